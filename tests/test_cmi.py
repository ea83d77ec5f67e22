"""CMI (method 'cmi', stages/cmi.py): the local view's crop, the memory bank's draw, the
authors' generator reset, the teacher's per-image features, a synthesis round that lowers its
loss and fills the pool and the bank, the command line with export and plots, and a run
stopped mid-synthesis that resumes to the uninterrupted run's result."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import (check_method_command_line, check_resumes_after_sigterm,
                      check_synthesis_method_registered, copy_stages, stage_state,
                      teacher_context, tiny_config)

from datafree_jax import models
from datafree_jax import pipeline
from datafree_jax.stages import cmi

# The tiny BN teacher of conftest's bn_teacher_workdir (10 steps), and a few small rounds.
TINY = {"teacher.steps": 10, "cmi.rounds": 3, "cmi.batch_size": 16, "cmi.iterations": 4,
        "cmi.kd_steps": 2, "cmi.bank_size": 32, "cmi.n_neg": 24, "cmi.eval_every": 0,
        "cmi.checkpoint_every": 1, "student.steps": 6, "student.batch_size": 16}


def cmi_config(**overrides):
  return tiny_config("cmi", **dict(TINY, **overrides))


def test_the_method_is_registered_with_its_stages_and_section():
  check_synthesis_method_registered("cmi", ("teacher", "cmi", "distill_cmi"), "distill_cmi",
                                    "w_cr")


def test_bad_settings_are_refused():
  with pytest.raises(pipeline.config_lib.ConfigError, match="has no BatchNorm layers"):
    pipeline.validate(cmi_config(**{"teacher.model": "lenet5", "cmi.w_bn": 0.0}))
  with pytest.raises(pipeline.config_lib.ConfigError, match="must be a multiple of"):
    pipeline.validate(cmi_config(**{"cmi.bank_size": 40}))


def test_the_local_view_is_a_resized_crop():
  # Jitted, as the synthesis round runs it (one program to compile, not one per operation).
  crop = jax.jit(cmi.random_resized_crop, static_argnames="ratio")
  x = jax.random.uniform(jax.random.key(0), (6, 8, 8, 2))
  # The whole image at aspect ratio 1 is the image itself.
  same = crop(jax.random.key(1), x, 1.0, ratio=(1.0, 1.0))
  np.testing.assert_allclose(same, x, atol=1e-6)
  # A crop of a horizontal ramp is a ramp again, stretched: values stay in the ramp's range,
  # still increase along the rows, and span less than the whole ramp on average (a crop may
  # take the full width when it gives up height).
  ramp = jnp.broadcast_to(jnp.arange(8.0)[None, None, :, None], (16, 8, 8, 1))
  cropped = np.asarray(crop(jax.random.key(2), ramp, 0.25))
  assert cropped.min() >= 0 and cropped.max() <= 7 + 1e-5
  assert np.all(np.diff(cropped[:, 4, :, 0], axis=1) >= -1e-5)
  # Away from the border pixels it is linear: a crop resized by one factor.
  steps = np.diff(cropped[:, 4, :, 0], axis=1)[:, 1:-1]
  np.testing.assert_allclose(steps, np.broadcast_to(steps[:, :1], steps.shape), atol=1e-4)
  span = cropped[:, 4, -1, 0] - cropped[:, 4, 0, 0]
  assert np.all(span <= 7 + 1e-5) and np.mean(span) < 6.5
  g = jax.jit(jax.grad(lambda x: jnp.sum(crop(jax.random.key(3), x, 0.25))))(x)
  assert np.all(np.isfinite(g)) and np.any(g)


def test_the_bank_gives_filled_rows_without_replacement_first():
  bank = jnp.arange(10.0)[:, None] * jnp.ones((1, 3))
  rows, valid = cmi.sample_bank(jax.random.key(0), bank, 4, 6)
  rows, valid = np.asarray(rows), np.asarray(valid)
  assert rows.shape == (6, 3) and valid.sum() == 4
  assert sorted(rows[valid, 0]) == [0, 1, 2, 3]           # each filled row once
  assert np.all(rows[~valid, 0] >= 4)
  rows, valid = cmi.sample_bank(jax.random.key(1), bank, 10, 4)
  assert np.all(np.asarray(valid)) and len(set(np.asarray(rows)[:, 0])) == 4
  assert not np.any(cmi.sample_bank(jax.random.key(2), bank, 0, 20)[1])  # 10 rows at most


def test_the_generator_reset_is_the_authors_init_and_its_images_are_pixels():
  gen = models.Generator(latent_dim=64, image_size=32, channels=1, width=32, style="zju")
  params, batch_stats = jax.jit(cmi.reset_generator, static_argnums=0)(gen, jax.random.key(0))
  kernels = np.concatenate([np.ravel(params[n]["kernel"]) for n in ("fc", "conv1", "conv2")])
  assert abs(kernels.std() - 0.02) < 0.001 and abs(kernels.mean()) < 0.001
  scales = np.concatenate([np.ravel(params[n]["scale"]) for n in ("bn0", "bn1", "bn2")])
  assert abs(scales.mean() - 1) < 0.01 and 0.01 < scales.std() < 0.03
  assert not any(np.any(params[n]["bias"]) for n in params)
  images, _ = jax.jit(functools.partial(gen.apply, mutable=["batch_stats"]))(
      {"params": params, "batch_stats": batch_stats},
      jax.random.normal(jax.random.key(1), (4, 64)))
  assert images.shape == (4, 32, 32, 1) and 0 < images.min() and images.max() < 1


def test_the_features_are_each_images_means_of_the_bn_inputs():
  model = models.get_classifier("lenet5_bn", 10)
  x = jax.random.normal(jax.random.key(0), (5, 32, 32, 1))

  @jax.jit
  def features(x):
    variables = model.init(jax.random.key(1), x, train=False)
    _, upd = model.apply(variables, x, train=False,
                         mutable=[models.BN_EXAMPLE_MOMENTS, models.BN_INPUTS])
    return cmi.instance_features(upd[models.BN_EXAMPLE_MOMENTS]), upd
  f, upd = features(x)
  f = np.asarray(f)
  assert f.shape == (5, 6 + 16 + 120)
  # Their batch mean is each BN layer's batch mean of its input, layers in path order.
  means = np.concatenate([np.asarray(upd[models.BN_INPUTS][n]["mean"])
                          for n in ("bn1", "bn2", "bn3")])
  np.testing.assert_allclose(f.mean(0), means, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_synthesis_round_lowers_its_loss_and_fills_the_pool_and_the_bank(bn_teacher):
  teacher, _ = bn_teacher
  ctx = teacher_context(bn_teacher, cmi_config(**{"cmi.iterations": 10, "cmi.lr": 0.02}))
  state, _, synth, _, _ = cmi.SYNTHESIS._build(ctx)
  head0 = jax.device_get(state["head"])
  first_round = []
  for _ in range(2):
    state, metrics = synth(state, teacher["variables"])
    first_round.append(jax.device_get(metrics))
  state = jax.device_get(state)
  m0, m1 = first_round
  assert set(m1) >= {"loss", "best_loss", "bn", "ce", "adv", "cr", "agreement"}
  assert int(state["step"]) == 2
  # The kept iterate is the best one; it is below where the round started.
  assert m1["best_loss"] <= m1["loss"] + 1e-6 and m0["bn"] < 20
  # Rounds 0 and 1 are written; their features fill bank rows 0..31 (16 each).
  assert np.any(state["pool"][0]) and np.any(state["pool"][1]) and not np.any(state["pool"][2])
  assert np.all(np.any(state["bank"] != 0, axis=1))
  # The head learns (kept across rounds).
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(head0),
                                            jax.tree.leaves(state["head"])))


@pytest.mark.slow
def test_stopped_mid_synthesis_the_run_resumes_to_the_uninterrupted_result(bn_teacher_workdir,
                                                                           tmp_path):
  """SIGTERM in round 2 of 4 (checkpoint of that round, exit 143); the same command again
  ends bitwise where the uninterrupted run ends: pool, bank, head, both students."""
  overrides = {"cmi.rounds": 4, "cmi.bank_size": 48, "stage": "train"}
  _, workdir = check_resumes_after_sigterm(
      bn_teacher_workdir, tmp_path, "cmi", cmi.SYNTHESIS, lambda: cmi_config(**overrides),
      ("cmi", "distill_cmi"))
  _, state, meta = stage_state(os.path.join(workdir, "cmi"))
  assert meta["done"] and meta["kind"] == "cmi_pool" and all(np.any(p) for p in state["pool"])


@pytest.mark.slow
def test_the_command_line_runs_the_method_then_export_and_plots(bn_teacher_workdir, tmp_path,
                                                                capsys):
  check_method_command_line(bn_teacher_workdir, tmp_path, capsys, "cmi", TINY, "distill_cmi",
                            student_steps=6)
  # stage=distill alone reads the finished pool from the checkpoint; without one it is a
  # one-line error.
  empty = copy_stages(bn_teacher_workdir, tmp_path / "e", "teacher")
  assert pipeline.main_entry(cmi_config(stage="distill"), empty) == 2
  assert "no CMI image pool in" in capsys.readouterr().err
