"""The sizing dry run (dry_run.py): every stage's step compiled from abstract inputs, a table,
nothing written; FLOPs of chunked loops multiplied by their trip counts; a stage that does not
fit the given device memory fails the run."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_config

from datafree_jax import config_lib
from datafree_jax import datasets
from datafree_jax import dry_run
from datafree_jax import generator_parts
from datafree_jax import pipeline
from datafree_jax import registry
from datafree_jax.ensemble import objective as ensemble_objective

# The slow set (conftest.py; sizing the accelerator programs): CI runs it as a step of its own.
pytestmark = pytest.mark.slow


def _rows(config):
  info = datasets.config_info(config)
  return dry_run.run(config, pipeline.stages_to_run(config), info,
                     registry.get(config.method).teacher, emit=lambda line: None)


def test_every_stage_of_the_ensemble_compiles_and_nothing_is_written(tmp_path, capsys):
  config = tiny_config("ensemble", **{"dry_run": True})
  workdir = tmp_path / "w"
  assert pipeline.main_entry(config, str(workdir)) == 0
  out = capsys.readouterr().out
  assert not workdir.exists()
  for stage in ("teacher", "generators", "distill_generators"):
    assert f"| {stage} |" in out
  # On a CPU the default target is the TPU: its program, judged against each TPU kind.
  assert "target platform tpu (lowered for it from cpu)" in out
  assert "TPU v4" in out and "H100 SXM" not in out and "a TPU process may use the chip's HBM" in out
  for program in ("train step", "evaluation", "sample grid", "checkpoint restore"):
    assert program in out


def test_rows_are_per_device_numbers_with_the_loop_trips_counted():
  """The generators' step with its members in 5 sequential chunks (lax.map: XLA counts the
  body once) reports the same FLOPs as all members at once; state bytes are the stacked
  generators' params + Adam moments + BN statistics."""
  base = {"ensemble.num_generators": 10, "ensemble.batch_per_generator": 8}
  whole = _rows(tiny_config("ensemble", stage="generators", **base))
  chunked = _rows(tiny_config("ensemble", stage="generators",
                              **dict(base, **{"ensemble.max_generators_per_device_at_once": 2})))
  whole, chunked = whole[0], chunked[0]   # the train steps
  assert (whole.kind, chunked.kind) == ("train", "train")
  assert whole.tflop_per_step > 0
  np.testing.assert_allclose(chunked.tflop_per_step, whole.tflop_per_step, rtol=0.05)
  assert chunked.peak_gib < whole.peak_gib  # two members' activations at a time, not ten
  config = tiny_config("ensemble")
  gen = ensemble_objective.make_generator(config, datasets.config_info(config))
  params, stats = jax.eval_shape(lambda: generator_parts.init_generator(gen, jax.random.key(0)))
  count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
  # params, Adam's two moments, BN statistics (float32) and Adam's int32 step count.
  expected = 10 * 4 * (3 * count(params) + count(stats) + 1)
  assert whole.state_gib * 2**30 == pytest.approx(expected)


def test_a_stage_that_does_not_fit_fails_the_run(tmp_path, capsys):
  config = tiny_config("dafl", **{"dry_run": True, "dry_run_hbm_gib": 1e-4})
  assert pipeline.main_entry(config, str(tmp_path / "w")) == 3
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
  rows = [r for r in _rows(config) if r.kind == "train"]
  assert [r.stage for r in rows] == ["teacher", "dafl"]
  # ResNet-34 teacher step at batch 128 on 32x32 images: forward ~2.3 GFLOP an image (1.16
  # G multiply-adds), training about 3x that: ~0.9 TFLOP a step on one device.
  assert 0.6 < rows[0].tflop_per_step < 1.2


def test_every_program_of_a_stage_is_sized_and_restore_is_the_state():
  """The generators stage's rows: train step, evaluation (chunked like the step), sample grid,
  checkpoint restore (the stacked members' bytes)."""
  rows = _rows(tiny_config("ensemble", stage="generators", **{
      "ensemble.num_generators": 10, "ensemble.max_generators_per_device_at_once": 2}))
  assert [r.kind for r in rows] == ["train", "eval", "eval", "restore"]
  train_row, evaluation, grid, restore = rows
  assert evaluation.peak_gib > 0 and evaluation.tflop_per_step > 0 and grid.peak_gib > 0
  assert restore.peak_gib == restore.state_gib == train_row.state_gib
  assert "generator's share of a member-step" in train_row.note


def test_checkpoints_are_sized_with_their_items_and_save_times(capsys):
  """The generators stage's periodic checkpoint is its whole state; its final one the same
  bytes as 'generators' (params, BN state) + 'resume' (Adam state, step); both with write times
  at the stated bandwidths."""
  config = tiny_config("ensemble", stage="generators", **{"ensemble.num_generators": 10})
  rows = _rows(config)
  restore = rows[-1]
  periodic, final = restore.checkpoint["periodic"], restore.checkpoint["final"]
  assert list(periodic) == ["state"] and sorted(final) == ["generators", "resume"]
  assert sum(final.values()) == periodic["state"]
  # Adam's two moments and its int32 counts, and the int32 step: about twice the generators.
  assert 1.9 < final["resume"] / final["generators"] < 2.1
  assert periodic["state"] == pytest.approx(restore.state_gib * 2**30, rel=0.01)
  lines = dry_run.checkpoint_table(rows, 25.0)
  assert lines[1].startswith("Checkpoints (logical bytes") and "local NVMe 2 GB/s" in lines[1]
  assert "checkpoint_preemption_secs=25 s" in lines[1]
  assert any(line.startswith("| generators | final | resume ") for line in lines)
  slow = dry_run.checkpoint_table([dataclasses.replace(
      restore, checkpoint={"periodic": {"state": 300e9}})], 25.0)
  assert slow[-1] == ("| generators | periodic | state 279.40 GiB | 279.40 | 150 (over the "
                      "preemption budget) | 300 (over the preemption budget) |")


