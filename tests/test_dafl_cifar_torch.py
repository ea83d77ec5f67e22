"""One DAFL step at the CIFAR-10 setting against the authors' PyTorch code (transcribed in
benchmarks/torch_dafl.py, compared by benchmarks/dafl_compare.py as
`python -m benchmarks.dafl_cifar_torch_check` does), from identical weights and latents, at
batch 4.

float64 (JAX under jax.enable_x64, PyTorch .double()): the loss terms agree to 1e-5 and every
generator and student gradient to 1e-4 relative. float32: images, teacher outputs and loss terms
agree as tightly; the gradients only to the float32 floor of ReLU networks (the benchmark's
docstring), checked against a sanity bound.
"""
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT

torch = pytest.importorskip("torch")

if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)
from benchmarks import dafl_compare as check  # pylint: disable=g-import-not-at-top,wrong-import-position

# The slow set (conftest.py): CI runs it as a step of its own.
pytestmark = pytest.mark.slow

LOSSES = ("l_oh", "l_a", "l_ie", "loss_g", "loss_kd")


@pytest.fixture(scope="module")
def setting():
  return check.cifar_setting(batch=4, schedule_steps=5, seed=0)


@pytest.fixture
def optimized_xla():
  """XLA's usual optimisations during the test. conftest turns most of them off, which makes
  float64 convolutions (compiled code, not a library call as in float32) ~10x slower."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def _by_name(rows):
  return {r["quantity"]: r for r in rows}


def _assert_rows(rows):
  failed = [f"{r['quantity']}: abs {r['abs']:.2e}, rel {r['rel']:.2e} > {r['tol']:.0e}"
            for r in rows if r["ok"] is False]
  assert not failed, "\n".join(failed)


@pytest.mark.usefixtures("optimized_xla")
def test_float64_one_step_matches_authors(setting):
  rows, _, _ = check.one_step_rows(check.Variant(setting, np.float64), per_leaf=True)
  names = _by_name(rows)
  for k in LOSSES:
    assert names[f"loss {k}"]["tol"] == 1e-5
  grads_g = [r for r in rows if r["quantity"].startswith("grad G ")]
  grads_s = [r for r in rows if r["quantity"].startswith("grad S ")]
  # Every leaf: the generator's 14 (12 by relative difference, the 2 BN-cancelled conv biases
  # against the whole gradient's size) and ResNet-18's 62.
  assert len(grads_g) == 14 and len(grads_s) == 62
  assert all(r["tol"] == 1e-4 for r in grads_g + grads_s)
  _assert_rows(rows)


def test_float32_one_step_matches_authors(setting):
  rows, _, _ = check.one_step_rows(check.Variant(setting, np.float32))
  names = _by_name(rows)
  for k in LOSSES:
    assert names[f"loss {k}"]["tol"] == 1e-5
  _assert_rows(rows)
