"""Teachers from other projects' files (teacher_import.py, teacher.init_from=PATH).

PyTorch models are built here with plain torch.nn under torchvision's module names (the
torchvision wheels of the local mirror are CUDA builds that do not load beside torch's CPU
build) and under the DAFL authors' names (their lenet.py / resnet.py, copied), with random
weights and BN running statistics from a few training-mode batches; their state_dicts are
saved as .pth and .safetensors, imported, and the Flax logits compared with PyTorch's
(evaluation mode). Tests that need torch skip without it; the .safetensors path is also tested
with torch made unimportable, the file written with safetensors.numpy.
"""
import os
import sys

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ensemble_config, tiny_config

from datafree_jax import common
from datafree_jax import datasets
from datafree_jax import input_pipeline
from datafree_jax import models
from datafree_jax import teacher_import
from datafree_jax import pipeline
from datafree_jax.stages import teacher as teacher_stage

try:
  import torch
  from torch import nn
except ImportError:
  torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs PyTorch (pip install torch): "
                                 "builds the reference models and writes .pth files")
try:
  import safetensors.numpy as st_numpy
except ImportError:
  st_numpy = None
needs_safetensors = pytest.mark.skipif(st_numpy is None,
                                       reason="needs safetensors (pip install safetensors)")


def _target(model, image_shape):
  params, batch_stats = jax.eval_shape(
      lambda: common.init_model(model, jax.random.key(0), image_shape))
  return {"params": params, "batch_stats": batch_stats}


def _logits(model, variables, x_nchw):
  x = jnp.asarray(np.transpose(x_nchw, (0, 2, 3, 1)))
  return np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(
      common.variables_of(variables["params"], variables["batch_stats"]), x))


# ---------------------------------------------------------------------------------------------
# PyTorch models under torchvision's and the DAFL authors' names.

