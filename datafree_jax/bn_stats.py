"""The frozen teacher's BatchNorm statistics as a pytree.

    {'global': batch_stats                       # running mean/var of every BN layer
     'class':  same tree, every leaf (K, C)      # class-conditional mean/var of each BN input
     'class_counts': (K,) int32}                 # images per class behind 'class'

'global' has the structure of the model's "batch_stats" collection; 'class' carries a leading
class axis, so `tree[k]` is the statistics for class k and it vmaps together with a stacked
generator ensemble. A model without BN layers has the empty pytree {}.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from datafree_jax import common
from datafree_jax import generator_parts
from datafree_jax import parallel
from datafree_jax.models import BN_EXAMPLE_MOMENTS


def compute(model, params, batch_stats, class_images) -> dict:
  """BN statistics of a trained model; `class_images[k]` holds training images of class k.

  The class-conditional mean/var of a layer are the moments of that layer's input over class
  k's images, with the model in evaluation mode (the same moments moment matching computes on
  generated images). A class with no images gets the global running statistics.
  """
  if not batch_stats:
    return {}
  variables = common.variables_of(params, batch_stats)

  @jax.jit
  def moments(x):
    return generator_parts.teacher_forward(model, variables, x, moments=True)[2]

  per_class = []
  counts = []
  for images in class_images:
    counts.append(len(images))
    per_class.append(moments(jnp.asarray(images)) if len(images) else batch_stats)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_class)
  return {"global": batch_stats, "class": stacked,
          "class_counts": jnp.asarray(np.asarray(counts, np.int32))}


def compute_streaming(model, params, batch_stats, batches, num_classes: int, mesh) -> dict:
  """compute()'s statistics from one pass over host-local (images, labels, mask) batches.

  For every BN layer's input x the examples' own spatial means of x and x^2
  (RecordingBatchNorm's "bn_example_moments") are summed per class over the examples of mask
  1, on the devices of `mesh` (the global batch split over them, so the sums are reduced over
  devices and processes); then mean_k = S1_k / n_k and var_k = S2_k / n_k - mean_k^2. For the
  same images this is compute()'s statistics up to float rounding. Nothing but the (K, C) sums
  is kept; a class with no images gets the global running statistics.
  """
  if not batch_stats:
    return {}
  variables = common.variables_of(params, batch_stats)
  rep = parallel.replicated(mesh)

  def sums(x, y, mask):
    _, upd = model.apply(variables, x, train=False, mutable=[BN_EXAMPLE_MOMENTS])
    onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32) * mask[:, None]
    per_class = jax.tree.map(lambda m: onehot.T @ m.astype(jnp.float32),
                             upd[BN_EXAMPLE_MOMENTS])
    return per_class, jnp.sum(onehot, axis=0)

  @functools.partial(jax.jit, donate_argnums=(0,), out_shardings=rep)
  def accumulate(total, x, y, mask):
    per_class, counts = sums(x, y, mask)
    return jax.tree.map(jnp.add, total, (per_class, counts))

  total = None
  for x, y, mask in batches:
    arrays = parallel.global_batch((x, y, mask), mesh)
    if total is None:
      total = jax.tree.map(jnp.zeros_like, jax.eval_shape(sums, *arrays))
      total = jax.device_put(total, rep)
    total = accumulate(total, *arrays)
  if total is None:
    raise ValueError("no batches to compute BN statistics from")
  moments, counts = jax.device_get(total)
  n = np.maximum(counts, 1.0)[:, None]

  def finish(leaf_mean, leaf_sq, global_mean, global_var):
    mean = leaf_mean / n
    var = np.maximum(leaf_sq / n - mean**2, 0.0)
    seen = counts[:, None] > 0
    return (np.where(seen, mean, np.asarray(global_mean)[None]).astype(np.float32),
            np.where(seen, var, np.asarray(global_var)[None]).astype(np.float32))

  out = jax.tree.map(lambda m, g: dict(zip(("mean", "var"), finish(m["mean"], m["sq"],
                                                                  g["mean"], g["var"]))),
                     moments, jax.device_get(batch_stats),
                     is_leaf=lambda t: isinstance(t, dict) and "sq" in t)
  return {"global": batch_stats, "class": jax.tree.map(jnp.asarray, out),
          "class_counts": jnp.asarray(counts.astype(np.int32))}


def for_class(stats: dict, k: int) -> dict:
  """Per-layer targets {'mean','var'} for class k, or the global ones without class stats."""
  if "class" in stats:
    return jax.tree.map(lambda x: x[k], stats["class"])
  return stats["global"]


def targets_for(stats: dict, class_ids) -> dict:
  """Targets stacked for a set of generators (class_ids: (G,) ints), leading axis G.

  Generator k matches class-conditional statistics of its class when they exist, else the
  global running statistics.
  """
  class_ids = jnp.asarray(class_ids)
  if "class" in stats:
    return jax.tree.map(lambda x: x[class_ids], stats["class"])
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (len(class_ids),) + x.shape), stats["global"])
