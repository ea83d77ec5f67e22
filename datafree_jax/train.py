"""The pipeline: `train_and_evaluate(config, workdir)` runs the stages a config asks for.

Every method is the teacher stage followed by the method's own stages (METHODS, the one table):

    method      stages run
    teacher     teacher
    dafl        teacher -> dafl (joint generator + student)
    ensemble    teacher -> generators (Luo et al.'s per-class ensemble) -> distill_generators
    kd_data     teacher -> distill_data (distill from the real training images: upper bound)
    kd_noise    teacher -> distill_noise (distill from N(0, 1) noise images: lower bound)

A stage is an object with the interface of stage.Stage; `register_method` adds a method from
outside the package. Each stage resumes from its own checkpoint directory under `workdir`; a
finished stage is loaded, not rerun. `config.stage` runs them all ('all'), only 'teacher', only
what comes after it ('train'), or one stage by its selector (method ensemble: 'generators', or
'distill' from the generator checkpoint in config.generator_checkpoint, default
<workdir>/generators; for kd_data/kd_noise 'distill' is the same as 'train').
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import config_lib
from datafree_jax import input_pipeline
from datafree_jax import log
from datafree_jax import loop
from datafree_jax import paths
from datafree_jax import plots
from datafree_jax import stage as stage_lib
from datafree_jax.stages import dafl
from datafree_jax.stages import distill
from datafree_jax.stages import ensemble
from datafree_jax.stages import teacher as teacher_stage

TEACHER = teacher_stage.STAGE
# method -> its stages in the order they run; the first is the teacher stage, which publishes
# the frozen teacher (Context.teacher) that the others use.
METHODS: dict[str, tuple] = {
    "teacher": (TEACHER,),
    "dafl": (TEACHER, dafl.STAGE),
    "ensemble": (TEACHER, ensemble.GENERATORS, ensemble.DISTILL),
    "kd_data": (TEACHER, distill.DATA),
    "kd_noise": (TEACHER, distill.NOISE),
}


def register_method(name: str, stages, config_sections: dict | None = None):
  """Adds method `name` that runs `stages` (stage.Stage objects, the teacher stage first, e.g.
  train.TEACHER). `config_sections` ({section: {field: (default, config_lib.Domain)}}) adds
  the method's own config sections to the schema, with their defaults (config_lib.base_config
  then has them)."""
  for section, fields in (config_sections or {}).items():
    config_lib.register_section(section, fields)
  METHODS[name] = tuple(stages)


def method_stages(method: str) -> tuple:
  """The stages of `method`, teacher first."""
  return METHODS[method]


def stage_selectors() -> list:
  """What config.stage may say: all, teacher, train and every registered stage's selector."""
  return ["all", "teacher", "train"] + sorted(
      {s.selector for stages in METHODS.values() for s in stages[1:] if s.selector})


def stages_to_run(config) -> tuple:
  """The stages this config runs (config.stage of config.method); raises ConfigError."""
  stages = method_stages(config.method)
  if config.stage == "all":
    return stages
  if config.stage == "teacher":
    return stages[:1]
  if config.stage == "train":
    return stages[1:]
  chosen = tuple(s for s in stages[1:] if s.selector == config.stage)
  if not chosen:
    owners = sorted(m for m, st in METHODS.items()
                    if any(s.selector == config.stage for s in st[1:]))
    raise config_lib.ConfigError(
        f"stage {config.stage!r} does not apply to method {config.method!r}; it is a stage of "
        + " and ".join(owners) + " (use stage=all, teacher or train)")
  return chosen


def validate(config):
  """Checks the config before anything is written; raises ConfigError.

  Every field against its domain (config_lib.SCHEMA), then each stage that will run checks
  what depends on several fields (Stage.check).
  """
  config_lib.check_config(config)
  info = input_pipeline.config_info(config)
  for s in stages_to_run(config):
    s.check(config, info)