if torch is not None:

  def _conv_bn_act(cin, cout, k, stride, groups=1):
    """torchvision's Conv2dNormActivation: Sequential(0 conv, 1 BN, 2 ReLU6)."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))

  class TVBasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock."""

    def __init__(self, inplanes, planes, stride=1):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU(inplace=True)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = None
      if stride != 1 or inplanes != planes:
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                        nn.BatchNorm2d(planes))

    def forward(self, x):
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      identity = x if self.downsample is None else self.downsample(x)
      return self.relu(out + identity)

  class TVResNet18(nn.Module):
    """torchvision.models.resnet18(num_classes=...)."""

    def __init__(self, num_classes):
      super().__init__()
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      inplanes = 64
      for i, planes in enumerate((64, 128, 256, 512)):
        stride = 1 if i == 0 else 2
        blocks = [TVBasicBlock(inplanes, planes, stride), TVBasicBlock(planes, planes)]
        setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        inplanes = planes
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.fc(torch.flatten(self.avgpool(x), 1))

  class TVInvertedResidual(nn.Module):
    """torchvision.models.mobilenetv2.InvertedResidual."""

    def __init__(self, inp, oup, stride, expand_ratio):
      super().__init__()
      hidden = int(round(inp * expand_ratio))
      self.use_res_connect = stride == 1 and inp == oup
      layers = [_conv_bn_act(inp, hidden, 1, 1)] if expand_ratio != 1 else []
      layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                 nn.Conv2d(hidden, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
      self.conv = nn.Sequential(*layers)

    def forward(self, x):
      return x + self.conv(x) if self.use_res_connect else self.conv(x)

  class TVMobileNetV2(nn.Module):
    """torchvision.models.mobilenet_v2(num_classes=...) (width multiplier 1)."""

    def __init__(self, num_classes):
      super().__init__()
      features = [_conv_bn_act(3, 32, 3, 2)]
      inp = 32
      for t, c, n, s in models.imagenet.MOBILENET_V2_SETTING:
        for i in range(n):
          features.append(TVInvertedResidual(inp, c, s if i == 0 else 1, t))
          inp = c
      features.append(_conv_bn_act(inp, 1280, 1, 1))
      self.features = nn.Sequential(*features)
      self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward(self, x):
      x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
      return self.classifier(torch.flatten(x, 1))

  class DAFLLeNet5(nn.Module):
    """DAFL/lenet.py LeNet5 (huawei-noah/Data-Efficient-Model-Compression), with optional
    BatchNorm2d bn1-bn3 after the convs (this project's LeNet-5-BN; not in the authors' code)."""

    def __init__(self, use_bn=False):
      super().__init__()
      self.conv1 = nn.Conv2d(1, 6, kernel_size=(5, 5))
      self.relu1 = nn.ReLU()
      self.maxpool1 = nn.MaxPool2d(kernel_size=(2, 2), stride=2)
      self.conv2 = nn.Conv2d(6, 16, kernel_size=(5, 5))
      self.relu2 = nn.ReLU()
      self.maxpool2 = nn.MaxPool2d(kernel_size=(2, 2), stride=2)
      self.conv3 = nn.Conv2d(16, 120, kernel_size=(5, 5))
      self.relu3 = nn.ReLU()
      self.fc1 = nn.Linear(120, 84)
      self.relu4 = nn.ReLU()
      self.fc2 = nn.Linear(84, 10)
      if use_bn:
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm2d(6), nn.BatchNorm2d(16),
                                        nn.BatchNorm2d(120))
      self.use_bn = use_bn

    def forward(self, img):
      bn = (lambda name, x: getattr(self, name)(x)) if self.use_bn else (lambda name, x: x)
      output = self.maxpool1(self.relu1(bn("bn1", self.conv1(img))))
      output = self.maxpool2(self.relu2(bn("bn2", self.conv2(output))))
      output = self.relu3(bn("bn3", self.conv3(output)))
      feature = output.view(-1, 120)
      return self.fc2(self.relu4(self.fc1(feature)))

  class DAFLBasicBlock(nn.Module):
    """DAFL/resnet.py BasicBlock."""
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
      super().__init__()
      self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                             bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.shortcut = nn.Sequential()
      if stride != 1 or in_planes != planes:
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes))

    def forward(self, x):
      out = nn.functional.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      return nn.functional.relu(out + self.shortcut(x))

  class DAFLResNet18(nn.Module):
    """DAFL/resnet.py ResNet18 (CIFAR: 3x3 stem, no max-pool, avg_pool2d(out, 4), linear)."""

    def __init__(self, num_classes=10):
      super().__init__()
      self.in_planes = 64
      self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.layer1 = self._make_layer(64, 2, 1)
      self.layer2 = self._make_layer(128, 2, 2)
      self.layer3 = self._make_layer(256, 2, 2)
      self.layer4 = self._make_layer(512, 2, 2)
      self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes, num_blocks, stride):
      layers = []
      for s in [stride] + [1] * (num_blocks - 1):
        layers.append(DAFLBasicBlock(self.in_planes, planes, s))
        self.in_planes = planes
      return nn.Sequential(*layers)

    def forward(self, x):
      out = nn.functional.relu(self.bn1(self.conv1(x)))
      out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
      out = nn.functional.avg_pool2d(out, 4)
      return self.linear(out.view(out.size(0), -1))

  TORCH_MODELS = {  # teacher.model -> (PyTorch module, input (C, H, W))
      "resnet18_imagenet": (lambda: TVResNet18(10), (3, 64, 64)),
      "mobilenet_v2": (lambda: TVMobileNetV2(10), (3, 32, 32)),
      "lenet5": (lambda: DAFLLeNet5(), (1, 32, 32)),
      "lenet5_bn": (lambda: DAFLLeNet5(use_bn=True), (1, 32, 32)),
      "resnet18": (lambda: DAFLResNet18(10), (3, 32, 32)),
  }


def _trained_torch_model(name, seed=0):
  """The PyTorch model of `name` with random weights, random BN affine parameters and BN
  running statistics from three training-mode batches (not the defaults 0 and 1), in
  evaluation mode."""
  torch.manual_seed(seed)
  build, chw = TORCH_MODELS[name]
  net = build()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.1)
    net.train()
    for _ in range(3):
      net(torch.randn(4, *chw) * 2 + 0.5)
  net.eval()
  return net, chw


def _save(state_dict, directory, stem):
  """The state_dict as <stem>.pth (torch.save) and <stem>.safetensors; their paths."""
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  pth, sft = os.path.join(directory, stem + ".pth"), os.path.join(directory, stem + ".safetensors")
  torch.save(state_dict, pth)
  safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, sft)
  return pth, sft


