"""Sharded frozen generators on 8 host CPU devices; run by test_sharded_distill.py.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_distill_check.py DIR

For G = 16 (2 per device) and G = 12 (padded to 16: devices 0-5 hold 2 real generators, 6 and
7 none), random stacked generator variables split over a 'data' mesh of the 8 devices:
make_images_fn's images of a step, each device's block compared with _draw_images of that
device's own real members on the step key folded with the device index, and the weights
(G = 12: r_d * 8 / 12 for the images of device d). Then a generators checkpoint of G = 12
is saved and loaded with layout 'sharded': zero members pad it to 16, split 2 per device.
Prints one JSON line of facts.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from datafree_jax import checkpoints as ckpt_lib  # pylint: disable=g-import-not-at-top
from datafree_jax import datasets
from datafree_jax import generator_parts
from datafree_jax import models  # pylint: disable=g-import-not-at-top
from datafree_jax import parallel  # pylint: disable=g-import-not-at-top
from datafree_jax.ensemble import frozen as ensemble_frozen

BN_BATCH, N = 4, 64   # 8 images per device: 2 draws of 4


def stacked_variables(gen, g):
  keys = jax.random.split(jax.random.key(7), g)
  params, stats = jax.vmap(lambda k: generator_parts.init_generator(gen, k))(keys)
  return {"params": params, "batch_stats": stats}


def main(out_dir):
  assert jax.device_count() == 8
  info = datasets.dataset_info("mnist5k")
  gen = models.Generator(latent_dim=8, image_size=32, channels=1, width=8, num_upsample=2,
                         style="luo")
  mesh = parallel.make_mesh("data")
  facts = {}
  key = jax.random.key(3)
  for g in (16, 12):
    variables = stacked_variables(gen, g)
    padded = 16
    if g < padded:
      variables = jax.tree.map(
          lambda x: jnp.concatenate([x, jnp.zeros((padded - g,) + x.shape[1:], x.dtype)]),
          variables)
    variables = jax.device_put(variables, parallel.split_leading(mesh))
    class_ids = np.arange(g) % info.num_classes
    gens = {"gen": gen, "layout": "sharded", "padded": padded,
            "meta": {"num_generators": g, "class_ids": class_ids.tolist()}}
    fn = jax.jit(ensemble_frozen.make_images_fn(gens, "vmap", BN_BATCH, mesh), static_argnums=1)
    out = fn(key, N, None, variables)
    images, weights = out if isinstance(out, tuple) else (out, None)
    assert images.shape == (N, 32, 32, 1), images.shape
    blocks = sorted({tuple(s.index[0].indices(N)): s.device for s in images.addressable_shards
                     }.items())
    assert len(blocks) == 8 and len({d for _, d in blocks}) == 8
    ids = np.concatenate([class_ids, np.zeros(padded - g, np.int32)])
    worst = 0.0
    for d in range(8):
      real = int(np.clip(g - 2 * d, 0, 2))
      if real == 0:
        continue
      local = jax.tree.map(lambda x, d=d: np.asarray(x)[2 * d:2 * d + 2], variables)
      want = ensemble_frozen._draw_images(gen, BN_BATCH, "vmap", jax.random.fold_in(key, d), N // 8,  # pylint: disable=protected-access
                                   local, jnp.asarray(ids[2 * d:2 * d + 2]), real)
      got = np.asarray(images)[d * 8:(d + 1) * 8]
      worst = max(worst, float(np.max(np.abs(got - np.asarray(want)))))
    facts[f"g{g}_max_diff"] = worst
    facts[f"g{g}_weights"] = None if weights is None else np.asarray(weights).tolist()
  # A G = 12 checkpoint restored sharded: padded with zero members to 16.
  variables = jax.device_get(stacked_variables(gen, 12))
  d = os.path.join(out_dir, "generators")
  ckpt = ckpt_lib.StageCheckpoints(d)
  meta = {"kind": "generator_ensemble", "done": True, "num_generators": 12,
          "image_shape": [32, 32, 1], "num_classes": 10, "latent_dim": 8, "width": 8,
          "num_upsample": 2, "style": "luo", "conditional": False,
          "class_ids": list(range(10)) + [0, 1], "batch_per_generator": BN_BATCH}
  ckpt.save(1, {"step": np.int32(1)}, meta, {"generators": variables})
  ckpt.close()
  gens = ensemble_frozen.load_generators(d, info, mesh, layout="auto")
  p = gens["params"]
  facts["loaded_layout"], facts["loaded_padded"] = gens["layout"], gens["padded"]
  leaf, saved = jax.tree.leaves(p)[0], jax.tree.leaves(variables["params"])[0]
  facts["loaded_shard_rows"] = sorted({s.data.shape[0] for s in leaf.addressable_shards})
  facts["loaded_equal"] = bool(np.array_equal(np.asarray(leaf)[:12], saved))
  facts["loaded_pad_zero"] = bool(not np.any(np.asarray(leaf)[12:]))
  print(json.dumps(facts))


if __name__ == "__main__":
  main(sys.argv[1])
