"""Preemption and failure, in every stage of every built-in method (methods.BUILT_IN_NAMES):

- SIGKILL of the command line once the stage's first checkpoint exists, a resumed run preempted by
  SIGTERM (it saves the reached step, exit code 143), and a second resumed run end bitwise
  where an uninterrupted run ends;
- a NaN in the stage's loss stops the run naming stage, step and term, keeping the last good
  checkpoint.

One uninterrupted in-process run of every method (one shared teacher) is the reference. The
killed command-line runs log nothing to the console or TensorBoard before their stage ends
(log_every_secs is huge), so they never import TensorFlow; the kill is timed by the stage's
checkpoint directory appearing.
"""
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import faults
from conftest import REPO_ROOT, stage_state

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import config_lib
from datafree_jax import loop
from datafree_jax import main
from datafree_jax import methods
from datafree_jax import pipeline
from datafree_jax import registry
from datafree_jax.stages import teacher as teacher_stage

# A tiny pipeline of every method on the LeNet-5-BN teacher (moment matching needs BN), with a
# checkpoint every 3 steps (the synthesis stages' checkpoint_every=0 is config.checkpoint_every;
# their step is one round).
FLAGS = ["--config.teacher.steps=24", "--config.teacher.batch_size=16",
         "--config.teacher.eval_every=0", "--config.teacher.bn_stats_per_class=4",
         "--config.student.steps=21", "--config.student.batch_size=16",
         "--config.student.eval_every=0", "--config.generator.width=4",
         "--config.ensemble.num_generators=2", "--config.ensemble.batch_per_generator=4",
         "--config.ensemble.steps=21", "--config.ensemble.eval_every=0",
         "--config.deepinversion.rounds=21", "--config.deepinversion.batch_size=8",
         "--config.deepinversion.iterations=2", "--config.deepinversion.kd_steps=2",
         "--config.deepinversion.eval_every=0", "--config.deepinversion.checkpoint_every=0",
         "--config.cmi.rounds=21", "--config.cmi.batch_size=8", "--config.cmi.iterations=2",
         "--config.cmi.kd_steps=2", "--config.cmi.bank_size=32", "--config.cmi.n_neg=24",
         "--config.cmi.width=8", "--config.cmi.head_dim=16", "--config.cmi.eval_every=0",
         "--config.cmi.checkpoint_every=0",
         "--config.fast.rounds=21", "--config.fast.warmup=1", "--config.fast.batch_size=8",
         "--config.fast.iterations=2", "--config.fast.kd_steps=2", "--config.fast.latent_dim=16",
         "--config.fast.width=8", "--config.fast.eval_every=0", "--config.fast.checkpoint_every=0",
         "--config.checkpoint_every=3", "--config.log_every_secs=1e9"]
# Steps of each stage: teacher.steps, or 21 (student.steps, ensemble.steps, the rounds).
TOTAL = {"teacher": 24}

# How each stage runs alone: (method, config stage, stage directories it needs from earlier).
STAGE_RUNS = {"teacher": ("teacher", "all", ()),
              "dafl": ("dafl", "train", ("teacher",)),
              "generators": ("ensemble", "generators", ("teacher",)),
              "distill_generators": ("ensemble", "distill", ("teacher", "generators")),
              "distill_data": ("kd_data", "train", ("teacher",)),
              "distill_noise": ("kd_noise", "train", ("teacher",)),
              "deepinversion": ("deepinversion", "deepinversion", ("teacher",)),
              "distill_deepinversion": ("deepinversion", "distill",
                                        ("teacher", "deepinversion")),
              "cmi": ("cmi", "cmi", ("teacher",)),
              "distill_cmi": ("cmi", "distill", ("teacher", "cmi")),
              "fast": ("fast", "fast", ("teacher",))}
BUILT_IN = methods.BUILT_IN_NAMES  # a new built-in method fails the table test until it is here
ALL_STAGES = sorted({s.name for m in BUILT_IN for s in pipeline.method_stages(m)})
# Every stage's NaN case runs whole stages: they are in the slow set. The loop's guard itself
# has a fast test on a toy stage
# (test_a_non_finite_loss_in_the_loop_stops_and_keeps_the_last_good_checkpoint).


