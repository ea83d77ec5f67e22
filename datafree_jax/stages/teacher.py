"""Stage 'teacher': supervised training of the teacher, evaluation, checkpoint and BN statistics.

Checkpoints go to <workdir>/teacher/. The final checkpoint also holds the items 'teacher' (the
model variables that later stages load) and 'bn_stats' (see bn_stats.py). Only this stage and
evaluation read a dataset.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from datafree_jax import bn_stats as bn_stats_lib
from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import input_pipeline
from datafree_jax import log
from datafree_jax import loop
from datafree_jax import losses
from datafree_jax import models
from datafree_jax import parallel

STAGE_SALT = 1


class TeacherError(RuntimeError):
  pass


def directory(workdir: str) -> str:
  return os.path.join(workdir, "teacher")


def _augment(cfg, info):
  fill = float((0.0 - info.mean[0]) / info.std[0]) if info.channels == 1 else 0.0
  return dict(pad=cfg.augment_shift, fill=fill, flip=bool(cfg.augment_flip))


def train(config, workdir: str, data: dict, writer) -> dict:
  """Trains (or resumes, or loads) the teacher; returns {'model','variables','bn_stats','meta'}."""
  cfg = config.teacher
  info = data["train"].info
  mesh = parallel.make_mesh("data")
  config_lib.check_positive("teacher.steps", cfg.steps)
  model = models.get_classifier(cfg.model, info.num_classes, cfg.get("width", 0))
  tx = common.make_optimizer(cfg, cfg.steps)
  params, batch_stats = common.init_model(model, jax.random.key(config.seed), info.image_shape)
  state = parallel.put_replicated(
      {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
       "step": jnp.zeros((), jnp.int32)}, mesh)
  aug = _augment(cfg, info)
  nan_at = config.get("debug_nan_at_step", -1)

  def step_fn(state, batch):
    images, labels = batch
    key = common.step_key(config.seed, STAGE_SALT, state["step"])
    images = common.random_shift(key, images, **aug)

    def loss_fn(p):
      logits, upd = model.apply(common.variables_of(p, state["batch_stats"]), images, train=True,
                                mutable=["batch_stats"])
      loss = loop.poison(losses.cross_entropy(logits, labels), state["step"], nan_at)
      return loss, (logits, upd.get("batch_stats", {}))
    (loss, (logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    new = {"params": optax.apply_updates(state["params"], updates), "batch_stats": new_bs,
           "opt_state": opt_state, "step": state["step"] + 1}
    return new, {"loss": loss, "accuracy": losses.accuracy(logits, labels),
                 "grad_norm": optax.tree.norm(grads)}

  rep = parallel.replicated(mesh)
  step_jit = jax.jit(step_fn, out_shardings=(rep, rep), donate_argnums=(0,))
  batches = input_pipeline.StepBatches(data["train"], parallel.check_global_batch(cfg.batch_size),
                                       config.seed)
  apply_logits = common.classifier_logits(model)
  test = data["test"]

  def eval_fn(state):
    return loop.evaluate_classifier(
        apply_logits, common.variables_of(state["params"], state["batch_stats"]),
        test.images, test.labels, mesh)

  meta = {"model": cfg.model, "num_classes": info.num_classes,
          "image_shape": list(info.image_shape), "dataset": info.name}

  def final_extras(state):
    stats = bn_stats_lib.compute(
        model, state["params"], state["batch_stats"],
        input_pipeline.class_examples(data["train"], cfg.bn_stats_per_class, config.seed))
    extras = {"teacher": {"params": state["params"], "batch_stats": state["batch_stats"]}}
    if stats:
      extras["bn_stats"] = stats
    return extras

  ckpt = ckpt_lib.StageCheckpoints(directory(workdir))
  result = loop.run(
      stage="teacher", ckpt=ckpt, state=state, step_fn=lambda s, b: step_jit(
          s, parallel.global_batch(b, mesh)),
      total_steps=cfg.steps, batch_fn=batches, eval_fn=eval_fn, eval_every=cfg.eval_every,
      checkpoint_every=config.checkpoint_every, writer=writer, meta=meta,
      final_extras=final_extras, log_every_secs=config.log_every_secs,
      stop_after_steps=config.get("debug_stop_after_steps", -1))
  ckpt.close()
  if result.step < cfg.steps:
    raise loop.Preempted("teacher", result.step, directory(workdir))
  return load(config, workdir, info)


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


def check_existing(config, workdir: str, info) -> dict | None:
  """Before a run that trains the teacher writes anything: a teacher checkpoint already in
  `workdir` must be readable and made for this config and dataset.

  Returns the finished teacher (loaded, so that its arrays are known to be intact), or None when
  there is no teacher yet or it is unfinished (the teacher stage then resumes it).
  """
  d = directory(workdir)
  if not os.path.isdir(d):
    return None
  ckpt = ckpt_lib.StageCheckpoints(d, create=False)
  try:
    step = ckpt.latest_step()
    meta = None if step is None else ckpt.restore_meta(step)
  finally:
    ckpt.close()
  if meta is None:
    return None
  _check_meta(meta, config.teacher, info, d)
  if not meta.get("done"):
    return None
  teacher = load(config, workdir, info)
  log.info(f"teacher: finished earlier at step {step}; loaded from {d}")
  return teacher


def load(config, workdir: str, info=None) -> dict:
  """The finished teacher of `workdir`, checked against the config and dataset."""
  cfg = config.teacher
  d = directory(workdir)
  if not os.path.isdir(d):
    raise TeacherError(f"no teacher checkpoint in {d}; run the teacher stage first "
                       f"(--config=...:stage=teacher or stage=all)")
  ckpt = ckpt_lib.StageCheckpoints(d, create=False)
  step = ckpt.latest_step()
  if step is None:
    raise TeacherError(f"no teacher checkpoint in {d}; run the teacher stage first")
  meta = ckpt.restore_meta(step)
  if not meta.get("done"):
    raise TeacherError(f"the teacher in {d} is unfinished (step {step} of "
                       f"{meta.get('total_steps')}); run the teacher stage again to finish it")
  _check_meta(meta, cfg, info, d)
  model = models.get_classifier(cfg.model, meta["num_classes"], cfg.get("width", 0))
  mesh = parallel.make_mesh("data")
  params, batch_stats = jax.eval_shape(
      lambda: common.init_model(model, jax.random.key(0), meta["image_shape"]))
  rep = parallel.replicated(mesh)
  target = ckpt_lib.abstract_like({"params": params, "batch_stats": batch_stats}, rep)
  variables = ckpt.restore(step, "teacher", target)
  stats = {}
  if variables["batch_stats"]:
    shapes = ckpt.item_shapes(step, "bn_stats")
    stats = ckpt.restore(step, "bn_stats", ckpt_lib.abstract_like(shapes, rep))
  ckpt.close()
  return {"model": model, "variables": common.variables_of(variables["params"],
                                                            variables["batch_stats"]),
          "bn_stats": stats, "meta": meta}
