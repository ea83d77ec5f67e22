"""Layers shared by the classifiers and generators."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from datafree_jax.models import cpu_conv

# Name of the variable collection where RecordingBatchNorm writes the moments of its input.
BN_INPUTS = "bn_inputs"
# ... and where it writes each example's own first and second moments (streaming statistics).
BN_EXAMPLE_MOMENTS = "bn_example_moments"


class RecordingBatchNorm(nn.BatchNorm):
  """nn.BatchNorm that can record the batch moments of its input.

  When the collection "bn_inputs" is mutable in `apply`, every such layer stores the per-channel
  mean and (biased) variance of its input over all non-channel axes, at the same module path
  where "batch_stats" keeps its running mean/var. The two pytrees therefore have the same
  structure, which is what moment matching (Luo et al.) compares. The recorded moments are
  differentiable functions of the input. They are computed in float32 (or the input's dtype
  when wider) whatever the input's dtype.

  When "bn_example_moments" is mutable, it stores each example's per-channel mean of x and of
  x^2 over the spatial axes ("mean", "sq": (N, C)), from which bn_stats sums class-conditional
  moments over a stream of batches.
  """

  @nn.compact
  def __call__(self, x, use_running_average=None, **kwargs):
    if self.is_mutable_collection(BN_INPUTS):
      x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      self.put_variable(BN_INPUTS, "mean", mean)
      self.put_variable(BN_INPUTS, "var", var)
    if self.is_mutable_collection(BN_EXAMPLE_MOMENTS):
      x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
      axes = tuple(range(1, x.ndim - 1))
      self.put_variable(BN_EXAMPLE_MOMENTS, "mean", jnp.mean(x32, axis=axes))
      self.put_variable(BN_EXAMPLE_MOMENTS, "sq", jnp.mean(jnp.square(x32), axis=axes))
    return super().__call__(x, use_running_average=use_running_average, **kwargs)


def classifier_output(logits, feats, features: bool):
  """A classifier's output, (logits, feats) or logits, in float32 (or wider: float64 under
  x64) whatever dtype it computed in."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  if not features:
    return logits
  return logits, feats.astype(jnp.promote_types(feats.dtype, jnp.float32))


def Conv(*args, platform=None, **kwargs) -> nn.Conv:  # pylint: disable=invalid-name
  """nn.Conv computed in the form of `platform` (platforms.py; cpu_conv.conv_for: the CPU
  paths on 'cpu', XLA's own convolution elsewhere and for None); same parameters."""
  return nn.Conv(*args, conv_general_dilated=cpu_conv.conv_for(platform), **kwargs)