@pytest.mark.slow
@needs_torch
@needs_safetensors
@pytest.mark.parametrize("name", ["resnet18_imagenet", "mobilenet_v2", "lenet5", "lenet5_bn",
                                  "resnet18"])
def test_pytorch_state_dict_gives_pytorchs_logits(tmp_path, name):
  """.pth and .safetensors of a torchvision ResNet-18 / MobileNetV2 (torchvision's names) and
  of the DAFL authors' LeNet-5 and CIFAR ResNet-18 (their names): the imported Flax model's
  evaluation-mode logits are PyTorch's to 1e-4."""
  net, chw = _trained_torch_model(name)
  state = net.state_dict()
  assert any(k.endswith("num_batches_tracked") for k in state) == (name != "lenet5")
  pth, sft = _save(state, str(tmp_path), name)
  x = np.random.default_rng(1).normal(size=(2,) + chw).astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(x)).numpy()
  model = models.get_classifier(name, 10)
  target = _target(model, chw[1:] + chw[:1])
  from_pth = teacher_import.to_flax(name, teacher_import.read_state_dict(pth), target)
  from_sft = teacher_import.to_flax(name, teacher_import.read_state_dict(sft), target)
  assert jax.tree.structure(from_pth) == jax.tree.structure(target)
  for a, b in zip(jax.tree.leaves(from_pth), jax.tree.leaves(from_sft)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(_logits(model, from_pth, x), expected, rtol=1e-4, atol=1e-4)
  # The BN running averages are PyTorch's (mean <- running_mean, var <- running_var).
  if name != "lenet5":
    bn = {"resnet18_imagenet": ("bn1", "bn1"), "mobilenet_v2": ("features_0_1", "features.0.1"),
          "lenet5_bn": ("bn2", "bn2"), "resnet18": ("stem_bn", "bn1")}[name]
    np.testing.assert_array_equal(from_pth["batch_stats"][bn[0]]["var"],
                                  state[bn[1] + ".running_var"].numpy())
  # to_state_dict is to_flax's inverse.
  back = teacher_import.to_state_dict(name, from_pth)
  assert set(back) == {k for k in state if not k.endswith("num_batches_tracked")}
  for k, v in back.items():
    np.testing.assert_array_equal(v, state[k].numpy(), err_msg=k)


def test_lenet5_fc1_rows_follow_the_flattening_order():
  """The first dense layer after conv features reads PyTorch's NCHW flattening: with a
  spatial map larger than 1x1 (a 36x36 LeNet-5: conv3's output is 2x2x120), to_flax reorders
  its input rows, and to_state_dict reverses it."""
  model = models.get_classifier("lenet5", 10)
  target = _target(model, (36, 36, 1))
  assert target["params"]["fc1"]["kernel"].shape == (480, 84)
  rng = np.random.default_rng(0)
  state = {k: rng.normal(size=v.shape).astype(np.float32)
           for k, v in teacher_import.to_state_dict(
               "lenet5", jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target)).items()}
  v = teacher_import.to_flax("lenet5", state, target)
  # PyTorch's fc1 input index c * 4 + (h * 2 + w) is our index (h * 2 + w) * 120 + c.
  w_torch = state["fc1.weight"]  # (84, 480)
  for c, hw in ((0, 0), (5, 3), (119, 2)):
    np.testing.assert_array_equal(v["params"]["fc1"]["kernel"][hw * 120 + c],
                                  w_torch[:, c * 4 + hw])
  np.testing.assert_array_equal(teacher_import.to_state_dict("lenet5", v)["fc1.weight"], w_torch)


@needs_safetensors
def test_safetensors_needs_no_torch(tmp_path, monkeypatch):
  """A .safetensors file written with safetensors.numpy is imported with torch unimportable;
  a .pth file then fails with one clear error naming pip install torch."""
  monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
  model = models.get_classifier("lenet5_bn", 10)
  params, batch_stats = common.init_model(model, jax.random.key(1), (32, 32, 1))
  batch_stats = jax.tree.map(lambda a: a + 0.25, batch_stats)
  variables = jax.tree.map(np.asarray, {"params": params, "batch_stats": batch_stats})
  path = str(tmp_path / "t.safetensors")
  st_numpy.save_file(teacher_import.to_state_dict("lenet5_bn", variables), path)
  got = teacher_import.to_flax("lenet5_bn", teacher_import.read_state_dict(path),
                               _target(model, (32, 32, 1)))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(variables)):
    np.testing.assert_array_equal(a, b)
  (tmp_path / "t.pth").write_bytes(b"not read")
  with pytest.raises(teacher_import.TeacherError, match="pip install torch"):
    teacher_import.read_state_dict(str(tmp_path / "t.pth"))


