"""ImageNet classifiers: torchvision's ResNet-18/34/50 and MobileNetV2, Flax Linen.

They have the interface of classifiers.py: `model.apply(variables, x, train=False,
features=False)` on NHWC float32 normalised images of any size >= 32 returns float32 logits, or
`(logits, features)` with `features=True`, where features are the globally average-pooled
activations before the final fully connected layer (512-d for ResNet-18/34, 2048-d for
ResNet-50, 1280-d for MobileNetV2). Every BatchNorm is a RecordingBatchNorm (momentum 0.9,
epsilon 1e-5: PyTorch's BatchNorm2d defaults), so `mutable=['bn_inputs']` returns the moments of
every BN layer's input in the structure of "batch_stats". `dtype` is the computation dtype
(parameters and BN running statistics stay float32).

Architectures, as torchvision defines them:
  ResNet: conv1 7x7/2 (no bias) -> bn1 -> ReLU -> 3x3/2 max-pool (padding 1) -> layer1..layer4
  of BasicBlocks (18: 2-2-2-2, 34: 3-4-6-3) or Bottlenecks (50: 3-4-6-3, expansion 4, the
  stride on the 3x3 conv: "ResNet v1.5"); the first block of layers 2-4 has stride 2, and a
  block whose stride or channel count changes has downsample = 1x1 conv (no bias) + BN;
  global average pool -> fc (with bias).
  MobileNetV2 (width multiplier 1.0): features.0 = 3x3/2 conv-BN-ReLU6 (32), then the
  inverted-residual table (t, c, n, s) = (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2),
  (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1) (features.1-17), a 1x1
  conv-BN-ReLU6 to 1280 (features.18), global average pool, classifier = Dropout(0.2) +
  Linear. The dropout is omitted here (the classifier interface has no dropout rng): this
  MobileNetV2 is torchvision's in evaluation mode, and trains without dropout.

`width` builds narrower models (tests, toy configurations): for the ResNets it is the base
width (64 is torchvision's; layer i has width * 2^(i-1) planes), for MobileNetV2 it scales
every channel count, the last 1280 included, by width / 32 (32 is torchvision's stem), rounded
to the nearest integer and at least 1. At the standard widths the models are torchvision's.

Parameter layout. A torchvision state_dict maps one to one onto our variables:
  * module names are torchvision's module path with "." replaced by "_" where torchvision nests
    modules in Sequentials: `layer1.0` -> module `layer1_0`, `layer1.0.downsample.0` ->
    `layer1_0/downsample_0`, `features.1.conv.0.0` -> `features_1/conv_0_0`, `classifier.1` ->
    `classifier_1`. Our nesting is torchvision's, except that a Sequential of plain layers
    (downsample, features.0, features.18, conv.k) is flattened into its parent. Conversely,
    `torchvision_key` joins our module names with "." and replaces every "_" in them by ".":
    none of our module names has an underscore of its own.
  * leaves: params kernel -> weight (conv: HWIO -> OIHW, so a depthwise (3, 3, 1, C) kernel is
    torchvision's (C, 1, 3, 3); dense: (in, out) -> (out, in)), BN scale -> weight,
    bias -> bias; batch_stats mean -> running_mean, var -> running_var. torchvision's
    `num_batches_tracked` buffers have no counterpart (ignored when loading).
`to_torchvision` and `from_torchvision` convert whole variable trees.

Initialisation: convolutions as torchvision (Kaiming normal, fan_out); MobileNetV2's classifier
as torchvision (normal(0, 0.01), zero bias); the ResNets' fc keeps Flax's default (LeCun
normal, zero bias) where torchvision uses PyTorch's default uniform.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from datafree_jax.models.layers import Conv, RecordingBatchNorm, classifier_output

# torchvision's nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu") for convs.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _bn(train: bool, name: str, dtype: Any):
  """RecordingBatchNorm with PyTorch's BatchNorm2d defaults, as classifiers._bn."""
  return RecordingBatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            dtype=dtype, name=name)


def _conv(features: int, kernel: int, strides: int, name: str, dtype: Any, groups: int = 1):
  """torchvision's bias-free Conv2d with padding (kernel - 1) // 2."""
  pad = (kernel - 1) // 2
  return Conv(features, (kernel, kernel), (strides, strides), padding=((pad, pad), (pad, pad)),
              feature_group_count=groups, use_bias=False, kernel_init=_CONV_INIT, dtype=dtype,
              name=name)


