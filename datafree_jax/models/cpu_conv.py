"""Convolution and max-pooling paths for the CPU backend: the models' per-backend choices.

The models take the run's target platform as a field (`platform`, platforms.py) and hand it
here; nothing reads the backend while tracing. On 'gpu' and 'tpu', and for None (export's
portable programs), the models use XLA's own convolution and flax's max_pool (`conv_for`
returns None, `max_pool` calls nn.max_pool). On XLA:CPU ('cpu') some shapes are far slower
than their arithmetic, and `conv_general_dilated` (the signature of `lax.conv_general_dilated`,
handed to `flax.linen.Conv(conv_general_dilated=...)`, so parameters keep nn.Conv's names and
shapes) picks a path per shape at trace time (`cpu_path` says which; measured in
benchmarks/RESULTS.md, "The CPU convolution paths"):

- 'dense': a window that covers the whole (padded) input, output 1x1 (LeNet-5's conv3): one
  matrix product of the flattened input.
- 'space_to_depth': stride 1, few input channels (<= SPACE_TO_DEPTH_MAX_IN) and 2..32 outputs
  (LeNet's conv1 and conv2). The image is cut into f x f blocks stacked along the channels
  (f = 4 for one input channel, else 2) and one convolution runs on the block grid with a kernel
  assembled from the original taps (zeros where a tap falls outside), outputs back by
  depth-to-space: the same function of the same parameters, with f^2 times the channels. XLA:CPU
  is slow on convolutions with one or few channels, the input gradient of a one-channel
  convolution most of all.
- 'matmul_kernel_grad': wide stride-1 convolutions (>= 64 inputs, outputs >= 2x inputs, kernel
  larger than 1x1): XLA's forward pass and input gradient, and the kernel gradient as kh*kw matrix
  products of shifted input windows with the output gradient. The generators' upsampling blocks
  took it at width 128 before their 2x2 form below; custom models with such layers still do
  (XLA:CPU's own kernel gradient is slower there).
- 'xla': everything else (dilation, groups, other layouts included).

`upsample_conv_form`: the generators' "nearest x2, then 3x3 convolution" blocks
(generators.UpsampleConv) compute, on CPU and from 64 low-resolution outputs, only the 2x2
windows each output parity reads, as one matrix product per tap (`taps_conv`).

`max_pool`: windows that tile the input exactly (LeNet's 2x2 / stride 2) are a reshape and a max
on CPU, with a gradient to each tile's first maximum (flax's too, ties included); XLA:CPU lowers
reduce_window's gradient to iota + select-and-scatter, several times the cost. (JAX's own
gradient of a max divides by the count of entries equal to it, a NaN wherever XLA recomputes
the entries with other rounding than the max.)
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from datafree_jax import platforms

# 'space_to_depth' for stride-1 convolutions with at most this many input channels and
# SPACE_TO_DEPTH_OUT[0]..SPACE_TO_DEPTH_OUT[1] outputs.
SPACE_TO_DEPTH_MAX_IN = 8
SPACE_TO_DEPTH_OUT = (2, 32)
# 'matmul_kernel_grad' from this many input channels, for outputs >= 2x the inputs.
MATMUL_KERNEL_GRAD_MIN_IN = 64
CPU_PATHS = ("dense", "space_to_depth", "matmul_kernel_grad", "xla")
# generators.UpsampleConv's 2x2 form on CPU from this many low-resolution outputs (4 x features).
UPSAMPLE_TAPS_MIN_OUT = 64


# The name scope of every CPU path: it names the path in a program's debug locations (a program
# lowered for an accelerator must carry none: tests/test_accelerator_program.py).
SCOPE = "cpu_path"


_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def _lax_conv(x, k, strides, padding):
  return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=("NHWC", "HWIO",
                                                                             "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x, k, strides, padding):
  """2-D convolution, NHWC input, HWIO kernel, explicit ((lo, hi), (lo, hi)) padding; kernel
  gradient as matrix products."""
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


@functools.lru_cache(maxsize=None)
def _block_taps(k: int, f: int) -> np.ndarray:
  """T[m, s, a, i] = 1 where i = f*m + s - a: output phase a of a block reads input phase s of
  the block m further on through tap i of a k-tap kernel."""
  count = (f - 1 + k - 1) // f + 1
  t = np.zeros((count, f, f, k), np.float32)
  for m in range(count):
    for s in range(f):
      for a in range(f):
        if 0 <= f * m + s - a < k:
          t[m, s, a, f * m + s - a] = 1
  return t


@functools.lru_cache(maxsize=None)
def _block_placement(kh: int, kw: int, f: int) -> np.ndarray:
  """P[(m, n, s, t, a, b), (i, j)] = 1 where block tap (m, n) reads tap (i, j) of the kernel
  for input phase (s, t) and output phase (a, b)."""
  th, tw = _block_taps(kh, f), _block_taps(kw, f)
  p = np.einsum("msai,ntbj->mnstabij", th, tw)
  return p.reshape(-1, kh * kw)


def _block_kernel(k, f: int):
  """The (mh, mw, f*f*C, f*f*D) block kernel of a (kh, kw, C, D) kernel: the 0/1 placement
  matrix times the kernel's taps."""
  kh, kw, c, d = k.shape
  mh, mw = _block_taps(kh, f).shape[0], _block_taps(kw, f).shape[0]
  kb = jnp.dot(jnp.asarray(_block_placement(kh, kw, f), k.dtype), k.reshape(kh * kw, c * d))
  kb = kb.reshape(mh * mw * f * f, f * f, c, d).transpose(0, 2, 1, 3)    # (m n s t), c, (a b), d
  return kb.reshape(mh, mw, f * f * c, f * f * d)


