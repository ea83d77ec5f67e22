"""The student side the stages share: the student model and its state, its KD update, the
distillation stage (Distill: the student learns KL(teacher || student) on images from a
source that a subclass supplies) and the sample grids written beside evaluations."""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import evaluation
from datafree_jax import losses
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax import paths
from datafree_jax import platforms
from datafree_jax import stage as stage_lib
from datafree_jax import visualize

STAGE_SALT = 3    # rng of the distillation steps (every Distill stage)
AUGMENT_SALT = 1  # folded into a step's key for the augmentation of its images


def random_shift(key, images, pad: int, fill, flip: bool = False):
  """Random translation by up to `pad` pixels, optional horizontal flip. The uncovered pixels
  take `fill`: a number, or one value per channel (a tuple)."""
  n, h, w, _ = images.shape
  if pad:
    widths = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    inside = jnp.pad(jnp.ones((1, h, w, 1), bool), widths)
    padded = jnp.where(inside, jnp.pad(images, widths), jnp.asarray(fill, images.dtype))
    k1, k2, key = jax.random.split(key, 3)
    dy = jax.random.randint(k1, (n,), 0, 2 * pad + 1)
    dx = jax.random.randint(k2, (n,), 0, 2 * pad + 1)
    images = jax.vmap(lambda im, y, x: jax.lax.dynamic_slice(im, (y, x, 0), (h, w, im.shape[-1])))(
        padded, dy, dx)
  if flip:
    do = jax.random.bernoulli(key, 0.5, (n, 1, 1, 1))
    images = jnp.where(do, images[:, :, ::-1, :], images)
  return images


def augmentation(cfg, info) -> dict:
  """random_shift's arguments from a config section with augment_shift/augment_flip. Shifts pad
  with black pixels (0 before normalisation), as torchvision's RandomCrop with padding does in
  the official scripts."""
  fill = tuple(float((0.0 - m) / s) for m, s in zip(info.mean, info.std))
  return dict(pad=cfg.augment_shift, fill=fill, flip=bool(cfg.augment_flip))


def student_kd_loss(model, params, batch_stats, images, teacher_logits, temperature: float,
                    weights=None):
  """kd_loss(teacher, student) of `images` (weighted by `weights` when given), the student's
  BN in training mode: (loss, new batch_stats)."""
  logits, upd = model.apply(common.variables_of(params, batch_stats), images, train=True,
                            mutable=["batch_stats"])
  return (losses.kd_loss(teacher_logits, logits, temperature, weights),
          upd.get("batch_stats", {}))


def student_kd_update(model, tx, params, batch_stats, opt_state, images, teacher_logits,
                      temperature: float, weights=None):
  """One student step on student_kd_loss; returns new state, the loss and gradient norm."""
  (loss, new_bs), grads = jax.value_and_grad(student_kd_loss, argnums=1, has_aux=True)(
      model, params, batch_stats, images, teacher_logits, temperature, weights)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), new_bs, opt_state, loss, optax.tree.norm(grads)


def make_student(config, info):
  scfg = config.student
  return models.get_classifier(scfg.model, info.num_classes, scfg.width,
                               common.compute_dtype(config), platforms.of_config(config))


def init_student(config, info, tx, key):
  """(student model, its initial {'params', 'batch_stats'} and optimiser state)."""
  student = make_student(config, info)
  sp, sbs = common.init_model(student, key, info.image_shape)
  return student, {"params": sp, "batch_stats": sbs}, tx.init(sp)


def student_identity(ctx) -> dict:
  return {"student_model": ctx.config.student.model, "num_classes": ctx.info.num_classes,
          "image_shape": list(ctx.info.image_shape),
          "teacher_model": ctx.config.teacher.model}


def student_summary(ctx, done) -> dict:
  return {"student": {"model": ctx.config.student.model,
                      "test_accuracy": done.eval.get("accuracy"), "steps": done.step,
                      "checkpoint": done.directory}}


def distill_step(student, tx, temperature: float, teacher_model, images_fn: Callable,
                 data_sharding, seed: int, n: int, augment: dict, state, batch, teacher_vars,
                 source):
  """One student step on kd_loss(T(x), S(x)), x = images_fn(key, n, batch, source), randomly
  shifted/flipped when `augment` (random_shift's pad/fill/flip) asks: `batch` is the
  loop's batch of the step (or None), `source` the placed arrays of the image source (the
  frozen generators' variables, or None). An images_fn may return (images, weights): the loss
  is then the weighted mean over the images."""
  key = common.step_key(seed, STAGE_SALT, state["step"])
  images = images_fn(key, n, batch, source)
  images, weights = images if isinstance(images, tuple) else (images, None)
  images = jax.lax.with_sharding_constraint(images, data_sharding)
  if augment["pad"] or augment["flip"]:
    images = random_shift(jax.random.fold_in(key, AUGMENT_SALT), images, **augment)
    images = jax.lax.with_sharding_constraint(images, data_sharding)
  t_logits = teacher_model.apply(teacher_vars, images, train=False)
  s = state["student"]
  p, bs, opt, kd, gn = student_kd_update(student, tx, s["params"], s["batch_stats"],
                                                state["student_opt"], images, t_logits,
                                                temperature, weights)
  return ({"student": {"params": p, "batch_stats": bs}, "student_opt": opt,
           "step": state["step"] + 1}, {"loss_kd": kd, "grad_norm_s": gn})


