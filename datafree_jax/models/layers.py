"""Layers shared by the classifiers and generators."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

# Name of the variable collection where RecordingBatchNorm writes the moments of its input.
BN_INPUTS = "bn_inputs"


class RecordingBatchNorm(nn.BatchNorm):
  """nn.BatchNorm that can record the batch moments of its input.

  When the collection "bn_inputs" is mutable in `apply`, every such layer stores the per-channel
  mean and (biased) variance of its input over all non-channel axes, at the same module path
  where "batch_stats" keeps its running mean/var. The two pytrees therefore have the same
  structure, which is what moment matching (Luo et al.) compares. The recorded moments are
  differentiable functions of the input.
  """

  @nn.compact
  def __call__(self, x, use_running_average=None, **kwargs):
    if self.is_mutable_collection(BN_INPUTS):
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x, axis=axes)
      var = jnp.mean(jnp.square(x - mean), axis=axes)
      self.put_variable(BN_INPUTS, "mean", mean)
      self.put_variable(BN_INPUTS, "var", var)
    return super().__call__(x, use_running_average=use_running_average, **kwargs)


def Conv(*args, **kwargs) -> nn.Conv:  # pylint: disable=invalid-name
  """nn.Conv with the backend's fastest kernel gradient (see cpu_conv); same parameters."""
  from datafree_jax.models import cpu_conv  # pylint: disable=g-import-not-at-top
  return nn.Conv(*args, conv_general_dilated=cpu_conv.conv_for_backend(), **kwargs)
