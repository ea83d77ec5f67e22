"""Preemption and failure: SIGKILL/SIGTERM mid-run resume exactly; NaN stops cleanly."""
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_config
from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import loop
from datafree_jax import train
from datafree_jax.stages import dafl
from datafree_jax.stages import teacher as teacher_stage

# A tiny pipeline on the command line: checkpoints every 3 steps, a console line every step.
TINY_FLAGS = ["--config.teacher.steps=24", "--config.teacher.batch_size=16",
              "--config.teacher.eval_every=0", "--config.teacher.bn_stats_per_class=4",
              "--config.student.steps=15", "--config.student.batch_size=16",
              "--config.student.eval_every=0", "--config.generator.width=4",
              "--config.checkpoint_every=3", "--config.log_every_secs=0"]


def _start(workdir, method):
  env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.Popen(
      [sys.executable, "-m", "datafree_jax.main", f"--config=configs/mnist5k.py:method={method}",
       f"--workdir={workdir}", *TINY_FLAGS], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)


def _run_until(workdir, method, stage, step, sig):
  """Runs the CLI and sends `sig` once it printed '<stage> step <step>/'; returns the output."""
  proc = _start(workdir, method)
  out = []
  for line in proc.stdout:
    out.append(line)
    if re.match(rf"{stage} step {step}/", line):
      proc.send_signal(sig)
      break
  out.extend(proc.stdout)
  proc.wait(timeout=300)
  return proc.returncode, "".join(out)


def _run(workdir, method):
  proc = _start(workdir, method)
  out = proc.stdout.read()
  assert proc.wait(timeout=600) == 0, out[-3000:]
  return out


def _final_state(directory):
  ckpt = ckpt_lib.StageCheckpoints(directory, create=False)
  step = ckpt.latest_step()
  shapes = ckpt.item_shapes(step, "state")
  return step, ckpt.restore(step, "state", ckpt_lib.abstract_like(
      shapes, jax.sharding.SingleDeviceSharding(jax.devices()[0])))


def _assert_same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _config_from_flags(method):
  """The config the CLI builds from TINY_FLAGS, for reference runs in this process."""
  c = tiny_config(method)
  for flag in TINY_FLAGS:
    key, value = flag[len("--config."):].split("=")
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = type(node[leaf])(value)
  return c


def test_sigkill_at_a_random_step_of_each_stage_then_resume_is_exact(tmp_path):
  rng = random.Random(1234)
  ref, killed, killed_kd = (str(tmp_path / d) for d in ("ref", "killed", "killed_kd"))
  # Uninterrupted reference runs (in this process: the same XLA programs as the CLI's).
  train.train_and_evaluate(_config_from_flags("dafl"), ref)
  train.train_and_evaluate(_config_from_flags("kd_data"), ref)
  # Teacher and DAFL's joint stage: SIGKILL at a random step of each, then run to the end.
  for stage, total in (("teacher", 24), ("dafl", 15)):
    rc, out = _run_until(killed, "dafl", stage, rng.randint(4, total - 2), signal.SIGKILL)
    assert rc == -signal.SIGKILL, out[-2000:]
  out = _run(killed, "dafl")
  assert "dafl: resuming from step" in out
  # Distillation (KD with data, which also checks the data order): same, from the teacher above.
  shutil.copytree(os.path.join(killed, "teacher"), os.path.join(killed_kd, "teacher"))
  rc, out = _run_until(killed_kd, "kd_data", "distill_data", rng.randint(4, 13), signal.SIGKILL)
  assert rc == -signal.SIGKILL, out[-2000:]
  out = _run(killed_kd, "kd_data")
  assert "distill_data: resuming from step" in out
  for run, d in ((killed, "teacher"), (killed, "dafl"), (killed_kd, "distill_data")):
    step_a, state_a = _final_state(os.path.join(ref, d))
    step_b, state_b = _final_state(os.path.join(run, d))
    assert step_a == step_b
    _assert_same(state_a, state_b)


