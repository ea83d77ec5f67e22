"""CIFAR classifiers of zju-vipa/DataFree's model zoo: Wide ResNets and VGG with BatchNorm, Flax
Linen.

zju-vipa/DataFree (Fang et al.'s benchmark of data-free distillation; its `registry.py` names
the models) trains its CIFAR teachers and students from three sources:
  * `resnet18`, `resnet34` (datafree/models/classifiers/resnet.py): the DAFL authors' CIFAR
    ResNets, which are classifiers.ResNet (`resnet18`, `resnet34` of this project);
  * `wrn16_1`, `wrn16_2`, `wrn40_1`, `wrn40_2` (wresnet.py, from ZSKT's code): `WideResNet`
    here;
  * `vgg8`, `vgg11`, `vgg13` (vgg.py, from RepDistiller; the registry's names build
    `vgg*_bn`, with BatchNorm): `VGG` here, registered as `vgg8_bn`, `vgg11_bn`, `vgg13_bn`.

Both models have the interface of classifiers.py: `model.apply(variables, x, train=False,
features=False)` on NHWC normalised images returns float32 logits, or `(logits, features)`
with `features=True`, the globally average-pooled activations before the last linear layer (as
their `return_features=True`). BatchNorms are RecordingBatchNorm with PyTorch's defaults
(momentum 0.9 in flax's convention, epsilon 1e-5); `dtype` is the computation dtype.

Architectures, as zju-vipa/DataFree defines them:
  WRN-d-k (d = 6n + 4): conv1 3x3 (16, no bias), then block1..block3 of n pre-activation blocks
  each (16k, 32k, 64k channels; stride 1, 2, 2 on each stage's first block), then bn1 - ReLU -
  global average pool - fc. A block: o = ReLU(bn1(x)); y = conv2(ReLU(bn2(conv1(o)))) (3x3
  convs, no bias, the stride on conv1); out = y + x when the block keeps its channel count, else
  y + convShortcut(o) (1x1, the block's stride, no bias: the shortcut reads the activated input,
  as their code does). Their dropout rate is 0 in every registered model; there is none here.
  VGG-BN: five blocks of 3x3 convs (padding 1, with bias), each conv followed by BatchNorm and
  ReLU; block channels A (VGG-11) = [64], [128], [256, 256], [512, 512], [512, 512], B (VGG-13)
  = [64, 64], [128, 128], [256, 256], [512, 512], [512, 512], S (VGG-8) = [64], [128], [256],
  [512], [512]. A 2x2 max-pool follows blocks 0-2, and block 3 only on 64x64 inputs (their
  forward's `if h == 64`); after block 4 a global average pool and `classifier` (512 -> classes).

Parameter layout: module names are zju-vipa/DataFree's module paths with "." replaced by "_"
(`block1.layer.0.convShortcut` -> `block1_layer_0/convShortcut`, `block2.4` -> `block2_4`), and
no module name has an underscore of its own, so their key is ours joined with "." with every "_"
replaced by "." (teacher_import.torch_key). Leaves as torchvision's (imagenet.py): kernel -> weight (HWIO
-> OIHW, (in, out) -> (out, in)), BN scale -> weight, bias -> bias, mean -> running_mean, var ->
running_var.

`width` builds narrower models (tests, toy configurations): the WRNs' stem channels (16 is
theirs; the stages have width * k, 2 width * k, 4 width * k), the VGGs' first block's (64 is
theirs; every channel count scaled by width / 64). Initialisation as theirs: convolutions normal
with std sqrt(2 / (k * k * out_channels)), VGG's conv biases zero and its classifier normal(0,
0.01) with zero bias; the WRNs' fc keeps Flax's default kernel (PyTorch's default there) with a
zero bias.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from datafree_jax.models import cpu_conv
from datafree_jax.models.layers import Conv, RecordingBatchNorm, classifier_output

# Their m.weight.data.normal_(0, sqrt(2 / (kh * kw * out_channels))): Kaiming normal, fan_out.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _bn(train: bool, name: str, dtype: Any):
  """RecordingBatchNorm with PyTorch's BatchNorm2d defaults, as classifiers._bn."""
  return RecordingBatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            dtype=dtype, name=name)


