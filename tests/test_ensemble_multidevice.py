"""Every stage on 8 host CPU devices (one subprocess) against 1 device (this process), and the
checkpoints the 8 devices wrote restored here on 1 device."""
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import stage_state

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import stage as stage_lib
from datafree_jax import pipeline
from datafree_jax.ensemble import frozen as ensemble_frozen
from datafree_jax.stages import distill
from datafree_jax.stages import ensemble
from datafree_jax.stages import teacher as teacher_stage

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multidevice_check as check  # pylint: disable=g-import-not-at-top,wrong-import-position

# The slow set (conftest.py): CI runs it as a step of its own.
pytestmark = pytest.mark.slow


def _restore_state(directory):
  """(step, 'state' item) of the latest checkpoint in `directory`, restored on 1 device."""
  return stage_state(directory)[:2]


def _meta(directory):
  ckpt = ckpt_lib.StageCheckpoints(directory, create=False)
  meta = ckpt.restore_meta()
  ckpt.close()
  return meta


def _diffs(ours, theirs, prefix):
  """{name: max |a - b|} over the arrays named prefix* (the same names on both sides)."""
  names = sorted(k for k in theirs if k.startswith(prefix))
  assert names and names == sorted(k for k in ours if k.startswith(prefix)), prefix
  return {k: float(np.max(np.abs(ours[k].astype(np.float64) - theirs[k]), initial=0.0))
          for k in names}


def _wait_for(path, proc, err_path, timeout=600):
  t0 = time.time()
  while not os.path.exists(path):
    if proc.poll() is not None:
      with open(err_path) as f:
        pytest.fail(f"the 8-device subprocess ended (rc {proc.returncode}) before writing "
                    f"{path}:\n{f.read()[-5000:]}")
    if time.time() - t0 > timeout:
      pytest.fail(f"no {path} after {timeout} s")
    time.sleep(0.05)


# 8 devices against 1 (same config, data and keys), stage_config's SGD: the reductions over the
# batch (mean loss, gradients, BN batch statistics) add up in another order when the batch is
# split over 8 devices, so results differ by float rounding. Measured (2-core CPU, jax 0.10.2,
# max |8 - 1|): teacher 3.6e-6 (its BN statistics, values up to ~4; parameters < 1e-6),
# DAFL 6e-7, distillation from data 1.9e-6 (the momentum of conv1; 0.12), from noise 3e-7;
# metrics (losses, gradient norms) 1e-6 relative. RTOL = ATOL = 1e-4 leaves >= 25x margin and
# is >= 100x below what a data-parallel bug does: a gradient taken on one device's shard, or
# summed instead of averaged over the devices (8x the SGD step, 8x the gradient norm), or every
# device drawing the same latent vectors moves parameters by 1e-3 to 1e-1 in 3 to 6 steps.
RTOL = ATOL = 1e-4


