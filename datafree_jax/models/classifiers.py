"""Classifiers (teachers and students), Flax Linen.

Every classifier is called as `model.apply(variables, x, train=False, features=False)` and returns
logits, or `(logits, features)` with `features=True`, where features are the activations before
the last fully connected layer (DAFL's activation loss uses them: 120-d after conv3 in LeNet-5,
512-d after global average pooling in the ResNets). BatchNorm layers are RecordingBatchNorm, so
`mutable=['bn_inputs']` also returns the batch moments of every BN layer's input.

Every classifier has a `dtype` field, the computation dtype (None by default: flax's, the dtype
of inputs and parameters, float32 here; bfloat16 for mixed precision): its convolutions, dense
layers and BatchNorms compute in `dtype`, while the parameters and BN running statistics stay
float32 and logits and features are returned in float32 (or wider). `get_classifier` also builds
the ImageNet models of `imagenet.py` and the Wide ResNets and VGGs of zju-vipa/DataFree's CIFAR
model zoo (`cifar_zoo.py`).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from datafree_jax.errors import UnknownModelError
from datafree_jax.models import cifar_zoo, cpu_conv, imagenet
from datafree_jax.models.layers import Conv, RecordingBatchNorm, classifier_output


def _bn(train: bool, name: str, dtype: Any = None):
  # PyTorch's BatchNorm2d defaults (momentum 0.1, eps 1e-5), as in the papers' code.
  return RecordingBatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            dtype=dtype, name=name)


class LeNet5(nn.Module):
  """LeNet-5 on 32x32 inputs: conv5x5-pool-conv5x5-pool-conv5x5-fc-fc (DAFL's teacher).

  widths (6, 16, 120, 84) is LeNet-5, (3, 8, 60, 42) LeNet-5-half. With use_bn, a BatchNorm
  follows each conv (before its ReLU): the CPU-sized teacher that moment matching needs.
  """
  num_classes: int = 10
  widths: Sequence[int] = (6, 16, 120, 84)
  use_bn: bool = False
  dtype: Any = None
  platform: Optional[str] = None   # platforms.py: 'cpu' takes cpu_conv's forms

  @nn.compact
  def __call__(self, x, train: bool = False, features: bool = False):
    c1, c2, c3, f4 = self.widths
    for i, (width, pool) in enumerate(((c1, True), (c2, True), (c3, False))):
      x = Conv(width, (5, 5), padding="VALID", dtype=self.dtype, platform=self.platform,
               name=f"conv{i + 1}")(x)
      if self.use_bn:
        x = _bn(train, f"bn{i + 1}", self.dtype)(x)
      x = nn.relu(x)
      if pool:
        x = cpu_conv.max_pool(x, (2, 2), strides=(2, 2), platform=self.platform)
    feats = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(f4, dtype=self.dtype, name="fc1")(feats))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x)
    return classifier_output(logits, feats, features)


class MLP(nn.Module):
  """HintonNet: an MLP on the flattened image, (1200, 1200) hidden, or (800, 800) for the student.

  The paper's inputs are 28x28 (784); this project's MNIST pipeline gives 32x32 (1024) inputs.
  """
  num_classes: int = 10
  hidden: Sequence[int] = (1200, 1200)
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False, features: bool = False):
    x = x.reshape((x.shape[0], -1))
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, dtype=self.dtype, name=f"fc{i + 1}")(x))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)
    return classifier_output(logits, x, features)


class BasicBlock(nn.Module):
  filters: int
  strides: int = 1
  dtype: Any = None
  platform: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    residual = x
    y = Conv(self.filters, (3, 3), (self.strides, self.strides), padding=1, use_bias=False,
             dtype=self.dtype, platform=self.platform, name="conv1")(x)
    y = nn.relu(_bn(train, "bn1", self.dtype)(y))
    y = Conv(self.filters, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
             platform=self.platform, name="conv2")(y)
    y = _bn(train, "bn2", self.dtype)(y)
    if self.strides != 1 or x.shape[-1] != self.filters:
      residual = Conv(self.filters, (1, 1), (self.strides, self.strides), use_bias=False,
                      dtype=self.dtype, platform=self.platform, name="shortcut_conv")(x)
      residual = _bn(train, "shortcut_bn", self.dtype)(residual)
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """CIFAR-style ResNet: 3x3 stem, no max-pool, four stages of basic blocks.

  stage_sizes (2, 2, 2, 2) is ResNet-18, (3, 4, 6, 3) ResNet-34; width 64 is the usual one.
  """
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  num_classes: int = 10
  width: int = 64
  dtype: Any = None
  platform: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool = False, features: bool = False):
    x = Conv(self.width, (3, 3), padding=1, use_bias=False, dtype=self.dtype,
             platform=self.platform, name="stem_conv")(x)
    x = nn.relu(_bn(train, "stem_bn", self.dtype)(x))
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.width * 2**i, strides, self.dtype, self.platform,
                       name=f"stage{i + 1}_block{j + 1}")(x, train)
    feats = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(feats)
    return classifier_output(logits, feats, features)


# name -> (num_classes, width, dtype) -> module. `width` 0 is each model's standard width.
CLASSIFIERS = {
    "lenet5": lambda nc, width, dtype: LeNet5(nc, dtype=dtype),
    "lenet5_half": lambda nc, width, dtype: LeNet5(nc, widths=(3, 8, 60, 42), dtype=dtype),
    "lenet5_bn": lambda nc, width, dtype: LeNet5(nc, use_bn=True, dtype=dtype),
    "lenet5_half_bn": lambda nc, width, dtype: LeNet5(nc, widths=(3, 8, 60, 42), use_bn=True,
                                                      dtype=dtype),
    "hinton": lambda nc, width, dtype: MLP(nc, (1200, 1200), dtype=dtype),
    "hinton_half": lambda nc, width, dtype: MLP(nc, (800, 800), dtype=dtype),
    "resnet18": lambda nc, width, dtype: ResNet((2, 2, 2, 2), nc, width or 64, dtype=dtype),
    "resnet34": lambda nc, width, dtype: ResNet((3, 4, 6, 3), nc, width or 64, dtype=dtype),
    # zju-vipa/DataFree's CIFAR Wide ResNets and VGGs with BN (their architectures and
    # parameter layout, cifar_zoo.py); their resnet18/resnet34 are the two above.
    **{f"wrn{d}_{k}": (lambda nc, width, dtype, d=d, k=k: cifar_zoo.wrn(d, k, nc, width, dtype))
       for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{f"{v}_bn": (lambda nc, width, dtype, v=v: cifar_zoo.vgg_bn(v, nc, width, dtype))
       for v in cifar_zoo.VGG_CFG},
    # ImageNet models (torchvision's architectures and parameter layout, imagenet.py).
    "resnet18_imagenet": lambda nc, width, dtype: imagenet.resnet18(nc, width, dtype),
    "resnet34_imagenet": lambda nc, width, dtype: imagenet.resnet34(nc, width, dtype),
    "resnet50_imagenet": lambda nc, width, dtype: imagenet.resnet50(nc, width, dtype),
    "mobilenet_v2": lambda nc, width, dtype: imagenet.mobilenet_v2(nc, width, dtype),
}


def get_classifier(name: str, num_classes: int, width: int = 0,
                   dtype: Any = None, platform: Optional[str] = None) -> nn.Module:
  """Classifier by name, computing in `dtype` (parameters and outputs stay float32), in the
  form of `platform` (platforms.py; None: XLA's own forms, what export traces). The ImageNet
  models take XLA's own forms on every platform (none of their layers has a CPU path).

  `width` overrides the base width of the ResNets (0 keeps 64), of MobileNetV2 (its stem's
  channels, 0 keeps 32; see imagenet.py), of the WRNs (their stem's channels, 0 keeps 16) and
  of the VGGs (their first block's channels, 0 keeps 64; see cifar_zoo.py); the LeNets and MLPs
  ignore it.
  """
  if name not in CLASSIFIERS:
    raise UnknownModelError(
        f"unknown model {name!r}; known models: {', '.join(sorted(CLASSIFIERS))}")
  model = CLASSIFIERS[name](num_classes, width, dtype)
  if platform is not None and "platform" in getattr(model, "__dataclass_fields__", {}):
    model = model.clone(platform=platform)
  return model
