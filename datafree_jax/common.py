"""Pieces the stages share: optimisers, augmentation, model variables, student updates."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax



def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
  """Optimiser from a config block with optimizer/lr/schedule/weight_decay/momentum/b1/b2.

  schedule: 'constant', 'cosine' (to 0 at total_steps) or 'step' (x0.1 at each fraction of
  total_steps in cfg.boundaries; the default (0.4, 0.8) is DAFL's CIFAR student schedule), times
  min(1, (step + 1) / cfg.warmup_steps) when warmup_steps > 0 (a linear warmup). SGD's weight
  decay is the PyTorch kind (added to the gradient). The values were checked against
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
  warmup = int(cfg.get("warmup_steps", 0) or 0)
  if warmup:
    lr = _with_warmup(lr, warmup)
  wd = cfg.get("weight_decay", 0.0)
  if cfg.optimizer == "adam":
    tx = optax.adam(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999))
  else:
    tx = optax.sgd(lr, momentum=cfg.get("momentum", 0.9) or None)
  return optax.chain(optax.add_decayed_weights(wd), tx) if wd else tx


def _with_warmup(lr, warmup: int):
  """The schedule `lr` (a number or a schedule) times min(1, (step + 1) / warmup)."""
  def schedule(step):
    base = lr(step) if callable(lr) else lr
    return base * jnp.minimum(1.0, (step + 1) / warmup)
  return schedule


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


def step_key(seed: int, stage_salt: int, step) -> Any:
  """The rng of one step: the stage's key with the step number folded in."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), stage_salt), step)
