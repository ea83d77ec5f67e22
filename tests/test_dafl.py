"""DAFL's joint loop and the baselines, on tiny configs with a briefly trained teacher."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import stage_state, tiny_config

from datafree_jax import common
from datafree_jax import evaluation
from datafree_jax import generator_parts
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax import pipeline
from datafree_jax.stages import dafl
from datafree_jax.stages import teacher as teacher_stage


@pytest.fixture(scope="module")
def teacher_workdir(lenet5_teacher_workdir):
  return lenet5_teacher_workdir


@pytest.fixture(scope="module")
def setup(teacher_workdir):
  config = tiny_config("dafl")
  data = pipeline.load_data(config)
  teacher = teacher_stage.load(config, teacher_workdir, data["test"].info)
  return config, data, teacher


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def reference_dafl_step(config, teacher, info, state):
  """DAFL's joint step written out from the paper, independently of the stage's code, for SGD.

  The generator G makes x = G(z) (BN in training mode) from the step's latents; the frozen
  teacher T (evaluation mode) scores x; G descends w_oh*L_oh + w_a*L_a + w_ie*L_ie; the student
  S descends KL(softmax(T(x)) || softmax(S(x))) on the same x (the generator from before the
  step), summed over classes and divided by the batch. Returns (new gen params, new student
  params, {term: value}).
  """
  g, s = config.generator, config.student
  gen = generator_parts.make_generator(g, info)
  student = models.get_classifier(s.model, info.num_classes)
  key = common.step_key(config.seed, dafl.STAGE_SALT, 0)
  z = jax.random.normal(key, (s.batch_size, g.latent_dim))
  tvars = teacher["variables"]

  def gen_loss(gp):
    x, _ = gen.apply({"params": gp, "batch_stats": state["gen"]["batch_stats"]}, z,
                     train=True, mutable=["batch_stats"])
    logits, feats = teacher["model"].apply(tvars, x, train=False, features=True)
    p = jax.nn.softmax(logits)
    l_oh = -jnp.mean(jnp.log(jnp.max(p, axis=1)))        # CE with the argmax as the label
    l_a = -jnp.mean(jnp.abs(feats))
    p_mean = jnp.mean(p, axis=0)
    l_ie = jnp.sum(p_mean * jnp.log10(p_mean))
    return g.w_oh * l_oh + g.w_a * l_a + g.w_ie * l_ie, (x, logits, l_oh, l_a, l_ie)

  def kd(sp, x, t_logits):
    logits = student.apply({"params": sp}, x, train=False)
    p = jax.nn.softmax(t_logits)
    return jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(logits))) / x.shape[0]

  @jax.jit
  def step(gp, sp):
    (loss, (x, t_logits, l_oh, l_a, l_ie)), gg = jax.value_and_grad(gen_loss, has_aux=True)(gp)
    kd_loss, sg = jax.value_and_grad(kd)(sp, x, t_logits)
    new_g = jax.tree.map(lambda p, d: p - g.lr * d, gp, gg)
    new_s = jax.tree.map(lambda p, d: p - s.lr * d, sp, sg)
    return new_g, new_s, {"loss_g": loss, "loss_kd": kd_loss, "l_oh": l_oh, "l_a": l_a,
                          "l_ie": l_ie}
  return step(state["gen"]["params"], state["student"]["params"])


@pytest.mark.parametrize("teacher_model", ["lenet5", "lenet5_bn"])
def test_joint_step_equals_the_papers_step(setup, bn_teacher_workdir, teacher_model):
  """Generator and student updates, and every logged term, against reference_dafl_step.

  SGD makes the update a linear function of the gradient, so a wrong image, teacher mode,
  loss weight or parameter version shows in the parameters (Adam's first step, lr * g / |g|,
  would hide the gradient's size).
  """
  _, data, teacher = setup
  config = tiny_config("dafl", **{"generator.optimizer": "sgd", "generator.lr": 0.05,
                                  "student.optimizer": "sgd", "student.lr": 0.1,
                                  "student.momentum": 0.0, "generator.w_a": 0.3,
                                  "generator.w_ie": 2.0, "teacher.model": teacher_model})
  info = data["test"].info
  if teacher_model == "lenet5_bn":  # Evaluation mode matters: running stats != batch stats.
    teacher = teacher_stage.load(config, bn_teacher_workdir, info)
  state, step, *_ = dafl.build(config, teacher, info)
  before = _np(state)
  teacher_before = _np(teacher["variables"])
  ref_g, ref_s, ref_terms = reference_dafl_step(config, teacher, info, state)
  new, metrics = step(state, None)
  for a, b in zip(jax.tree.leaves(_np(new["gen"]["params"])), jax.tree.leaves(_np(ref_g))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
  for a, b in zip(jax.tree.leaves(_np(new["student"]["params"])), jax.tree.leaves(_np(ref_s))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)
  for k, v in ref_terms.items():
    np.testing.assert_allclose(float(metrics[k]), float(v), rtol=1e-5, atol=1e-6)
  # Both moved, by more than the tolerance above.
  for part in ("gen", "student"):
    moved = [np.abs(a - np.asarray(b)).max() for a, b in zip(
        jax.tree.leaves(before[part]["params"]), jax.tree.leaves(new[part]["params"]))]
    assert max(moved) > 1e-3, (part, moved)
  # The teacher's variables (its BN running statistics included) are what they were.
  for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(_np(teacher["variables"]))):
    np.testing.assert_array_equal(a, b)


def test_student_update_does_not_change_the_generator(setup):
  config, data, teacher = setup
  info = data["test"].info
  s1, step, *_ = dafl.build(config, teacher, info)
  s2, _, *_ = dafl.build(config, teacher, info)
  # Same generator, very different students: the generator update must be identical.
  s2["student"]["params"] = jax.tree.map(lambda x: x * 3.0 + 1.0, s2["student"]["params"])
  students_before = _np((s1["student"]["params"], s2["student"]["params"]))
  n1, _ = step(s1, None)
  n2, _ = step(s2, None)
  for a, b in zip(jax.tree.leaves(n1["gen"]), jax.tree.leaves(n2["gen"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # And each student was updated from its own parameters.
  for before, after in zip(students_before, (n1["student"]["params"], n2["student"]["params"])):
    assert all(not np.array_equal(a, np.asarray(b))
               for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_twenty_joint_steps_lower_the_kd_loss(setup):
  config, data, teacher = setup
  state, step, *_ = dafl.build(config, teacher, data["test"].info)
  kd = []
  for _ in range(20):
    state, metrics = step(state, None)
    kd.append(float(metrics["loss_kd"]))
    assert np.isfinite(float(metrics["loss_g"]))
  assert np.mean(kd[-5:]) < 0.75 * kd[0], kd


# Final test accuracy of the tiny student after 30 steps (measured: kd_data 0.41, kd_noise 0.10
# from a 0.63 teacher): KD with the real images must learn, KD on noise must not.
ACCURACY_BOUNDS = {"kd_data": (0.3, 1.0), "kd_noise": (0.0, 0.2), "dafl": (0.0, 1.0)}
STAGE_DIRS = {"kd_data": "distill_data", "kd_noise": "distill_noise", "dafl": "dafl"}


@pytest.mark.parametrize("method", ["kd_data", "kd_noise", "dafl"])
def test_methods_run_end_to_end(teacher_workdir, tmp_path, method):
  workdir = str(tmp_path)
  shutil.copytree(teacher_stage.directory(teacher_workdir), teacher_stage.directory(workdir))
  config = tiny_config(method)
  config.student.steps = 30
  config.student.eval_every = 15
  summary = pipeline.train_and_evaluate(config, workdir)
  student = summary["student"]
  assert student["steps"] == 30
  low, high = ACCURACY_BOUNDS[method]
  assert low <= student["test_accuracy"] <= high, student
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["student"]["test_accuracy"] == student["test_accuracy"]
  # The reported accuracy is the final checkpoint's student, evaluated again here.
  step, state, meta = stage_state(os.path.join(workdir, STAGE_DIRS[method]))
  assert step == 30 and meta["done"]
  data = pipeline.load_data(config)
  model = models.get_classifier(config.student.model, 10)
  again = evaluation.evaluate_classifier(
      evaluation.classifier_logits(model), common.variables_of(state["student"]["params"],
                                                           state["student"]["batch_stats"]),
      data["test"].images, data["test"].labels, parallel.make_mesh("data"))
  assert again["accuracy"] == student["test_accuracy"]
  if method == "dafl":
    samples = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert samples == ["dafl_step000015.png", "dafl_step000030.png"]
