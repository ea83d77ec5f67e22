"""DAFL's joint loop and the baselines, on tiny configs with a briefly trained teacher."""
import os
import shutil

import jax
import numpy as np
import pytest

from conftest import tiny_config
from datafree_jax import train
from datafree_jax.stages import dafl
from datafree_jax.stages import teacher as teacher_stage


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teacher"))
  config = tiny_config("teacher")
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def setup(teacher_workdir):
  config = tiny_config("dafl")
  data = train.load_data(config)
  teacher = teacher_stage.load(config, teacher_workdir, data["test"].info)
  return config, data, teacher


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def test_generator_gets_gradients_and_teacher_stays_frozen(setup):
  config, data, teacher = setup
  info = data["test"].info
  state, step, *_ = dafl.build(config, teacher, info)
  gen_before = _copy(state["gen"]["params"])
  teacher_before = _copy(teacher["variables"])
  # Every generator parameter has a non-zero gradient of the DAFL objective.
  gen = dafl.make_generator(config.generator, info)
  z = jax.random.normal(jax.random.key(0), (16, config.generator.latent_dim))
  grads = jax.grad(lambda p: dafl.generator_dafl_loss(
      gen, teacher["model"], teacher["variables"], config.generator, p,
      state["gen"]["batch_stats"], z)[0])(state["gen"]["params"])
  for g in jax.tree.leaves(grads):
    assert np.abs(np.asarray(g)).max() > 0
  state, _ = step(state, None)
  changed = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(gen_before), jax.tree.leaves(state["gen"]["params"]))]
  assert all(changed)
  for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(teacher["variables"])):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_student_update_does_not_change_the_generator(setup):
  config, data, teacher = setup
  info = data["test"].info
  s1, step, *_ = dafl.build(config, teacher, info)
  s2, _, *_ = dafl.build(config, teacher, info)
  # Same generator, very different students: the generator update must be identical.
  s2["student"]["params"] = jax.tree.map(lambda x: x * 3.0 + 1.0, s2["student"]["params"])
  n1, _ = step(s1, None)
  n2, _ = step(s2, None)
  for a, b in zip(jax.tree.leaves(n1["gen"]), jax.tree.leaves(n2["gen"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(jax.tree.leaves(n1["student"])[0]),
                            np.asarray(jax.tree.leaves(n2["student"])[0]))


def test_twenty_joint_steps_lower_the_kd_loss(setup):
  config, data, teacher = setup
  state, step, *_ = dafl.build(config, teacher, data["test"].info)
  kd = []
  for _ in range(20):
    state, metrics = step(state, None)
    kd.append(float(metrics["loss_kd"]))
    assert np.isfinite(float(metrics["loss_g"]))
  assert np.mean(kd[-5:]) < 0.75 * kd[0], kd


@pytest.mark.parametrize("method", ["kd_data", "kd_noise", "dafl"])
def test_methods_run_end_to_end(teacher_workdir, tmp_path, method):
  workdir = str(tmp_path)
  shutil.copytree(teacher_stage.directory(teacher_workdir), teacher_stage.directory(workdir))
  config = tiny_config(method)
  config.student.steps = 10
  config.student.eval_every = 5
  summary = train.train_and_evaluate(config, workdir)
  assert summary["student"]["steps"] == 10
  assert 0.0 <= summary["student"]["test_accuracy"] <= 1.0
  assert os.path.exists(os.path.join(workdir, "results.json"))
  if method == "dafl":
    samples = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert samples == ["dafl_step000005.png", "dafl_step000010.png"]
