"""The generator ensemble sharded over 8 host CPU devices (a subprocess), restored on 1 device."""
import json
import os
import subprocess
import sys

import jax
import numpy as np

from datafree_jax import input_pipeline
from datafree_jax.stages import ensemble

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sharded_ensemble_matches_one_device_and_restores_anywhere(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             # 8 devices must be set before jax is imported; opt level 0 halves compile time.
             XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                       "--xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "ensemble_multidevice_check.py"),
                         str(tmp_path)], env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  facts = json.loads(proc.stdout.strip().splitlines()[-1])
  assert facts["devices"] == 8 and facts["padded"] == 16 and facts["local_members"] == [2]
  assert facts["max_abs_diff"] <= 1e-5 and facts["steps"] == 2

  # Restore the checkpoint written on 8 devices here, on this process's device(s).
  info = input_pipeline.dataset_info("mnist5k")
  gens = ensemble.load_generators(os.path.join(str(tmp_path), "generators"), info)
  assert gens["meta"]["num_generators"] == 10 and gens["meta"]["padded"] == 16
  expected = np.load(os.path.join(str(tmp_path), "expected.npz"))
  restored = jax.tree_util.tree_flatten_with_path(
      {"params": gens["params"], "batch_stats": gens["batch_stats"]})[0]
  assert len(restored) == len(expected.files)
  for path, value in restored:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    np.testing.assert_array_equal(np.asarray(value), expected[name])
  images_fn = jax.jit(ensemble.make_images_fn(gens, "vmap"), static_argnums=1)
  images = np.asarray(images_fn(jax.random.key(0), 20,
                                {"params": gens["params"], "batch_stats": gens["batch_stats"]}))
  assert images.shape == (20, 32, 32, 1) and np.isfinite(images).all()
  assert os.path.exists(os.path.join(str(tmp_path), "samples", "generators_step000002.png"))
  # The stage finished on 8 devices (16 members) counts as finished here, too.
  from ensemble_multidevice_check import config_for  # pylint: disable=g-import-not-at-top
  out = ensemble.train_generators(config_for("auto", at_once=1), str(tmp_path), None, info,
                                  writer=None)
  assert (out["num_generators"], out["members"], out["result"].step) == (10, 16, 2)
