"""Luo et al.'s generator ensemble: the stacked step, both stages, checkpoints, config errors."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_config
from datafree_jax import bn_stats
from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import losses
from datafree_jax import models
from datafree_jax import train
from datafree_jax.stages import dafl
from datafree_jax.stages import ensemble
from datafree_jax.stages import teacher as teacher_stage


def ensemble_config(**overrides):
  """The tiny ensemble config: 3 generators of width 8, batch 8 each, 4 steps."""
  base = {"ensemble.num_generators": 3, "ensemble.batch_per_generator": 8,
          "ensemble.steps": 4, "ensemble.eval_every": 2, "ensemble.lowering": "vmap",
          "ensemble.w_tv": 0.1, "ensemble.w_l2": 0.1, "ensemble.w_mm": 0.5}
  base.update(overrides)
  return tiny_config("ensemble", **base)


@pytest.fixture(scope="module")
def teacher_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teacher_bn"))
  config = tiny_config("teacher", **{"teacher.model": "lenet5_bn", "teacher.steps": 10,
                                     "checkpoint_every": 1000})
  train.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def setup(teacher_workdir):
  config = ensemble_config()
  data = train.load_data(config)
  teacher = teacher_stage.load(config, teacher_workdir, data["test"].info)
  assert teacher["bn_stats"], "the lenet5_bn teacher must come with BN statistics"
  return data["test"].info, teacher


def _np(tree):
  return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def one_step(setup):
  """Initial state and the state after one step, for each lowering (SGD, see below)."""
  info, teacher = setup
  out = {}
  # SGD: Adam's first update is lr * g / (|g| + eps), which maps the float noise on gradients
  # that are exactly 0 in exact arithmetic (the conv biases before a BN) to +-lr.
  # Two generators keep the compilation of the unrolled step short. Chunking and sharding are
  # checked against the vmapped step in test_ensemble_multidevice.py.
  for name, kw in {"vmap": {}, "unroll": {"ensemble.lowering": "unroll"}}.items():
    config = ensemble_config(**{"ensemble.optimizer": "sgd", "ensemble.lr": 0.05,
                                "ensemble.num_generators": 2}, **kw)
    ens = ensemble.build(config, teacher, info)
    before = _np(ens.state)
    state, metrics = ens.step(ens.state)
    out[name] = (config, ens, before, _np(state), {k: float(v) for k, v in metrics.items()})
  return out


def _assert_trees_close(a, b, atol=1e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def test_vmap_and_unroll_lowerings_give_the_same_step(one_step):
  _, ens, before, ref, ref_metrics = one_step["vmap"]
  assert ens.lowering == "vmap" and one_step["unroll"][1].lowering == "unroll"
  for name in ("unroll",):
    _, _, _, state, metrics = one_step[name]
    _assert_trees_close(ref["params"], state["params"])
    _assert_trees_close(ref["batch_stats"], state["batch_stats"])
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
      np.testing.assert_allclose(metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-5)
  # The step changed every generator.
  a, b = before["params"]["fc"]["kernel"], ref["params"]["fc"]["kernel"]
  assert all(np.abs(a[k] - b[k]).max() > 1e-4 for k in range(2))


def test_step_equals_independent_single_generator_updates(one_step, setup):
  """Each member's update is an ordinary one-generator update with its own class and rng."""
  _, teacher = setup
  config, ens, before, after, metrics = one_step["vmap"]
  e = config.ensemble
  gen, tmodel, tvars = ens.gen, teacher["model"], teacher["variables"]
  tx = optax.sgd(e.lr)

  @jax.jit
  def update(params, batch_stats, targets, z, k):
    def loss_fn(p):
      images, upd = gen.apply({"params": p, "batch_stats": batch_stats}, z, train=True,
                              mutable=["batch_stats"])
      logits, _, moments = common.teacher_forward(tmodel, tvars, images, moments=True)
      labels = jnp.full((z.shape[0],), k)
      loss = (losses.inceptionism_loss(logits, labels, images, e.w_tv, e.w_l2) +
              e.w_mm * losses.bn_moment_matching(moments, targets, form=e.mm_form))
      return loss, upd["batch_stats"]
    (loss, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), new_bs, loss

  member_losses = []
  for k in range(ens.num_generators):
    member = lambda x, k=k: x[k]
    key = ensemble.member_key(config.seed, 0, k)
    z = jax.random.normal(jax.random.split(key)[0], (e.batch_per_generator, gen.latent_dim))
    params, new_bs, loss = update(jax.tree.map(member, before["params"]),
                                  jax.tree.map(member, before["batch_stats"]),
                                  bn_stats.for_class(teacher["bn_stats"], k), z, k)
    _assert_trees_close(jax.tree.map(member, after["params"]), _np(params))
    _assert_trees_close(jax.tree.map(member, after["batch_stats"]), _np(new_bs))
    member_losses.append(float(loss))
  np.testing.assert_allclose(metrics["loss"], np.mean(member_losses), rtol=1e-5)