def test_the_stage_table_names_every_stage_of_every_method():
  assert set(BUILT_IN) <= set(registry.METHODS)
  assert sorted(STAGE_RUNS) == ALL_STAGES


def _config_arg(method):
  return f"method={method},teacher=lenet5_bn"


def cli_config(method, stage="all"):
  """The config the command line builds from FLAGS, for runs in this process."""
  c = config_lib.load_config_file(os.path.join(REPO_ROOT, "configs", "mnist5k.py"),
                                  _config_arg(method))
  for flag in FLAGS:  # as the command line reads them
    key, value = flag[len("--config."):].split("=")
    main.apply_override(c, key, value)
  c.stage = stage
  return c


def _assert_same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) and la
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """One workdir where every method ran uninterrupted (the teacher trained once)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  for method in BUILT_IN:
    pipeline.train_and_evaluate(cli_config(method), workdir)
  assert sorted(n for n in os.listdir(workdir) if n in ALL_STAGES) == ALL_STAGES
  return workdir


@pytest.fixture(scope="module")
def prerequisites(tmp_path_factory):
  """A workdir with what the stages need from earlier ones (the teacher, the generators),
  without the runs of the other methods that `reference` also makes."""
  workdir = str(tmp_path_factory.mktemp("prerequisites"))
  pipeline.train_and_evaluate(cli_config("teacher"), workdir)
  pipeline.train_and_evaluate(cli_config("ensemble", "generators"), workdir)
  return workdir


def _made_earlier(workdir, stage):
  """Runs in `workdir` the stages `stage` needs that it does not hold yet (the synthesis
  stages that `prerequisites` leaves out, for their distillation's NaN case); returns it."""
  for d in STAGE_RUNS[stage][2]:
    if not os.path.isdir(os.path.join(workdir, d)):
      method, config_stage, _ = STAGE_RUNS[d]
      pipeline.train_and_evaluate(cli_config(method, config_stage), workdir)
  return workdir


def _prepare(reference, workdir, stage):
  method, config_stage, needs = STAGE_RUNS[stage]
  os.makedirs(workdir, exist_ok=True)
  for d in needs:
    shutil.copytree(os.path.join(reference, d), os.path.join(workdir, d))
  return method, config_stage, TOTAL.get(stage, 21)


def _wait_for(path, proc=None, timeout=120.0):
  deadline = time.monotonic() + timeout
  while not os.path.isdir(path):
    if proc is not None and proc.poll() is not None:
      raise AssertionError(f"the run ended (code {proc.returncode}) before {path} appeared:\n"
                           + proc.stdout.read()[-3000:])
    assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
    time.sleep(0.002)


def _sigterm_run(config, workdir, stage, after_step):
  """main_entry(config, workdir) with a SIGTERM to this process once checkpoint `after_step`
  of `stage` exists; returns (exit code, stderr)."""
  def preempt():
    _wait_for(os.path.join(workdir, stage, str(after_step)))
    os.kill(os.getpid(), signal.SIGTERM)

  late = []
  # A SIGTERM arriving after the stage's loop (which handles it) must not end pytest.
  old = signal.signal(signal.SIGTERM, lambda *_: late.append(True))
  try:
    thread = threading.Thread(target=preempt)
    thread.start()
    code = pipeline.main_entry(config, workdir)
    thread.join()
  finally:
    signal.signal(signal.SIGTERM, old)
  assert not late, "the SIGTERM came after the stage had ended"
  return code


@pytest.mark.slow
@pytest.mark.parametrize("stage", ALL_STAGES)
def test_sigkill_then_sigterm_in_every_stage_then_resume_is_exact(reference, tmp_path, capsys,
                                                                  stage):
  """The command line killed (SIGKILL) once the stage's first checkpoint exists; the same run
  resumed, then preempted (SIGTERM: checkpoint of the reached step, exit code 143); resumed
  again to the end: bitwise the uninterrupted run's final state."""
  workdir = str(tmp_path / "w")
  method, config_stage, total = _prepare(reference, workdir, stage)
  stage_dir = os.path.join(workdir, stage)
  kill_after = 3  # the first checkpoint; the kill lands at a step the machine's speed decides
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.Popen(
      [sys.executable, "-m", "datafree_jax.main",
       f"--config=configs/mnist5k.py:{_config_arg(method)},stage={config_stage}",
       f"--workdir={workdir}", *FLAGS], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  try:
    _wait_for(os.path.join(stage_dir, str(kill_after)), proc)
    proc.kill()
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  killed_at = ckpt_lib.StageCheckpoints(stage_dir, create=False).latest_step()
  # (Room for the resumed run to reach its next checkpoint and be preempted before its end.)
  assert kill_after <= killed_at < total - 6, (kill_after, killed_at)

  # Resume (the same config, in this process); SIGTERM once it saved its next checkpoint.
  config = cli_config(method, config_stage)
  capsys.readouterr()
  next_checkpoint = (killed_at // 3 + 1) * 3
  assert _sigterm_run(config, workdir, stage, next_checkpoint) == 143
  out, err = capsys.readouterr()
  assert f"{stage}: resuming from step {killed_at}" in out
  m = re.search(rf"^{stage}: preempted \(SIGTERM\) at step (\d+); checkpoint saved in "
                rf"{re.escape(os.path.abspath(stage_dir))}\. Run the same command again to "
                r"resume\.$", err, re.M)
  assert m, err
  preempted_at = int(m.group(1))
  assert next_checkpoint <= preempted_at < total
  saved_step, _, meta = stage_state(stage_dir)
  assert saved_step == preempted_at and not meta["done"]

  assert pipeline.main_entry(config, workdir) == 0
  assert f"{stage}: resuming from step {preempted_at}" in capsys.readouterr().out
  step_a, state_a, meta_a = stage_state(os.path.join(reference, stage))
  step_b, state_b, meta_b = stage_state(stage_dir)
  assert step_a == step_b == total and meta_a["done"] and meta_b["done"]
  _assert_same(state_a, state_b)


@pytest.mark.slow
def test_sigterm_on_the_command_line_exits_143(reference, tmp_path):
  """The exit code as the shell sees it, for the teacher stage of the real command line."""
  workdir = str(tmp_path / "w")
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  proc = subprocess.Popen(
      [sys.executable, "-m", "datafree_jax.main",
       f"--config=configs/mnist5k.py:{_config_arg('teacher')}", f"--workdir={workdir}", *FLAGS],
      cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    _wait_for(os.path.join(workdir, "teacher", "3"), proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 143, out[-2000:]
  m = re.search(r"teacher: preempted \(SIGTERM\) at step (\d+); checkpoint saved", out)
  assert m, out[-2000:]
  ckpt = ckpt_lib.StageCheckpoints(teacher_stage.directory(workdir), create=False)
  assert ckpt.latest_step() == int(m.group(1)) and not ckpt.restore_meta()["done"]


@pytest.mark.slow
def test_sigterm_mid_save_in_the_generators_stage_then_resume_loses_nothing(prerequisites,
                                                                          tmp_path, capsys):
  """SIGTERM while a periodic checkpoint of the generators stage is being written (orbax's
  temporary directory of it exists, its step directory does not yet): the run completes that
  save, saves the reached step and exits 143; resumed, it ends bitwise where the uninterrupted
  run ended, with a final checkpoint of 'generators' and 'resume' only."""
  workdir = str(tmp_path / "w")
  method, config_stage, total = _prepare(prerequisites, workdir, "generators")
  stage_dir = os.path.join(workdir, "generators")
  config = cli_config(method, config_stage)
  sent, ended = [], threading.Event()

  def preempt_mid_save():
    while not ended.is_set():
      names = os.listdir(stage_dir) if os.path.isdir(stage_dir) else []
      for name in names:
        step = name.split(".")[0]
        if name.endswith(".orbax-checkpoint-tmp") and not os.path.isdir(
            os.path.join(stage_dir, step)):
          os.kill(os.getpid(), signal.SIGTERM)
          sent.append(int(step))
          return
      time.sleep(0.0002)

  late = []
  old = signal.signal(signal.SIGTERM, lambda *_: late.append(True))
  capsys.readouterr()
  try:
    thread = threading.Thread(target=preempt_mid_save)
    thread.start()
    code = pipeline.main_entry(config, workdir)
    ended.set()
    thread.join()
  finally:
    signal.signal(signal.SIGTERM, old)
  assert sent and not late, (sent, late)
  assert code == 143
  out, err = capsys.readouterr()
  m = re.search(r"^generators: preempted \(SIGTERM\) at step (\d+); checkpoint saved in ", err,
                re.M)
  assert m, err
  preempted_at = int(m.group(1))
  assert sent[0] <= preempted_at < total
  assert re.search(rf"^generators: preemption checkpoint of step {preempted_at} written in "
                   r"[0-9.]+ s \(budget 25 s\): state [0-9.]+ [KM]iB, meta in ", out, re.M), out
  reader = ckpt_lib.StageCheckpoints(stage_dir, create=False)
  assert sent[0] in reader.manager.all_steps() and reader.latest_step() == preempted_at
  reader.close()

  assert pipeline.main_entry(config, workdir) == 0
  assert f"generators: resuming from step {preempted_at}" in capsys.readouterr().out
  step_a, state_a, meta_a = stage_state(os.path.join(prerequisites, "generators"))
  step_b, state_b, meta_b = stage_state(stage_dir)
  assert step_a == step_b == total and meta_a["done"] and meta_b["done"]
  _assert_same(state_a, state_b)
  assert sorted(os.listdir(stage_dir)) == [str(total)]
  assert {"generators", "resume", "meta"} <= set(os.listdir(os.path.join(stage_dir, str(total))))
  assert "state" not in os.listdir(os.path.join(stage_dir, str(total)))


# The metric that turns non-finite when the stage's loss is NaN at a step.
NAN_TERM = {"teacher": "loss", "dafl": "loss_g", "generators": "loss",
            "distill_generators": "loss_kd", "distill_data": "loss_kd", "distill_noise": "loss_kd",
            "deepinversion": "loss", "distill_deepinversion": "loss_kd", "cmi": "loss",
            "distill_cmi": "loss_kd", "fast": "loss"}


@pytest.mark.slow
@pytest.mark.parametrize("stage", ALL_STAGES)
def test_nan_in_every_stage_stops_naming_stage_step_and_term(prerequisites, tmp_path, stage):
  workdir = str(tmp_path / "w")
  method, config_stage, _ = _prepare(_made_earlier(prerequisites, stage), workdir, stage)
  config = cli_config(method, config_stage)
  real = next(s for s in pipeline.method_stages(method) if s.name == stage)
  config.method = faults.with_faulty_stage(method, faults.nan_at(real, 7))
  with pytest.raises(loop.NonFiniteError,
                     match=rf"^{stage}: non-finite .*{NAN_TERM[stage]}.* at step 7 .*the last good "
                           rf"checkpoint in .*{stage} \(step 6\) is kept$"):
    pipeline.train_and_evaluate(config, workdir)
  step, state, meta = stage_state(os.path.join(workdir, stage))
  assert step == 6 and int(state["step"]) == 6 and not meta["done"]
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
  if stage == "teacher":  # (resumption itself is the SIGKILL/SIGTERM test's subject)
    config.method = method  # Without the NaN the same run resumes and finishes.
    pipeline.train_and_evaluate(config, workdir)
    step, _, meta = stage_state(os.path.join(workdir, stage))
    assert step == TOTAL["teacher"] and meta["done"]


def test_a_non_finite_loss_in_the_loop_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  """The NaN guard on a toy stage: a non-finite loss at step 7 stops the loop with one line
  naming the stage, the term and the step; the periodic checkpoint of step 6 stays the latest
  (every stage of every method: test_nan_in_every_stage_stops_naming_stage_step_and_term)."""
  def step_fn(state, _):
    bad = int(state["step"]) == 7   # the loss of the state of step 7
    return ({"step": state["step"] + 1, "w": state["w"] + 1.0},
            {"loss": jax.numpy.float32(np.nan if bad else 1.0)})
  ckpt = ckpt_lib.StageCheckpoints(str(tmp_path / "toy"))
  state = {"step": jax.numpy.zeros((), jax.numpy.int32), "w": jax.numpy.zeros(3)}
  with pytest.raises(loop.NonFiniteError,
                     match=r"^toy: non-finite .*loss.* at step 7 .*the last good checkpoint in "
                           r".*toy \(step 6\) is kept$"):
    loop.run(stage="toy", ckpt=ckpt, state=state, step_fn=step_fn, total_steps=9,
             checkpoint_every=3, log_every_secs=1e9)
  assert ckpt.latest_step() == 6
  restored = ckpt.restore(6, "state", ckpt_lib.abstract_like(state))
  np.testing.assert_array_equal(np.asarray(restored["w"]), 6.0)
  ckpt.close()


@pytest.mark.parametrize("signal_in_step", [2, 3])
def test_sigterm_in_a_periodic_checkpoint_step_saves_once(tmp_path, signal_in_step):
  """SIGTERM received in the step that reaches step 3, a periodic checkpoint step
  (checkpoint_every=3), is answered with that checkpoint (orbax refuses a second save of the
  same step); received in the step that reaches step 2, with a checkpoint of step 2."""
  def step_fn(state, _):
    if int(state["step"]) == signal_in_step - 1:
      os.kill(os.getpid(), signal.SIGTERM)  # handled by the loop: it sets a flag
    return {"step": state["step"] + 1, "w": state["w"] * 2.0}, {"loss": state["w"].sum()}
  ckpt = ckpt_lib.StageCheckpoints(str(tmp_path / "stage"))
  state = {"step": jax.numpy.zeros((), jax.numpy.int32), "w": jax.numpy.ones(3)}
  with pytest.raises(loop.Preempted) as err:
    loop.run(stage="toy", ckpt=ckpt, state=state, step_fn=step_fn, total_steps=9,
             checkpoint_every=3, log_every_secs=1e9)
  assert err.value.step == signal_in_step
  assert ckpt.latest_step() == signal_in_step
  restored = ckpt.restore(signal_in_step, "state", ckpt_lib.abstract_like(state))
  np.testing.assert_array_equal(np.asarray(restored["w"]), 2.0 ** signal_in_step)
  ckpt.close()


def test_loop_reads_a_steps_metrics_after_dispatching_the_next(tmp_path):
  """The host reads step k's metrics once step k + 1 is dispatched (the device does not wait
  for it), except where the state is used: before the evaluation, the checkpoint and the end,
  the pending step is read first. A non-finite value stops the run naming its own step, and no
  checkpoint holds a state that a non-finite step made."""
  events = []

  class Probe:
    """A metric whose reading by the host is recorded."""

    def __init__(self, i, value=1.0):
      self.i, self.value = i, value

    def __float__(self):
      events.append(("read", self.i))
      return self.value

  def run(bad_step=None, total=6):
    events.clear()

    def step_fn(state, _):
      i = int(state["step"])
      events.append(("step", i))
      value = float("nan") if i == bad_step else 1.0
      return {"step": state["step"] + 1, "w": state["w"] + 1.0}, {"loss": Probe(i, value)}
    ckpt = ckpt_lib.StageCheckpoints(str(tmp_path / f"stage{bad_step}"))
    state = {"step": jax.numpy.zeros((), jax.numpy.int32), "w": jax.numpy.zeros(2)}
    try:
      return loop.run(stage="toy", ckpt=ckpt, state=state, step_fn=step_fn, total_steps=total,
                      eval_fn=lambda s: events.append(("eval", int(s["step"]))) or {},
                      eval_every=3, checkpoint_every=4, log_every_secs=1e9), ckpt
    finally:
      ckpt.close()

  run()
  assert events == [("step", 0), ("step", 1), ("read", 0), ("step", 2), ("read", 1),
                    ("read", 2), ("eval", 3),          # step 3's state is evaluated
                    ("step", 3), ("read", 3),          # step 4's is saved
                    ("step", 4), ("step", 5), ("read", 4), ("read", 5), ("eval", 6)]
  # A NaN in step 3 (its state is step 4's, a checkpoint step): found before that save.
  with pytest.raises(loop.NonFiniteError, match="at step 3") as err:
    run(bad_step=3)
  assert ("read", 3) == events[-1] and ("step", 4) not in events
  assert "(step None)" in str(err.value)
  # A NaN in step 4 is read once step 5 is dispatched, and the run stops there.
  with pytest.raises(loop.NonFiniteError, match="at step 4"):
    run(bad_step=4)
  assert events[-2:] == [("step", 5), ("read", 4)]
