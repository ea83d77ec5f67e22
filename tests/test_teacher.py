"""Teacher stage: training lowers the loss, checkpoints round-trip, BN statistics, reuse."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import faults

from datafree_jax import bn_stats
from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import loop
from datafree_jax import models
from datafree_jax import stage as stage_lib
from datafree_jax import pipeline
from datafree_jax.stages import teacher as teacher_stage


def test_teacher_training_lowers_loss_and_checkpoints(tmp_path, tiny):
  config = tiny("teacher")
  config.teacher.lr = 2e-3
  data = pipeline.load_data(config)
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
  # The final checkpoint replaces the periodic ones (step 30).
  assert sorted(os.listdir(teacher_stage.directory(workdir))) == ["40"]


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


def _bn_inputs_by_capture(model, variables, images):
  """The input of every BN layer, in evaluation mode, without the 'bn_inputs' recording.

  Every BN layer of the ResNet follows a convolution (stem_conv -> stem_bn, convN -> bnN,
  shortcut_conv -> shortcut_bn), so its input is that convolution's output, which flax's
  capture_intermediates returns. {bn module path: (N, H, W, C) array}.
  """
  conv_to_bn = {"stem_conv": "stem_bn", "conv1": "bn1", "conv2": "bn2",
                "shortcut_conv": "shortcut_bn"}

  @jax.jit
  def run(x):
    return model.apply(variables, x, train=False,
                       capture_intermediates=lambda mdl, method: mdl.name in conv_to_bn,
                       mutable=["intermediates"])[1]["intermediates"]

  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(run(jnp.asarray(images)))[0]:
    keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
    assert keys[-1] == "__call__", keys
    out["/".join(keys[:-2] + [conv_to_bn[keys[-2]]])] = np.asarray(value, np.float64)
  return out


def test_bn_statistics_of_a_tiny_resnet():
  model = models.get_classifier("resnet18", 3, width=4)
  params, batch_stats = common.init_model(model, jax.random.key(0), (8, 8, 3))
  # Not the init values: evaluation mode (running statistics) then differs from training mode
  # (batch statistics) in the input of every BN layer after the first.
  batch_stats = jax.tree.map(lambda x: x + 0.5, batch_stats)
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
  # Every BN layer, deep ones included: the moments of its input in evaluation mode, over
  # class k's images, with the input captured independently (one batch of all the classes:
  # evaluation mode treats every image on its own).
  inputs = _bn_inputs_by_capture(model, common.variables_of(params, batch_stats),
                                 np.concatenate(class_images))
  assert len(inputs) == 20
  assert "stage4_block2/bn2" in inputs and "stage3_block1/shortcut_bn" in inputs
  bounds = np.cumsum([0] + [len(x) for x in class_images])
  for name, x in inputs.items():
    node = stats["class"]
    for part in name.split("/"):
      node = node[part]
    for k in range(3):
      xk = x[bounds[k]:bounds[k + 1]]
      mean = xk.mean(axis=(0, 1, 2))
      var = ((xk - mean) ** 2).mean(axis=(0, 1, 2))
      np.testing.assert_allclose(node["mean"][k], mean, rtol=1e-4, atol=1e-5, err_msg=name)
      np.testing.assert_allclose(node["var"][k], var, rtol=1e-4, atol=1e-5, err_msg=name)
  # for_class / targets_for pick class k's statistics.
  np.testing.assert_array_equal(bn_stats.for_class(stats, 2)["stem_bn"]["mean"],
                                stats["class"]["stem_bn"]["mean"][2])
  np.testing.assert_array_equal(
      bn_stats.for_class(stats, 1)["stage2_block1"]["bn2"]["var"],
      stats["class"]["stage2_block1"]["bn2"]["var"][1])
  t = bn_stats.targets_for(stats, [2, 0])
  np.testing.assert_array_equal(t["stem_bn"]["var"][1], stats["class"]["stem_bn"]["var"][0])
  np.testing.assert_array_equal(t["stage4_block2"]["bn2"]["mean"][0],
                                stats["class"]["stage4_block2"]["bn2"]["mean"][2])


def test_model_without_bn_has_empty_stats():
  model = models.get_classifier("lenet5", 10)
  params, batch_stats = common.init_model(model, jax.random.key(0), (32, 32, 1))
  assert batch_stats == {}
  assert bn_stats.compute(model, params, batch_stats, [np.zeros((2, 32, 32, 1), np.float32)]) == {}


def test_interrupted_teacher_resumes_to_the_same_parameters(tmp_path, tiny):
  config = tiny("teacher")
  data = pipeline.load_data(config)
  full = teacher_stage.train(config, str(tmp_path / "full"), data, writer=None)
  workdir = str(tmp_path / "resumed")
  ctx = stage_lib.Context(config=config, workdir=workdir, data=data, info=data["test"].info)
  with pytest.raises(loop.Preempted, match="step 15"):
    stage_lib.run(faults.sigterm_at(teacher_stage.STAGE, 15), ctx)
  assert ckpt_lib.StageCheckpoints(teacher_stage.directory(workdir)).latest_step() == 15
  resumed = teacher_stage.train(config, workdir, data, writer=None)
  for a, b in zip(jax.tree.leaves(full["variables"]), jax.tree.leaves(resumed["variables"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_teacher_init_from_another_run_skips_training(tmp_path, tiny):
  """teacher.init_from: the stage takes 0 steps and ends in the same teacher checkpoint (its
  parameters, test accuracy and BN statistics) as the run it starts from."""
  config = tiny("teacher", **{"teacher.model": "lenet5_bn"})
  data = pipeline.load_data(config)
  first = teacher_stage.train(config, str(tmp_path / "a"), data, writer=None)
  config_b = tiny("teacher", **{"teacher.model": "lenet5_bn",
                                "teacher.init_from": str(tmp_path / "a")})
  summary = pipeline.train_and_evaluate(config_b, str(tmp_path / "b"))
  second = teacher_stage.load(config_b, str(tmp_path / "b"), data["test"].info)
  assert second["meta"]["step"] == 0 and second["meta"]["done"]
  assert summary["teacher"]["test_accuracy"] == first["meta"]["eval"]["accuracy"]
  for a, b in zip(jax.tree.leaves((first["variables"], first["bn_stats"])),
                  jax.tree.leaves((second["variables"], second["bn_stats"]))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  # A path without a teacher checkpoint, or one of another model, is refused before writing.
  for path, model, message in ((tmp_path / "none", "lenet5_bn", "no such directory"),
                               (tmp_path / "a", "lenet5", "cannot restore 'teacher'")):
    bad = tiny("teacher", **{"teacher.model": model, "teacher.init_from": str(path)})
    with pytest.raises((teacher_stage.TeacherError, ckpt_lib.CheckpointError), match=message):
      pipeline.train_and_evaluate(bad, str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()
