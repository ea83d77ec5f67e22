"""Meshes and shardings. Nothing here assumes one device or one process.

Data-parallel stages use a 1-D mesh over all devices with axis 'data': the batch is split over
it and parameters are replicated. The generator ensemble uses axis 'gen' over all devices: the
stacked generators are split over it.
"""
from __future__ import annotations

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