@needs_safetensors
def test_bfloat16_safetensors(tmp_path):
  """safetensors' numpy loader does not know bfloat16; such files (written here by hand in the
  safetensors format: u64 header size, JSON header, little-endian data) are read all the
  same."""
  import json  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
  b = np.ones(3, np.float32)
  header = json.dumps({"a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]},
                       "b": {"dtype": "F32", "shape": [3], "data_offsets": [12, 24]}}).encode()
  header += b" " * (-len(header) % 8)
  path = tmp_path / "bf16.safetensors"
  path.write_bytes(len(header).to_bytes(8, "little") + header + a.tobytes() + b.tobytes())
  got = teacher_import.read_state_dict(str(path))
  np.testing.assert_array_equal(got["a"].astype(np.float32), a.astype(np.float32))
  np.testing.assert_array_equal(got["b"], b)
  (tmp_path / "junk.safetensors").write_bytes(b"\x03\x00")
  with pytest.raises(teacher_import.TeacherError, match="not a readable safetensors file"):
    teacher_import.read_state_dict(str(tmp_path / "junk.safetensors"))


def _lenet_state():
  model = models.get_classifier("lenet5_bn", 10)
  target = _target(model, (32, 32, 1))
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target)
  return model, target, teacher_import.to_state_dict("lenet5_bn", zeros)


@pytest.mark.parametrize("case, message", [
    ("missing", r"missing key 'bn2\.running_var' \(for batch_stats/bn2/var, shape \(16,\)\)"),
    ("unexpected", r"unexpected key 'fc3\.weight' \(shape \(10, 84\)\)"),
    ("misshaped", r"key 'fc2\.weight' has shape \(7, 84\), expected \(10, 84\)"),
    ("not_lenet", r"missing key 'bn1\.bias' .*\(21 missing, 1 unexpected, 0 mis-shaped"),
])
def test_state_dict_errors_name_the_key(case, message):
  _, target, state = _lenet_state()
  state = dict(state, **{"bn1.num_batches_tracked": np.int64(5)})  # ignored
  if case == "missing":
    del state["bn2.running_var"]
  elif case == "unexpected":
    state["fc3.weight"] = np.zeros((10, 84), np.float32)
  elif case == "misshaped":
    state["fc2.weight"] = np.zeros((7, 84), np.float32)
  else:  # a DAFL CIFAR ResNet's names for a LeNet: the first LeNet key it lacks
    state = {"conv1.weight": state["conv1.weight"], "linear.weight": np.zeros((10, 512))}
  with pytest.raises(teacher_import.TeacherError, match=message):
    teacher_import.to_flax("lenet5_bn", state, target)


def test_module_prefix_and_unsupported_models():
  """nn.DataParallel's 'module.' prefix is dropped; unsupported models say which are."""
  _, target, state = _lenet_state()
  got = teacher_import.to_flax("lenet5_bn", {"module." + k: v for k, v in state.items()},
                               target)
  assert jax.tree.structure(got) == jax.tree.structure(target)
  with pytest.raises(teacher_import.TeacherError, match="state_dicts can be imported for"):
    teacher_import.torch_key("no_such_model", "params", ("fc", "kernel"))


@needs_torch
def test_torch_files_wrapped_or_not_a_state_dict(tmp_path):
  _, target, state = _lenet_state()
  tensors = {k: torch.from_numpy(v) for k, v in state.items()}
  torch.save({"epoch": 3, "state_dict": tensors}, str(tmp_path / "wrapped.pt"))
  got = teacher_import.to_flax("lenet5_bn",
                               teacher_import.read_state_dict(str(tmp_path / "wrapped.pt")),
                               target)
  assert jax.tree.structure(got) == jax.tree.structure(target)
  torch.save(nn.Linear(2, 2), str(tmp_path / "module.pth"))
  with pytest.raises(teacher_import.TeacherError, match="save the model's state_dict"):
    teacher_import.read_state_dict(str(tmp_path / "module.pth"))