def space_to_depth_conv(x, k, padding, f: int):
  """Stride-1 convolution (NHWC, HWIO, explicit padding) computed on f x f blocks."""
  kh, kw, c, d = k.shape
  b, h, w, _ = x.shape
  ho = h + padding[0][0] + padding[0][1] - kh + 1
  wo = w + padding[1][0] + padding[1][1] - kw + 1
  th, tw = _block_taps(kh, f), _block_taps(kw, f)
  ph, pw = -(-ho // f), -(-wo // f)                       # output blocks
  qh, qw = ph + th.shape[0] - 1, pw + tw.shape[0] - 1     # input blocks they read
  xp = jnp.pad(x, ((0, 0), (padding[0][0], f * qh - h - padding[0][0]),
                   (padding[1][0], f * qw - w - padding[1][0]), (0, 0)))
  xs = xp.reshape(b, qh, f, qw, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, qh, qw, f * f * c)
  kb = _block_kernel(k, f)
  y = lax.conv_general_dilated(xs, kb, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO",
                                                                           "NHWC"))
  y = y.reshape(b, ph, pw, f, f, d).transpose(0, 1, 3, 2, 4, 5).reshape(b, f * ph, f * pw, d)
  return y[:, :ho, :wo, :]


def cpu_path(x_shape, k_shape, strides, padding) -> str:
  """The CPU path of a plain 2-D NHWC convolution (explicit padding): 'dense',
  'space_to_depth', 'matmul_kernel_grad' or 'xla' (see the module docstring)."""
  kh, kw, c, d = k_shape
  hp = x_shape[1] + padding[0][0] + padding[0][1]
  wp = x_shape[2] + padding[1][0] + padding[1][1]
  if (hp, wp) == (kh, kw):
    return "dense"
  stride1 = tuple(strides) == (1, 1)
  if (stride1 and c <= SPACE_TO_DEPTH_MAX_IN and SPACE_TO_DEPTH_OUT[0] <= d
      <= SPACE_TO_DEPTH_OUT[1] and kh * kw > 1 and min(hp, wp) >= 8):
    return "space_to_depth"
  if stride1 and c >= MATMUL_KERNEL_GRAD_MIN_IN and d >= 2 * c and kh * kw > 1:
    return "matmul_kernel_grad"
  return "xla"


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """lax.conv_general_dilated, through the CPU path of `cpu_path` for plain 2-D NHWC
  convolutions."""
  plain = (lhs.ndim == 4 and feature_group_count == 1 and batch_group_count == 1
           and all(d == 1 for d in (lhs_dilation or (1, 1)))
           and all(d == 1 for d in (rhs_dilation or (1, 1)))
           and dimension_numbers == _NHWC
           and preferred_element_type is None)
  if plain and isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
  path = "xla"
  if plain:
    padding = tuple(tuple(int(v) for v in p) for p in padding)
    strides = tuple(int(s) for s in window_strides)
    path = cpu_path(lhs.shape, rhs.shape, strides, padding)
  if path == "dense":
    with jax.named_scope(f"{SCOPE}.dense"):
      xp = jnp.pad(lhs, ((0, 0), padding[0], padding[1], (0, 0)))
      y = jnp.dot(xp.reshape(xp.shape[0], -1), rhs.reshape(-1, rhs.shape[-1]),
                  precision=precision)
      return y[:, None, None, :]
  if path == "space_to_depth":
    with jax.named_scope(f"{SCOPE}.space_to_depth"):
      return space_to_depth_conv(lhs, rhs, padding, 4 if rhs.shape[2] == 1 else 2)
  if path == "matmul_kernel_grad":
    with jax.named_scope(f"{SCOPE}.matmul_kernel_grad"):
      return conv_nhwc(lhs, rhs, strides, padding)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


