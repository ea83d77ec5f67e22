"""The pipeline: `train_and_evaluate(config, workdir)` runs the stages a config asks for.

A method (registry.Method; the built-in ones in methods.py) is the teacher stage followed by
the method's own stages. Each stage resumes from its own checkpoint directory under `workdir`;
a finished stage is loaded, not rerun. `config.stage` runs them all ('all'), only 'teacher',
only what comes after it ('train'), or one stage by its selector (method ensemble:
'generators', or 'distill' from the generator checkpoint in config.generator_checkpoint,
default <workdir>/generators; for kd_data/kd_noise 'distill' is the same as 'train').
"""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

import jax

from datafree_jax import config_lib
from datafree_jax import datasets
from datafree_jax import dry_run
from datafree_jax import errors
from datafree_jax import input_pipeline
from datafree_jax import log
from datafree_jax import loop
from datafree_jax import methods  # pylint: disable=unused-import (registers the built-ins)
from datafree_jax import paths
from datafree_jax import plots
from datafree_jax import registry
from datafree_jax import stage as stage_lib


def method_stages(method: str) -> tuple:
  """The stages of `method`, teacher first."""
  return registry.get(method).stages


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
    owners = sorted(m.name for m in registry.METHODS.values()
                    if any(s.selector == config.stage for s in m.stages[1:]))
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
  info = datasets.config_info(config)
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
                               datasets.config_info(config), config.data_threads or None)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the pipeline; returns a summary dict (also written to <workdir>/results.json)."""
  # Everything that can be checked is checked before anything is written: a run that fails
  # here leaves the workdir as it was.
  validate(config)
  t0 = time.time()
  workdir = paths.resolve(workdir)
  check_workdir(config, workdir)
  stages = stages_to_run(config)
  ctx = stage_lib.Context(config=config, workdir=workdir, data=load_data(config),
                          info=datasets.config_info(config),
                          running=tuple(s.name for s in stages))
  summary = {"config": config.to_dict(), "workdir": workdir}
  teacher = registry.get(config.method).teacher
  if teacher not in stages:  # Continues from the finished teacher of the workdir.
    ctx.teacher = teacher.load(ctx)
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
                 f"{stage_lib.directory(ctx, teacher)}, TensorBoard logs "
                 f"{paths.join(workdir, 'tensorboard')}")
  finally:
    ctx.writer.close()
  summary["plots"] = plots.write_plots(workdir, event_dir=ctx.writer.local_dir,
                                       image_stages=registry.get(config.method).image_stages)
  summary["seconds"] = time.time() - t0
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "results.json"), json.dumps(summary, indent=1))
  return summary


def main_entry(config, workdir: str, debug: bool = False) -> int:
  """CLI body: runs the pipeline, prints where the results are; returns the exit code (with
  config.dry_run: the sizing dry run instead, which writes nothing)."""
  try:
    if config.get("dry_run"):
      validate(config)
      return dry_run.main(config, stages_to_run(config), datasets.config_info(config),
                          registry.get(config.method).teacher)
    summary = train_and_evaluate(config, workdir)
  except loop.Preempted as e:
    print(str(e), file=sys.stderr, flush=True)
    return 143
  except errors.USER_ERRORS as e:
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
  for name, entry in s.items():  # the entries of the method's other stages (Stage.summarize)
    if name in ("teacher", "student") or not isinstance(entry, dict) or "checkpoint" not in entry:
      continue
    facts = [f"{k} {v}" for k, v in entry.items()
             if k not in ("checkpoint", "eval") and isinstance(v, (int, float, str))]
    facts += [f"{k} {v:.4f}" for k, v in (entry.get("eval") or {}).items()
              if isinstance(v, (int, float))]
    lines.append(f"{name}: " + ", ".join(facts))
    lines.append(f"  checkpoint: {paths.resolve(entry['checkpoint'])}")
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