def check_workdir(config, workdir: str):
  """Raises ConfigError when `workdir` cannot hold this run's results (checked before writing).

  Stages that continue an earlier run (stage=train, generators, distill) need the workdir with
  its teacher; stage=all and stage=teacher create it. A remote workdir (gs://...) is checked by
  writing a probe object there (and removing it).
  """
  path = paths.resolve(workdir)
  if paths.exists(path):
    if not paths.isdir(path):
      raise config_lib.ConfigError(f"workdir {path} exists and is not a directory")
    if not paths.writable(path):
      raise config_lib.ConfigError(f"workdir {path} is not writable")
    return
  if config.stage not in ("all", "teacher"):
    raise config_lib.ConfigError(
        f"workdir {path} does not exist; stage={config.stage!r} continues from the teacher of "
        "an earlier run in that workdir (run stage=all or stage=teacher there first, or fix "
        "--workdir)")
  if paths.is_remote(path):
    if not paths.writable(path):
      raise config_lib.ConfigError(
          f"cannot write to workdir {path} (does the bucket exist, and may this account write "
          "to it?)")
    return
  parent = paths.parent(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise config_lib.ConfigError(f"cannot create workdir {path}: {parent} is not a directory")
  if not paths.writable(parent):
    raise config_lib.ConfigError(f"cannot create workdir {path}: {parent} is not writable")


def load_data(config) -> input_pipeline.Splits:
  """The dataset's splits, each read on first use."""
  return input_pipeline.Splits(config.dataset, config.data_dir or None,
                               input_pipeline.config_info(config))


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the pipeline; returns a summary dict (also written to <workdir>/results.json)."""
  import jax  # pylint: disable=g-import-not-at-top

  # Everything that can be checked is checked before anything is written: a run that fails
  # here leaves the workdir as it was.
  validate(config)
  t0 = time.time()
  workdir = paths.resolve(workdir)
  check_workdir(config, workdir)
  stages = stages_to_run(config)
  ctx = stage_lib.Context(config=config, workdir=workdir, data=load_data(config),
                          info=input_pipeline.config_info(config),
                          running=tuple(s.name for s in stages))
  summary = {"config": config.to_dict(), "workdir": workdir}
  teacher = method_stages(config.method)[0]
  if teacher not in stages:  # Continues from the finished teacher of the workdir.
    ctx.teacher = teacher_stage.load(config, workdir, ctx.info)
    meta = ctx.teacher["meta"]
    summary.update(teacher.summarize(ctx, stage_lib.Done(
        stage_lib.directory(ctx, teacher), meta["step"], meta.get("eval", {}), meta)))
  for s in stages:
    step, meta = stage_lib.saved_meta(ctx, s)  # An existing checkpoint must be this config's.
    s.prepare(ctx, stage_lib.is_finished(ctx, s, step, meta))

  if jax.process_index() == 0:
    paths.makedirs(workdir)
  ctx.writer = log.LazyWriter(paths.join(workdir, "tensorboard"))
  try:
    for s in stages:
      summary.update(stage_lib.run(s, ctx))
      if s is teacher and len(stages) > 1:
        acc = summary["teacher"]["test_accuracy"]
        log.info(f"teacher {config.teacher.model}: test accuracy "
                 f"{acc if acc is None else format(acc, '.4f')}, checkpoint "
                 f"{teacher_stage.directory(workdir)}, TensorBoard logs "
                 f"{paths.join(workdir, 'tensorboard')}")
  finally:
    ctx.writer.close()
  summary["plots"] = plots.write_plots(workdir, event_dir=ctx.writer.local_dir)
  summary["seconds"] = time.time() - t0
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "results.json"), json.dumps(summary, indent=1))
  return summary


# Errors that mean "the user must change something": one line on stderr, no traceback.
def _user_errors():
  from datafree_jax import models  # pylint: disable=g-import-not-at-top
  errors = [config_lib.ConfigError, input_pipeline.UnknownDatasetError, models.UnknownModelError,
            ckpt_lib.CheckpointError, teacher_stage.TeacherError, loop.NonFiniteError]
  try:
    from datafree_jax import tfds_pipeline  # pylint: disable=g-import-not-at-top
    errors.append(tfds_pipeline.DatasetNotPreparedError)
  except ImportError:
    pass
  return tuple(errors)


def main_entry(config, workdir: str, debug: bool = False) -> int:
  """CLI body: runs the pipeline, prints where the results are; returns the exit code (with
  config.dry_run: the sizing dry run instead, which writes nothing)."""
  try:
    if config.get("dry_run"):
      from datafree_jax import dry_run  # pylint: disable=g-import-not-at-top
      validate(config)
      return dry_run.main(config, stages_to_run(config), input_pipeline.config_info(config))
    summary = train_and_evaluate(config, workdir)
  except loop.Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    return 143
  except _user_errors() as e:
    if debug:
      traceback.print_exc()
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  log.info(_summary_text(summary))
  return 0


def _summary_text(s: dict) -> str:
  lines = ["", "=== done in " + log.format_seconds(s["seconds"])]
  t = s.get("teacher")
  if t:
    acc = t["test_accuracy"]
    lines.append(f"teacher {t['model']}: test accuracy {acc:.4f}" if acc is not None else
                 f"teacher {t['model']}")
    lines.append(f"  checkpoint: {paths.resolve(t['checkpoint'])}")
  g = s.get("generators")
  if g:
    lines.append(f"generators: {g['num_generators']} after {g['steps']} steps" + "".join(
        f", {k} {v:.4f}" for k, v in g["eval"].items()))
    lines.append(f"  checkpoint: {paths.resolve(g['checkpoint'])}")
  st = s.get("student")
  if st:
    lines.append(f"student {st['model']}: final test accuracy {st['test_accuracy']:.4f} after "
                 f"{st['steps']} steps")
    lines.append(f"  checkpoint: {paths.resolve(st['checkpoint'])}")
  lines.append(f"TensorBoard logs: {paths.join(s['workdir'], 'tensorboard')}  "
               f"(tensorboard --logdir {paths.join(s['workdir'], 'tensorboard')})")
  if s.get("plots"):
    lines.append("plots:")
    lines.extend(f"  {p}" for p in s["plots"])
  lines.append(f"summary: {paths.join(s['workdir'], 'results.json')}")
  return "\n".join(lines)
