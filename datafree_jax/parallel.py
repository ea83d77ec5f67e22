"""Meshes and shardings. Nothing here assumes one device or one process.

Data-parallel stages use a 1-D mesh over all devices with axis 'data': the batch is split over
it and parameters are replicated. The generator ensemble uses axis 'gen' over all devices: the
stacked generators are split over it.
"""
from __future__ import annotations

import collections
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from datafree_jax.errors import ConfigError


def make_mesh(axis_name: str) -> Mesh:
  """A 1-D mesh over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (axis_name,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def split_leading(mesh: Mesh) -> NamedSharding:
  """Splits the leading axis of an array over the mesh's (single) axis."""
  return NamedSharding(mesh, P(mesh.axis_names[0]))


def put_replicated(tree, mesh: Mesh):
  return jax.device_put(tree, replicated(mesh))


def replicate_host(tree, mesh: Mesh):
  """A tree of values that every process holds alike (numpy, or jax arrays on this process's
  devices) as arrays replicated over every device of the mesh."""
  return jax.tree.map(lambda x: jax.device_put(np.asarray(jax.device_get(x)), replicated(mesh)),
                      tree)


def global_batch(local_arrays, mesh: Mesh):
  """Host-local numpy batch -> global jax arrays split over the mesh (per-process data loading)."""
  sharding = split_leading(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_arrays)


DEVICE_PREFETCH = 2  # steps PrefetchedBatches places ahead of the one asked for


class PrefetchedBatches:
  """Global batches by step, placed on the mesh ahead of time: `placed(step)`.

  `placed(step)` is global_batch(batches(step), mesh). Asked for step s, it returns the batch
  of s (placed earlier when s followed the previous step) and, before returning, has asked
  `batches` for s + 1 ... s + size and started placing them (device_put is asynchronous: the
  copies run while the caller's step does). A step that does not follow the previous one (a
  resumed run, a rewind) drops what was placed and starts again at it. `batches` must be a
  pure function of the step (every stage's is), so the batches are those of
  global_batch(batches(step), mesh) whatever the size. close() drops what is placed and
  closes `batches` when it has a close().
  """

  def __init__(self, batches: Callable[[int], Any], mesh: Mesh, size: int = DEVICE_PREFETCH):
    if size < 0:
      raise ValueError(f"device prefetch size must be >= 0, got {size}")
    self.batches, self.mesh, self.size = batches, mesh, int(size)
    self._placed: collections.deque = collections.deque()  # (step, placed batch), in order

  def __call__(self, step: int):
    step = int(step)
    if self._placed and self._placed[0][0] != step:
      self._placed.clear()
    if not self._placed:
      self._placed.append((step, global_batch(self.batches(step), self.mesh)))
    _, batch = self._placed.popleft()
    ahead = self._placed[-1][0] if self._placed else step
    while len(self._placed) < self.size:
      ahead += 1
      self._placed.append((ahead, global_batch(self.batches(ahead), self.mesh)))
    return batch

  def close(self):
    self._placed.clear()
    close = getattr(self.batches, "close", None)
    if close is not None:
      close()


def is_main_process() -> bool:
  return jax.process_index() == 0


def check_global_batch(global_batch: int) -> int:
  """Raises ConfigError unless the global batch splits evenly over the data-parallel devices;
  returns this process's share of it."""
  n = jax.device_count()
  if global_batch % n:
    raise ConfigError(
        f"global batch size {global_batch} is not divisible by the {n} data-parallel devices")
  return global_batch // jax.process_count()
