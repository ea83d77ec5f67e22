"""checkpoints.StageCheckpoints' asynchronous saves and the final checkpoint's layout, and the
loop's save on SIGTERM (within its time budget, with a periodic save in flight).

The states are large enough (32-64 MiB) that a save is still being written for tens of
milliseconds after the call returns, while the next steps already run (a step of the toy loops
takes well under a millisecond).
"""
import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import loop
from datafree_jax.errors import CheckpointError

BIG = 32 * 2**20 // 4   # float32 elements of a 32 MiB array


@jax.jit
def _touch(state):
  return jax.tree.map(lambda x: x + 1, state)


# Donated: XLA may update the buffers in place, the ones an asynchronous save was given.
_touch_donated = jax.jit(lambda s: jax.tree.map(lambda x: x * 3 + 1, s), donate_argnums=(0,))


def _state(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"big": jax.random.normal(k1, (BIG,)), "w": jax.random.normal(k2, (3, 5)),
          "step": jnp.int32(seed)}


def _host(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_async_save_keeps_the_values_at_the_call_while_the_state_changes(tmp_path):
  """Saves returned to the caller before being written; the state is then updated by donated
  steps (in place where XLA can) while the write goes on. Each checkpoint holds the values of
  its call, and waiting completes it."""
  ckpt = ckpt_lib.StageCheckpoints(str(tmp_path / "s"), max_to_keep=5)
  state = _state()
  expected = {}
  for step in (1, 2, 3):
    state = _touch_donated(state)
    expected[step] = _host(state)
    report = ckpt.save(step, state, {"step": step}, wait=False)
    assert report.seconds is None and report.step == step
    assert set(report.items) == {"state", "meta"}
    assert report.items["state"] == ckpt_lib.tree_bytes(state) > BIG * 4 - 1
    for _ in range(3):  # the next steps run while it is written
      state = _touch_donated(state)
  assert ckpt.wait()
  assert ckpt.in_flight() is None and ckpt.complete_step() == 3
  assert ckpt.last.step == 3 and ckpt.last.seconds >= ckpt.last.blocked_s
  for step, want in expected.items():
    _assert_equal(ckpt.restore(step, "state", ckpt_lib.abstract_like(state)), want)
    assert ckpt.restore_meta(step) == {"step": step}
  ckpt.close()


def test_a_bounded_wait_returns_while_the_write_goes_on(tmp_path):
  ckpt = ckpt_lib.StageCheckpoints(str(tmp_path / "s"))
  state = {"big": jnp.ones((2 * BIG,))}   # 64 MiB
  ckpt.save(1, state, {}, wait=True)
  report = ckpt.save(2, _touch(state), {}, wait=False)
  assert not ckpt.wait(timeout=0.0)       # still being written
  assert ckpt.in_flight() is report and ckpt.complete_step() == 1
  # A manager opened now (another process resuming) sees only the complete step.
  reader = ckpt_lib.StageCheckpoints(str(tmp_path / "s"), create=False)
  assert reader.latest_step() == 1
  reader.close()
  assert ckpt.wait(timeout=600.0) and report.seconds is not None
  assert ckpt.complete_step() == 2
  ckpt.close()


def test_final_checkpoint_holds_the_part_and_a_deletable_resume_item(tmp_path):
  d = str(tmp_path / "s")
  state = {"params": {"k": jnp.arange(6.0)}, "batch_stats": {"m": jnp.ones(2)},
           "opt_state": {"mu": jnp.full((6,), 0.5)}, "step": jnp.int32(9)}
  part = {"params": state["params"], "batch_stats": state["batch_stats"]}
  ckpt = ckpt_lib.StageCheckpoints(d)
  ckpt.save(6, state, {"done": False})
  report = ckpt.save(9, state, {"done": True}, {"generators": part}, state_item="generators")
  ckpt.delete_others(9)
  assert set(report.items) == {"resume", "generators", "meta"}
  assert report.items["resume"] == 6 * 4 + 4 and report.items["generators"] == 8 * 4
  assert sorted(os.listdir(d)) == ["9"]
  assert {"generators", "resume", "meta"} <= set(os.listdir(os.path.join(d, "9")))
  assert "state" not in os.listdir(os.path.join(d, "9"))
  meta = ckpt.restore_meta(9)
  assert meta["state_items"] == ["generators", "resume"]
  _assert_equal(ckpt.restore_state(9, ckpt_lib.abstract_like(state)), state)
  shapes = ckpt.state_shapes(9)
  assert {k: jax.tree.map(lambda s: s.shape, v) for k, v in shapes.items()} == {
      k: jax.tree.map(lambda s: s.shape, v) for k, v in state.items()}
  # The part alone (what the distillation stage reads) needs no 'resume'.
  shutil.rmtree(os.path.join(d, "9", "resume"))
  _assert_equal(ckpt.restore(9, "generators", ckpt_lib.abstract_like(part)), part)
  with pytest.raises(CheckpointError, match=r"holds no 'resume' item \(it was deleted\): its "
                                            r"'generators' can be read, but the stage cannot "
                                            "be continued"):
    ckpt.restore_state(9, ckpt_lib.abstract_like(state))
  ckpt.close()


def test_a_final_checkpoint_of_the_earlier_layout_still_restores(tmp_path):
  """Before the split layout a final checkpoint held the whole 'state' beside 'generators'."""
  state = {"params": {"k": jnp.arange(3.0)}, "opt_state": {"mu": jnp.ones(3)},
           "step": jnp.int32(4)}
  ckpt = ckpt_lib.StageCheckpoints(str(tmp_path / "s"))
  ckpt.save(4, state, {"done": True}, {"generators": {"params": state["params"]}})
  _assert_equal(ckpt.restore_state(4, ckpt_lib.abstract_like(state)), state)
  assert set(ckpt.state_shapes(4)) == set(state)
  ckpt.close()


def _toy_step(sigterm_in_step):
  """A step that keeps 'big' (the same array: the step takes no time) and doubles 'w';
  SIGTERM to this process in step `sigterm_in_step` (the one that reaches that step + 1)."""
  update = jax.jit(lambda w, step: (w * 2.0, step + 1), donate_argnums=(0, 1))

  def step_fn(state, _):
    if int(state["step"]) == sigterm_in_step:
      os.kill(os.getpid(), signal.SIGTERM)   # the loop's handler sets a flag
    w, step = update(state["w"], state["step"])
    return dict(state, w=w, step=step), {"loss": w.sum()}
  return step_fn


def _toy_state(mib):
  return {"big": jnp.ones((mib * 2**18,)), "w": jnp.ones(3), "step": jnp.zeros((), jnp.int32)}


def test_sigterm_while_a_periodic_save_is_written_waits_for_it_then_saves(tmp_path, capsys):
  """Checkpoint 3 is being written (64 MiB) when SIGTERM arrives in the next step: the loop
  waits for it within the budget, then saves step 4 and stops; nothing is lost."""
  ckpt = ckpt_lib.StageCheckpoints(str(tmp_path / "s"))
  with pytest.raises(loop.Preempted) as err:
    loop.run(stage="toy", ckpt=ckpt, state=_toy_state(64), step_fn=_toy_step(3),
             total_steps=9, checkpoint_every=3, log_every_secs=1e9, preemption_save_secs=600)
  ckpt.close()
  assert err.value.step == 4 and err.value.saved
  out = capsys.readouterr().out
  assert "toy: SIGTERM at step 4 while checkpoint 3 (state 64.00 MiB, meta) is being " \
         "written; waiting for it first" in out
  m = re.search(r"toy: preemption checkpoint of step 4 written in ([0-9.]+) s \(budget 600 s\): "
                r"state 64\.00 MiB, meta in ", out)
  assert m, out
  reader = ckpt_lib.StageCheckpoints(str(tmp_path / "s"), create=False)
  assert reader.manager.all_steps() == [3, 4]
  for step in (3, 4):
    restored = reader.restore(step, "state", ckpt_lib.abstract_like(_toy_state(64)))
    np.testing.assert_array_equal(np.asarray(restored["w"]), 2.0 ** step)
  reader.close()


def test_a_preemption_save_past_its_budget_says_what_a_resume_uses(tmp_path, capsys):
  """A budget far below the write time: the loop stops waiting, names the complete checkpoint
  a resume would use, and the write still completes before the process goes on (close)."""
  ckpt = ckpt_lib.StageCheckpoints(str(tmp_path / "s"))
  with pytest.raises(loop.Preempted) as err:
    loop.run(stage="toy", ckpt=ckpt, state=_toy_state(64), step_fn=_toy_step(4),
             total_steps=9, checkpoint_every=2, log_every_secs=1e9, async_saves=False,
             preemption_save_secs=1e-6)
  assert not err.value.saved and err.value.step == 5 and err.value.resume_step == 4
  assert str(err.value).startswith(
      "toy: preempted (SIGTERM) at step 5; its checkpoint was not complete after the "
      "preemption budget of 1e-06 s (checkpoint_preemption_secs) and is still being written: "
      "if the process is killed first, a resume starts from step 4 (in ")
  assert ("toy: the preemption save of step 5 did not complete within 1e-06 s "
          "(checkpoint_preemption_secs;") in capsys.readouterr().err
  ckpt.close()   # the write goes on until it completes
  reader = ckpt_lib.StageCheckpoints(str(tmp_path / "s"), create=False)
  assert reader.latest_step() == 5
  reader.close()


def test_a_finished_stage_continues_from_its_split_final_checkpoint(tmp_path):
  """A finished stage whose config asks for more steps continues from its final checkpoint
  ('params' item + 'resume') exactly as an uninterrupted run; without 'resume' it cannot."""
  update = jax.jit(lambda s: {"params": s["params"] * 2.0 + s["opt"], "opt": s["opt"] + 1.0,
                              "step": s["step"] + 1})

  def step_fn(state, _):
    new = update(state)
    return new, {"loss": new["params"].sum()}

  def init():
    return {"params": jnp.ones(4), "opt": jnp.zeros(4), "step": jnp.zeros((), jnp.int32)}

  def run(d, total):
    ckpt = ckpt_lib.StageCheckpoints(str(tmp_path / d))
    try:
      return loop.run(stage="toy", ckpt=ckpt, state=init(), step_fn=step_fn, total_steps=total,
                      checkpoint_every=2, log_every_secs=1e9,
                      final_extras=lambda s: {"part": {"params": s["params"]}},
                      final_state_item="part")
    finally:
      ckpt.close()
  straight = run("straight", 6)
  run("continued", 4)
  assert sorted(os.listdir(tmp_path / "continued")) == ["4"]
  assert {"part", "resume"} <= set(os.listdir(tmp_path / "continued" / "4"))
  continued = run("continued", 6)
  assert continued.resumed_from == 4 and continued.step == 6
  _assert_equal(continued.state, straight.state)
  run("cut", 4)
  shutil.rmtree(tmp_path / "cut" / "4" / "resume")
  with pytest.raises(CheckpointError, match="holds no 'resume' item"):
    run("cut", 6)
