"""Shared fixtures: tiny configs that run the real code paths in seconds on a 2-core CPU."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent XLA compilation cache for the test session, set before jax is imported and
# inherited by the command-line subprocesses the tests start: a program that several tests (or
# a reference run and the CLI runs it is compared with) compile is compiled once.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="datafree_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pytest  # pylint: disable=g-import-not-at-top

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(method="dafl", **overrides):
  """configs/mnist5k.py shrunk to a few steps, with flat 'a.b' overrides."""
  from datafree_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file(os.path.join(REPO_ROOT, "configs", "mnist5k.py"),
                                  f"method={method}")
  c.teacher.steps = 40
  c.teacher.batch_size = 32
  c.teacher.eval_every = 0
  c.teacher.bn_stats_per_class = 8
  c.student.steps = 20
  c.student.batch_size = 32
  c.student.eval_every = 0
  c.generator.width = 8
  c.log_every_secs = 1e9
  c.checkpoint_every = 10
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture
def tiny():
  return tiny_config