def test_gpu_target_judges_against_the_preallocated_fraction(monkeypatch):
  """A GPU process may use XLA_PYTHON_CLIENT_MEM_FRACTION of the memory (JAX's 75% unless
  set); a program over it is named with its largest values."""
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert dry_run.usable_gib("gpu", 80.0) == pytest.approx(60.0)
  assert dry_run.usable_gib("tpu", 32.0) == 32.0
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
  assert dry_run.usable_gib("gpu", 80.0) == pytest.approx(40.0)
  row = dry_run.Row("generators", "step", "train", 8, 1.0, 50.0, 1.0, 0.0, 10, "",
                    largest=[(6.0, "param.1 f32[125,512,25088]")])
  text = dry_run.table([row], "gpu", False, 0.05, {})
  assert "50% of a GPU's memory" in text and "**does not fit**" in text
  assert "param.1 f32[125,512,25088] 6.00 GiB" in text
  assert "assumed 5% of peak" in text


def test_largest_values_are_read_from_the_optimised_program():
  hlo = """
  %a = f32[4,8]{1,0} parameter(0)
  ROOT %b = bf16[1024,1024]{1,0} add(%x, %y)
  %c = f32[4,8]{1,0} copy(%a)
  """
  top = dry_run.largest_values(hlo, 2)
  assert [what for _, what in top] == ["b bf16[1024,1024]", "a f32[4,8]"]
  assert top[0][0] == pytest.approx(2 * 1024 * 1024 / 2**30)


def test_a_measuring_dry_run_times_every_program_and_its_figures_are_reused(tmp_path):
  """dry_run_measure runs each program on zero inputs; the JSON it writes (dry_run_out) gives a
  later dry run the measured throughput of that device kind instead of dry_run_mfu."""
  out = tmp_path / "rows.json"
  config = tiny_config("dafl", **{"dry_run": True, "dry_run_target": "cpu",
                                  "dry_run_measure": True, "dry_run_out": str(out)})
  lines = []
  rows = dry_run.run(config, pipeline.stages_to_run(config), datasets.config_info(config),
                     registry.get(config.method).teacher, emit=lines.append)
  timed = [r for r in rows if r.kind != "restore"]
  assert timed and all(r.measured_s and r.measured_s > 0 for r in timed)
  assert "Measured on these devices" in "\n".join(lines)
  data = json.loads(out.read_text())
  assert data["target"] == "cpu" and data["exact"] and len(data["rows"]) == len(rows)
  data["device_kind"] = "NVIDIA H100 80GB HBM3"   # as a measuring run on an H100 writes it
  out.write_text(json.dumps(data))
  measured = dry_run.load_measured(str(out))
  train_rows = [r for r in rows if r.kind == "train"]
  expected = np.median([r.tflop_per_step / r.measured_s for r in train_rows])
  assert measured == {"H100 SXM": pytest.approx(expected)}
  text = dry_run.table(rows, "gpu", False, 0.05, measured)
  assert "measured throughput for H100 SXM" in text and "assumed 5% of peak" in text


# Small synthesis sizes for the methods whose sections default to the published ones.
SMALL = {"deepinversion": {"deepinversion.rounds": 2, "deepinversion.batch_size": 16,
                           "deepinversion.iterations": 2, "deepinversion.kd_steps": 2},
         "cmi": {"cmi.rounds": 2, "cmi.batch_size": 16, "cmi.iterations": 2, "cmi.kd_steps": 2,
                 "cmi.bank_size": 32, "cmi.n_neg": 24},
         "fast": {"fast.rounds": 3, "fast.warmup": 1, "fast.batch_size": 16, "fast.iterations": 2,
                  "fast.kd_steps": 2, "fast.latent_dim": 16, "fast.width": 8}}


@pytest.mark.parametrize("method", [m for m in registry.names() if registry.student_stage(m)])
def test_every_method_has_a_measuring_dry_run(method, tmp_path):
  """What benchmarks/accelerator.sh step 5 runs for each method: every program measured on
  zero inputs and the rows written as JSON, the method's own train programs with their calls."""
  out = tmp_path / "rows.json"
  config = tiny_config(method, **{"dry_run": True, "dry_run_target": "cpu",
                                  "dry_run_measure": True, "dry_run_out": str(out)},
                       **SMALL.get(method, {}))
  rows = _rows(config)
  timed = [r for r in rows if r.kind != "restore"]
  assert all(r.measured_s is not None and r.measured_s > 0 for r in timed)
  own = [r for r in rows if r.stage != registry.get(method).teacher.name and r.kind == "train"]
  assert own and all(r.steps > 0 for r in own)
  data = json.loads(out.read_text())
  assert data["config"] == method and len(data["rows"]) == len(rows)
