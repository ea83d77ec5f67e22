"""Generator parts the stages share: building and initialising a generator, generating
images, the frozen teacher's forward pass."""
from __future__ import annotations

import math

import jax.numpy as jnp

from datafree_jax import config_lib
from datafree_jax import models
from datafree_jax.models import BN_INPUTS

SAMPLE_SEED = 1234  # the fixed latents of sample grids and of the generators' evaluation


def generate(gen, params, batch_stats, z, labels=None):
  """Images of a generator on latents `z` (and class `labels`, for a conditional generator), its
  BN in training mode: (images, new batch_stats)."""
  images, upd = gen.apply({"params": params, "batch_stats": batch_stats}, z, labels, train=True,
                          mutable=["batch_stats"])
  return images, upd["batch_stats"]


def teacher_forward(model, variables, x, *, moments: bool = False):
  """Frozen teacher in evaluation mode: (logits, features, bn input moments or None)."""
  if moments:
    (logits, feats), upd = model.apply(variables, x, train=False, features=True,
                                       mutable=[BN_INPUTS])
    return logits, feats, upd.get(BN_INPUTS, {})
  logits, feats = model.apply(variables, x, train=False, features=True)
  return logits, feats, None


def make_generator(gcfg, info, style=None, dtype=None, platform=None) -> models.Generator:
  """The generator of config section `gcfg` (style: gcfg.style unless given), computing in
  `dtype`, in the form of `platform` (platforms.py)."""
  return models.Generator(latent_dim=gcfg.latent_dim, image_size=info.image_size,
                          channels=info.channels, width=gcfg.width,
                          num_upsample=gcfg.num_upsample, style=style or gcfg.style,
                          dtype=dtype, platform=platform)


def check_generator_fits(config, info):
  """Raises ConfigError unless config.generator's upsampling reaches the dataset's image size."""
  ups = config.generator.num_upsample
  if info.image_size % 2**ups:
    largest = int(math.log2(info.image_size & -info.image_size))
    raise config_lib.ConfigError(
        f"generator.num_upsample={ups} does not fit the {info.image_size}x{info.image_size} "
        f"images of dataset {info.name!r}: the image size must be a multiple of 2^{ups} "
        f"(use num_upsample <= {largest})")


def init_generator(gen: models.Generator, key):
  labels = jnp.zeros((2,), jnp.int32) if gen.num_classes else None
  v = gen.init(key, jnp.zeros((2, gen.latent_dim), jnp.float32), labels)
  return v["params"], v["batch_stats"]
