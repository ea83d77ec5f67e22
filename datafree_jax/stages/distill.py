"""Distillation stages: the student learns KL(teacher || student) on images from a source.

Sources: 'data' (the real training images: KD with data, the upper-bound baseline), 'noise'
(N(0, 1) images: the lower-bound baseline) and, in stages/ensemble.py, 'generators' (frozen
generators loaded from a checkpoint, Luo et al.'s second stage). Checkpoints go to
<workdir>/distill_<source>/. Also the student parts the DAFL stage shares: its initial state,
evaluation, summary and sample grids.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax import paths
from datafree_jax import platforms
from datafree_jax import stage as stage_lib

STAGE_SALT = 3
AUGMENT_SALT = 1  # folded into a step's key for the augmentation of its images


def directory(workdir: str, source: str) -> str:
  return paths.join(workdir, f"distill_{source}")


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
  shifted/flipped when `augment` (common.random_shift's pad/fill/flip) asks: `batch` is the
  loop's batch of the step (or None), `source` the placed arrays of the image source (the
  frozen generators' variables, or None). An images_fn may return (images, weights): the loss
  is then the weighted mean over the images."""
  key = common.step_key(seed, STAGE_SALT, state["step"])
  images = images_fn(key, n, batch, source)
  images, weights = images if isinstance(images, tuple) else (images, None)
  images = jax.lax.with_sharding_constraint(images, data_sharding)
  if augment["pad"] or augment["flip"]:
    images = common.random_shift(jax.random.fold_in(key, AUGMENT_SALT), images, **augment)
    images = jax.lax.with_sharding_constraint(images, data_sharding)
  t_logits = teacher_model.apply(teacher_vars, images, train=False)
  s = state["student"]
  p, bs, opt, kd, gn = common.student_kd_update(student, tx, s["params"], s["batch_stats"],
                                                state["student_opt"], images, t_logits,
                                                temperature, weights)
  return ({"student": {"params": p, "batch_stats": bs}, "student_opt": opt,
           "step": state["step"] + 1}, {"loss_kd": kd, "grad_norm_s": gn})


def data_images(key, n, batch, source):  # pylint: disable=unused-argument
  """The real training batch (images, labels) of the step."""
  return batch[0]


def noise_images(image_shape):
  def images_fn(key, n, batch, source):  # pylint: disable=unused-argument
    return jax.random.normal(key, (n,) + tuple(image_shape))
  return images_fn


class Distill(stage_lib.Stage):
  """Distils the student from `source`; subclasses supply other image sources (`source_images`)."""
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

  def prepare(self, ctx, finished):
    if self.source == "data" and not finished:
      _ = ctx.data["train"]

  def source_images(self, ctx, mesh):
    """(images_fn(key, n, batch, source), batches(step) -> the step's batch or None, the
    source's placed arrays or None, extra meta)."""
    if self.source == "data":
      batches = ctx.data["train"].train_batches(
          parallel.check_global_batch(ctx.config.student.batch_size), ctx.config.seed + 1)
      return data_images, lambda step: parallel.global_batch(batches(step), mesh), None, {}
    return noise_images(ctx.info.image_shape), None, None, {}

  def abstract_source(self, ctx, mesh):
    """source_images' (images_fn, abstract batch or None, abstract source or None) for the dry
    run: nothing read or loaded."""
    if self.source == "data":
      batch = stage_lib.abstract_batch(ctx.config.student.batch_size, ctx.info.image_shape,
                                     parallel.split_leading(mesh))
      return data_images, batch, None
    return noise_images(ctx.info.image_shape), None, None

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
                          common.augmentation(scfg, info)),
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
            stage_lib.restore_program(self.name, {"student": state, "source": source})]

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
        evaluate=common.make_classifier_eval(student, lambda s: s["student"], ctx.data, mesh),
        eval_every=scfg.eval_every, meta=dict(meta, method=config.method))

  def summarize(self, ctx, done):
    return student_summary(ctx, done)


DATA = Distill("data")
NOISE = Distill("noise")


def make_sample_writer(ctx, sample_fn: Callable, name: str, row_titles=None,
                       args: tuple = ()) -> Optional[Callable]:
  """on_eval callback: a grid of sample_fn(state, *args)'s images, the teacher's class under
  each, written to <workdir>/samples/<name>_stepNNNNNN.png and TensorBoard. Every process
  computes them (one computation over the global mesh); process 0 writes them."""
  from datafree_jax import visualize  # pylint: disable=g-import-not-at-top
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
