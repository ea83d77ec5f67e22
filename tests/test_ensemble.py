"""Luo et al.'s generator ensemble: the stacked step, both stages, checkpoints, config errors."""
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ensemble_config, stage_state, tiny_config

from datafree_jax import bn_stats
from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import datasets
from datafree_jax import generator_parts
from datafree_jax import losses
from datafree_jax import models
from datafree_jax import students
from datafree_jax import pipeline
from datafree_jax.ensemble import frozen as ensemble_frozen
from datafree_jax.ensemble import objective as ensemble_objective
from datafree_jax.stages import ensemble
from datafree_jax.stages import teacher as teacher_stage


@pytest.fixture(scope="module")
def teacher_workdir(bn_teacher_workdir):
  return bn_teacher_workdir


@pytest.fixture(scope="module")
def setup(teacher_workdir):
  config = ensemble_config()
  data = pipeline.load_data(config)
  teacher = teacher_stage.load(config, teacher_workdir, data["test"].info)
  assert teacher["bn_stats"], "the lenet5_bn teacher must come with BN statistics"
  return data["test"].info, teacher


def _np(tree):
  return jax.tree.map(np.asarray, tree)


# Variants of the tiny ensemble (2 generators, SGD) whose first step is compared with
# independent single-generator updates. SGD: Adam's first update is lr * g / (|g| + eps), which
# maps the float noise on gradients that are exactly 0 in exact arithmetic (the conv biases
# before a BN) to +-lr. Sharding over 8 devices is checked in test_ensemble_multidevice.py.
VARIANTS = {
    "vmap": {},
    "loop": {"ensemble.lowering": "loop"},
    "vmap_chunked": {"ensemble.max_generators_per_device_at_once": 1},
    "kl": {"ensemble.mm_form": "kl"},
    "one_generator_random": {"ensemble.num_generators": 1, "ensemble.single_target": "random"},
    "one_generator_argmax": {"ensemble.num_generators": 1, "ensemble.single_target": "argmax"},
    "one_generator_conditional": {"ensemble.num_generators": 1},
}


def variant_config(name):
  return ensemble_config(**{"ensemble.optimizer": "sgd", "ensemble.lr": 0.05,
                            "ensemble.num_generators": 2, **VARIANTS[name]})


@pytest.fixture(scope="module")
def one_step(setup):
  """{variant: (config, ensemble, state before, state after one step, metrics)}."""
  info, teacher = setup
  out = {}
  for name in VARIANTS:
    config = variant_config(name)
    ens = ensemble.build(config, teacher, info)
    before = _np(ens.state)
    state, metrics = ens.step(ens.state, None)
    out[name] = (config, ens, before, _np(state), {k: float(v) for k, v in metrics.items()})
  return out


def _assert_trees_close(a, b, atol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


@pytest.mark.parametrize("name", ["loop", "vmap_chunked"])
def test_lowerings_and_chunking_give_the_same_step(one_step, name):
  _, ens, before, ref, ref_metrics = one_step["vmap"]
  config, other, _, state, metrics = one_step[name]
  assert ens.lowering == "vmap" and other.lowering == config.ensemble.lowering
  _assert_trees_close(ref["params"], state["params"])
  _assert_trees_close(ref["batch_stats"], state["batch_stats"])
  assert metrics.keys() == ref_metrics.keys()
  for k in metrics:
    np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-5)
  # The step changed every generator.
  a, b = before["params"]["fc"]["kernel"], ref["params"]["fc"]["kernel"]
  assert all(np.abs(a[k] - b[k]).max() > 1e-4 for k in range(2))


def _teacher_view(tmodel, tvars, images):
  """Teacher logits and the batch moments of each BN layer's input, computed without the
  'bn_inputs' recording: in LeNet-5-BN the input of bn<i> is the output of conv<i>."""
  logits, inter = tmodel.apply(tvars, images, train=False, capture_intermediates=True,
                               mutable=["intermediates"])
  moments = {}
  for i in (1, 2, 3):
    x = inter["intermediates"][f"conv{i}"]["__call__"][0]
    mean = jnp.mean(x, axis=(0, 1, 2))
    moments[f"bn{i}"] = {"mean": mean, "var": jnp.mean((x - mean) ** 2, axis=(0, 1, 2))}
  return logits, moments


