"""DeepInversion (method 'deepinversion', stages/deepinversion.py): the pool's pixels, the
authors' jitter, a synthesis round that lowers its loss, the two stages through the pipeline,
the command line, export and plots, and a run stopped mid-synthesis that resumes to the
uninterrupted run's result."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (check_method_command_line, check_resumes_after_sigterm,
                      check_synthesis_method_registered, copy_stages, stage_state,
                      teacher_context, tiny_config)

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import datasets
from datafree_jax import pipeline
from datafree_jax.stages import deepinversion

# The tiny BN teacher of conftest's bn_teacher_workdir (10 steps), and a few small rounds.
TINY = {"teacher.steps": 10, "deepinversion.rounds": 3, "deepinversion.batch_size": 16,
        "deepinversion.iterations": 4, "deepinversion.kd_steps": 2,
        "deepinversion.eval_every": 0, "deepinversion.checkpoint_every": 1,
        "student.steps": 6, "student.batch_size": 16}


def di_config(**overrides):
  return tiny_config("deepinversion", **dict(TINY, **overrides))


def test_the_method_is_registered_with_its_stages_and_section():
  check_synthesis_method_registered(
      "deepinversion", ("teacher", "deepinversion", "distill_deepinversion"),
      "distill_deepinversion", "w_bn")


def test_the_pool_keeps_8_bit_pixels_and_gives_back_normalised_images():
  info = datasets.config_info(tiny_config("deepinversion"))
  low, high = deepinversion.pixel_range(info)
  x = jnp.asarray(np.linspace(low[0] - 1, high[0] + 1, 7).reshape(7, 1, 1, 1), jnp.float32)
  u = deepinversion.quantize(x, info)
  assert u.dtype == jnp.uint8
  # Pixels below 0 / above 1 clip to 0 / 255; a round trip is within half a grey level.
  assert int(u[0, 0, 0, 0]) == 0 and int(u[-1, 0, 0, 0]) == 255
  back = deepinversion.dequantize(u, info)
  inside = np.clip(np.asarray(x), low[0], high[0])
  assert np.max(np.abs(np.asarray(back) - inside)) <= 0.5 / 255 / info.std[0] + 1e-6
  # The images_fn draws only from the first `filled` rounds.
  pool = jnp.stack([jnp.full((4, 2, 2, 1), r, jnp.uint8) for r in range(3)])
  draw = deepinversion.pool_images_fn(info)
  images = draw(jax.random.key(0), 64, None, {"pool": pool, "filled": jnp.int32(2)})
  levels = set(np.unique(np.round(np.asarray(images) * info.std[0] * 255 + info.mean[0] * 255)))
  assert levels == {0.0, 1.0}


def test_jitter_is_a_roll_of_the_whole_batch_and_flip_mirrors_it():
  x = jnp.arange(2 * 5 * 5).reshape(2, 5, 5, 1).astype(jnp.float32)
  jitter_and_flip = jax.jit(deepinversion.jitter_and_flip, static_argnums=(2, 3))
  seen = set()
  for k in range(30):
    y = np.asarray(jitter_and_flip(jax.random.key(k), x, 2, True))
    found = [(dy, dx, f) for dy in range(-2, 3) for dx in range(-2, 3) for f in (0, 1)
             if np.array_equal(y, np.roll(np.asarray(x)[:, :, ::-1] if f else np.asarray(x),
                                          (dy, -dx if f else dx), axis=(1, 2)))]
    assert found, k
    seen.add(found[0][2])
  assert seen == {0, 1}
  np.testing.assert_array_equal(jitter_and_flip(jax.random.key(0), x, 0, False), x)


def _round(bn_teacher, iterations, **overrides):
  teacher, _ = bn_teacher
  ctx = teacher_context(bn_teacher,
                        di_config(**{"deepinversion.iterations": iterations, **overrides}))
  state, _, synth, _, _ = deepinversion.SYNTHESIS._build(ctx)
  state, metrics = synth(state, teacher["variables"])
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.slow
def test_a_synthesis_round_lowers_its_terms_and_fills_one_round_of_the_pool(bn_teacher):
  # One iteration without the competition term, then 40 with it, from the same noise.
  state1, first = _round(bn_teacher, 1, **{"deepinversion.w_adv": 0.0})
  state, last = _round(bn_teacher, 40)
  assert "adv" not in first and 0 <= last["adv"] <= 1
  assert int(state["step"]) == 1
  assert set(last) >= {"loss", "bn", "ce", "tv", "agreement"}
  assert last["bn"] < 0.5 * first["bn"] and last["ce"] < first["ce"]
  # Round 0 is written, the other rounds are still empty.
  assert np.any(state["pool"][0]) and not np.any(state["pool"][1:])
  assert not np.array_equal(state["pool"][0], state1["pool"][0])


@pytest.mark.slow
def test_the_stages_run_and_the_distillation_reads_the_finished_pool(bn_teacher_workdir,
                                                                     tmp_path):
  workdir = copy_stages(bn_teacher_workdir, tmp_path / "w", "teacher")
  summary = pipeline.train_and_evaluate(di_config(stage="train"), workdir)
  assert summary["deepinversion"]["rounds"] == 3 and summary["deepinversion"]["images"] == 48
  assert summary["student"]["checkpoint"] == os.path.join(workdir, "distill_deepinversion")
  _, state, meta = stage_state(os.path.join(workdir, "deepinversion"))
  assert meta["done"] and meta["kind"] == "deepinversion_pool"
  assert state["pool"].shape == (3, 16, 32, 32, 1) and all(np.any(p) for p in state["pool"])
  # The finished stage keeps its final checkpoint only (the final save removes the periodic
  # ones; the resume test below stops the synthesis between rounds and resumes).
  assert ckpt_lib.StageCheckpoints(os.path.join(workdir, "deepinversion"),
                                   create=False).manager.all_steps() == [3]
  # stage=distill alone loads the pool from the checkpoint (a new student stage).
  distill_dir = os.path.join(workdir, "distill_deepinversion")
  _, first_student, _ = stage_state(distill_dir)
  os.rename(distill_dir, distill_dir + ".old")
  pipeline.train_and_evaluate(di_config(stage="distill"), workdir)
  _, again, meta = stage_state(distill_dir)
  assert meta["pool_images"] == 48 and meta["pool"] == os.path.join(workdir, "deepinversion")
  for a, b in zip(jax.tree.leaves(first_student), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_distillation_without_a_finished_pool_is_a_one_line_error(bn_teacher_workdir, tmp_path,
                                                                  capsys):
  workdir = copy_stages(bn_teacher_workdir, tmp_path / "w", "teacher")
  assert pipeline.main_entry(di_config(stage="distill"), workdir) == 2
  assert "no DeepInversion image pool in" in capsys.readouterr().err


def test_a_teacher_without_batchnorm_is_refused():
  with pytest.raises(pipeline.config_lib.ConfigError, match="has no BatchNorm layers"):
    pipeline.validate(di_config(**{"teacher.model": "lenet5"}))


@pytest.mark.slow
def test_stopped_mid_synthesis_the_run_resumes_to_the_uninterrupted_result(bn_teacher_workdir,
                                                                           tmp_path):
  """SIGTERM in round 2 of 4 (checkpoint of that round, exit 143); the same command again
  ends bitwise where the uninterrupted run ends: the pool, both students."""
  overrides = {"deepinversion.rounds": 4, "stage": "train"}
  check_resumes_after_sigterm(
      bn_teacher_workdir, tmp_path, "deepinversion", deepinversion.SYNTHESIS,
      lambda: di_config(**overrides), ("deepinversion", "distill_deepinversion"))


@pytest.mark.slow
def test_the_command_line_runs_the_method_then_export_and_plots(bn_teacher_workdir, tmp_path,
                                                                capsys):
  check_method_command_line(bn_teacher_workdir, tmp_path, capsys, "deepinversion", TINY,
                            "distill_deepinversion", student_steps=6)