def test_flax_msgpack_and_orbax_round_trip(tmp_path):
  """{'params', 'batch_stats'}, a TrainState-like dict or params alone, as msgpack bytes or an
  orbax PyTree checkpoint (alone or in a CheckpointManager's step directory): the same
  variables; a mis-shaped or missing entry is named."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  model = models.get_classifier("lenet5_bn", 10)
  params, batch_stats = common.init_model(model, jax.random.key(2), (32, 32, 1))
  variables = jax.tree.map(np.asarray, {"params": params, "batch_stats": batch_stats})
  target = _target(model, (32, 32, 1))

  def check(got):
    assert jax.tree.structure(got) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(variables)):
      np.testing.assert_array_equal(a, b)

  (tmp_path / "v.msgpack").write_bytes(flax.serialization.to_bytes(variables))
  check(teacher_import.read_flax(str(tmp_path / "v.msgpack"), target))
  state = dict(variables, step=np.int32(7), opt_state={"mu": variables["params"]})
  (tmp_path / "s.msgpack").write_bytes(flax.serialization.msgpack_serialize(state))
  check(teacher_import.read_flax(str(tmp_path / "s.msgpack"), target))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(str(tmp_path / "orbax"), state)
    ckpt.save(str(tmp_path / "manager" / "120" / "default"), state)
  check(teacher_import.read_flax(str(tmp_path / "orbax"), target))
  check(teacher_import.read_flax(str(tmp_path / "manager"), target))
  # The params alone: fine for a model without BN, named as the problem for one with BN.
  plain = models.get_classifier("lenet5", 10)
  p_plain = jax.tree.map(np.asarray, common.init_model(plain, jax.random.key(3),
                                                      (32, 32, 1))[0])
  (tmp_path / "p.msgpack").write_bytes(flax.serialization.to_bytes(p_plain))
  got = teacher_import.read_flax(str(tmp_path / "p.msgpack"), _target(plain, (32, 32, 1)))
  np.testing.assert_array_equal(got["params"]["fc2"]["kernel"], p_plain["fc2"]["kernel"])
  with pytest.raises(teacher_import.TeacherError,
                     match=r"params alone.*missing key 'params/bn1/bias'"):
    teacher_import.read_flax(str(tmp_path / "p.msgpack"), target)
  bad = jax.tree.map(lambda a: a, variables)
  bad["params"]["fc2"]["kernel"] = np.zeros((84, 7), np.float32)
  (tmp_path / "bad.msgpack").write_bytes(flax.serialization.to_bytes(bad))
  with pytest.raises(teacher_import.TeacherError,
                     match=r"key 'params/fc2/kernel' has shape \(84, 7\), expected \(84, 10\)"):
    teacher_import.read_flax(str(tmp_path / "bad.msgpack"), target)
  (tmp_path / "junk.msgpack").write_bytes(b"\xc1 not msgpack")
  with pytest.raises(teacher_import.TeacherError, match="not a Flax msgpack file"):
    teacher_import.read_flax(str(tmp_path / "junk.msgpack"), target)
  (tmp_path / "empty").mkdir()
  with pytest.raises(teacher_import.TeacherError, match="no checkpoint in"):
    teacher_import.read_flax(str(tmp_path / "empty"), target)


def test_init_from_dispatch_errors_before_writing(tmp_path):
  """Through the pipeline: an unknown suffix, a missing file and a file of another model are
  one TeacherError each (naming init_from and the key), and the workdir is not created."""
  _, _, state = _lenet_state()
  (tmp_path / "t.npz").write_bytes(b"")
  if st_numpy is not None:
    st_numpy.save_file(state, str(tmp_path / "bn.safetensors"))
  cases = [("t.npz", "a file must be a PyTorch state_dict"),
           ("none.pth", "no such directory or file")]
  if st_numpy is not None:
    cases.append(("bn.safetensors",
                  r"teacher.model='lenet5', 10 classes\): state_dict .*unexpected key 'bn1\."))
  for name, message in cases:
    config = tiny_config("teacher", **{"teacher.model": "lenet5",
                                       "teacher.init_from": str(tmp_path / name)})
    with pytest.raises(teacher_stage.TeacherError, match=message):
      pipeline.train_and_evaluate(config, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()


@pytest.mark.slow  # the whole pipeline from an imported teacher
@needs_safetensors
def test_imported_teacher_runs_the_ensemble_pipeline_without_training_data(tmp_path):
  """A LeNet-5-BN teacher from a .pth file (DAFL's names plus bn1-bn3; .safetensors without
  torch) on a dataset registered with test images only: the teacher stage takes 0 steps, its
  BN statistics are the file's running averages (global only), and a tiny ensemble pipeline
  (generators, distillation) runs to the end."""
  images, labels = input_pipeline._load_mnist5k("test")  # pylint: disable=protected-access
  images = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))  # 28 -> 32, LeNet-5's size
  name = "mnist5k_test_only_import"
  datasets.register_dataset(name, test=(images, labels),
                                  class_names=[str(k) for k in range(10)])
  try:
    if torch is not None:
      net, _ = _trained_torch_model("lenet5_bn")
      path = str(tmp_path / "teacher.pth")
      torch.save(net.state_dict(), path)
      state = {k: v.numpy() for k, v in net.state_dict().items()}
    else:
      model = models.get_classifier("lenet5_bn", 10)
      params, batch_stats = common.init_model(model, jax.random.key(1), (32, 32, 1))
      state = teacher_import.to_state_dict("lenet5_bn", jax.tree.map(
          np.asarray, {"params": params, "batch_stats": jax.tree.map(lambda a: a + 0.3,
                                                                     batch_stats)}))
      path = str(tmp_path / "teacher.safetensors")
      st_numpy.save_file(state, path)
    config = ensemble_config(**{"teacher.init_from": path, "ensemble.steps": 2,
                                "student.steps": 4, "ensemble.eval_every": 0})
    config.dataset = name
    workdir = str(tmp_path / "run")
    summary = pipeline.train_and_evaluate(config, workdir)
    teacher = teacher_stage.load(config, workdir, datasets.dataset_info(name))
    assert teacher["meta"]["step"] == 0 and teacher["meta"]["done"]
    assert set(teacher["bn_stats"]) == {"global"}
    for ours, key in (("bn1", "bn1"), ("bn3", "bn3")):
      np.testing.assert_allclose(teacher["bn_stats"]["global"][ours]["mean"],
                                 state[key + ".running_mean"], rtol=1e-6)
      np.testing.assert_allclose(teacher["variables"]["batch_stats"][ours]["var"],
                                 state[key + ".running_var"], rtol=1e-6)
    assert 0.0 <= summary["teacher"]["test_accuracy"] <= 1.0
    assert os.path.isdir(os.path.join(workdir, "generators"))
    assert summary["student"]["steps"] == 4
    assert 0.0 <= summary["student"]["test_accuracy"] <= 1.0
  finally:
    datasets.DATASETS.pop(name, None)
    datasets.REGISTERED.pop(name, None)  # pylint: disable=protected-access


@needs_safetensors
def test_imported_teacher_gets_class_statistics_from_the_training_split(tmp_path):
  """With a training split (mnist5k) the BN statistics pass still runs on it: class-conditional
  statistics beside the imported running averages."""
  model = models.get_classifier("lenet5_bn", 10)
  params, batch_stats = common.init_model(model, jax.random.key(4), (32, 32, 1))
  variables = jax.tree.map(np.asarray, {"params": params, "batch_stats": jax.tree.map(
      lambda a: a + 0.5, batch_stats)})
  path = str(tmp_path / "teacher.safetensors")
  st_numpy.save_file(teacher_import.to_state_dict("lenet5_bn", variables), path)
  config = tiny_config("teacher", **{"teacher.model": "lenet5_bn", "teacher.init_from": path})
  summary = pipeline.train_and_evaluate(config, str(tmp_path / "run"))
  teacher = teacher_stage.load(config, str(tmp_path / "run"))
  assert teacher["meta"]["step"] == 0 and summary["teacher"]["test_accuracy"] is not None
  stats = teacher["bn_stats"]
  assert set(stats) == {"global", "class", "class_counts"}
  np.testing.assert_array_equal(stats["class_counts"], [8] * 10)
  np.testing.assert_allclose(stats["global"]["bn2"]["var"], variables["batch_stats"]["bn2"]["var"])
  assert stats["class"]["bn2"]["mean"].shape == (10, 16)