class BasicBlock(nn.Module):
  """torchvision's BasicBlock: 3x3 conv (stride) - BN - ReLU - 3x3 conv - BN, + shortcut, ReLU."""
  planes: int
  strides: int = 1
  dtype: Any = None
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    y = _conv(self.planes, 3, self.strides, "conv1", self.dtype)(x)
    y = nn.relu(_bn(train, "bn1", self.dtype)(y))
    y = _conv(self.planes, 3, 1, "conv2", self.dtype)(y)
    y = _bn(train, "bn2", self.dtype)(y)
    return nn.relu(y + _shortcut(self, x, train))


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (v1.5): 1x1 - 3x3 (stride) - 1x1 (4 x planes) convs with BNs."""
  planes: int
  strides: int = 1
  dtype: Any = None
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    y = _conv(self.planes, 1, 1, "conv1", self.dtype)(x)
    y = nn.relu(_bn(train, "bn1", self.dtype)(y))
    y = _conv(self.planes, 3, self.strides, "conv2", self.dtype)(y)
    y = nn.relu(_bn(train, "bn2", self.dtype)(y))
    y = _conv(self.planes * self.expansion, 1, 1, "conv3", self.dtype)(y)
    y = _bn(train, "bn3", self.dtype)(y)
    return nn.relu(y + _shortcut(self, x, train))


def _shortcut(block, x, train: bool):
  """x, or torchvision's downsample (1x1 conv with the block's stride, BN) when the block
  changes the resolution or the channel count. Called inside the block's compact method."""
  out = block.planes * block.expansion
  if block.strides == 1 and x.shape[-1] == out:
    return x
  x = _conv(out, 1, block.strides, "downsample_0", block.dtype)(x)
  return _bn(train, "downsample_1", block.dtype)(x)


class ResNet(nn.Module):
  """torchvision's ImageNet ResNet (module docstring); `width` is the base width (64)."""
  block: Any = BasicBlock
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 1000
  width: int = 64
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False, features: bool = False):
    x = _conv(self.width, 7, 2, "conv1", self.dtype)(x)
    x = nn.relu(_bn(train, "bn1", self.dtype)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block(self.width * 2**i, strides, self.dtype, name=f"layer{i + 1}_{j}")(x, train)
    feats = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(feats)
    return classifier_output(logits, feats, features)


# torchvision's MobileNetV2 inverted-residual table: expansion t, channels c, repeats n, stride s.
MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidual(nn.Module):
  """torchvision's InvertedResidual: [1x1 expand conv-BN-ReLU6 when t != 1], 3x3 depthwise
  conv (stride)-BN-ReLU6, 1x1 linear conv-BN, + x when the stride is 1 and channels match."""
  out_channels: int
  strides: int
  expand_ratio: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    in_channels = x.shape[-1]
    hidden = int(round(in_channels * self.expand_ratio))
    y, k = x, 0
    if self.expand_ratio != 1:
      y = _conv(hidden, 1, 1, "conv_0_0", self.dtype)(y)
      y = nn.relu6(_bn(train, "conv_0_1", self.dtype)(y))
      k = 1
    y = _conv(hidden, 3, self.strides, f"conv_{k}_0", self.dtype, groups=hidden)(y)
    y = nn.relu6(_bn(train, f"conv_{k}_1", self.dtype)(y))
    y = _conv(self.out_channels, 1, 1, f"conv_{k + 1}", self.dtype)(y)
    y = _bn(train, f"conv_{k + 2}", self.dtype)(y)
    if self.strides == 1 and in_channels == self.out_channels:
      y = x + y
    return y


class MobileNetV2(nn.Module):
  """torchvision's MobileNetV2 without the classifier's dropout (module docstring).

  `width` is the stem's channel count (32); every channel count is scaled by width / 32.
  """
  num_classes: int = 1000
  width: int = 32
  dtype: Any = None

  def channels(self, c: int) -> int:
    """Channel count c of the standard model at this width."""
    return max(1, int(round(c * self.width / 32)))

  @nn.compact
  def __call__(self, x, train: bool = False, features: bool = False):
    x = _conv(self.channels(32), 3, 2, "features_0_0", self.dtype)(x)
    x = nn.relu6(_bn(train, "features_0_1", self.dtype)(x))
    index = 1
    for t, c, n, s in MOBILENET_V2_SETTING:
      for i in range(n):
        x = InvertedResidual(self.channels(c), s if i == 0 else 1, t, self.dtype,
                             name=f"features_{index}")(x, train)
        index += 1
    x = _conv(self.channels(1280), 1, 1, f"features_{index}_0", self.dtype)(x)
    feats = nn.relu6(_bn(train, f"features_{index}_1", self.dtype)(x))
    feats = jnp.mean(feats, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      kernel_init=nn.initializers.normal(0.01), name="classifier_1")(feats)
    return classifier_output(logits, feats, features)


def resnet18(num_classes: int = 1000, width: int = 0, dtype: Any = None) -> ResNet:
  return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, width or 64, dtype)


