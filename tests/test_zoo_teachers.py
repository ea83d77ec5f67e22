"""Teachers of zju-vipa/DataFree's CIFAR model zoo (models/cifar_zoo.py, teacher_import.py).

Their PyTorch models (tests/zoo_torch_models.py, transcribed from their code) get random
weights, random BN affine parameters and BN running statistics from three training-mode
batches; their state_dicts are saved as their zoo saves them (train_scratch.py: {'epoch',
'arch', 'state_dict', 'best_acc1', 'optimizer', 'scheduler'}), imported under the same model
name, and the evaluation-mode logits and features compared with PyTorch's to 1e-4 on random
CIFAR-shaped inputs. Tests that need torch skip without it.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, tiny_config

from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import datasets
from datafree_jax import models
from datafree_jax import pipeline
from datafree_jax import registry
from datafree_jax import teacher_import
from datafree_jax.stages import teacher as teacher_stage

try:
  import torch
  import zoo_torch_models
except ImportError:
  torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch (pip install torch): "
                                 "builds their models and writes .pth files")

# teacher.model -> the name in their registry.py.
THEIR_NAMES = {"resnet18": "resnet18", "resnet34": "resnet34", "wrn16_1": "wrn16_1",
               "wrn16_2": "wrn16_2", "wrn40_1": "wrn40_1", "wrn40_2": "wrn40_2",
               "vgg8_bn": "vgg8", "vgg11_bn": "vgg11", "vgg13_bn": "vgg13"}


def _target(model, image_shape=(32, 32, 3)):
  params, batch_stats = jax.eval_shape(
      lambda: common.init_model(model, jax.random.key(0), image_shape))
  return {"params": params, "batch_stats": batch_stats}


def _their_model(name, num_classes, seed=0):
  """Their model `name` (our name) with random weights and BN statistics, evaluation mode."""
  torch.manual_seed(seed)
  net = zoo_torch_models.MODEL_DICT[THEIR_NAMES[name]](num_classes)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
    net.train()
    for _ in range(3):
      net(torch.randn(4, 3, 32, 32) * 2 + 0.5)
  return net.eval()


def _save_as_their_zoo(net, name, path, data_parallel=False):
  """torch.save as their train_scratch.py saves checkpoints/pretrained/<dataset>_<model>.pth,
  with a real SGD optimizer's and MultiStepLR's states (the scheduler's milestones a Counter)."""
  optimizer = torch.optim.SGD(net.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
  scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, [120, 150, 180], 0.1)
  state = net.state_dict()
  if data_parallel:  # their train_scratch.py wraps the model in nn.DataParallel without --gpu
    state = {"module." + k: v for k, v in state.items()}
  torch.save({"epoch": 200, "arch": THEIR_NAMES[name], "state_dict": state, "best_acc1": 94.87,
              "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, path)


def _check_logits(tmp_path, name, num_classes, data_parallel=False):
  net = _their_model(name, num_classes)
  path = str(tmp_path / f"cifar_{THEIR_NAMES[name]}.pth")
  _save_as_their_zoo(net, name, path, data_parallel)
  model = models.get_classifier(name, num_classes)
  variables = teacher_import.to_flax(name, teacher_import.read_state_dict(path), _target(model))
  x = np.random.default_rng(1).normal(size=(3, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    logits, feats = (t.numpy() for t in net(torch.from_numpy(x), return_features=True))
  ours_logits, ours_feats = jax.jit(lambda v, x: model.apply(v, x, features=True))(
      common.variables_of(variables["params"], variables["batch_stats"]),
      jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert np.abs(logits).max() > 1e-2  # not a degenerate comparison
  np.testing.assert_allclose(ours_logits, logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours_feats, feats, rtol=1e-4, atol=1e-4)
  return variables, net


@needs_torch
@pytest.mark.parametrize("name", ["wrn16_1", "vgg8_bn"])
def test_their_zoo_file_gives_their_logits(tmp_path, name):
  """A zoo file of their WRN-16-1 / VGG-8-BN (CIFAR-100's 100 classes for the VGG, saved from
  nn.DataParallel for the WRN): logits and features equal PyTorch's to 1e-4, and the BN
  running averages are theirs."""
  variables, net = _check_logits(tmp_path, name, 100 if name.startswith("vgg") else 10,
                                 data_parallel=name.startswith("wrn"))
  ours, theirs = (("block2_layer_0", "bn1"), "block2.layer.0.bn1") if name.startswith("wrn") else (
      ("block1_1",), "block1.1")
  stats = variables["batch_stats"]
  for key in ours:
    stats = stats[key]
  np.testing.assert_array_equal(stats["var"], net.state_dict()[theirs + ".running_var"].numpy())


@pytest.mark.slow
@needs_torch
@pytest.mark.parametrize("name", ["resnet18", "resnet34", "wrn16_2", "wrn40_1", "wrn40_2",
                                  "vgg11_bn", "vgg13_bn"])
def test_every_zoo_model_gives_their_logits(tmp_path, name):
  """Their ResNet-18/34, WRN-16-2/40-1/40-2 and VGG-11/13 with BN, from zoo files: logits and
  features equal PyTorch's to 1e-4."""
  _check_logits(tmp_path, name, 10)


def _zero_state_dict(name, num_classes=10):
  """{their key: zeros} of model `name` (to_state_dict of zeros: no torch needed)."""
  target = _target(models.get_classifier(name, num_classes))
  return teacher_import.to_state_dict(name, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype),
                                                         target))


def test_their_names():
  """The keys are their modules' (the names of their wresnet.py and vgg.py), and a file of
  one model read as another names the first wrong key and the model the file is of."""
  wrn, vgg = _zero_state_dict("wrn40_2"), _zero_state_dict("vgg11_bn")
  for key, shape in (("conv1.weight", (16, 3, 3, 3)), ("block1.layer.0.bn1.running_mean", (16,)),
                     ("block1.layer.0.convShortcut.weight", (32, 16, 1, 1)),
                     ("block3.layer.5.conv2.weight", (128, 128, 3, 3)), ("bn1.weight", (128,)),
                     ("fc.weight", (10, 128))):
    assert wrn[key].shape == shape, key
  assert "block1.layer.1.convShortcut.weight" not in wrn
  for key, shape in (("block0.0.bias", (64,)), ("block0.1.running_var", (64,)),
                     ("block2.3.weight", (256, 256, 3, 3)), ("block4.4.weight", (512,)),
                     ("classifier.weight", (10, 512))):
    assert vgg[key].shape == shape, key
  assert len(wrn) == 1 + 4 * 37 + 18 * 2 + 3 + 2 and len(vgg) == 8 * 6 + 2
  target = _target(models.get_classifier("wrn40_1", 10))
  with pytest.raises(teacher_import.TeacherError) as e:
    teacher_import.to_flax("wrn40_1", wrn, target)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith("state_dict (PyTorch names of 'wrn40_1'): unexpected key "
                            "'block1.layer.0.convShortcut.weight' (shape (32, 16, 1, 1))")
  assert message.endswith("its keys are those of teacher.model='wrn40_2'")
  # Another number of classes: the classifier named, no other model suggested.
  with pytest.raises(teacher_import.TeacherError,
                     match=r"key 'classifier.bias' has shape \(100,\), expected \(10,\) "
                           r"\(0 missing, 0 unexpected, 2 mis-shaped keys in all\)$"):
    teacher_import.to_flax("vgg11_bn", _zero_state_dict("vgg11_bn", 100),
                           _target(models.get_classifier("vgg11_bn", 10)))
  assert teacher_import.identify(wrn) == (["wrn40_2"], ["wrn40_2"])
  # The names of a model at another width: named as such.
  narrow = teacher_import.to_state_dict("wrn16_1", jax.tree.map(
      lambda s: np.zeros(s.shape, s.dtype), _target(models.get_classifier("wrn16_1", 10, 8))))
  assert teacher_import.identify(narrow) == ([], ["wrn16_1"])
  with pytest.raises(teacher_import.TeacherError,
                     match=r"missing key 'block1\.layer\.0\.convShortcut\.weight' .*; its key "
                           r"names are those of teacher.model='wrn16_1' \(at another width\)$"):
    teacher_import.to_flax("wrn16_2", narrow, _target(models.get_classifier("wrn16_2", 10)))


def _register_cifar_shaped(name, images, labels):
  datasets.register_dataset(name, test=(images, labels), mean=(0.0,) * 3, std=(1.0,) * 3,
                            class_names=[str(k) for k in range(10)])


@pytest.mark.slow
@needs_torch
def test_zoo_file_through_teacher_init_from(tmp_path):
  """`teacher.init_from=cifar10_wrn16_1.pth` (their zoo's file) through the pipeline's teacher
  stage, on 32x32x3 test images registered with mean 0 and std 1 (the images are the inputs
  as they are): the teacher's test accuracy is PyTorch's, exactly; a file of another model is
  one TeacherError naming the key and the model, before anything is written."""
  net = _their_model("wrn16_1", 10)
  path = str(tmp_path / "cifar10_wrn16_1.pth")
  _save_as_their_zoo(net, "wrn16_1", path)
  rng = np.random.default_rng(2)
  images = rng.uniform(size=(40, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    predicted = net(torch.from_numpy(images.transpose(0, 3, 1, 2))).argmax(1).numpy()
  labels = np.where(np.arange(40) % 4 == 0, (predicted + 1) % 10, predicted)  # 75% right
  name = "cifar_shaped_zoo_test"
  _register_cifar_shaped(name, images, labels.astype(np.int64))
  try:
    config = tiny_config("teacher", **{"teacher.model": "wrn16_1", "teacher.init_from": path})
    config.dataset = name
    summary = pipeline.train_and_evaluate(config, str(tmp_path / "run"))
    assert summary["teacher"]["test_accuracy"] == pytest.approx(0.75)
    teacher = teacher_stage.load(config, str(tmp_path / "run"), datasets.dataset_info(name))
    assert teacher["meta"]["step"] == 0
    config.teacher.model = "wrn16_2"
    with pytest.raises(teacher_stage.TeacherError) as e:
      pipeline.train_and_evaluate(config, str(tmp_path / "other"))
    assert "\n" not in str(e.value)
    assert str(e.value).startswith(f"teacher.init_from={path!r} (teacher.model='wrn16_2', 10 "
                                   "classes): state_dict (PyTorch names of 'wrn16_2'): ")
    assert str(e.value).endswith("its keys are those of teacher.model='wrn16_1'")
    assert not (tmp_path / "other").exists()
  finally:
    datasets.DATASETS.pop(name, None)
    datasets.REGISTERED.pop(name, None)  # pylint: disable=protected-access


# ---------------------------------------------------------------------------------------------
# The pair configs.

PAIRS = {"resnet34_resnet18": ("resnet34", "resnet18"), "vgg11_resnet18": ("vgg11_bn", "resnet18"),
         "wrn40_2_wrn16_1": ("wrn40_2", "wrn16_1"), "wrn40_2_wrn40_1": ("wrn40_2", "wrn40_1"),
         "wrn40_2_wrn16_2": ("wrn40_2", "wrn16_2")}


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_pair_configs(pair):
  """`configs/cifar10.py:pair=...` (and cifar100.py's) sets the pair's models and validates with
  every method; teacher.init_from is left to the command line (empty: the teacher is
  trained)."""
  for dataset in ("cifar10", "cifar100"):
    path = os.path.join(REPO_ROOT, "configs", f"{dataset}.py")
    for method in registry.names() if dataset == "cifar10" else ("dafl",):
      config = config_lib.load_config_file(path, f"pair={pair},method={method}")
      assert (config.teacher.model, config.student.model) == PAIRS[pair]
      assert config.dataset == dataset and config.teacher.init_from == ""
      pipeline.validate(config)
    config = config_lib.load_config_file(path, f"pair={pair},method=dafl")
    zju = pair != "resnet34_resnet18"  # their settings (cifar10.py), else DAFL's official ones
    assert (config.teacher.weight_decay, config.student.temperature) == (
        (1e-4, 20.0) if zju else (5e-4, 1.0))


def test_unknown_pair_lists_the_pairs():
  path = os.path.join(REPO_ROOT, "configs", "cifar10.py")
  with pytest.raises(config_lib.ConfigError, match="unknown pair 'wrn40_2_wrn16_4'; pairs: "
                     "resnet34_resnet18, vgg11_resnet18, wrn40_2_wrn16_1"):
    config_lib.load_config_file(path, "pair=wrn40_2_wrn16_4")
