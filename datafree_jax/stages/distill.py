"""Stage 'distill': the student learns KL(teacher || student) on images from a source.

Sources: 'data' (the real training images: KD with data, the upper-bound baseline), 'noise'
(N(0, 1) images: the lower-bound baseline) and 'generators' (frozen generators loaded from a
checkpoint, Luo et al.'s second stage). Checkpoints go to <workdir>/distill_<source>/.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import input_pipeline
from datafree_jax import log
from datafree_jax import loop
from datafree_jax import models
from datafree_jax import parallel

STAGE_SALT = 3


def directory(workdir: str, source: str) -> str:
  return os.path.join(workdir, f"distill_{source}")


def make_student_eval(student, test, mesh) -> Callable:
  apply_logits = common.classifier_logits(student)

  def eval_fn(state):
    s = state["student"]
    return loop.evaluate_classifier(apply_logits, common.variables_of(s["params"],
                                                                      s["batch_stats"]),
                                    test.images, test.labels, mesh)
  return eval_fn


def make_sample_writer(config, workdir, writer, teacher, info, sample_fn_or_gen, name: str,
                       row_titles=None) -> Optional[Callable]:
  """on_eval callback writing a grid of generated images, teacher's class under each.

  `sample_fn_or_gen` is a Generator (DAFL: state['gen'] holds its variables) or a function
  state -> images.
  """
  from datafree_jax import visualize  # pylint: disable=g-import-not-at-top
  tmodel, tvars = teacher["model"], teacher["variables"]
  if isinstance(sample_fn_or_gen, models.Generator):
    gen = sample_fn_or_gen
    z = jax.random.normal(jax.random.key(1234), (100, gen.latent_dim))

    def sample(state):
      g = state["gen"]
      return gen.apply({"params": g["params"], "batch_stats": g["batch_stats"]}, z, train=True,
                       mutable=["batch_stats"])[0]
  else:
    sample = sample_fn_or_gen
  sample = jax.jit(sample)
  predict = jax.jit(lambda x: jnp.argmax(tmodel.apply(tvars, x, train=False), -1))

  def on_eval(state, step):
    if jax.process_index() != 0:
      return
    images = sample(state)
    preds = np.asarray(predict(images))
    images = np.asarray(images)
    grid = visualize.sample_grid(images, preds, info.mean, info.std, ncols=10, scale=2,
                                 row_titles=row_titles)
    path = os.path.join(workdir, "samples", f"{name}_step{step:06d}.png")
    visualize.save_png(path, grid)
    if writer is not None:
      writer.write_images(step, {f"samples/{name}": grid[None]})
  return on_eval


def train(config, workdir: str, teacher: dict, data: dict, writer, source: str,
          images_fn: Optional[Callable] = None, meta_extra: Optional[dict] = None,
          images_args=None) -> dict:
  """Distils the student from `source`.

  For 'generators', `images_fn(key, batch)` supplies the images of a step, or
  `images_fn(key, batch, images_args)` when `images_args` (a pytree of placed arrays, e.g. the
  frozen generators' variables) is given: it is then an argument of the jitted step, not a
  constant compiled into it.
  """
  config_lib.check_choice("distillation source", source, ("data", "noise", "generators"))
  if source == "generators" and images_fn is None:
    raise ValueError("distill.train(source='generators') needs an images_fn")
  scfg = config.student
  config_lib.check_positive("student.steps", scfg.steps)
  config_lib.check_positive("student.temperature", scfg.temperature)
  info = data["test"].info
  mesh = parallel.make_mesh("data")
  batch = scfg.batch_size
  parallel.check_global_batch(batch)
  student = models.get_classifier(scfg.model, info.num_classes, scfg.get("width", 0))
  tx = common.make_optimizer(scfg, scfg.steps)
  ks = jax.random.fold_in(jax.random.key(config.seed), STAGE_SALT)
  sp, sbs = common.init_model(student, ks, info.image_shape)
  state = parallel.put_replicated({"student": {"params": sp, "batch_stats": sbs},
                                   "student_opt": tx.init(sp),
                                   "step": jnp.zeros((), jnp.int32)}, mesh)
  tmodel, tvars = teacher["model"], teacher["variables"]
  nan_at = config.get("debug_nan_at_step", -1)
  data_sharding = parallel.split_leading(mesh)

  def step_fn(state, batch_in):
    key = common.step_key(config.seed, STAGE_SALT, state["step"])
    if source == "data":
      images = batch_in[0]
    elif source == "noise":
      images = jax.random.normal(key, (batch,) + tuple(info.image_shape))
    elif images_args is not None:
      images = images_fn(key, batch, batch_in)
    else:
      images = images_fn(key, batch)
    images = jax.lax.with_sharding_constraint(images, data_sharding)
    t_logits = tmodel.apply(tvars, images, train=False)
    s = state["student"]
    p, bs, opt, kd, gn = common.student_kd_update(student, tx, s["params"], s["batch_stats"],
                                                  state["student_opt"], images, t_logits,
                                                  scfg.temperature)
    kd = loop.poison(kd, state["step"], nan_at)
    return ({"student": {"params": p, "batch_stats": bs}, "student_opt": opt,
             "step": state["step"] + 1}, {"loss_kd": kd, "grad_norm_s": gn})

  rep = parallel.replicated(mesh)
  step_jit = jax.jit(step_fn, out_shardings=(rep, rep), donate_argnums=(0,))
  if source == "data":
    batches = input_pipeline.StepBatches(data["train"], parallel.check_global_batch(batch),
                                         config.seed + 1)
    run_step = lambda s, b: step_jit(s, parallel.global_batch(b, mesh))
  elif source == "generators" and images_args is not None:
    batches = lambda step: images_args
    run_step = step_jit
  else:
    batches = None
    run_step = step_jit
  ckpt = ckpt_lib.StageCheckpoints(directory(workdir, source))
  meta = dict(meta_extra or {}, method=config.method, source=source, student_model=scfg.model,
              num_classes=info.num_classes, image_shape=list(info.image_shape),
              teacher_model=teacher["meta"]["model"])
  result = loop.run(
      stage=f"distill_{source}", ckpt=ckpt, state=state, step_fn=run_step,
      total_steps=scfg.steps, batch_fn=batches, eval_fn=make_student_eval(student, data["test"],
                                                                           mesh),
      eval_every=scfg.eval_every, checkpoint_every=config.checkpoint_every, writer=writer,
      meta=meta, log_every_secs=config.log_every_secs,
      stop_after_steps=config.get("debug_stop_after_steps", -1))
  ckpt.close()
  return {"result": result, "directory": directory(workdir, source)}
