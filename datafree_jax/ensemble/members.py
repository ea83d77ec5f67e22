"""The members of a generator ensemble as one stack: parameters, BN state and optimiser state of
every generator on a leading member axis, split over the devices; functions mapped over the
members in either lowering ('vmap': vectorised; 'loop': traced member by member), in chunks that
bound memory (chunking, member_layout)."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from datafree_jax import platforms

MAX_UNROLLED = 32       # members traced one by one in one chunk of the 'loop' lowering


def resolve_lowering(lowering: str, platform: str) -> str:
  """'auto' -> 'loop' on platform 'cpu', 'vmap' on the accelerators (platforms.py)."""
  if lowering == "auto":
    return "loop" if platforms.is_cpu(platform) else "vmap"
  return lowering


def chunking(n: int, at_once: int) -> tuple[int, int]:
  """(chunks, members per chunk) for n members at most `at_once` at a time (0 = all at once):
  the fewest chunks, then the smallest equal chunks that cover n, so that chunks x size - n
  (padding) is less than the number of chunks, whatever n's divisors (n prime included)."""
  if at_once <= 0 or at_once >= n:
    return 1, max(n, 1)
  chunks = -(-n // at_once)
  return chunks, -(-n // chunks)


def member_layout(g: int, devices: int, at_once: int) -> tuple[int, int, int]:
  """(padded members, members per device, members per chunk) of G generators on `devices`
  devices updated at most `at_once` per device at a time: each device's share is padded to
  whole chunks (chunking), the ensemble to a multiple of the devices."""
  per_device = -(-g // devices)
  chunks, size = chunking(per_device, at_once)
  return devices * chunks * size, chunks * size, size


def _per_chunk(fn: Callable, lowering: str, shared):
  if lowering == "vmap":
    return jax.vmap(lambda xs: fn(*xs, *shared))
  return functools.partial(_each_member, fn, shared)


def map_members(fn: Callable, stacked: tuple, lowering: str, at_once: int = 0, shared=()):
  """fn(*member_k, *shared) for every member k of the pytrees `stacked` (leading member axis),
  inside a jitted function; the results stacked (new arrays: for images and predictions;
  `update_members` updates a member stack in place).

  'vmap' vectorises over members; 'loop' traces `fn` once per member. With `at_once` > 0 the
  members are processed in sequential chunks (chunking(n, at_once); lax.map over chunks; a
  last, partial chunk is filled with repeats of the first members, whose results are dropped),
  bounding the memory of one call. 'loop' unrolls at most MAX_UNROLLED members per chunk (the
  size of the traced program).
  """
  n = jax.tree.leaves(stacked)[0].shape[0]
  if lowering != "vmap" and (at_once <= 0 or at_once > MAX_UNROLLED):
    at_once = MAX_UNROLLED
  chunks, c = chunking(n, at_once)
  per_chunk = _per_chunk(fn, lowering, shared)
  if chunks == 1:
    return per_chunk(stacked)
  if chunks * c != n:
    fill = np.arange(chunks * c) % n
    stacked = jax.tree.map(lambda x: x[fill], stacked)
  parts = jax.tree.map(lambda x: x.reshape((chunks, c) + x.shape[1:]), stacked)
  out = jax.lax.map(per_chunk, parts)
  return jax.tree.map(lambda y: y.reshape((chunks * c,) + y.shape[2:])[:n], out)


def update_members(fn: Callable, members, consts, at_once: int = 0, shared=()):
  """(new members, per-member metrics) of fn(member_k, consts_k, *shared) -> (new member_k,
  metrics_k) for every member of the stack `members`, vmapped, inside a jitted function.

  With `at_once` > 0 the members are updated in chunks of at_once (n must be a multiple:
  member_layout pads the ensemble so): a fori_loop whose carry is the member stack itself, each
  chunk read with dynamic_slice and written back with dynamic_update_slice, so that XLA updates
  the (donated) stack in place instead of building a second one beside it (lax.map over chunks
  would). Without chunking, one vmap over all members.
  """
  n = jax.tree.leaves(members)[0].shape[0]
  per_chunk = _per_chunk(fn, "vmap", shared)
  if at_once <= 0 or at_once >= n:
    return per_chunk((members, consts))
  if n % at_once:
    raise ValueError(f"{n} members do not split into chunks of {at_once} (member_layout pads "
                     "the ensemble to whole chunks)")
  take = lambda tree, start: jax.tree.map(
      lambda x: jax.lax.dynamic_slice_in_dim(x, start, at_once), tree)
  put = lambda tree, part, start: jax.tree.map(
      lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y.astype(x.dtype), start, 0),
      tree, part)
  first = jax.eval_shape(per_chunk, (take(members, 0), take(consts, 0)))[1]
  # A zero computed from the members, so that under a shard_map the metrics buffer varies over
  # the mesh axis as the members do (the loop carry's type must not change).
  zero = jnp.zeros((), jnp.float32) * jax.tree.leaves(members)[0].reshape(-1)[0]
  metrics = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape[1:], s.dtype)
                         + zero.astype(s.dtype), first)

  def body(i, carry):
    members, metrics = carry
    start = i * at_once
    new, met = per_chunk((take(members, start), take(consts, start)))
    return put(members, new, start), put(metrics, met, start)
  return jax.lax.fori_loop(0, n // at_once, body, (members, metrics))


def _each_member(fn, shared, stacked):
  n = jax.tree.leaves(stacked)[0].shape[0]
  outs = [fn(*jax.tree.map(lambda x, i=i: x[i], stacked), *shared) for i in range(n)]
  return jax.tree.map(lambda *ys: jnp.stack(ys), *outs)
