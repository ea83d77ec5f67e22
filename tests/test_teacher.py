"""Teacher stage: training lowers the loss, checkpoints round-trip, BN statistics, reuse."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from datafree_jax import bn_stats
from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import models
from datafree_jax import train
from datafree_jax.stages import teacher as teacher_stage


def test_teacher_training_lowers_loss_and_checkpoints(tmp_path, tiny):
  config = tiny("teacher")
  config.teacher.lr = 2e-3
  data = train.load_data(config)
  workdir = str(tmp_path)
  out = teacher_stage.train(config, workdir, data, writer=None)
  ckpt = ckpt_lib.StageCheckpoints(teacher_stage.directory(workdir), create=False)
  meta = ckpt.restore_meta()
  assert meta["done"] and meta["step"] == 40
  # The untrained model's test loss is ~ln(10); 40 steps of batch 32 must lower it clearly.
  assert meta["eval"]["loss"] < 1.5, meta["eval"]
  assert meta["eval"]["accuracy"] > 0.5
  # A second call finds the finished teacher and loads the very same parameters.
  again = teacher_stage.train(config, workdir, data, writer=None)
  for a, b in zip(jax.tree.leaves(out["variables"]), jax.tree.leaves(again["variables"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert sorted(os.listdir(teacher_stage.directory(workdir))) == ["30", "40"]


def test_checkpoint_round_trip_is_exact(tmp_path):
  model = models.get_classifier("resnet18", 10, width=4)
  params, batch_stats = common.init_model(model, jax.random.key(3), (32, 32, 3))
  batch_stats = jax.tree.map(lambda x: x + jax.random.uniform(jax.random.key(4), x.shape),
                             batch_stats)
  state = {"params": params, "batch_stats": batch_stats, "step": jnp.int32(7)}
  ckpt = ckpt_lib.StageCheckpoints(str(tmp_path / "c"))
  ckpt.save(7, state, {"done": False})
  restored = ckpt.restore(7, "state", ckpt_lib.abstract_like(state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert ckpt.restore_meta(7) == {"done": False}


def test_bn_statistics_of_a_tiny_resnet():
  model = models.get_classifier("resnet18", 3, width=4)
  params, batch_stats = common.init_model(model, jax.random.key(0), (8, 8, 3))
  batch_stats = jax.tree.map(lambda x: x + 0.5, batch_stats)  # Not the init values.
  rng = np.random.default_rng(0)
  class_images = [rng.normal(size=(n, 8, 8, 3)).astype(np.float32) + k for k, n in
                  enumerate((4, 5, 6))]
  stats = bn_stats.compute(model, params, batch_stats, class_images)
  # One (mean, var) entry per BN layer: stem + 2 per block * 8 blocks + 3 shortcut BNs.
  layers = [p for p, _ in jax.tree_util.tree_flatten_with_path(stats["global"])[0]]
  assert len(layers) == 2 * 20
  for a, b in zip(jax.tree.leaves(stats["global"]), jax.tree.leaves(batch_stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert jax.tree.structure(stats["class"]) == jax.tree.structure(batch_stats)
  for leaf, ref in zip(jax.tree.leaves(stats["class"]), jax.tree.leaves(batch_stats)):
    assert leaf.shape == (3,) + ref.shape
  np.testing.assert_array_equal(stats["class_counts"], [4, 5, 6])
  # Hand computation for the first BN layer: its input is the stem conv of the images.
  kernel = np.asarray(params["stem_conv"]["kernel"])
  for k, x in enumerate(class_images):
    conv = np.asarray(jax.lax.conv_general_dilated(
        x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")))
    mean = conv.mean(axis=(0, 1, 2))
    var = ((conv - mean) ** 2).mean(axis=(0, 1, 2))
    np.testing.assert_allclose(stats["class"]["stem_bn"]["mean"][k], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["class"]["stem_bn"]["var"][k], var, rtol=1e-4, atol=1e-5)
  # for_class / targets_for pick class k's statistics.
  np.testing.assert_array_equal(bn_stats.for_class(stats, 2)["stem_bn"]["mean"],
                                stats["class"]["stem_bn"]["mean"][2])
  t = bn_stats.targets_for(stats, [2, 0])
  np.testing.assert_array_equal(t["stem_bn"]["var"][1], stats["class"]["stem_bn"]["var"][0])


def test_model_without_bn_has_empty_stats():
  model = models.get_classifier("lenet5", 10)
  params, batch_stats = common.init_model(model, jax.random.key(0), (32, 32, 1))
  assert batch_stats == {}
  assert bn_stats.compute(model, params, batch_stats, [np.zeros((2, 32, 32, 1), np.float32)]) == {}


def test_interrupted_teacher_resumes_to_the_same_parameters(tmp_path, tiny):
  config = tiny("teacher")
  data = train.load_data(config)
  full = teacher_stage.train(config, str(tmp_path / "full"), data, writer=None)
  interrupted = tiny("teacher", debug_stop_after_steps=15)
  workdir = str(tmp_path / "resumed")
  try:
    teacher_stage.train(interrupted, workdir, data, writer=None)
  except Exception as e:  # pylint: disable=broad-except
    assert "step 15" in str(e)
  else:
    raise AssertionError("the stopped run should report where it stopped")
  assert ckpt_lib.StageCheckpoints(teacher_stage.directory(workdir)).latest_step() == 15
  resumed = teacher_stage.train(config, workdir, data, writer=None)
  for a, b in zip(jax.tree.leaves(full["variables"]), jax.tree.leaves(resumed["variables"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