def test_every_stage_on_8_devices_matches_1_device_and_restores_here(tmp_path):
  workdir = str(tmp_path)
  ref = str(tmp_path / "one_device")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             # 8 devices must be set before jax is imported; opt level 0 halves compile time.
             XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                       "--xla_backend_optimization_level=0")
  out_path, err_path = str(tmp_path / "stdout.txt"), str(tmp_path / "stderr.txt")
  with open(out_path, "w") as out, open(err_path, "w") as err:
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "multidevice_check.py"), workdir],
                            env=env, stdout=out, stderr=err)
  try:
    # Meanwhile, the same stages on this process's 1 device.
    config = check.stage_config("teacher")
    data = pipeline.load_data(config)
    info = data["test"].info
    mine = check.teacher_result(teacher_stage.train(config, ref, data, None))
    _wait_for(os.path.join(workdir, check.TEACHER_DONE), proc, err_path)
    # The teacher written on 8 devices, loaded here on 1: DAFL and the distillation start from
    # it, as they do there.
    teacher8 = teacher_stage.load(config, workdir, info)
    mine.update(check.downstream(ref, teacher8, data))
    # The generator ensemble's step on 1 device, all members at once ('vmap'; 10 members).
    random_teacher = check.random_teacher(info)
    mesh1 = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("gen",))
    e1 = ensemble.build(check.config_for("vmap"), random_teacher, info, mesh1)
    s1, m1 = e1.step(e1.state, None)
    step1 = check.flatten({"params": s1["params"], "batch_stats": s1["batch_stats"]}, "state/")
    step1.update(check.flatten(jax.device_get(m1), "metrics/"))
    proc.wait(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  with open(out_path) as f, open(err_path) as g:
    stdout, stderr = f.read(), g.read()
  assert proc.returncode == 0, stdout[-3000:] + stderr[-5000:]
  facts = json.loads(stdout.strip().splitlines()[-1])
  assert facts["devices"] == 8 and facts["padded"] == 16 and facts["local_members"] == [2]
  assert facts["steps"] == 2
  # The sharded ensemble's step on 8 devices ('loop', 2 members per device, one at a time)
  # is the 1-device 'vmap' step of all 10 members at once.
  assert e1.padded == 10
  step8 = dict(np.load(os.path.join(workdir, "ensemble_step.npz")))
  for name in _diffs(step1, step8, "state/"):
    np.testing.assert_allclose(step1[name], step8[name], atol=1e-5, rtol=0, err_msg=name)
  for name in _diffs(step1, step8, "metrics/"):
    np.testing.assert_allclose(step1[name], step8[name], atol=1e-5, rtol=1e-5, err_msg=name)
  theirs = dict(np.load(os.path.join(workdir, "data_parallel.npz")))

  # The teacher written on 8 devices loads here bit for bit.
  loaded = check.teacher_result(teacher8)
  assert all(d == 0.0 for d in _diffs(loaded, theirs, "teacher/").values())
  # Each data-parallel stage on 8 devices = on 1 device, up to rounding.
  worst = {}
  for prefix in ("teacher/", "dafl/", "dafl_metrics/", "distill_data/", "distill_noise/"):
    for name in _diffs(mine, theirs, prefix):
      np.testing.assert_allclose(mine[name], theirs[name], rtol=RTOL, atol=ATOL, err_msg=name)
    worst[prefix] = max(_diffs(mine, theirs, prefix).items(), key=lambda kv: kv[1])
  worst["teacher/variables/"] = max(_diffs(mine, theirs, "teacher/variables/").items(),
                                    key=lambda kv: kv[1])
  worst["ensemble"] = max(_diffs(step1, step8, "").items(), key=lambda kv: kv[1])
  print("max |8 devices - 1 device|:", worst)
  # The last step's loss and gradient norm of each stage (in its checkpoint's meta): a gradient
  # summed instead of averaged over devices shows there even under Adam's scale-free update.
  for stage in ("teacher", "distill_data", "distill_noise"):
    meta8, meta1 = _meta(os.path.join(workdir, stage)), _meta(os.path.join(ref, stage))
    assert meta8["done"] and meta1["done"] and meta8["train"].keys() == meta1["train"].keys()
    for k, v in meta1["train"].items():
      if k != "accuracy":  # k/16: rounding could flip a near tie.
        np.testing.assert_allclose(meta8["train"][k], v, rtol=RTOL, err_msg=f"{stage} {k}")

  # The distillation stages' final states, written on 8 devices, restore here bit for bit.
  for source in ("data", "noise"):
    step, state = _restore_state(distill.directory(workdir, source))
    assert step == 3
    restored = check.flatten(state, f"distill_{source}/")
    assert all(d == 0.0 for d in _diffs(restored, theirs, f"distill_{source}/").values())

  # An unfinished generators stage written on 8 devices (16 members for 10 generators) cannot
  # resume on 1 device (10 members): the padding depends on the device count.
  unfinished = os.path.join(workdir, "unfinished")
  meta = _meta(ensemble.directory(unfinished))
  assert (meta["done"], meta["step"], meta["padded"]) == (False, 1, 16)
  with pytest.raises(ckpt_lib.CheckpointError, match="padding depends on the device count"):
    stage_lib.run_alone(ensemble.GENERATORS, check.config_for("auto", at_once=1), unfinished,
                        info=info, teacher=random_teacher)

  # The final checkpoint holds all 16 members as they were split (nothing gathered onto one
  # device); restored here, on this process's device(s), as the real 10.
  ckpt = ckpt_lib.StageCheckpoints(os.path.join(workdir, "generators"), create=False)
  saved = ckpt.item_shapes(ckpt.latest_step(), "generators")
  ckpt.close()
  assert {x.shape[0] for x in jax.tree.leaves(saved)} == {16}
  gens = ensemble_frozen.load_generators(os.path.join(workdir, "generators"), info)
  assert gens["meta"]["num_generators"] == 10 and gens["meta"]["padded"] == 16
  expected = np.load(os.path.join(workdir, "expected.npz"))
  restored = jax.tree_util.tree_flatten_with_path(
      {"params": gens["params"], "batch_stats": gens["batch_stats"]})[0]
  assert len(restored) == len(expected.files)
  for path, value in restored:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    np.testing.assert_array_equal(np.asarray(value), expected[name])
  images_fn = jax.jit(ensemble_frozen.make_images_fn(gens, "vmap", 4), static_argnums=1)
  images = np.asarray(images_fn(jax.random.key(0), 20, None,
                                {"params": gens["params"], "batch_stats": gens["batch_stats"]}))
  assert images.shape == (20, 32, 32, 1) and np.isfinite(images).all()
  assert os.path.exists(os.path.join(workdir, "samples", "generators_step000002.png"))
  # The stage finished on 8 devices (16 members) counts as finished here, too.
  out = stage_lib.run_alone(ensemble.GENERATORS, check.config_for("auto", at_once=1), workdir,
                            info=info).summary["generators"]
  assert (out["num_generators"], out["members"], out["steps"]) == (10, 16, 2)
