"""Fixed-shape evaluation batches: (images, labels, mask) padded to the local batch, shared by
the in-memory (input_pipeline) and streamed (streaming) sources."""
from __future__ import annotations

import jax
from jax.experimental import multihost_utils
import numpy as np


def pad_batch(images: np.ndarray, labels: np.ndarray, local_batch: int):
  """(images, int32 labels, float32 mask) of up to local_batch examples, padded with zeros to
  local_batch (mask 0 on the padding)."""
  n = len(labels)
  mask = np.zeros((local_batch,), np.float32)
  mask[:n] = 1.0
  if n < local_batch:
    images = np.concatenate([images, np.zeros((local_batch - n,) + images.shape[1:],
                                              images.dtype)])
    labels = np.concatenate([labels, np.zeros((local_batch - n,), labels.dtype)])
  return images, np.asarray(labels).astype(np.int32), mask


def masked_batches(images: np.ndarray, labels: np.ndarray, local_batch: int):
  """(images, labels, mask) batches of local_batch host-local examples, the last one padded
  (mask 0); in a multi-process run every process yields the same number of batches (the
  largest count of any process; the extra ones all padding)."""
  n_batches = int(-(-len(labels) // local_batch))
  if jax.process_count() > 1:
    n_batches = int(np.max(multihost_utils.process_allgather(np.int32(n_batches))))
  for i in range(n_batches):
    yield pad_batch(images[i * local_batch:(i + 1) * local_batch],
                    labels[i * local_batch:(i + 1) * local_batch], local_batch)
