"""The stage interface, and `run`, the one function that runs any stage.

A method (registry.Method) is the teacher stage followed by the method's own stages. A stage is
an object with:

    name          its checkpoint directory under the workdir; the name in logs and summaries
    selector      what `config.stage` names to run this stage alone ('' = never alone)
    check(config, info)           raises ConfigError for what this stage cannot run; called for
                                  every stage of the method before anything is written
    steps(config)                 how many steps the stage takes
    finished(config, step, meta)  whether a checkpoint ends the stage (default: marked done
                                  and at least steps(config) steps)
    identity(ctx)                 what an existing checkpoint of the stage must have been made
                                  for (model, image shape, ...): saved with every checkpoint and
                                  compared before a run resumes or loads one
    prepare(ctx, finished)        reads what the stage will need (data splits, checkpoints of
                                  other runs) before anything is written; `finished`: its own
                                  checkpoint in the workdir already ends it
    plan(ctx) -> Plan             the initial state, the jitted step, batches, evaluation
    programs(ctx)                 every device program the stage runs (train step, evaluation,
                                  sampling) with abstract inputs, and its checkpoint restore,
                                  as `Program`s, for the sizing dry run (dry_run.py)
    summarize(ctx, done) -> dict  the stage's entries of the run's summary, once it has
                                  finished (now or in an earlier run); the teacher stage also
                                  publishes the frozen teacher there (ctx.teacher)

`run(stage, ctx)` does the rest, the same way for every stage: a finished checkpoint is loaded,
not rerun; an unfinished one is resumed; otherwise the stage starts. The loop (loop.run) saves
periodic checkpoints, answers SIGTERM with a checkpoint and exit code 143, stops on a
non-finite metric, evaluates and logs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import evaluation
from datafree_jax import log
from datafree_jax import loop
from datafree_jax import paths


@dataclasses.dataclass
class Program:
  """One device program of a stage with abstract arguments (Stage.programs), for the dry run.

  kind: 'train' (the step the loop runs), 'eval' (evaluation or sampling), 'restore' (reading
  the stage's checkpoint: fn None, its memory is `state`)."""
  label: str                 # what the program is, e.g. "train step, batch 1024"
  fn: Any                    # the jax.jit-wrapped function the stage runs (None: restore)
  args: tuple = ()           # jax.ShapeDtypeStruct pytrees (with shardings), or None
  kwargs: dict = dataclasses.field(default_factory=dict)
  state: Any = None          # the abstract state of the stage, for its bytes per device
  trips: int = 1             # how often XLA's once-counted loop body runs in one call
  steps: int = 0             # calls over the stage (train: its steps), for hours
  note: str = ""
  kind: str = "train"
  checkpoint: Optional[dict] = None   # restore: {'periodic'|'final': {item: abstract tree}}


def abstract_batch(batch_size: int, image_shape, sharding, image_dtype=np.float32) -> tuple:
  """A training batch (images of image_dtype, labels int32) as ShapeDtypeStructs with
  `sharding`. A stage's training batch: image_dtype input_pipeline.train_image_dtype(info)
  (uint8 for streamed datasets)."""
  return (jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), image_dtype,
                               sharding=sharding),
          jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=sharding))


def abstract_teacher(model, variables, bn_stats, model_name: str) -> dict:
  """The abstract frozen teacher a dry run hands later stages (like the teacher stage's)."""
  return {"model": model, "variables": variables, "bn_stats": bn_stats,
          "meta": {"model": model_name}}


def classifier_eval_program(name: str, model, variables, info, mesh) -> Program:
  """The evaluation program of a classifier (evaluation.evaluate_batches' jitted batch function) on
  abstract `variables` and one evaluation batch of `info`'s images."""
  n = evaluation.eval_local_batch() * jax.process_count()
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names[0]))
  x, y = abstract_batch(n, info.image_shape, split)
  mask = jax.ShapeDtypeStruct((n,), np.float32, sharding=split)
  fn = evaluation.eval_batch_fn(evaluation.classifier_logits(model))
  return Program(f"{name} evaluation, batch {n}", fn, (variables, x, y, mask), kind="eval")


