"""A convolution whose kernel gradient is fast on XLA:CPU.

XLA's CPU backend computes the kernel gradient of a convolution with a slow generic loop, many
times the cost of the forward pass at the generator's sizes (benchmarks/RESULTS.md). This
module keeps XLA's own forward pass and input gradient and computes the kernel gradient as
kh*kw matrix products of shifted input windows with the output gradient, which XLA:CPU runs
fast.

`conv_general_dilated` has the signature of `lax.conv_general_dilated` and is passed to
`flax.linen.Conv(conv_general_dilated=...)`, so parameters keep nn.Conv's names and shapes and
checkpoints do not depend on the choice. It is used only on the CPU backend (see
`conv_for_backend`); anything it does not cover (dilation, groups, other layouts) goes to lax.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Convolutions with in_channels * out_channels below this use lax's kernel gradient.
MIN_CHANNEL_PRODUCT = 256

_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def _lax_conv(x, k, strides, padding):
  return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=("NHWC", "HWIO",
                                                                             "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x, k, strides, padding):
  """2-D convolution, NHWC input, HWIO kernel, explicit ((lo, hi), (lo, hi)) padding."""
  return _lax_conv(x, k, strides, padding)


def _fwd(x, k, strides, padding):
  return _lax_conv(x, k, strides, padding), (x, k)


def _bwd(strides, padding, res, g):
  x, k = res
  _, vjp_x = jax.vjp(lambda x_: _lax_conv(x_, k, strides, padding), x)
  (dx,) = vjp_x(g)
  kh, kw = k.shape[:2]
  sh, sw = strides
  ho, wo = g.shape[1:3]
  xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
  rows = []
  for i in range(kh):
    cols = []
    for j in range(kw):
      window = xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
      cols.append(jnp.einsum("bhwc,bhwd->cd", window, g))
    rows.append(jnp.stack(cols))
  return dx, jnp.stack(rows).astype(k.dtype)


conv_nhwc.defvjp(_fwd, _bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """lax.conv_general_dilated, with the fast kernel gradient for plain 2-D NHWC convolutions."""
  plain = (lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and (dimension_numbers is None or dimension_numbers == _NHWC))
  # Few channels (LeNet's first layers): XLA's own kernel gradient is as fast there, and the
  # whole LeNet train step faster with it.
  plain = plain and rhs.shape[-2] * rhs.shape[-1] >= MIN_CHANNEL_PRODUCT
  if plain and isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  padding = tuple(tuple(int(v) for v in p) for p in padding)
  return conv_nhwc(lhs, rhs, tuple(int(s) for s in window_strides), padding)


def conv_for_backend():
  """The conv_general_dilated to hand nn.Conv: ours on CPU, XLA's own elsewhere (None)."""
  return conv_general_dilated if jax.default_backend() == "cpu" else None