class Distill(stage_lib.Stage):
  """Distils the student from images of `source`, which a subclass supplies (source_images,
  abstract_source). Checkpoints go to <workdir>/distill_<source>/."""
  selector = "distill"

  def __init__(self, source: str):
    self.source = source
    self.name = f"distill_{source}"

  def check(self, config, info):
    parallel.check_global_batch(config.student.batch_size)

  def steps(self, config):
    return config.student.steps

  def identity(self, ctx):
    return dict(student_identity(ctx), source=self.source)

  def source_images(self, ctx, mesh):
    """(images_fn(key, n, batch, source), batches(step) -> the step's batch or None, the
    source's placed arrays or None, extra meta)."""
    raise NotImplementedError

  def abstract_source(self, ctx, mesh):
    """source_images' (images_fn, abstract batch or None, abstract source or None) for the dry
    run: nothing read or loaded."""
    raise NotImplementedError

  def _build(self, ctx, mesh, images_fn, abstract: bool = False):
    """(initial state, or ShapeDtypeStructs of it with `abstract`; student; jitted step)."""
    config, info = ctx.config, ctx.info
    scfg = config.student
    tx = common.make_optimizer(scfg, scfg.steps)
    student = make_student(config, info)

    def init():
      _, svars, sopt = init_student(
          config, info, tx, jax.random.fold_in(jax.random.key(config.seed), STAGE_SALT))
      return {"student": svars, "student_opt": sopt, "step": jnp.zeros((), jnp.int32)}
    rep = parallel.replicated(mesh)
    if abstract:
      state = ckpt_lib.abstract_like(jax.eval_shape(init), rep)
    else:
      state = parallel.put_replicated(init(), mesh)
    step_jit = jax.jit(
        functools.partial(distill_step, student, tx, scfg.temperature, ctx.teacher["model"],
                          images_fn, parallel.split_leading(mesh), config.seed, scfg.batch_size,
                          augmentation(scfg, info)),
        out_shardings=(rep, rep), donate_argnums=(0,))
    return state, student, step_jit

  def programs(self, ctx):
    mesh = parallel.make_mesh("data")
    images_fn, batch, source = self.abstract_source(ctx, mesh)
    state, student, step_jit = self._build(ctx, mesh, images_fn, abstract=True)
    s = state["student"]
    evaluation = stage_lib.classifier_eval_program(
        "student", student, common.variables_of(s["params"], s["batch_stats"]), ctx.info, mesh)
    return [stage_lib.Program(
        f"student step on {self.source}, batch {ctx.config.student.batch_size}", step_jit,
        (state, batch), dict(teacher_vars=ctx.teacher["variables"], source=source),
        state={"student": state, "source": source}, steps=ctx.config.student.steps),
            evaluation,
            stage_lib.restore_program(self.name, {"student": state, "source": source}, state)]

  def plan(self, ctx):
    config = ctx.config
    scfg = config.student
    mesh = parallel.make_mesh("data")
    images_fn, batches, source, meta = self.source_images(ctx, mesh)
    state, student, step_jit = self._build(ctx, mesh, images_fn)
    return stage_lib.Plan(
        state=state, step=functools.partial(step_jit, teacher_vars=ctx.teacher["variables"],
                                            source=source),
        batches=batches,
        evaluate=evaluation.make_classifier_eval(student, lambda s: s["student"], ctx.data, mesh),
        eval_every=scfg.eval_every, meta=dict(meta, method=config.method))

  def summarize(self, ctx, done):
    return student_summary(ctx, done)


def make_sample_writer(ctx, sample_fn: Callable, name: str, row_titles=None,
                       args: tuple = ()) -> Optional[Callable]:
  """on_eval callback: a grid of sample_fn(state, *args)'s images, the teacher's class under
  each, written to <workdir>/samples/<name>_stepNNNNNN.png and TensorBoard. Every process
  computes them (one computation over the global mesh); process 0 writes them."""
  tmodel, tvars = ctx.teacher["model"], ctx.teacher["variables"]
  rep = parallel.replicated(parallel.make_mesh("data"))
  sample = jax.jit(sample_fn, out_shardings=rep)
  predict = jax.jit(lambda v, x: jnp.argmax(tmodel.apply(v, x, train=False), -1),
                    out_shardings=rep)
  info = ctx.info

  def on_eval(state, step):
    images = sample(state, *args)
    preds = np.asarray(jax.device_get(predict(tvars, images)))
    if jax.process_index() != 0:
      return
    images = np.asarray(jax.device_get(images))
    grid = visualize.sample_grid(images, preds, info.mean, info.std, ncols=10, scale=2,
                                 row_titles=row_titles)
    visualize.save_png(paths.join(ctx.workdir, "samples", f"{name}_step{step:06d}.png"), grid)
    if ctx.writer is not None:
      ctx.writer.write_images(step, {f"samples/{name}": grid[None]})
  return on_eval
