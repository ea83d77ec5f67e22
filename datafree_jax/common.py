"""Pieces the stages share: optimisers, augmentation, model variables, student updates."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from datafree_jax import loop
from datafree_jax import losses
from datafree_jax.models import BN_INPUTS


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """Optimiser from a config block with optimizer/lr/schedule/weight_decay/momentum/b1/b2.

  schedule: 'constant', 'cosine' (to 0 at total_steps) or 'step' (x0.1 at each fraction of
  total_steps in cfg.boundaries; the default (0.4, 0.8) is DAFL's CIFAR student schedule). SGD's
  weight decay is the PyTorch kind (added to the gradient). The values were checked against
  config_lib.SCHEMA before.
  """
  if cfg.schedule == "constant":
    lr = cfg.lr
  elif cfg.schedule == "cosine":
    lr = optax.cosine_decay_schedule(cfg.lr, max(total_steps, 1))
  else:
    scales: dict = {}  # Boundaries that fall on the same step multiply: x0.1 each.
    for f in cfg.get("boundaries", (0.4, 0.8)):
      step = int(f * total_steps)
      scales[step] = scales.get(step, 1.0) * 0.1
    lr = optax.piecewise_constant_schedule(cfg.lr, scales)
  wd = cfg.get("weight_decay", 0.0)
  if cfg.optimizer == "adam":
    tx = optax.adam(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999))
  else:
    tx = optax.sgd(lr, momentum=cfg.get("momentum", 0.9) or None)
  return optax.chain(optax.add_decayed_weights(wd), tx) if wd else tx


def compute_dtype(config):
  """What models compute in: bfloat16 for config.dtype 'bfloat16'; None for 'float32' (flax
  then computes in the dtype of the inputs and parameters: float32, or float64 when x64 is
  on)."""
  return jnp.bfloat16 if config.get("dtype", "float32") == "bfloat16" else None


def variables_of(params, batch_stats) -> dict:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def init_model(model: nn.Module, key, image_shape, batch: int = 2):
  """(params, batch_stats) of a classifier; batch_stats is {} for a model without BN."""
  # One jitted init: run op by op, flax's init compiles each initialiser separately (seconds).
  variables = jax.jit(lambda k: model.init(
      k, jnp.zeros((batch,) + tuple(image_shape), jnp.float32), train=False))(key)
  return variables["params"], variables.get("batch_stats", {})


def classifier_logits(model):
  """apply_logits(variables, x) in evaluation mode."""
  return lambda variables, x: model.apply(variables, x, train=False)


def make_classifier_eval(model, select, data, mesh):
  """evaluate(state): test accuracy and loss of the classifier whose {'params', 'batch_stats'}
  are select(state), over the test split of `data` (read on first use; in memory or
  streamed)."""
  apply_logits = classifier_logits(model)

  def evaluate(state):
    v, test = select(state), data["test"]
    return loop.evaluate_batches(apply_logits, variables_of(v["params"], v["batch_stats"]),
                                 test.eval_batches(loop.eval_local_batch()), mesh)
  return evaluate


SAMPLE_SEED = 1234  # the fixed latents of sample grids and of the generators' evaluation


def generate(gen, params, batch_stats, z, labels=None):
  """Images of a generator on latents `z` (and class `labels`, for a conditional generator), its
  BN in training mode: (images, new batch_stats)."""
  images, upd = gen.apply({"params": params, "batch_stats": batch_stats}, z, labels, train=True,
                          mutable=["batch_stats"])
  return images, upd["batch_stats"]


def teacher_forward(model, variables, x, *, moments: bool = False):
  """Frozen teacher in evaluation mode: (logits, features, bn input moments or None)."""
  if moments:
    (logits, feats), upd = model.apply(variables, x, train=False, features=True,
                                       mutable=[BN_INPUTS])
    return logits, feats, upd.get(BN_INPUTS, {})
  logits, feats = model.apply(variables, x, train=False, features=True)
  return logits, feats, None


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
  logits, upd = model.apply(variables_of(params, batch_stats), images, train=True,
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


def step_key(seed: int, stage_salt: int, step) -> Any:
  """The rng of one step: the stage's key with the step number folded in."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stage_salt), step)