def test_sigterm_saves_at_the_reached_step_and_resumes(tmp_path):
  workdir = str(tmp_path)
  rc, out = _run_until(workdir, "teacher", "teacher", 7, signal.SIGTERM)
  assert rc == 143, out[-2000:]
  m = re.search(r"teacher: preempted \(SIGTERM\) at step (\d+); checkpoint saved", out)
  assert m, out[-2000:]
  step = int(m.group(1))
  assert step >= 7
  ckpt = ckpt_lib.StageCheckpoints(teacher_stage.directory(workdir), create=False)
  assert ckpt.latest_step() == step
  assert not ckpt.restore_meta(step)["done"]
  out = _run(workdir, "teacher")
  assert f"teacher: resuming from step {step}" in out
  assert ckpt_lib.StageCheckpoints(teacher_stage.directory(workdir)).restore_meta()["done"]


def test_nan_stops_with_stage_step_and_term_and_keeps_last_checkpoint(tmp_path):
  config = tiny_config("teacher", debug_nan_at_step=25, checkpoint_every=10)
  data = train.load_data(config)
  workdir = str(tmp_path)
  with pytest.raises(loop.NonFiniteError,
                     match=r"teacher: non-finite loss at step 25 .*step 20\) is kept"):
    teacher_stage.train(config, workdir, data, writer=None)
  ckpt = ckpt_lib.StageCheckpoints(teacher_stage.directory(workdir), create=False)
  assert ckpt.latest_step() == 20
  step, state = _final_state(teacher_stage.directory(workdir))
  assert step == 20 and int(state["step"]) == 20
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
  # Without the injected NaN the same command resumes from step 20 and finishes.
  config.debug_nan_at_step = -1
  out = teacher_stage.train(config, workdir, data, writer=None)
  assert out["meta"]["done"] and out["meta"]["step"] == 40


def test_nan_in_the_dafl_generator_loss_names_it(tmp_path):
  config = tiny_config("dafl", debug_nan_at_step=3)
  config.teacher.steps = 5
  data = train.load_data(config)
  teacher = teacher_stage.train(tiny_config("teacher", **{"teacher.steps": 5}), str(tmp_path),
                                data, writer=None)
  with pytest.raises(loop.NonFiniteError, match=r"dafl: non-finite .*loss_g.* at step 3"):
    dafl.train(config, str(tmp_path), teacher, data, writer=None)


ENSEMBLE_FLAGS = ["--config.teacher.model=lenet5_bn", "--config.student.model=lenet5_half_bn",
                  "--config.ensemble.num_generators=2", "--config.ensemble.batch_per_generator=4",
                  "--config.ensemble.steps=12", "--config.ensemble.eval_every=0",
                  "--config.student.steps=6"]


def test_sigkill_in_the_generators_stage_then_resume_is_exact(tmp_path, monkeypatch):
  """The ensemble's generators stage (stacked params, BN and optimiser state): SIGKILL at a
  random step, resume, and end bitwise where an uninterrupted run ends."""
  monkeypatch.setattr(sys.modules[__name__], "TINY_FLAGS", TINY_FLAGS + ENSEMBLE_FLAGS)
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  config = _config_from_flags("ensemble")  # TINY_FLAGS now include ENSEMBLE_FLAGS.
  assert config.teacher.model == "lenet5_bn" and config.ensemble.steps == 12
  config.stage = "teacher"
  train.train_and_evaluate(config, ref)
  shutil.copytree(os.path.join(ref, "teacher"), os.path.join(killed, "teacher"))
  config.stage = "generators"
  train.train_and_evaluate(config, ref)
  rc, out = _run_until(killed, "ensemble", "generators", random.Random(7).randint(4, 10),
                       signal.SIGKILL)
  assert rc == -signal.SIGKILL, out[-2000:]
  out = _run(killed, "ensemble")
  assert "generators: resuming from step" in out
  step_a, state_a = _final_state(os.path.join(ref, "generators"))
  step_b, state_b = _final_state(os.path.join(killed, "generators"))
  assert step_a == step_b == 12
  _assert_same(state_a, state_b)
