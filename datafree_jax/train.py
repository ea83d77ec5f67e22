"""The pipeline: `train_and_evaluate(config, workdir)` runs the stages a config asks for.

    method      stages run
    teacher     teacher
    dafl        teacher -> dafl (joint generator + student)
    ensemble    teacher -> generators (Luo et al.'s per-class ensemble) -> distill from them
    kd_data     teacher -> distill from the real training images (baseline, upper bound)
    kd_noise    teacher -> distill from N(0, 1) noise images (baseline, lower bound)

Each stage resumes from its own checkpoint directory under `workdir`; a finished stage is
loaded, not rerun. `config.stage` runs them all ('all'), only 'teacher', only what comes after
it ('train'), or, for method ensemble, only 'generators' or only 'distill' (from the generator
checkpoint in config.generator_checkpoint, default <workdir>/generators; for kd_data/kd_noise
'distill' is the same as 'train').
"""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
import traceback

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import config_lib
from datafree_jax import input_pipeline
from datafree_jax import log
from datafree_jax import loop

METHODS = config_lib.METHODS
STAGES = config_lib.STAGES
# The stage directories each method writes under the workdir, in the order they run.
METHOD_STAGES = {"teacher": ("teacher",), "dafl": ("teacher", "dafl"),
                 "ensemble": ("teacher", "generators", "distill_generators"),
                 "kd_data": ("teacher", "distill_data"), "kd_noise": ("teacher", "distill_noise")}
# The stages of each method after the teacher that `config.stage` may name on their own.
_OWN_STAGES = {"ensemble": ("generators", "distill"), "kd_data": ("distill",),
               "kd_noise": ("distill",)}


def validate(config):
  """Checks the config before anything is written; raises ConfigError.

  Every field against its domain (config_lib.SCHEMA), then what depends on several fields.
  """
  config_lib.check_config(config)
  info = input_pipeline.dataset_info(config.dataset)
  if config.stage in ("generators", "distill") and config.stage not in _OWN_STAGES.get(
      config.method, ()):
    raise config_lib.ConfigError(
        f"stage {config.stage!r} does not apply to method {config.method!r}; it is a stage of "
        + " and ".join(sorted(m for m, st in _OWN_STAGES.items() if config.stage in st))
        + " (use stage=all, teacher or train)")
  ups = config.generator.num_upsample
  if info.image_size % 2**ups:
    largest = int(math.log2(info.image_size & -info.image_size))
    raise config_lib.ConfigError(
        f"generator.num_upsample={ups} does not fit the {info.image_size}x{info.image_size} "
        f"images of dataset {config.dataset!r}: the image size must be a multiple of 2^{ups} "
        f"(use num_upsample <= {largest})")
  if config.method == "ensemble":
    import jax  # pylint: disable=g-import-not-at-top
    from datafree_jax import models  # pylint: disable=g-import-not-at-top
    from datafree_jax.stages import ensemble  # pylint: disable=g-import-not-at-top
    teacher = models.get_classifier(config.teacher.model, info.num_classes,
                                    config.teacher.get("width", 0))
    shapes = jax.eval_shape(lambda: teacher.init(
        jax.random.key(0), jax.numpy.zeros((1,) + info.image_shape), train=False))
    ensemble.validate(config, teacher_has_bn=bool(shapes.get("batch_stats")))
  from datafree_jax import parallel  # pylint: disable=g-import-not-at-top
  if config.stage in ("all", "teacher"):
    parallel.check_global_batch(config.teacher.batch_size)
  if config.method != "teacher" and config.stage not in ("teacher", "generators"):
    parallel.check_global_batch(config.student.batch_size)


def check_workdir(config, workdir: str):
  """Raises ConfigError when `workdir` cannot hold this run's results (checked before writing).

  Stages that continue an earlier run (stage=train, generators, distill) need the workdir with
  its teacher; stage=all and stage=teacher create it.
  """
  path = os.path.abspath(workdir)
  if os.path.exists(path):
    if not os.path.isdir(path):
      raise config_lib.ConfigError(f"workdir {path} exists and is not a directory")
    if not _writable(path):
      raise config_lib.ConfigError(f"workdir {path} is not writable")
    return
  if config.stage not in ("all", "teacher"):
    raise config_lib.ConfigError(
        f"workdir {path} does not exist; stage={config.stage!r} continues from the teacher of "
        "an earlier run in that workdir (run stage=all or stage=teacher there first, or fix "
        "--workdir)")
  parent = os.path.dirname(path)
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise config_lib.ConfigError(f"cannot create workdir {path}: {parent} is not a directory")
  if not _writable(parent):
    raise config_lib.ConfigError(f"cannot create workdir {path}: {parent} is not writable")


def _writable(directory: str) -> bool:
  """Whether a file can be created in `directory` (tried, then removed: permission bits do not
  tell for root, read-only mounts or ACLs)."""
  try:
    tempfile.TemporaryFile(dir=directory).close()
    return True
  except OSError:
    return False