def _moment_matching(moments, targets, form):
  """L_mm by hand: sum over layers of ||mu - mu_t|| + ||var - var_t|| ('l2'), or of the mean
  over channels of KL(N(mu, var) || N(mu_t, var_t)) with 1e-5 added to the variances ('kl')."""
  total = 0.0
  for layer, m in moments.items():
    t = targets[layer]
    if form == "l2":
      total += (jnp.sqrt(jnp.sum((m["mean"] - t["mean"]) ** 2)) +
                jnp.sqrt(jnp.sum((m["var"] - t["var"]) ** 2)))
    else:
      v, vt = m["var"] + 1e-5, t["var"] + 1e-5
      total += jnp.mean(0.5 * (jnp.log(vt / v) + (v + (m["mean"] - t["mean"]) ** 2) / vt - 1))
  return total


@pytest.mark.parametrize("name", ["vmap", "kl", "one_generator_random",
                                  "one_generator_argmax", "one_generator_conditional"])
def test_step_equals_independent_single_generator_updates(one_step, setup, name):
  """Each member's update is an ordinary one-generator update with its own class and rng:
  target-class CE (G = 1: a random class per image, or the teacher's argmax) + TV and l2
  priors + moment matching against its class's BN statistics (G = 1: the global ones). The
  conditional single generator (the default for G = 1) draws one class c per step, is given c
  as a one-hot input, and matches class c's statistics."""
  info, teacher = setup
  config, ens, before, after, metrics = one_step[name]
  e = config.ensemble
  gen, tmodel, tvars = ens.gen, teacher["model"], teacher["variables"]
  assert ens.num_generators == (1 if name.startswith("one_") else 2)

  conditional = name == "one_generator_conditional"
  assert gen.num_classes == (info.num_classes if conditional else 0)

  @functools.partial(jax.jit, static_argnums=4)
  def update(params, batch_stats, targets, key, k):
    z = jax.random.normal(jax.random.split(key)[0], (e.batch_per_generator, gen.latent_dim))
    if conditional:
      c = jax.random.randint(jax.random.fold_in(key, 2), (), 0, info.num_classes)
      targets = jax.tree.map(lambda t: t[c], teacher["bn_stats"]["class"])

    def loss_fn(p):
      images, upd = gen.apply({"params": p, "batch_stats": batch_stats}, z,
                              jnp.full((z.shape[0],), c) if conditional else None, train=True,
                              mutable=["batch_stats"])
      logits, moments = _teacher_view(tmodel, tvars, images)
      if conditional:
        labels = jnp.full((z.shape[0],), c)
      elif k >= 0:
        labels = jnp.full((z.shape[0],), k)
      elif e.single_target == "argmax":
        labels = jnp.argmax(logits, -1)
      else:
        labels = jax.random.randint(jax.random.split(key)[1], (z.shape[0],), 0,
                                    info.num_classes)
      ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
      loss = (ce + e.w_tv * losses.total_variation(images) +
              e.w_l2 * losses.image_l2_prior(images) +
              e.w_mm * _moment_matching(moments, targets, e.mm_form))
      return loss, upd["batch_stats"]
    (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return jax.tree.map(lambda p, g: p - e.lr * g, params, grads), new_bs, loss

  member_losses = []
  for k in range(ens.num_generators):
    member = lambda x, k=k: x[k]
    stats = teacher["bn_stats"]
    targets = stats["global"] if ens.num_generators == 1 else bn_stats.for_class(stats, k)
    params, new_bs, loss = update(jax.tree.map(member, before["params"]),
                                  jax.tree.map(member, before["batch_stats"]), targets,
                                  ensemble_objective.member_key(config.seed, 0, k),
                                  -1 if ens.num_generators == 1 else k)
    _assert_trees_close(jax.tree.map(member, after["params"]), _np(params))
    _assert_trees_close(jax.tree.map(member, after["batch_stats"]), _np(new_bs))
    member_losses.append(float(loss))
  np.testing.assert_allclose(metrics["loss"], np.mean(member_losses), rtol=1e-5)


def test_lowerings_agree_after_several_adam_steps(setup):
  """vmap and loop, 3 Adam steps: the generated images agree to 1e-3 (images in about [-3, 3]).
  (Parameters are not compared: Adam turns float noise on exactly-zero gradients, the conv
  biases before a BN, into +-lr steps that change the images only through rounding; one SGD
  step agrees to 1e-5, test_lowerings_and_chunking_give_the_same_step.)"""
  info, teacher = setup
  images = {}
  for lowering in ("vmap", "loop"):
    config = ensemble_config(**{"ensemble.num_generators": 2, "ensemble.lowering": lowering})
    ens = ensemble.build(config, teacher, info)
    state = ens.state
    for _ in range(3):
      state, _ = ens.step(state, None)
    images[lowering] = np.asarray(jax.jit(ens.sample, static_argnums=1)(state, 4))
  assert images["vmap"].shape == (2, 4, 32, 32, 1)
  np.testing.assert_allclose(images["vmap"], images["loop"], atol=1e-3, rtol=0)


def test_dafl_loss_option_is_dafls_generator_objective_plus_moment_matching(setup):
  info, teacher = setup
  config = ensemble_config(**{"ensemble.loss": "dafl", "ensemble.w_mm": 0.7,
                              "generator.w_a": 0.3, "generator.w_ie": 2.0})
  g = config.generator
  gen = ensemble_objective.make_generator(config, info)
  params, batch_stats = generator_parts.init_generator(gen, jax.random.key(5))
  tmodel, tvars = teacher["model"], teacher["variables"]
  targets = bn_stats.for_class(teacher["bn_stats"], 2)

  @jax.jit
  def both(key):
    config.ensemble.batch_per_generator = 8
    spec = ensemble_objective.member_spec(config, info, tmodel)
    loss, (_, metrics) = ensemble_objective.member_loss(spec, params, batch_stats, targets, 2, key, tvars)
    z = jax.random.normal(jax.random.split(key)[0], (8, gen.latent_dim))
    images, _ = gen.apply({"params": params, "batch_stats": batch_stats}, z, train=True,
                          mutable=["batch_stats"])
    logits, moments = _teacher_view(tmodel, tvars, images)
    _, feats = tmodel.apply(tvars, images, train=False, features=True)
    p = jax.nn.softmax(logits)
    p_mean = jnp.mean(p, 0)
    terms = {"l_oh": -jnp.mean(jnp.log(jnp.max(p, 1))), "l_a": -jnp.mean(jnp.abs(feats)),
             "l_ie": jnp.sum(p_mean * jnp.log10(p_mean)),
             "mm": _moment_matching(moments, targets, "l2")}
    ref = (g.w_oh * terms["l_oh"] + g.w_a * terms["l_a"] + g.w_ie * terms["l_ie"] +
           0.7 * terms["mm"])
    return loss, metrics, ref, terms
  loss, metrics, ref, terms = both(jax.random.key(6))
  assert float(terms["mm"]) > 0.01  # The moment-matching term is there and not negligible.
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  for k in ("l_oh", "l_a", "l_ie", "mm"):
    np.testing.assert_allclose(float(metrics[k]), float(terms[k]), rtol=1e-5)


def expected_batch(gens, key, n, bn_batch):
  """The distillation batch of the frozen generators, computed without make_images_fn:
  k = ceil(n / bn_batch) draws; draw j is generator perm[j mod G], perm = a permutation of the
  G generators keyed split(key, 3)[0], and gives bn_batch images (one BN batch) from N(0, I)
  latents keyed fold_in(split(key, 3)[2], j); the draws concatenated, the first n kept."""
  gen, g = gens["gen"], int(gens["meta"]["num_generators"])
  k_perm, _, k_z = jax.random.split(key, 3)
  perm = np.asarray(jax.random.permutation(k_perm, g))
  apply = jax.jit(lambda v, z: gen.apply(v, z, train=True, mutable=["batch_stats"])[0])
  out = []
  for j in range(-(-n // bn_batch)):
    m = int(perm[j % g])
    v = {"params": jax.tree.map(lambda x: x[m], gens["params"]),
         "batch_stats": jax.tree.map(lambda x: x[m], gens["batch_stats"])}
    out.append(np.asarray(apply(v, jax.random.normal(jax.random.fold_in(k_z, j),
                                                     (bn_batch, gen.latent_dim)))))
  return np.concatenate(out)[:n]


@pytest.fixture(scope="module")
def loaded_generators(generators_workdir):
  workdir, _ = generators_workdir
  return ensemble_frozen.load_generators(workdir, datasets.dataset_info("mnist5k"))


@pytest.mark.parametrize("n,bn_batch", [(9, 4), (12, 4), (5, 2), (13, 4), (8, 8)])
def test_distillation_batches_draw_each_generator_in_its_training_bn_batch(
    loaded_generators, n, bn_batch):
  """Each generator's images come in BN batches of its training batch size, whatever G and n;
  every generator at most once per step while ceil(n / bn_batch) <= G (here G = 3)."""
  gens = loaded_generators
  assert gens["meta"]["num_generators"] == 3 and gens["meta"]["batch_per_generator"] == 8
  fn = jax.jit(ensemble_frozen.make_images_fn(gens, "loop", bn_batch), static_argnums=1)
  variables = {"params": gens["params"], "batch_stats": gens["batch_stats"]}
  for seed in range(2):
    key = jax.random.key(seed)
    images = np.asarray(fn(key, n, None, variables))
    np.testing.assert_allclose(images, expected_batch(gens, key, n, bn_batch), atol=1e-5,
                               rtol=0)


def test_a_conditional_generator_distils_on_every_class_in_turn():
  """A single conditional generator gives the images i of each draw j the classes
  (r_j + i) mod K, r_j = randint(split(key, 3)[1], (k,), 0, K)[j]: every class in turn."""
  info = datasets.dataset_info("mnist5k")
  gen = models.Generator(latent_dim=6, image_size=32, channels=1, width=4, style="luo",
                         num_classes=10)
  params, batch_stats = generator_parts.init_generator(gen, jax.random.key(3))
  stack = lambda t: jax.tree.map(lambda x: x[None], t)
  gens = {"gen": gen, "meta": {"num_generators": 1, "class_ids": [ensemble_objective.ALL_CLASSES],
                               "image_shape": list(info.image_shape)}}
  variables = {"params": stack(params), "batch_stats": stack(batch_stats)}
  fn = jax.jit(ensemble_frozen.make_images_fn(gens, "loop", 4), static_argnums=1)
  key = jax.random.key(11)
  images = np.asarray(fn(key, 12, None, variables))
  _, k_class, k_z = jax.random.split(key, 3)
  r = np.asarray(jax.random.randint(k_class, (3,), 0, 10))
  for j in range(3):
    labels = (r[j] + np.arange(4)) % 10
    z = jax.random.normal(jax.random.fold_in(k_z, j), (4, 6))
    expected = gen.apply({"params": params, "batch_stats": batch_stats}, z, labels, train=True,
                         mutable=["batch_stats"])[0]
    np.testing.assert_allclose(images[4 * j:4 * j + 4], expected, atol=1e-5, rtol=0)


def test_make_eval_reports_the_teachers_view_of_the_samples(generators_workdir, setup,
                                                            loaded_generators):
  """The stage's final evaluation, recomputed from the saved generators: agreement is the
  fraction of samples the teacher assigns to their generator's class, class_entropy the
  entropy of the teacher's class histogram over all samples / log(10)."""
  _, summary = generators_workdir
  info, teacher = setup
  gens = loaded_generators
  gen = gens["gen"]
  apply = jax.jit(lambda v, z: gen.apply(v, z, train=True, mutable=["batch_stats"])[0])
  preds = []
  for k in range(3):
    v = {"params": jax.tree.map(lambda x, k=k: x[k], gens["params"]),
         "batch_stats": jax.tree.map(lambda x, k=k: x[k], gens["batch_stats"])}
    z = jax.random.normal(jax.random.fold_in(jax.random.key(generator_parts.SAMPLE_SEED), k),
                          (ensemble_config().ensemble.batch_per_generator, gen.latent_dim))
    logits = teacher["model"].apply(teacher["variables"], apply(v, z), train=False)
    preds.append(np.asarray(jnp.argmax(logits, -1)))
  preds = np.stack(preds)
  agreement = np.mean(preds == np.arange(3)[:, None])
  hist = np.bincount(preds.ravel(), minlength=10) / preds.size
  hist = hist[hist > 0]
  entropy = -np.sum(hist * np.log(hist)) / np.log(10)
  evaluation = summary["generators"]["eval"]
  np.testing.assert_allclose(evaluation["agreement"], agreement, rtol=1e-6)
  np.testing.assert_allclose(evaluation["class_entropy"], entropy, rtol=1e-5)


def test_generators_stage(generators_workdir):
  workdir, summary = generators_workdir
  g = summary["generators"]
  assert g["num_generators"] == 3 and g["members"] == 3 and g["steps"] == 4
  assert sorted(g["eval"]) == ["agreement", "class_entropy"]  # (values: test_make_eval_...)
  assert "student" not in summary  # stage=generators stops before distillation.
  samples = sorted(os.listdir(os.path.join(workdir, "samples")))
  assert samples == ["generators_step000002.png", "generators_step000004.png"]
  ckpt = ckpt_lib.StageCheckpoints(ensemble.directory(workdir), create=False)
  meta = ckpt.restore_meta()
  ckpt.close()
  assert meta["done"] and meta["num_generators"] == 3 and meta["padded"] == 3
  assert meta["class_ids"] == [0, 1, 2] and meta["image_shape"] == [32, 32, 1]
  assert not os.path.exists(os.path.join(workdir, "distill_generators"))
  # Run again: the finished stage is reported, not rebuilt or retrained.
  again = pipeline.train_and_evaluate(ensemble_config(stage="generators"), workdir)
  assert again["generators"] == g


def _stage_state(workdir, stage):
  _, state, meta = stage_state(os.path.join(workdir, stage))
  return state, meta


DISTILL = {"student.steps": 10, "student.eval_every": 5}


@pytest.fixture(scope="module")
def distilled_alone(generators_workdir, teacher_workdir, tmp_path_factory):
  """(workdir, summary) of stage=distill from the shared generators, in another workdir."""
  gen_workdir, _ = generators_workdir
  workdir = str(tmp_path_factory.mktemp("distill_alone"))
  shutil.copytree(teacher_stage.directory(teacher_workdir), teacher_stage.directory(workdir))
  config = ensemble_config(**{"stage": "distill", **DISTILL,
                              "generator_checkpoint": ensemble.directory(gen_workdir)})
  return workdir, pipeline.train_and_evaluate(config, workdir)


def test_distill_stage_alone_from_a_generator_checkpoint(distilled_alone, generators_workdir):
  workdir, summary = distilled_alone
  gen_workdir, _ = generators_workdir
  assert summary["student"]["steps"] == 10
  assert "generators" not in summary
  assert not os.path.exists(ensemble.directory(workdir))  # Only distillation ran here.
  _, meta = _stage_state(workdir, "distill_generators")
  assert meta["done"] and meta["source"] == "generators" and meta["num_generators"] == 3
  assert meta["generators"] == ensemble.directory(gen_workdir)
  assert meta["eval"]["accuracy"] == summary["student"]["test_accuracy"]
  gens = ensemble_frozen.load_generators(gen_workdir, datasets.dataset_info("mnist5k"))
  assert jax.tree.leaves(gens["params"])[0].shape[0] == 3  # A workdir path works too.


def test_distillation_learns_from_the_loaded_generators(generators_workdir, teacher_workdir,
                                                        loaded_generators, setup, tmp_path):
  """One SGD step of stage=distill equals a step on KL(teacher || student) over the batch
  that expected_batch draws from the saved generators, in their training BN batch of 8 (the
  student in training mode)."""
  info, teacher = setup
  gen_workdir, _ = generators_workdir
  workdir = str(tmp_path)
  shutil.copytree(teacher_stage.directory(teacher_workdir), teacher_stage.directory(workdir))
  config = ensemble_config(**{"stage": "distill", "student.steps": 1, "student.lr": 0.5,
                              "student.optimizer": "sgd", "student.batch_size": 10,
                              "generator_checkpoint": ensemble.directory(gen_workdir)})
  pipeline.train_and_evaluate(config, workdir)
  state, _ = _stage_state(workdir, "distill_generators")

  student = models.get_classifier(config.student.model, info.num_classes)
  params, batch_stats = common.init_model(
      student, jax.random.fold_in(jax.random.key(config.seed), students.STAGE_SALT),
      info.image_shape)
  x = expected_batch(loaded_generators, common.step_key(config.seed, students.STAGE_SALT, 0), 10,
                     8)
  t_logits = teacher["model"].apply(teacher["variables"], x, train=False)

  def kd(p):
    logits, upd = student.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
    pt = jax.nn.softmax(t_logits)
    return jnp.sum(pt * (jnp.log(pt) - jax.nn.log_softmax(logits))) / 10, upd["batch_stats"]
  grads, new_bs = jax.jit(jax.grad(kd, has_aux=True))(params)
  expected = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
  _assert_trees_close(_np(state["student"]["params"]), _np(expected), atol=2e-5)
  _assert_trees_close(_np(state["student"]["batch_stats"]), _np(new_bs), atol=1e-5)
  assert max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
      jax.tree.leaves(params), jax.tree.leaves(expected))) > 1e-3  # it did move


def test_stage_train_runs_generators_then_distillation(teacher_workdir, generators_workdir,
                                                       distilled_alone, tmp_path):
  """stage=train (and so stage=all after the teacher) is stage=generators then stage=distill:
  the same generators and the same student, bit for bit, as the two stages run alone."""
  workdir = str(tmp_path)
  shutil.copytree(teacher_stage.directory(teacher_workdir), teacher_stage.directory(workdir))
  summary = pipeline.train_and_evaluate(ensemble_config(stage="train", **DISTILL), workdir)
  assert summary["generators"]["steps"] == 4 and summary["generators"]["num_generators"] == 3
  assert summary["student"]["steps"] == 10
  state, meta = _stage_state(workdir, "distill_generators")
  assert meta["done"] and meta["generators"] == ensemble.directory(os.path.abspath(workdir))
  alone, _ = _stage_state(distilled_alone[0], "distill_generators")
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(alone)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  gens, _ = _stage_state(workdir, "generators")
  gens_alone, _ = _stage_state(generators_workdir[0], "generators")
  for a, b in zip(jax.tree.leaves(gens), jax.tree.leaves(gens_alone)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _fake_generator_checkpoint(directory, image_shape, num_classes):
  ckpt = ckpt_lib.StageCheckpoints(directory)
  meta = {"kind": "generator_ensemble", "done": True, "stage": "generators", "step": 1,
          "num_generators": 2, "padded": 2, "num_classes": num_classes,
          "image_shape": list(image_shape), "latent_dim": 4, "width": 4, "num_upsample": 2,
          "style": "luo", "class_ids": [0, 1]}
  ckpt.save(1, {"x": jnp.zeros(2)}, meta, {"generators": {"x": jnp.zeros(2)}})
  ckpt.close()


@pytest.mark.parametrize("image_shape,num_classes,what", [
    ((28, 28, 1), 10, r"10 classes of \(28, 28, 1\) images"),
    ((32, 32, 1), 100, r"100 classes of \(32, 32, 1\) images")])
def test_generator_checkpoint_for_other_data_is_rejected(teacher_workdir, tmp_path, image_shape,
                                                         num_classes, what):
  workdir = str(tmp_path / "work")
  shutil.copytree(teacher_stage.directory(teacher_workdir), teacher_stage.directory(workdir))
  gdir = str(tmp_path / "other_generators")
  _fake_generator_checkpoint(gdir, image_shape, num_classes)
  config = ensemble_config(stage="distill", generator_checkpoint=gdir)
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=f"made for {what}, but dataset 'mnist5k' has 10 classes of "
                           r"\(32, 32, 1\) images"):
    pipeline.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "distill_generators"))