def test_dafl_loss_option_uses_dafls_generator_objective(setup):
  info, teacher = setup
  config = ensemble_config(**{"ensemble.loss": "dafl", "ensemble.w_mm": 0.0})
  gen = ensemble.make_generator(config, info)
  params, batch_stats = dafl.init_generator(gen, jax.random.key(5))
  tmodel, tvars = teacher["model"], teacher["variables"]

  @jax.jit
  def both(key):
    loss, (_, metrics) = ensemble.member_loss(config, gen, tmodel, tvars, params, batch_stats,
                                              {}, 2, key, 8, info.num_classes)
    z = jax.random.normal(jax.random.split(key)[0], (8, gen.latent_dim))
    ref, (_, _, _, terms) = dafl.generator_dafl_loss(gen, tmodel, tvars, config.generator,
                                                     params, batch_stats, z)
    return loss, metrics, ref, terms
  loss, metrics, ref, terms = both(jax.random.key(6))
  np.testing.assert_allclose(float(loss), float(ref), rtol=1e-5)
  for k in ("l_oh", "l_a", "l_ie"):
    np.testing.assert_allclose(float(metrics[k]), float(terms[k]), rtol=1e-5)


def test_class_balanced_batches_from_the_generators():
  """Every generator gives batch // G or batch // G + 1 images of a batch, in turn."""

  class Fake:  # A "generator" whose images are filled with its parameter (its index).
    latent_dim = 2

    def apply(self, variables, z, train, mutable):
      del train, mutable
      return jnp.broadcast_to(variables["params"], (z.shape[0], 1, 1, 1)), {}

  for g, batch in ((3, 32), (4, 32), (1, 5)):
    gens = {"gen": Fake(), "meta": {"num_generators": g}}
    fn = jax.jit(ensemble.make_images_fn(gens, "unroll"), static_argnums=1)
    variables = {"params": jnp.arange(g, dtype=jnp.float32), "batch_stats": jnp.zeros(g)}
    for seed in range(3):
      images = np.asarray(fn(jax.random.key(seed), batch, variables))
      assert images.shape == (batch, 1, 1, 1)
      counts = np.bincount(images.reshape(-1).astype(int), minlength=g)
      assert counts.sum() == batch and counts.max() - counts.min() <= 1, counts


@pytest.fixture(scope="module")
def generators_workdir(teacher_workdir, tmp_path_factory):
  """A workdir where stage=generators of method=ensemble ran (4 steps, evaluated at 2 and 4)."""
  workdir = str(tmp_path_factory.mktemp("generators"))
  shutil.copytree(teacher_stage.directory(teacher_workdir), teacher_stage.directory(workdir))
  summary = train.train_and_evaluate(ensemble_config(stage="generators"), workdir)
  return workdir, summary


def test_generators_stage(generators_workdir):
  workdir, summary = generators_workdir
  g = summary["generators"]
  assert g["num_generators"] == 3 and g["members"] == 3 and g["steps"] == 4
  assert 0.0 <= g["eval"]["agreement"] <= 1.0 and 0.0 <= g["eval"]["class_entropy"] <= 1.0
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
  again = train.train_and_evaluate(ensemble_config(stage="generators"), workdir)
  assert again["generators"] == g


