"""Evaluation of a classifier: top-1 accuracy and cross-entropy over fixed-shape, masked batches
(every process runs the same number of identical-shape steps)."""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from datafree_jax import batching
from datafree_jax import common
from datafree_jax import parallel


def evaluate_classifier(apply_logits: Callable, variables, images: np.ndarray, labels: np.ndarray,
                        mesh, batch_size: int = 500) -> dict:
  """Top-1 accuracy and CE of `apply_logits(variables, images)` over a host-local test split.

  Batches are padded to a fixed size and masked, so every process runs the same number of
  identical-shape steps even when their shards differ in length.
  """
  return evaluate_batches(apply_logits, variables, batching.masked_batches(
      images, labels, eval_local_batch(batch_size)), mesh)


def eval_local_batch(batch_size: int = 500) -> int:
  """This process's evaluation batch: about batch_size, a multiple of its device count."""
  n_dev_local = jax.local_device_count()
  return max(n_dev_local, (batch_size // n_dev_local) * n_dev_local)


def evaluate_batches(apply_logits: Callable, variables, batches, mesh) -> dict:
  """Top-1 accuracy and CE over host-local (images, labels, mask) batches (every process the
  same number of the same shape), counting the examples of mask 1."""
  correct = jnp.zeros((), jnp.float32)
  nll = jnp.zeros((), jnp.float32)
  count = jnp.zeros((), jnp.float32)
  fn = eval_batch_fn(apply_logits)
  for x, y, mask in batches:
    c, l, n = fn(variables, *parallel.global_batch((x, y, mask), mesh))
    correct, nll, count = correct + c, nll + l, count + n
  correct, nll, count = jax.device_get((correct, nll, count))
  return {"accuracy": float(correct / count), "loss": float(nll / count)}


_EVAL_FNS: dict = {}


def eval_batch_fn(apply_logits):
  """The jitted (correct, nll, count) of one evaluation batch (variables, x, y, mask)."""
  if apply_logits not in _EVAL_FNS:
    @jax.jit
    def fn(variables, x, y, mask):
      logits = apply_logits(variables, x)
      logp = jax.nn.log_softmax(logits)
      nll = -jnp.take_along_axis(logp, y[:, None], axis=1)[:, 0]
      return (jnp.sum((jnp.argmax(logits, -1) == y) * mask), jnp.sum(nll * mask), jnp.sum(mask))
    _EVAL_FNS[apply_logits] = fn
  return _EVAL_FNS[apply_logits]


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
    return evaluate_batches(apply_logits, common.variables_of(v["params"], v["batch_stats"]),
                            test.eval_batches(eval_local_batch()), mesh)
  return evaluate