def taps_conv(x, k, padding):
  """Stride-1 convolution (NHWC, HWIO, explicit padding) as one matrix product per kernel tap
  of the shifted input window, summed."""
  with jax.named_scope(f"{SCOPE}.taps"):
    kh, kw = k.shape[:2]
    xp = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
    return sum(jnp.einsum("bhwc,cd->bhwd", xp[:, i:i + ho, j:j + wo], k[i, j])
               for i in range(kh) for j in range(kw))


def upsample_conv_form(features: int, platform) -> str:
  """How generators.UpsampleConv computes: '3x3' (one 3x3 convolution of the phase kernels,
  every backend's default) or '2x2' (2x2 phase kernels, 4/9 of the multiply-adds, as taps_conv:
  XLA:CPU's gradients of even-sized kernels are slow), on CPU from UPSAMPLE_TAPS_MIN_OUT
  low-resolution outputs."""
  if platforms.is_cpu(platform) and 4 * features >= UPSAMPLE_TAPS_MIN_OUT:
    return "2x2"
  return "3x3"


def conv_for(platform):
  """The conv_general_dilated to hand nn.Conv on `platform` (platforms.py): ours on 'cpu',
  XLA's own elsewhere (None)."""
  return conv_general_dilated if platforms.is_cpu(platform) else None


def _window_last(x, wh: int, ww: int):
  """(B, H, W, C) -> (B, H/wh, W/ww, C, wh*ww): each tile's values last."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h // wh, w // ww, c, wh * ww)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def tile_max_pool(x, wh: int, ww: int):
  """Max over the wh x ww tiles of x (H, W multiples of them). Its gradient goes to the first
  maximum of each tile (row-major), as XLA's select-and-scatter (flax's max_pool) does."""
  b, h, w, c = x.shape
  return jnp.max(x.reshape(b, h // wh, wh, w // ww, ww, c), axis=(2, 4))


def _tile_fwd(x, wh, ww):
  return tile_max_pool(x, wh, ww), x


def _tile_bwd(wh, ww, x, g):
  b, h, w, c = x.shape
  first = jnp.argmax(_window_last(x, wh, ww), axis=-1)
  dx = jnp.where(first[..., None] == jnp.arange(wh * ww), g[..., None], jnp.zeros((), g.dtype))
  dx = dx.reshape(b, h // wh, w // ww, c, wh, ww).transpose(0, 1, 4, 2, 5, 3)
  return (dx.reshape(b, h, w, c),)


tile_max_pool.defvjp(_tile_fwd, _tile_bwd)


def max_pool(x, window, strides, padding="VALID", platform=None):
  """nn.max_pool; on 'cpu', windows that tile the input exactly are `tile_max_pool`."""
  _, h, w, _ = x.shape
  window, strides = tuple(window), tuple(strides)
  if (platforms.is_cpu(platform) and window == strides and padding == "VALID"
      and h % window[0] == 0 and w % window[1] == 0):
    with jax.named_scope(f"{SCOPE}.tile_max_pool"):
      return tile_max_pool(x, *window)
  return nn.max_pool(x, window, strides=strides, padding=padding)