class WideBlock(nn.Module):
  """Their wresnet.BasicBlock (dropout 0): pre-activation, shortcut from the activated input
  when the channel count changes."""
  out_planes: int
  strides: int = 1
  dtype: Any = None
  platform: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    equal_in_out = x.shape[-1] == self.out_planes
    o = nn.relu(_bn(train, "bn1", self.dtype)(x))
    y = Conv(self.out_planes, (3, 3), (self.strides, self.strides), padding=1, use_bias=False,
             kernel_init=_CONV_INIT, dtype=self.dtype, platform=self.platform, name="conv1")(o)
    y = nn.relu(_bn(train, "bn2", self.dtype)(y))
    y = Conv(self.out_planes, (3, 3), padding=1, use_bias=False, kernel_init=_CONV_INIT,
             dtype=self.dtype, platform=self.platform, name="conv2")(y)
    if equal_in_out:
      return x + y
    shortcut = Conv(self.out_planes, (1, 1), (self.strides, self.strides), use_bias=False,
                    kernel_init=_CONV_INIT, dtype=self.dtype, platform=self.platform,
                    name="convShortcut")(o)
    return shortcut + y


class WideResNet(nn.Module):
  """Their wresnet.WideResNet: WRN-depth-widen_factor (module docstring)."""
  depth: int = 40
  widen_factor: int = 2
  num_classes: int = 10
  width: int = 16
  dtype: Any = None
  platform: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False, features: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"a WRN's depth is 6n + 4, got {self.depth}")
    n = (self.depth - 4) // 6
    x = Conv(self.width, (3, 3), padding=1, use_bias=False, kernel_init=_CONV_INIT,
             dtype=self.dtype, platform=self.platform, name="conv1")(x)
    for stage in range(3):
      planes = self.width * self.widen_factor * 2**stage
      for i in range(n):
        strides = 2 if stage > 0 and i == 0 else 1
        x = WideBlock(planes, strides, self.dtype, self.platform,
                      name=f"block{stage + 1}_layer_{i}")(x, train)
    x = nn.relu(_bn(train, "bn1", self.dtype)(x))
    feats = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(feats)
    return classifier_output(logits, feats, features)


# Their vgg.cfg: the conv channels of each of the five blocks.
VGG_CFG = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class VGG(nn.Module):
  """Their vgg.VGG with batch_norm=True (module docstring)."""
  cfg: Sequence[Sequence[int]] = VGG_CFG["vgg11"]
  num_classes: int = 10
  width: int = 64
  dtype: Any = None
  platform: Optional[str] = None

  def channels(self, c: int) -> int:
    return max(1, c * self.width // 64)

  @nn.compact
  def __call__(self, x, train: bool = False, features: bool = False):
    pool3 = x.shape[1] == 64  # their forward: `if h == 64: x = self.pool3(x)`
    for b, block in enumerate(self.cfg):
      for i, c in enumerate(block):  # Sequential indices: conv 3i, BN 3i + 1, ReLU 3i + 2
        x = Conv(self.channels(c), (3, 3), padding=1, kernel_init=_CONV_INIT,
                 dtype=self.dtype, platform=self.platform, name=f"block{b}_{3 * i}")(x)
        x = nn.relu(_bn(train, f"block{b}_{3 * i + 1}", self.dtype)(x))
      if b < 3 or (b == 3 and pool3):
        x = cpu_conv.max_pool(x, (2, 2), strides=(2, 2), platform=self.platform)
    feats = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      kernel_init=nn.initializers.normal(0.01), name="classifier")(feats)
    return classifier_output(logits, feats, features)


def wrn(depth: int, widen_factor: int, num_classes: int, width: int = 0,
        dtype: Any = None) -> WideResNet:
  return WideResNet(depth, widen_factor, num_classes, width or 16, dtype)


def vgg_bn(name: str, num_classes: int, width: int = 0, dtype: Any = None) -> VGG:
  return VGG(VGG_CFG[name], num_classes, width or 64, dtype)