def test_distill_stage_alone_from_a_generator_checkpoint(generators_workdir, teacher_workdir,
                                                         tmp_path):
  gen_workdir, _ = generators_workdir
  workdir = str(tmp_path)
  shutil.copytree(teacher_stage.directory(teacher_workdir), teacher_stage.directory(workdir))
  config = ensemble_config(**{"stage": "distill", "student.steps": 10,
                              "student.eval_every": 5,
                              "generator_checkpoint": ensemble.directory(gen_workdir)})
  summary = train.train_and_evaluate(config, workdir)
  assert summary["student"]["steps"] == 10
  assert 0.0 <= summary["student"]["test_accuracy"] <= 1.0
  assert "generators" not in summary
  assert not os.path.exists(ensemble.directory(workdir))  # Only distillation ran here.
  ckpt = ckpt_lib.StageCheckpoints(os.path.join(workdir, "distill_generators"), create=False)
  meta = ckpt.restore_meta()
  ckpt.close()
  assert meta["done"] and meta["source"] == "generators" and meta["num_generators"] == 3
  gens = ensemble.load_generators(gen_workdir, train.load_data(config)["test"].info)
  assert jax.tree.leaves(gens["params"])[0].shape[0] == 3  # A workdir path works too.


def test_stage_train_runs_generators_then_distillation(teacher_workdir, tmp_path):
  """stage=train (and so stage=all after the teacher) runs both stages of the method, for real;
  stage=generators and stage=distill alone are tested above."""
  workdir = str(tmp_path)
  shutil.copytree(teacher_stage.directory(teacher_workdir), teacher_stage.directory(workdir))
  config = ensemble_config(**{"stage": "train", "ensemble.steps": 2, "student.steps": 4})
  summary = train.train_and_evaluate(config, workdir)
  assert summary["generators"]["steps"] == 2 and summary["generators"]["num_generators"] == 3
  assert summary["student"]["steps"] == 4
  ckpt = ckpt_lib.StageCheckpoints(os.path.join(workdir, "distill_generators"), create=False)
  meta = ckpt.restore_meta()
  ckpt.close()
  assert meta["done"] and meta["generators"] == ensemble.directory(os.path.abspath(workdir))


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
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "distill_generators"))


def test_distill_stage_without_generators_is_a_checkpoint_error(teacher_workdir, tmp_path):
  workdir = str(tmp_path)
  shutil.copytree(teacher_stage.directory(teacher_workdir), teacher_stage.directory(workdir))
  with pytest.raises(ckpt_lib.CheckpointError, match="no generator checkpoint in .*generators; "
                                                     "run the generators stage first"):
    train.train_and_evaluate(ensemble_config(stage="distill"), workdir)


def test_moment_matching_with_a_bn_free_teacher_is_a_config_error(tmp_path):
  config = ensemble_config(**{"teacher.model": "lenet5"})
  workdir = str(tmp_path / "w")
  with pytest.raises(config_lib.ConfigError, match="'lenet5' has no BatchNorm layers"):
    train.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)  # Rejected before anything was written.
  # The stage itself checks the loaded teacher, too; with w_mm = 0 it accepts it.
  info = train.load_data(config)["test"].info
  model = models.get_classifier("lenet5", info.num_classes)
  params, _ = common.init_model(model, jax.random.key(0), info.image_shape)
  teacher = {"model": model, "variables": {"params": params}, "bn_stats": {},
             "meta": {"model": "lenet5"}}
  with pytest.raises(config_lib.ConfigError, match="set ensemble.w_mm=0"):
    ensemble.build(config, teacher, info)
  config.ensemble.w_mm = 0.0
  ens = ensemble.build(config, teacher, info)
  assert ens.num_generators == 3 and ens.consts["targets"] == {}


def test_generators_stage_is_only_for_the_ensemble(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="stage 'generators' does not apply"):
    train.train_and_evaluate(tiny_config("dafl", stage="generators"), str(tmp_path / "w"))
