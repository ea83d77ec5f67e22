"""Distillation from generators split over 8 devices (ensemble.frozen.make_images_fn, 'sharded'):
each device draws its images from its own generators, weighted when the devices hold unequal
numbers; a checkpoint is restored split and padded. Runs tests/sharded_distill_check.py in a
subprocess with 8 host CPU devices."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest


# The slow set (conftest.py): CI runs it as a step of its own.
pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))


def test_sharded_generators_on_8_devices(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_distill_check.py"),
                         str(tmp_path)], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-5000:]
  facts = json.loads(proc.stdout.strip().splitlines()[-1])
  # Every device's images are its own members' draws (same function, same per-device key).
  assert facts["g16_max_diff"] < 1e-5 and facts["g12_max_diff"] < 1e-5, facts
  assert facts["g16_weights"] is None  # 2 real generators on every device: no weights
  w = np.asarray(facts["g12_weights"]).reshape(8, 8)
  np.testing.assert_allclose(w[:6], 2 * 8 / 12)  # devices 0-5 hold 2 of the 12
  np.testing.assert_array_equal(w[6:], 0.0)      # devices 6 and 7 hold none
  assert facts["loaded_layout"] == "sharded" and facts["loaded_padded"] == 16
  assert facts["loaded_shard_rows"] == [2]
  assert facts["loaded_equal"] and facts["loaded_pad_zero"]
