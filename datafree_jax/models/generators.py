"""Generators: DAFL's (Chen et al.), Luo et al.'s and zju-vipa's DataFree benchmark's, one Flax
module with a `style` switch.

DAFL (official code), image size s, C channels, latent d, width w (128 in the paper):
  Dense(d -> w*(s/4)^2) -> reshape -> BN -> [nearest x2 -> Conv3x3(w) -> BN(eps 0.8) -> LeakyReLU(0.2)]
  -> [nearest x2 -> Conv3x3(w/2) -> BN(eps 0.8) -> LeakyReLU(0.2)] -> Conv3x3(C) -> tanh
  -> BN(C, no scale/offset).
Luo et al. (authors' TF code, google-research data_free_distillation generators.py):
Dense -> BN(eps 1e-5) -> LeakyReLU(0.2), then num_upsample blocks with widths w, w/2, w/3, ...
(w // (i + 1): their `128 // (i + 1)`; nearest x2, Conv3x3, BN(momentum 0.9, eps 0.8),
LeakyReLU), Conv3x3(C) -> tanh -> BN(scale only, eps 0.8: their arg_scope's epsilon);
init = s / 2^num_upsample. eps=0.8 is a quirk of both originals, kept. Their dense and conv
layers before a BN have no bias; here they have one, which the BN cancels (the same function).
zju-vipa/DataFree's Generator (style "zju": DataFree's and Fast-Datafree's
datafree/models/generator.py, CMI's and Fast-DFKD's; ngf = w/2): the DAFL layout with PyTorch's
BN epsilon 1e-5 throughout, Conv3x3(C) -> sigmoid and no output BN: images are pixel values in
[0, 1], which the caller normalises (their Normalizer).
With num_classes > 0 the generator is conditional, as the authors' `conditioned_generator`: the
one-hot label is concatenated to z.

Each "nearest x2 -> Conv3x3" pair is computed by `UpsampleConv` as one 3x3 convolution at the
low resolution with 4x the output channels followed by a depth-to-space reshape: the same
function of the same parameters (nn.Conv's names and shapes), without the upsampled tensor
(faster on every backend that pays for materialising it; benchmarks/RESULTS.md).

Generators are always applied in training mode (`mutable=['batch_stats']`): their BN layers
normalise with the statistics of the generated batch, in training and when sampling.

`dtype` is the computation dtype (None by default: the dtype of inputs and parameters, float32
here; bfloat16 for mixed precision): the dense layer, convolutions and BatchNorms compute in it,
parameters and BN running statistics stay float32, and the images are returned in float32 (or
wider).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from datafree_jax.models import cpu_conv
from datafree_jax.models.layers import Conv


def upsample_nearest(x, factor: int = 2):
  """Nearest-neighbour upsampling (NHWC); UpsampleConv's reference in the tests."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
  return x.reshape(b, h * factor, w * factor, c)


# _PHASE_TAPS[a, s, p] = 1 when tap p (0..2) of a 3x3 convolution applied after nearest x2
# upsampling reads, for an output row of parity a, the low-resolution row at offset s - 1.
_PHASE_TAPS = np.zeros((2, 3, 3), np.float32)
_PHASE_TAPS[0, 0, 0] = _PHASE_TAPS[0, 1, 1] = _PHASE_TAPS[0, 1, 2] = 1
_PHASE_TAPS[1, 1, 0] = _PHASE_TAPS[1, 1, 1] = _PHASE_TAPS[1, 2, 2] = 1


# _PHASE_TAPS_2X2[a, m, p] = 1 when tap p (0..2) of that 3x3 convolution reads, for an output row
# of parity a, the low-resolution row h - 1 + a + m (m = 0, 1): rows h - 1, h, h (a = 0) or h, h,
# h + 1 (a = 1).
_PHASE_TAPS_2X2 = np.zeros((2, 2, 3), np.float32)
_PHASE_TAPS_2X2[0, 0, 0] = _PHASE_TAPS_2X2[0, 1, 1] = _PHASE_TAPS_2X2[0, 1, 2] = 1
_PHASE_TAPS_2X2[1, 0, 0] = _PHASE_TAPS_2X2[1, 0, 1] = _PHASE_TAPS_2X2[1, 1, 2] = 1


def upsample_conv_kernel_2x2(kernel):
  """(3, 3, C, D) kernel -> (2, 2, C, 4D): the 2x2 window of each parity, outputs (a, b, D)."""
  c, d = kernel.shape[2:]
  k = jnp.einsum("amp,bnq,pqcd->mncabd", _PHASE_TAPS_2X2, _PHASE_TAPS_2X2, kernel)
  return k.reshape(2, 2, c, 4 * d)


def upsample_conv_kernel(kernel):
  """(3, 3, C, D) kernel -> (3, 3, C, 4D) low-resolution kernel, outputs ordered (a, b, D)."""
  c, d = kernel.shape[2:]
  k = jnp.einsum("asp,btq,pqcd->stcabd", _PHASE_TAPS, _PHASE_TAPS, kernel)
  return k.reshape(3, 3, c, 4 * d)


