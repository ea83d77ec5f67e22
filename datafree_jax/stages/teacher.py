"""Stage 'teacher': supervised training of the teacher, evaluation, checkpoint and BN statistics.

Checkpoints go to <workdir>/teacher/. The final checkpoint also holds the items 'teacher' (the
model variables that later stages load) and 'bn_stats' (see bn_stats.py). This stage reads the
training split; the data-free stages after it do not.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import optax

from datafree_jax import bn_stats as bn_stats_lib
from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import input_pipeline
from datafree_jax import log
from datafree_jax import loop
from datafree_jax import losses
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax import stage as stage_lib

STAGE_SALT = 1


class TeacherError(RuntimeError):
  pass


def directory(workdir: str) -> str:
  return os.path.join(workdir, "teacher")


def supervised_loss(model, params, batch_stats, images, labels):
  """Cross-entropy of the model in training mode: (loss, (logits, new batch_stats))."""
  logits, upd = model.apply(common.variables_of(params, batch_stats), images, train=True,
                            mutable=["batch_stats"])
  return losses.cross_entropy(logits, labels), (logits, upd.get("batch_stats", {}))


def train_step(model, tx, aug: dict, seed: int, state, batch):
  """One supervised step on cross-entropy, images randomly shifted (and flipped)."""
  images, labels = batch
  key = common.step_key(seed, STAGE_SALT, state["step"])
  images = common.random_shift(key, images, **aug)
  (loss, (logits, new_bs)), grads = jax.value_and_grad(supervised_loss, argnums=1, has_aux=True)(
      model, state["params"], state["batch_stats"], images, labels)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new = {"params": optax.apply_updates(state["params"], updates), "batch_stats": new_bs,
         "opt_state": opt_state, "step": state["step"] + 1}
  return new, {"loss": loss, "accuracy": losses.accuracy(logits, labels),
               "grad_norm": optax.tree.norm(grads)}


class Teacher(stage_lib.Stage):
  """Trains the teacher; once finished, publishes the frozen teacher as ctx.teacher
  ({'model', 'variables', 'bn_stats', 'meta'})."""
  name = "teacher"
  selector = "teacher"

  def check(self, config, info):
    parallel.check_global_batch(config.teacher.batch_size)

  def finished(self, config, step, meta):
    """A finished teacher is used as it is, whatever teacher.steps says now: one teacher is
    trained once and then serves many runs."""
    return bool(meta.get("done"))

  def steps(self, config):
    return 0 if config.teacher.init_from else config.teacher.steps

  def identity(self, ctx):
    return {"model": ctx.config.teacher.model, "num_classes": ctx.info.num_classes,
            "image_shape": list(ctx.info.image_shape)}

  def check_checkpoint(self, ctx, saved, d):
    _check_meta(saved, ctx.config.teacher, ctx.info, d)

  def prepare(self, ctx, finished):
    if finished:
      ctx.teacher = load(ctx.config, ctx.workdir, ctx.info)  # Its arrays are known intact.
      return
    _ = ctx.data["train"]
    if ctx.config.teacher.init_from:
      ctx.outputs["teacher_init"] = load_variables(ctx.config, ctx.info)

  def plan(self, ctx):
    config, info = ctx.config, ctx.info
    cfg = config.teacher
    mesh = parallel.make_mesh("data")
    model, tx, step_jit = _build(config, info, mesh)
    if cfg.init_from:
      start = ctx.outputs.pop("teacher_init", None) or load_variables(config, info)
      params, batch_stats = start["params"], start["batch_stats"]
      log.info(f"teacher: starting from {cfg.init_from} (no training; evaluation and BN "
               "statistics)")
    else:
      params, batch_stats = common.init_model(model, jax.random.key(config.seed),
                                              info.image_shape)
    state = parallel.put_replicated(
        {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
         "step": jnp.zeros((), jnp.int32)}, mesh)
    train = ctx.data["train"]
    local = train.train_batches(parallel.check_global_batch(cfg.batch_size), config.seed)

    def final_items(state):
      if isinstance(train, input_pipeline.Dataset):
        stats = bn_stats_lib.compute(
            model, state["params"], state["batch_stats"],
            input_pipeline.class_examples(train, cfg.bn_stats_per_class, config.seed))
      else:  # streamed: per-class running sums over one pass
        stats = bn_stats_lib.compute_streaming(
            model, state["params"], state["batch_stats"],
            train.class_batches(loop.eval_local_batch(), cfg.bn_stats_per_class),
            info.num_classes, mesh)
      items = {"teacher": {"params": state["params"], "batch_stats": state["batch_stats"]}}
      if stats:
        items["bn_stats"] = stats
      return items

    return stage_lib.Plan(
        state=state, step=step_jit,
        batches=lambda step: parallel.global_batch(local(step), mesh), evaluate=common.make_classifier_eval(model, lambda s: s, ctx.data, mesh),
        eval_every=cfg.eval_every, meta={"dataset": info.name}, final_items=final_items)

  def programs(self, ctx):
    """The training step from abstract state and batch; publishes the abstract frozen teacher
    (variables and BN statistics as ShapeDtypeStructs) as ctx.teacher."""
    from datafree_jax import dry_run  # pylint: disable=g-import-not-at-top
    config, info = ctx.config, ctx.info
    cfg = config.teacher
    mesh = parallel.make_mesh("data")
    model, tx, step_jit = _build(config, info, mesh)
    rep, split = parallel.replicated(mesh), parallel.split_leading(mesh)
    params, batch_stats = jax.eval_shape(
        lambda: common.init_model(model, jax.random.key(0), info.image_shape))
    state = ckpt_lib.abstract_like({"params": params, "batch_stats": batch_stats,
                                    "opt_state": jax.eval_shape(tx.init, params),
                                    "step": jax.ShapeDtypeStruct((), jnp.int32)}, rep)
    b = cfg.batch_size
    batch = dry_run.abstract_batch(b, info.image_shape, split)
    stats = {}
    if batch_stats:
      k = info.num_classes
      stats = {"global": batch_stats,
               "class": jax.tree.map(lambda x: jax.ShapeDtypeStruct((k,) + x.shape, x.dtype),
                                     batch_stats),
               "class_counts": jax.ShapeDtypeStruct((k,), jnp.int32)}
    variables = common.variables_of(params, batch_stats)
    ctx.teacher = dry_run.teacher_like(model, ckpt_lib.abstract_like(variables, rep),
                                       ckpt_lib.abstract_like(stats, rep), cfg.model)
    return [dry_run.Program(f"train step, batch {b}", step_jit, (state, batch), state=state,
                            steps=cfg.steps)]

  def summarize(self, ctx, done):
    if ctx.teacher is None:
      ctx.teacher = load(ctx.config, ctx.workdir, ctx.info)
    return {"teacher": {"model": ctx.config.teacher.model,
                        "test_accuracy": done.eval.get("accuracy"),
                        "checkpoint": done.directory}}


STAGE = Teacher()


def _build(config, info, mesh):
  """(model, optimiser, jitted train step) of the teacher stage."""
  cfg = config.teacher
  model = models.get_classifier(cfg.model, info.num_classes, cfg.width,
                                 common.compute_dtype(config))
  tx = common.make_optimizer(cfg, cfg.steps)
  rep = parallel.replicated(mesh)
  step_jit = jax.jit(functools.partial(train_step, model, tx, common.augmentation(cfg, info),
                                       config.seed),
                     out_shardings=(rep, rep), donate_argnums=(0,))
  return model, tx, step_jit


def _check_meta(meta: dict, cfg, info, d: str):
  if meta.get("model") != cfg.model:
    raise TeacherError(f"the teacher in {d} is a {meta.get('model')!r} but the config says "
                       f"teacher.model={cfg.model!r}")
  if info is not None:
    if meta.get("num_classes") != info.num_classes or tuple(meta.get("image_shape", ())) != tuple(
        info.image_shape):
      raise TeacherError(
          f"the teacher in {d} was made for {meta.get('num_classes')} classes of "
          f"{tuple(meta.get('image_shape', ()))} images, but dataset {info.name!r} has "
          f"{info.num_classes} classes of {tuple(info.image_shape)} images")


def load_variables(config, info) -> dict:
  """{'params', 'batch_stats'} of the teacher in config.teacher.init_from (the 'teacher' item
  of its latest checkpoint), restored into config.teacher.model's shapes; raises TeacherError
  when there is none, CheckpointError when it does not fit the model."""
  cfg = config.teacher
  d = ckpt_lib.stage_directory(cfg.init_from, "teacher")
  if not os.path.isdir(d):
    raise TeacherError(f"teacher.init_from={cfg.init_from!r}: no such directory")
  ckpt = ckpt_lib.StageCheckpoints(d, create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise TeacherError(f"teacher.init_from={cfg.init_from!r}: no checkpoint in {d}")
    model = models.get_classifier(cfg.model, info.num_classes, cfg.width)
    params, batch_stats = jax.eval_shape(
        lambda: common.init_model(model, jax.random.key(0), info.image_shape))
    rep = parallel.replicated(parallel.make_mesh("data"))
    return ckpt.restore(step, "teacher", ckpt_lib.abstract_like(
        {"params": params, "batch_stats": batch_stats}, rep))
  finally:
    ckpt.close()


def load(config, workdir: str, info=None) -> dict:
  """The finished teacher of `workdir`, checked against the config and dataset."""
  cfg = config.teacher
  d = directory(workdir)
  if not os.path.isdir(d):
    raise TeacherError(f"no teacher checkpoint in {d}; run the teacher stage first "
                       f"(--config=...:stage=teacher or stage=all)")
  ckpt = ckpt_lib.StageCheckpoints(d, create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise TeacherError(f"no teacher checkpoint in {d}; run the teacher stage first")
    meta = ckpt.restore_meta(step)
    if not meta.get("done"):
      raise TeacherError(f"the teacher in {d} is unfinished (step {step} of "
                         f"{meta.get('total_steps')}); run the teacher stage again to finish it")
    _check_meta(meta, cfg, info, d)
    model = models.get_classifier(cfg.model, meta["num_classes"], cfg.width,
                                  common.compute_dtype(config))
    rep = parallel.replicated(parallel.make_mesh("data"))
    params, batch_stats = jax.eval_shape(
        lambda: common.init_model(model, jax.random.key(0), meta["image_shape"]))
    variables = ckpt.restore(step, "teacher", ckpt_lib.abstract_like(
        {"params": params, "batch_stats": batch_stats}, rep))
    stats = {}
    if variables["batch_stats"]:
      stats = ckpt.restore(step, "bn_stats",
                           ckpt_lib.abstract_like(ckpt.item_shapes(step, "bn_stats"), rep))
  finally:
    ckpt.close()
  return {"model": model, "variables": common.variables_of(variables["params"],
                                                            variables["batch_stats"]),
          "bn_stats": stats, "meta": meta}


def train(config, workdir: str, data, writer=None) -> dict:
  """Runs the teacher stage alone (resumes or loads it); returns the frozen teacher."""
  ctx = stage_lib.Context(config=config, workdir=workdir, data=data, info=data["test"].info,
                          writer=writer)
  stage_lib.run(STAGE, ctx)
  return ctx.teacher
