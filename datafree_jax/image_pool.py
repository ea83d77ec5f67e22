"""The image pool of the synthesis methods (DeepInversion, Fast-DFKD): each synthesis round
writes one batch of images into a pool kept in the stage's checkpointed state, and a student is
distilled on images drawn from the rounds filled so far.

The pool is a (rounds, batch, H, W, C) uint8 array of pixels (the authors write PNG files):
quantize / dequantize convert between it and normalised float images. pool_images_fn is the
image source of students.distill_step on it, distill_on_pool a run of such steps inside one
jitted call, latest_round the images of the newest round (for sample grids).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def pixel_range(info):
  """(low, high), (C,) float32 arrays: the normalised values of pixel values 0 and 1."""
  mean, std = np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)
  return (0.0 - mean) / std, (1.0 - mean) / std


def normalise(pixels01, info):
  """Float pixel values in [0, 1] -> normalised images (x - mean) / std."""
  mean, std = jnp.asarray(info.mean, jnp.float32), jnp.asarray(info.std, jnp.float32)
  return (pixels01 - mean) / std


def quantize(images, info):
  """Normalised float images -> uint8 pixels round(255 * clip(x * std + mean, 0, 1))."""
  mean, std = jnp.asarray(info.mean, jnp.float32), jnp.asarray(info.std, jnp.float32)
  pixels = jnp.clip(images.astype(jnp.float32) * std + mean, 0.0, 1.0)
  return jnp.round(pixels * 255.0).astype(jnp.uint8)


def dequantize(pixels, info):
  """uint8 pixels -> normalised float32 images (u / 255 - mean) / std."""
  mean, std = jnp.asarray(info.mean, jnp.float32), jnp.asarray(info.std, jnp.float32)
  return (pixels.astype(jnp.float32) / 255.0 - mean) / std


def empty(rounds: int, batch_size: int, info):
  """The pool before the first round: zeros (rounds, batch_size, H, W, C) uint8."""
  return jnp.zeros((rounds, batch_size) + tuple(info.image_shape), jnp.uint8)


def pool_images_fn(info):
  """images_fn(key, n, batch, source) of students.distill_step: n images drawn uniformly, with
  replacement, from the first source['filled'] rounds of source['pool'] (R, B, H, W, C)."""
  def images_fn(key, n, batch, source):  # pylint: disable=unused-argument
    pool = source["pool"]
    rounds, per_round = pool.shape[:2]
    flat = pool.reshape((rounds * per_round,) + pool.shape[2:])
    index = jax.random.randint(key, (n,), 0, jnp.maximum(source["filled"], 1) * per_round)
    return dequantize(flat[index], info)
  return images_fn


def distill_on_pool(kd_steps: int, distill, state, teacher_vars, first_step, filled):
  """kd_steps steps of students.distill_step (`distill`: its partial up to the state, with
  pool_images_fn as image source) for state['student'] on the first `filled` rounds of
  state['pool'] (a lax.fori_loop; one step is computed without a loop); the steps' rng is
  keyed by first_step, first_step + 1, ... Returns (state with the new student and its
  optimiser, {'loss_kd': the last step's})."""
  source = {"pool": state["pool"], "filled": filled}
  sub = {"student": state["student"], "student_opt": state["student_opt"], "step": first_step}
  if kd_steps == 1:
    sub, metrics = distill(sub, None, teacher_vars, source)
  else:
    shapes = jax.eval_shape(lambda s: distill(s, None, teacher_vars, source)[1], sub)

    def body(_, carry):
      return distill(carry[0], None, teacher_vars, source)
    sub, metrics = jax.lax.fori_loop(
        0, kd_steps, body, (sub, jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), shapes)))
  return (dict(state, student=sub["student"], student_opt=sub["student_opt"]),
          {"loss_kd": metrics["loss_kd"]})


def latest_round(state, n: int, info):
  """The first n images of the newest filled round of state['pool'] (state['step'] rounds
  filled), normalised."""
  r = jnp.maximum(state["step"] - 1, 0)
  return dequantize(jax.lax.dynamic_index_in_dim(state["pool"], r, 0, keepdims=False)[:n], info)