class UpsampleConv(nn.Module):
  """upsample_nearest(x) followed by nn.Conv(features, (3, 3), padding=1), computed at x's size.

  out[2h + a, 2w + b] only reads x rows h - 1..h + 1 and columns w - 1..w + 1, with the
  3x3 taps summed per parity (a, b); zero padding of the upsampled image is zero padding of x.
  Parameters are nn.Conv's ('kernel' (3, 3, C, D), 'bias' (D,)), initialised the same way.
  The low-resolution kernel is formed in float32 and the convolution computed in `dtype`.

  Where cpu_conv.upsample_conv_form says '2x2' (the CPU, 4D >= 64), only the 2x2 window each
  parity reads is computed: a 2x2 convolution of x padded by 1 gives, at position (h + a, w + b),
  parity (a, b)'s output at (h, w) (4/9 of the multiply-adds).
  """
  features: int
  dtype: Any = None
  platform: Optional[str] = None   # platforms.py

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, c, self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    dtype = self.dtype if self.dtype is not None else jnp.promote_types(x.dtype, kernel.dtype)
    x = x.astype(dtype)
    if cpu_conv.upsample_conv_form(self.features, self.platform) == "2x2":
      k = upsample_conv_kernel_2x2(kernel).astype(dtype)
      y = cpu_conv.taps_conv(x, k, ((1, 1), (1, 1)))                  # (b, h + 1, w + 1, 4D)
      y = y.reshape(b, h + 1, w + 1, 2, 2, self.features)
      rows = [jnp.stack([y[:, a:a + h, p:p + w, a, p] for p in (0, 1)], axis=3) for a in (0, 1)]
      y = jnp.stack(rows, axis=2)                                      # (b, h, 2, w, 2, D)
      return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(dtype)
    k = upsample_conv_kernel(kernel).astype(dtype)
    dn = lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))
    conv = cpu_conv.conv_for(self.platform) or lax.conv_general_dilated
    y = conv(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)
    y = y.reshape(b, h, w, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias.astype(dtype)


class Generator(nn.Module):
  latent_dim: int = 100
  image_size: int = 32
  channels: int = 1
  width: int = 128
  num_upsample: int = 2
  style: str = "dafl"  # "dafl", "luo" or "zju"
  num_classes: int = 0  # > 0: conditional, __call__ takes the class labels
  dtype: Any = None  # computation dtype; parameters and the output stay float32
  platform: Optional[str] = None  # platforms.py: 'cpu' takes cpu_conv's forms; None XLA's own

  def block_widths(self) -> list:
    if self.style == "luo":
      return [max(self.width // (i + 1), 1) for i in range(self.num_upsample)]
    return [max(self.width // 2**i, 1) for i in range(self.num_upsample)]

  @nn.compact
  def __call__(self, z, labels=None, train: bool = True):
    if self.style not in ("dafl", "luo", "zju"):
      raise ValueError(f"unknown generator style {self.style!r}; use 'dafl', 'luo' or 'zju'")
    if self.num_classes:
      if labels is None:
        raise ValueError("a conditional generator (num_classes > 0) needs the class labels")
      z = jnp.concatenate([z, jax.nn.one_hot(labels, self.num_classes, dtype=z.dtype)], -1)
    init = self.image_size // 2**self.num_upsample
    if init * 2**self.num_upsample != self.image_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by 2^{self.num_upsample}")
    bn = lambda eps, name, **kw: nn.BatchNorm(  # PyTorch momentum 0.1 == flax momentum 0.9.
        use_running_average=not train, momentum=0.9, epsilon=eps, dtype=self.dtype, name=name,
        **kw)
    x = nn.Dense(self.width * init * init, dtype=self.dtype, name="fc")(z)
    x = x.reshape((z.shape[0], init, init, self.width))
    x = bn(1e-5, "bn0")(x)
    if self.style == "luo":
      x = nn.leaky_relu(x, 0.2)
    for i, width in enumerate(self.block_widths()):
      x = UpsampleConv(width, self.dtype, self.platform, name=f"conv{i + 1}")(x)
      x = nn.leaky_relu(bn(1e-5 if self.style == "zju" else 0.8, f"bn{i + 1}")(x), 0.2)
    x = Conv(self.channels, (3, 3), padding=1, dtype=self.dtype, platform=self.platform,
             name="conv_out")(x)
    if self.style == "zju":
      x = jax.nn.sigmoid(x)
      return x.astype(jnp.promote_types(x.dtype, jnp.float32))
    x = jnp.tanh(x)
    if self.style == "dafl":
      x = bn(1e-5, "bn_out", use_scale=False, use_bias=False)(x)
    else:
      x = bn(0.8, "bn_out", use_scale=True, use_bias=False)(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))