def cost_flops(cost) -> float:
  """FLOPs of an XLA cost analysis (`Lowered.cost_analysis()` or `Compiled.cost_analysis()`:
  a dict, or in older jax a list of one dict per program)."""
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def restore_program(name: str, state, saved_state=None, final_items: Optional[Mapping] = None,
                    final_state_item: Optional[str] = None) -> Program:
  """Reading the stage's checkpoint: its abstract `state` materialised on the devices.
  `saved_state` (default `state`) is the train state its checkpoints hold, `final_items` and
  `final_state_item` the final checkpoint's items as in its Plan, abstract: the dry run sizes
  the periodic and the final checkpoint (checkpoints.checkpoint_items)."""
  saved_state = state if saved_state is None else saved_state
  checkpoint = {"periodic": ckpt_lib.checkpoint_items(saved_state),
                "final": ckpt_lib.checkpoint_items(saved_state, final_items, final_state_item)}
  return Program(f"{name} checkpoint restore", None, state=state, kind="restore",
                 checkpoint=checkpoint)


@dataclasses.dataclass
class Context:
  """What the stages of one run share."""
  config: Any                      # the run's ml_collections.ConfigDict
  workdir: str
  data: Any                        # input_pipeline.Splits: each split read on first use
  info: Any                        # datasets.DatasetInfo of config.dataset
  writer: Any = None               # TensorBoard writer (log.LazyWriter) or None
  teacher: Optional[dict] = None   # the frozen teacher, once the teacher stage has finished
  running: tuple = ()              # names of the stages this run runs
  outputs: dict = dataclasses.field(default_factory=dict)  # what stages hand later ones


@dataclasses.dataclass
class Plan:
  """What a stage hands the loop (see loop.run for how each part is used)."""
  state: Any                                   # pytree of placed arrays; the restore target
  step: Callable                               # (state, batch) -> (state, metrics)
  batches: Optional[Callable[[int], Any]] = None   # step -> host batch; a pure function
  evaluate: Optional[Callable[[Any], Mapping[str, float]]] = None
  eval_every: int = 0
  meta: dict = dataclasses.field(default_factory=dict)  # saved with every checkpoint
  resume_keys: tuple = ()   # keys of `meta` an unfinished checkpoint must match to be resumed
  final_items: Optional[Callable[[Any], Mapping]] = None  # extra items of the final checkpoint
  # The final item that holds part of the state (keyed like it): the final checkpoint then
  # keeps the rest as its deletable 'resume' item, not a whole 'state' (checkpoints.py).
  final_state_item: Optional[str] = None
  on_eval: Optional[Callable[[Any, int], None]] = None    # beside each evaluation (grids)
  checkpoint_every: Optional[int] = None  # steps between checkpoints (None: the config's)


@dataclasses.dataclass
class Done:
  """A finished stage: its checkpoint and final numbers."""
  directory: str
  step: int
  eval: dict
  meta: dict
  state: Any = None   # the final state when it ran in this process; None when loaded
  summary: Optional[dict] = None  # the stage's summary entries (run_alone)


class Stage:
  """Base class with the defaults; a stage overrides what it needs."""
  name = ""
  selector = ""

  def check(self, config, info) -> None:
    pass

  def steps(self, config) -> int:
    raise NotImplementedError

  def finished(self, config, step: int, meta: dict) -> bool:
    """Whether a checkpoint (`step`, `meta`) ends the stage; else it is resumed (a finished
    stage whose config now asks for more steps continues to them)."""
    return bool(meta.get("done")) and step >= self.steps(config)

  def identity(self, ctx) -> dict:
    return {}

  def check_checkpoint(self, ctx, saved: dict, directory: str) -> None:
    """Raises CheckpointError when a checkpoint's meta `saved` does not match identity(ctx)."""
    for key, value in self.identity(ctx).items():
      if key in saved and saved[key] != value:
        raise ckpt_lib.CheckpointError(
            f"the {self.name} checkpoint in {directory} was made for {key}={saved[key]!r} but "
            f"this run has {key}={value!r}; use another workdir or the same config")

  def resume_hint(self, key: str, saved: dict) -> str:  # pylint: disable=unused-argument
    """Text added to the error of a checkpoint whose resume key `key` differs."""
    return ""

  def prepare(self, ctx, finished: bool) -> None:  # pylint: disable=unused-argument
    pass

  def plan(self, ctx) -> Plan:
    raise NotImplementedError

  def summarize(self, ctx, done: Done) -> dict:
    return {self.name: {"steps": done.step, "eval": done.eval, "checkpoint": done.directory}}

  def programs(self, ctx) -> list:
    """The stage's jitted step(s) with abstract inputs (stage.Program), for the sizing dry
    run: nothing materialised, read or written. ctx.teacher is the abstract frozen teacher."""
    raise NotImplementedError(f"stage {self.name!r} has no dry run")


