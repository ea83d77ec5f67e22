"""Random teachers for the benchmarks: the cost of a step does not depend on what a teacher
learned, and a teacher with every parameter and BN statistic drawn at random exercises the whole
weight mapping of a comparison with PyTorch (benchmarks/step_speed.py,
benchmarks/dafl_cifar_torch_check.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from datafree_jax import common, models


def random_teacher(model_name: str, info, seed: int = 0, width: int = 0,
                   class_stats: bool = False) -> dict:
  """A random teacher in the dict form the stages take, drawn with numpy on the Flax model's
  shapes (nothing compiled): kernels ~ N(0, 1/fan_in), biases, BN offsets and running means ~
  N(0, 0.1^2), BN scales ~ U(0.8, 1.2), running variances ~ U(0.5, 2). class_stats: also
  random per-class BN statistics ('bn_stats', the moment-matching targets)."""
  model = models.get_classifier(model_name, info.num_classes, width)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((2,) + tuple(info.image_shape), jnp.float32), train=False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf, lead=()):
    name, shape = path[-1].key, tuple(lead) + tuple(leaf.shape)
    if name == "kernel":
      x = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), shape)
    elif name == "scale":
      x = rng.uniform(0.8, 1.2, shape)
    elif name == "var":
      x = rng.uniform(0.5, 2.0, shape)
    else:
      x = rng.normal(0.0, 0.1, shape)
    return jnp.asarray(x, jnp.float32)

  params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
  batch_stats = jax.tree_util.tree_map_with_path(draw, shapes.get("batch_stats", {}))
  stats = {}
  if class_stats and batch_stats:
    k = info.num_classes
    stats = {"global": batch_stats,
             "class": jax.tree_util.tree_map_with_path(
                 lambda p, x: draw(p, x, (k,)), shapes["batch_stats"]),
             "class_counts": jnp.full((k,), 100, jnp.int32)}
  return {"model": model, "variables": common.variables_of(params, batch_stats),
          "bn_stats": stats, "meta": {"model": model_name}}
