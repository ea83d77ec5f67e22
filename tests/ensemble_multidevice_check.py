"""The ensemble on 8 host CPU devices; run by test_ensemble_multidevice.py in a subprocess.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/ensemble_multidevice_check.py DIR

Checks, with a random LeNet-5-BN teacher (its BN statistics computed on random images):
  - G = 10 generators on 8 devices (padded to 16 members, 2 per device, lowering 'auto', i.e.
    'unroll' on CPU, one member at a time: max_generators_per_device_at_once=1) take the same
    step as G = 10 on a 1-device mesh with lowering 'vmap', all members at once (1e-5);
  - the state is sharded over 'gen' (2 members per device);
  - the generators stage runs on 8 devices and writes DIR/generators; the real members' final
    parameters go to DIR/expected.npz for the parent to compare after restoring on 1 device.
Prints one JSON line of facts at the end.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from jax.sharding import Mesh, PartitionSpec as P  # pylint: disable=g-import-not-at-top

from conftest import tiny_config  # pylint: disable=g-import-not-at-top
from datafree_jax import bn_stats  # pylint: disable=g-import-not-at-top
from datafree_jax import common  # pylint: disable=g-import-not-at-top
from datafree_jax import input_pipeline  # pylint: disable=g-import-not-at-top
from datafree_jax import models  # pylint: disable=g-import-not-at-top
from datafree_jax import parallel  # pylint: disable=g-import-not-at-top
from datafree_jax.stages import ensemble  # pylint: disable=g-import-not-at-top


def random_teacher(info):
  model = models.get_classifier("lenet5_bn", info.num_classes)
  params, batch_stats = common.init_model(model, jax.random.key(0), info.image_shape)
  rng = np.random.default_rng(0)
  images = [rng.normal(0.1 * k, 1.0, (6,) + info.image_shape).astype(np.float32)
            for k in range(info.num_classes)]
  return {"model": model, "variables": common.variables_of(params, batch_stats),
          "bn_stats": bn_stats.compute(model, params, batch_stats, images),
          "meta": {"model": "lenet5_bn"}}


def config_for(lowering, at_once=0):
  # SGD: Adam's first step lr * g / |g| turns float noise on exactly-zero gradients into +-lr.
  return tiny_config("ensemble", **{
      "ensemble.batch_per_generator": 4, "ensemble.steps": 2, "ensemble.eval_every": 0,
      "ensemble.optimizer": "sgd", "ensemble.lr": 0.05, "ensemble.w_tv": 0.1,
      "ensemble.w_l2": 0.1, "ensemble.lowering": lowering,
      "ensemble.max_generators_per_device_at_once": at_once})


def main(workdir):
  assert jax.device_count() == 8, jax.devices()
  info = input_pipeline.dataset_info("mnist5k")
  teacher = random_teacher(info)
  mesh8 = parallel.make_mesh("gen")
  mesh1 = Mesh(np.asarray(jax.devices()[:1]), ("gen",))
  config8 = config_for("auto", at_once=1)
  e8 = ensemble.build(config8, teacher, info, mesh8)
  e1 = ensemble.build(config_for("vmap"), teacher, info, mesh1)
  assert (e8.num_generators, e8.padded, e1.padded) == (10, 16, 10), (e8.padded, e1.padded)
  assert list(e8.class_ids) == [k % 10 for k in range(16)]
  kernel = e8.state["params"]["fc"]["kernel"]
  assert kernel.sharding.spec == P("gen"), kernel.sharding
  local = {s.data.shape[0] for s in kernel.addressable_shards}
  assert local == {2} and len(kernel.addressable_shards) == 8, local

  s8, m8 = e8.step(jax.tree.map(jnp.copy, e8.state))  # A copy: e8.state trains below.
  s1, m1 = e1.step(e1.state)
  worst = 0.0
  for part in ("params", "batch_stats"):
    for a, b in zip(jax.tree.leaves(s8[part]), jax.tree.leaves(s1[part])):
      a, b = np.asarray(a)[:10], np.asarray(b)
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
      worst = max(worst, float(np.abs(a - b).max()))
  for k in m1:
    np.testing.assert_allclose(float(m8[k]), float(m1[k]), rtol=1e-5, atol=1e-5)

  out = ensemble.train_generators(config8, workdir, teacher, info, writer=None, ens=e8)
  state = out["result"].state
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)[:10]
          for path, v in jax.tree_util.tree_flatten_with_path(
              {"params": state["params"], "batch_stats": state["batch_stats"]})[0]}
  np.savez(os.path.join(workdir, "expected.npz"), **flat)
  print(json.dumps({"devices": jax.device_count(), "padded": e8.padded,
                    "lowering_8": e8.lowering, "local_members": sorted(local),
                    "max_abs_diff": worst, "steps": out["result"].step}))


if __name__ == "__main__":
  main(sys.argv[1])
