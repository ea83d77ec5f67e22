"""Generators: DAFL's (Chen et al.) and Luo et al.'s, one Flax module with a `style` switch.

DAFL (official code), image size s, C channels, latent d, width w (128 in the paper):
  Dense(d -> w*(s/4)^2) -> reshape -> BN -> [nearest x2 -> Conv3x3(w) -> BN(eps 0.8) -> LeakyReLU(0.2)]
  -> [nearest x2 -> Conv3x3(w/2) -> BN(eps 0.8) -> LeakyReLU(0.2)] -> Conv3x3(C) -> tanh
  -> BN(C, no scale/offset).
Luo et al. (authors' TF code): Dense -> BN -> LeakyReLU, then num_upsample blocks with widths
w, w/2, ... (nearest x2, Conv3x3, BN(momentum 0.9, eps 0.8), LeakyReLU), Conv3x3(C) -> tanh ->
BN(scale only); init = s / 2^num_upsample. eps=0.8 is a quirk of both originals, kept.

Generators are always applied in training mode (`mutable=['batch_stats']`): their BN layers
normalise with the statistics of the generated batch, in training and when sampling.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from datafree_jax.models.layers import Conv


def upsample_nearest(x, factor: int = 2):
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, factor, w, factor, c))
  return x.reshape(b, h * factor, w * factor, c)


class Generator(nn.Module):
  latent_dim: int = 100
  image_size: int = 32
  channels: int = 1
  width: int = 128
  num_upsample: int = 2
  style: str = "dafl"  # "dafl" or "luo"

  @nn.compact
  def __call__(self, z, train: bool = True):
    if self.style not in ("dafl", "luo"):
      raise ValueError(f"unknown generator style {self.style!r}; use 'dafl' or 'luo'")
    init = self.image_size // 2**self.num_upsample
    if init * 2**self.num_upsample != self.image_size:
      raise ValueError(f"image_size {self.image_size} is not divisible by 2^{self.num_upsample}")
    bn = lambda eps, name, **kw: nn.BatchNorm(  # PyTorch momentum 0.1 == flax momentum 0.9.
        use_running_average=not train, momentum=0.9, epsilon=eps, name=name, **kw)
    x = nn.Dense(self.width * init * init, name="fc")(z)
    x = x.reshape((z.shape[0], init, init, self.width))
    x = bn(1e-5, "bn0")(x)
    if self.style == "luo":
      x = nn.leaky_relu(x, 0.2)
    for i in range(self.num_upsample):
      x = upsample_nearest(x)
      x = Conv(max(self.width // 2**i, 1), (3, 3), padding=1, name=f"conv{i + 1}")(x)
      x = nn.leaky_relu(bn(0.8, f"bn{i + 1}")(x), 0.2)
    x = Conv(self.channels, (3, 3), padding=1, name="conv_out")(x)
    x = jnp.tanh(x)
    if self.style == "dafl":
      return bn(1e-5, "bn_out", use_scale=False, use_bias=False)(x)
    return bn(1e-5, "bn_out", use_scale=True, use_bias=False)(x)
