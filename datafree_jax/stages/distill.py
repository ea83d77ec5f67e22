"""Distillation stages: the student learns KL(teacher || student) on images from a source.

Sources: 'data' (the real training images: KD with data, the upper-bound baseline), 'noise'
(N(0, 1) images: the lower-bound baseline) and, in stages/ensemble.py, 'generators' (frozen
generators loaded from a checkpoint, Luo et al.'s second stage). Checkpoints go to
<workdir>/distill_<source>/. The distillation itself is students.Distill.
"""
from __future__ import annotations

import jax

from datafree_jax import input_pipeline
from datafree_jax import parallel
from datafree_jax import paths
from datafree_jax import stage as stage_lib
from datafree_jax import students


def directory(workdir: str, source: str) -> str:
  return paths.join(workdir, f"distill_{source}")


def data_images(key, n, batch, source):  # pylint: disable=unused-argument
  """The real training batch (images, labels) of the step."""
  return batch[0]


def normalized_data_images(info):
  """data_images of a dataset whose training batches may be uint8 (streamed): the images
  normalised on the device (input_pipeline.normalize_images)."""
  def images_fn(key, n, batch, source):  # pylint: disable=unused-argument
    return input_pipeline.normalize_images(batch[0], info)
  return images_fn


def noise_images(image_shape):
  def images_fn(key, n, batch, source):  # pylint: disable=unused-argument
    return jax.random.normal(key, (n,) + tuple(image_shape))
  return images_fn


class RealOrNoise(students.Distill):
  """Distillation from the real training images ('data') or from N(0, 1) noise ('noise')."""

  def prepare(self, ctx, finished):
    if self.source == "data" and not finished:
      _ = ctx.data["train"]

  def source_images(self, ctx, mesh):
    """(images_fn(key, n, batch, source), batches(step) -> the step's batch or None, the
    source's placed arrays or None, extra meta)."""
    if self.source == "data":
      batches = ctx.data["train"].train_batches(
          parallel.check_global_batch(ctx.config.student.batch_size), ctx.config.seed + 1)
      return (normalized_data_images(ctx.info), parallel.PrefetchedBatches(batches, mesh), None,
              {})
    return noise_images(ctx.info.image_shape), None, None, {}

  def abstract_source(self, ctx, mesh):
    """source_images' (images_fn, abstract batch or None, abstract source or None) for the dry
    run: nothing read or loaded."""
    if self.source == "data":
      batch = stage_lib.abstract_batch(ctx.config.student.batch_size, ctx.info.image_shape,
                                       parallel.split_leading(mesh),
                                       input_pipeline.train_image_dtype(ctx.info))
      return normalized_data_images(ctx.info), batch, None
    return noise_images(ctx.info.image_shape), None, None



DATA = RealOrNoise("data")
NOISE = RealOrNoise("noise")