def test_distill_stage_without_generators_is_a_checkpoint_error(teacher_workdir, tmp_path):
  workdir = str(tmp_path)
  shutil.copytree(teacher_stage.directory(teacher_workdir), teacher_stage.directory(workdir))
  with pytest.raises(ckpt_lib.CheckpointError, match="no generator checkpoint in .*generators; "
                                                     "run the generators stage first"):
    pipeline.train_and_evaluate(ensemble_config(stage="distill"), workdir)


def test_moment_matching_with_a_bn_free_teacher_is_a_config_error(tmp_path):
  config = ensemble_config(**{"teacher.model": "lenet5"})
  workdir = str(tmp_path / "w")
  with pytest.raises(config_lib.ConfigError, match="'lenet5' has no BatchNorm layers"):
    pipeline.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)  # Rejected before anything was written.
  # With w_mm = 0 the BN-free teacher is accepted: no moment-matching targets.
  info = pipeline.load_data(config)["test"].info
  model = models.get_classifier("lenet5", info.num_classes)
  params, _ = common.init_model(model, jax.random.key(0), info.image_shape)
  teacher = {"model": model, "variables": {"params": params}, "bn_stats": {},
             "meta": {"model": "lenet5"}}
  config.ensemble.w_mm = 0.0
  pipeline.validate(config)
  ens = ensemble.build(config, teacher, info)
  assert ens.num_generators == 3 and ens.consts["targets"] == {}


def test_generators_stage_is_only_for_the_ensemble(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="stage 'generators' does not apply"):
    pipeline.train_and_evaluate(tiny_config("dafl", stage="generators"), str(tmp_path / "w"))