def resnet34(num_classes: int = 1000, width: int = 0, dtype: Any = None) -> ResNet:
  return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, width or 64, dtype)


def resnet50(num_classes: int = 1000, width: int = 0, dtype: Any = None) -> ResNet:
  return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, width or 64, dtype)


def mobilenet_v2(num_classes: int = 1000, width: int = 0,
                 dtype: Any = None) -> MobileNetV2:
  return MobileNetV2(num_classes, width or 32, dtype)


# Our leaf names -> torchvision's, per variable collection.
_LEAF_NAMES = {"params": {"kernel": "weight", "scale": "weight", "bias": "bias"},
               "batch_stats": {"mean": "running_mean", "var": "running_var"}}


def torchvision_key(collection: str, path: Sequence[str]) -> str:
  """The torchvision state_dict key of the leaf variables[collection][path[0]]...[path[-1]].

  E.g. ("params", ("layer1_0", "downsample_0", "kernel")) -> "layer1.0.downsample.0.weight",
  ("batch_stats", ("bn1", "mean")) -> "bn1.running_mean".
  """
  if collection not in _LEAF_NAMES or path[-1] not in _LEAF_NAMES[collection]:
    raise KeyError(f"no torchvision counterpart for {collection}/{'/'.join(path)}")
  modules = [name.replace("_", ".") for name in path[:-1]]
  return ".".join(modules + [_LEAF_NAMES[collection][path[-1]]])


def _leaves(variables) -> list:
  """[(collection, path, leaf)] of the "params" and "batch_stats" collections."""
  out = []
  for collection in ("params", "batch_stats"):
    flat = jax.tree_util.tree_flatten_with_path(variables.get(collection, {}))[0]
    out += [(collection, tuple(k.key for k in keys), leaf) for keys, leaf in flat]
  return out


def _to_torch_layout(x):
  """Our layout -> torchvision's: HWIO -> OIHW for conv kernels, (in, out) -> (out, in).
  NumPy arrays stay NumPy arrays, jax arrays jax arrays."""
  if x.ndim == 4:
    return x.transpose(3, 2, 0, 1)
  return x.T if x.ndim == 2 else x


def to_torchvision(variables: Mapping) -> dict:
  """{torchvision key: array in torchvision's layout} of variables' params and batch_stats."""
  return {torchvision_key(c, path): _to_torch_layout(leaf)
          for c, path, leaf in _leaves(variables)}


def from_torchvision(state_dict: Mapping, variables: Mapping) -> dict:
  """{"params", "batch_stats"} with the structure of `variables` (e.g. from init, or shapes
  from jax.eval_shape), its leaves taken from a torchvision state_dict (arrays, or CPU tensors:
  anything np.asarray takes). Raises ValueError on a missing or unexpected key or a shape that
  does not match; num_batches_tracked is ignored."""
  out = {}
  used = set()
  for collection, path, leaf in _leaves(variables):
    key = torchvision_key(collection, path)
    if key not in state_dict:
      raise ValueError(f"{key} (for {collection}/{'/'.join(path)}) is not in the state_dict")
    value = np.asarray(state_dict[key], np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    elif value.ndim == 2:
      value = value.T
    if value.shape != tuple(leaf.shape):
      raise ValueError(f"{key}: shape {value.shape} in our layout, expected {tuple(leaf.shape)}")
    node = out.setdefault(collection, {})
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(value)
    used.add(key)
  extra = sorted(k for k in state_dict if k not in used and not k.endswith("num_batches_tracked"))
  if extra:
    raise ValueError(f"state_dict keys without a counterpart: {', '.join(extra[:10])}")
  return out