def load_data(config) -> input_pipeline.Splits:
  """The dataset's splits, each read on first use."""
  return input_pipeline.Splits(config.dataset, config.data_dir or None)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the pipeline; returns a summary dict (also written to <workdir>/results.json)."""
  import jax  # pylint: disable=g-import-not-at-top
  from datafree_jax.stages import dafl, distill, ensemble, teacher as teacher_stage  # pylint: disable=g-import-not-at-top

  # Everything that can be checked is checked before anything is written: a run that fails
  # here leaves the workdir as it was.
  validate(config)
  t0 = time.time()
  check_workdir(config, workdir)
  data = load_data(config)
  info = data["test"].info
  if config.stage in ("all", "teacher"):
    teacher = teacher_stage.check_existing(config, workdir, info)
  else:
    teacher = teacher_stage.load(config, workdir, info)
  if teacher is None or config.method == "kd_data":
    _ = data["train"]  # Read now, before anything is written; the data-free stages never do.
  loaded_generators = None
  if config.method == "ensemble" and config.stage == "distill":
    loaded_generators = ensemble.load_generators(ensemble.checkpoint_to_distill(config, workdir),
                                                 info)

  os.makedirs(workdir, exist_ok=True)
  writer = log.LazyWriter(os.path.join(workdir, "tensorboard"))
  summary = {"config": config.to_dict(), "workdir": os.path.abspath(workdir)}
  try:
    if teacher is None:
      teacher = teacher_stage.train(config, workdir, data, writer)
    summary["teacher"] = {"model": config.teacher.model,
                          "test_accuracy": teacher["meta"]["eval"].get("accuracy"),
                          "checkpoint": teacher_stage.directory(workdir)}
    if config.method != "teacher" and config.stage != "teacher":
      acc = summary["teacher"]["test_accuracy"]
      log.info(f"teacher {config.teacher.model}: test accuracy "
               f"{acc if acc is None else format(acc, '.4f')}, checkpoint "
               f"{os.path.abspath(teacher_stage.directory(workdir))}, TensorBoard logs "
               f"{os.path.abspath(os.path.join(workdir, 'tensorboard'))}")
    if config.stage != "teacher" and config.method != "teacher":
      if config.method == "dafl":
        out = dafl.train(config, workdir, teacher, data, writer)
      elif config.method == "ensemble":
        out = None
        if config.stage != "distill":
          gens = ensemble.train_generators(config, workdir, teacher, data["test"].info, writer)
          summary["generators"] = {
              "num_generators": gens["num_generators"], "members": gens["members"],
              "steps": gens["result"].step, "eval": gens["result"].eval_metrics,
              "checkpoint": gens["directory"]}
        if config.stage != "generators":
          out = ensemble.distill_from_generators(config, workdir, teacher, data, writer,
                                                 gens=loaded_generators)
      else:
        source = {"kd_data": "data", "kd_noise": "noise"}[config.method]
        out = distill.train(config, workdir, teacher, data, writer, source)
      if out is not None:
        summary["student"] = {"model": config.student.model,
                              "test_accuracy": out["result"].eval_metrics.get("accuracy"),
                              "steps": out["result"].step, "checkpoint": out["directory"]}
  finally:
    writer.close()
  summary["seconds"] = time.time() - t0
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return summary


# Errors that mean "the user must change something": one line on stderr, no traceback.
def _user_errors():
  from datafree_jax import models  # pylint: disable=g-import-not-at-top
  from datafree_jax.stages import teacher as teacher_stage  # pylint: disable=g-import-not-at-top
  errors = [config_lib.ConfigError, input_pipeline.UnknownDatasetError, models.UnknownModelError,
            ckpt_lib.CheckpointError, teacher_stage.TeacherError, loop.NonFiniteError]
  try:
    from datafree_jax import tfds_pipeline  # pylint: disable=g-import-not-at-top
    errors.append(tfds_pipeline.DatasetNotPreparedError)
  except ImportError:
    pass
  return tuple(errors)


def main_entry(config, workdir: str, debug: bool = False) -> int:
  """CLI body: runs the pipeline, prints where the results are; returns the exit code."""
  try:
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
    lines.append(f"  checkpoint: {os.path.abspath(t['checkpoint'])}")
  g = s.get("generators")
  if g:
    lines.append(f"generators: {g['num_generators']} after {g['steps']} steps" + "".join(
        f", {k} {v:.4f}" for k, v in g["eval"].items()))
    lines.append(f"  checkpoint: {os.path.abspath(g['checkpoint'])}")
  st = s.get("student")
  if st:
    lines.append(f"student {st['model']}: final test accuracy {st['test_accuracy']:.4f} after "
                 f"{st['steps']} steps")
    lines.append(f"  checkpoint: {os.path.abspath(st['checkpoint'])}")
  lines.append(f"TensorBoard logs: {os.path.join(s['workdir'], 'tensorboard')}  "
               f"(tensorboard --logdir {os.path.join(s['workdir'], 'tensorboard')})")
  lines.append(f"summary: {os.path.join(s['workdir'], 'results.json')}")
  return "\n".join(lines)
