"""The sizing dry run (dry_run.py): every stage's step compiled from abstract inputs, a table,
nothing written; FLOPs of chunked loops multiplied by their trip counts; a stage that does not
fit the given device memory fails the run."""
import os

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_config
from datafree_jax import config_lib
from datafree_jax import dry_run
from datafree_jax import input_pipeline
from datafree_jax import train


def _rows(config):
  info = input_pipeline.config_info(config)
  return dry_run.run(config, train.stages_to_run(config), info, emit=lambda line: None)


def test_every_stage_of_the_ensemble_compiles_and_nothing_is_written(tmp_path, capsys):
  config = tiny_config("ensemble", **{"dry_run": True})
  workdir = tmp_path / "w"
  assert train.main_entry(config, str(workdir)) == 0
  out = capsys.readouterr().out
  assert not workdir.exists()
  for stage in ("teacher", "generators", "distill_generators"):
    assert f"| {stage} |" in out
  assert "TPU v4" in out and "H100" in out


def test_rows_are_per_device_numbers_with_the_loop_trips_counted():
  """The generators' step with its members in 5 sequential chunks (lax.map: XLA counts the
  body once) reports the same FLOPs as all members at once; state bytes are the stacked
  generators' params + Adam moments + BN statistics."""
  base = {"ensemble.num_generators": 10, "ensemble.batch_per_generator": 8}
  whole = _rows(tiny_config("ensemble", stage="generators", **base))
  chunked = _rows(tiny_config("ensemble", stage="generators",
                              **dict(base, **{"ensemble.max_generators_per_device_at_once": 2})))
  (whole,), (chunked,) = whole, chunked
  assert whole.tflop_per_step > 0
  np.testing.assert_allclose(chunked.tflop_per_step, whole.tflop_per_step, rtol=0.05)
  assert chunked.peak_gib < whole.peak_gib  # two members' activations at a time, not ten
  config = tiny_config("ensemble")
  from datafree_jax.stages import dafl, ensemble  # pylint: disable=g-import-not-at-top
  gen = ensemble.make_generator(config, input_pipeline.config_info(config))
  params, stats = jax.eval_shape(lambda: dafl.init_generator(gen, jax.random.key(0)))
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  # params, Adam's two moments, BN statistics (float32) and Adam's int32 step count.
  expected = 10 * 4 * (3 * count(params) + count(stats) + 1)
  assert whole.state_gib * 2**30 == pytest.approx(expected)


def test_a_stage_that_does_not_fit_fails_the_run(tmp_path, capsys):
  config = tiny_config("dafl", **{"dry_run": True, "dry_run_hbm_gib": 1e-4})
  assert train.main_entry(config, str(tmp_path / "w")) == 3
  err = capsys.readouterr().err
  assert "stage teacher" in err and "more than dry_run_hbm_gib=0.0001" in err
  assert not (tmp_path / "w").exists()


def test_bytes_per_device_counts_a_split_leaf_by_its_share():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  n = jax.device_count()
  tree = {"a": jax.ShapeDtypeStruct((8 * n, 4), np.float32, sharding=split),
          "b": jax.ShapeDtypeStruct((3,), np.int32)}
  assert dry_run.bytes_per_device(tree) == 8 * 4 * 4 + 3 * 4


def test_cifar10_config_dry_run():
  config = config_lib.load_config_file(os.path.join(REPO_ROOT, "configs", "cifar10.py"))
  rows = _rows(config)
  assert [r.stage for r in rows] == ["teacher", "dafl"]
  # ResNet-34 teacher step at batch 128 on 32x32 images: forward ~2.3 GFLOP an image (1.16
  # G multiply-adds), training about 3x that: ~0.9 TFLOP a step on one device.
  assert 0.6 < rows[0].tflop_per_step < 1.2