def directory(ctx, stage: Stage) -> str:
  return paths.join(ctx.workdir, stage.name)


def saved_meta(ctx, stage: Stage) -> tuple[Optional[int], Optional[dict]]:
  """(step, meta) of the stage's latest checkpoint in the workdir, (None, None) if none; the
  meta checked against the stage's identity. Reads only."""
  d = directory(ctx, stage)
  step, meta = ckpt_lib.latest_meta(d)
  if meta is not None:
    stage.check_checkpoint(ctx, meta, d)
  return step, meta


def is_finished(ctx, stage: Stage, step: Optional[int], meta: Optional[dict]) -> bool:
  return meta is not None and stage.finished(ctx.config, step, meta)


def run(stage: Stage, ctx) -> dict:
  """Runs (or resumes, or loads) `stage`; returns stage.summarize's summary entries."""
  d = directory(ctx, stage)
  step, meta = saved_meta(ctx, stage)
  if is_finished(ctx, stage, step, meta):
    log.info(f"{stage.name}: finished earlier at step {step}; loaded from {d}")
    done = Done(d, step, meta.get("eval", {}), meta)
    ctx.outputs[stage.name] = done
    return stage.summarize(ctx, done)
  plan = stage.plan(ctx)
  meta_to_save = dict(plan.meta, **stage.identity(ctx))
  if meta is not None:
    for key in plan.resume_keys:
      if key in meta and meta[key] != plan.meta[key]:
        raise ckpt_lib.CheckpointError(
            f"the {stage.name} checkpoint in {d} has {key}={meta[key]!r} but this run has "
            f"{key}={plan.meta[key]!r}{stage.resume_hint(key, meta)}; use another workdir or "
            "the same config")
  total = stage.steps(ctx.config)
  ckpt = ckpt_lib.StageCheckpoints(d)
  try:
    result = loop.run(
        stage=stage.name, ckpt=ckpt, state=plan.state, step_fn=plan.step,
        total_steps=total, batch_fn=plan.batches, eval_fn=plan.evaluate,
        eval_every=plan.eval_every,
        checkpoint_every=(ctx.config.checkpoint_every if plan.checkpoint_every is None
                          else plan.checkpoint_every),
        writer=ctx.writer, meta=meta_to_save, final_extras=plan.final_items,
        log_every_secs=ctx.config.log_every_secs, on_eval=plan.on_eval,
        async_saves=ctx.config.get("checkpoint_async", True),
        preemption_save_secs=ctx.config.get("checkpoint_preemption_secs", 25.0),
        final_state_item=plan.final_state_item)
  finally:
    ckpt.close()
  done = Done(d, result.step, result.eval_metrics, meta_to_save, result.state)
  ctx.outputs[stage.name] = done
  return stage.summarize(ctx, done)


def run_alone(stage: Stage, config, workdir: str, *, data=None, info=None, teacher=None,
              writer=None, outputs: Optional[dict] = None) -> Done:
  """Runs (or resumes, or loads) one stage outside the pipeline, e.g. from a notebook or a
  test; returns its Done (with the final state when it ran here)."""
  ctx = Context(config=config, workdir=workdir, data=data,
                info=info if info is not None else data["test"].info, writer=writer,
                teacher=teacher, outputs=dict(outputs or {}))
  summary = run(stage, ctx)
  done = ctx.outputs[stage.name]
  done.summary = summary
  return done
