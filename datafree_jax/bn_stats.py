"""The frozen teacher's BatchNorm statistics as a pytree.

    {'global': batch_stats                       # running mean/var of every BN layer
     'class':  same tree, every leaf (K, C)      # class-conditional mean/var of each BN input
     'class_counts': (K,) int32}                 # images per class behind 'class'

'global' has the structure of the model's "batch_stats" collection; 'class' carries a leading
class axis, so `tree[k]` is the statistics for class k and it vmaps together with a stacked
generator ensemble. A model without BN layers has the empty pytree {}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from datafree_jax import common


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
    return common.teacher_forward(model, variables, x, moments=True)[2]

  per_class = []
  counts = []
  for images in class_images:
    counts.append(len(images))
    per_class.append(moments(jnp.asarray(images)) if len(images) else batch_stats)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *per_class)
  return {"global": batch_stats, "class": stacked,
          "class_counts": jnp.asarray(np.asarray(counts, np.int32))}


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
