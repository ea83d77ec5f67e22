"""Luo et al. (2020): a per-class generator ensemble, then distillation from the frozen ensemble.

Stage 'generators' (checkpoints in <workdir>/generators/): G generators, generator k trained
towards class k against the frozen teacher T only (no data):
  L_k = inceptionism_loss(T(G_k(z)), k, G_k(z), w_tv, w_l2)
        + w_mm * bn_moment_matching(moments of T's BN inputs on G_k(z), class-k BN statistics)
(config.ensemble.loss='dafl' uses DAFL's generator terms instead of the inceptionism loss; w_mm
still adds moment matching when > 0). G = config.ensemble.num_generators, 0 meaning one per
class; generator k targets class k mod num_classes (G < num_classes leaves classes out: for
tests and debugging). G = 1 is the ablation "one generator instead of ten": a single generator
for all classes. By default (single_target='conditional') it is conditioned on the class, as in
the authors' code (one-hot label concatenated to z): each step draws one class c for the whole
batch, and the loss is CE towards c + moment matching against class c's BN statistics. The
unconditional variants give each sample a random target class ('random') or the teacher's
argmax ('argmax') and match the global BN statistics.

The update of one generator is `member_update`, a pure function of that member's arrays. The
params, BN state and optimiser state of all generators are stacked on a leading "member" axis,
sharded over the mesh axis 'gen', and `make_step` maps member_update over them in one of two
lowerings (config.ensemble.lowering; 'auto' = 'loop' on the CPU backend, 'vmap' elsewhere):
  'vmap'  one jitted step: a shard_map over 'gen' gives each device its members, which are
          vmapped (with max_generators_per_device_at_once > 0: in sequential chunks of that
          many, lax.map over chunks, to bound memory). The teacher's kernels are shared, so the
          teacher half folds the member axis into its batch.
  'loop'  a Python loop calls one jitted member_update per member, on the device that holds
          it. XLA:CPU runs vmapped per-member convolutions as grouped convolutions, many times
          slower than separate ones; separate calls also compile once for all members
          (benchmarks/ensemble_step_speed.py).
Member k's randomness is the stage key with the step and k folded in, so results do not
depend on the lowering, the device count or the chunking.

Padding: when G is not a multiple of the device count, the ensemble is padded with extra members
(member k, k >= G, trains towards class k mod num_classes). They cost compute and are left out of
the metrics and the sample grids; the 'generators' item of the final checkpoint holds every
member as it is split over the devices (nothing is gathered), the real G first, and the real G
is stored in the checkpoint's meta. A run resumes only on a device count that gives the same
padding; the distillation stage loads the generators on any device count.

Stage 'distill_generators' (Luo et al.'s second stage; config.stage 'distill'): the student
learns KL(T || S) on images of the frozen generators, drawn inside the jitted step: each draw is
one generator's batch of batch_per_generator images (the BN batch it was trained with; BN in
training mode, its updated statistics discarded), the generators taken in a random order that
draws each equally often (make_images_fn).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from datafree_jax import bn_stats as bn_stats_lib
from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import generator_parts
from datafree_jax import log
from datafree_jax import losses
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax import paths
from datafree_jax import platforms
from datafree_jax import stage as stage_lib
from datafree_jax import students

STAGE_SALT = 4          # rng of the generator steps
INIT_SALT = 40          # rng of the generators' initialisation
SAMPLES_PER_ROW = 10    # samples per generator in the grids (visualize's 10 columns)
GRID_GENERATORS = 20    # generators shown in the sample grids
MAX_UNROLLED = 32       # members traced one by one in one chunk of the 'loop' lowering
ALL_CLASSES = -1        # class id of a generator trained on all classes (G = 1)


def directory(workdir: str) -> str:
  return paths.join(workdir, "generators")


def checkpoint_to_distill(config, workdir: str) -> str:
  """Where stage 'distill' loads the generators: config.generator_checkpoint, else the workdir's."""
  return config.get("generator_checkpoint", "") or directory(workdir)


def resolve_lowering(lowering: str, platform: str) -> str:
  """'auto' -> 'loop' on platform 'cpu', 'vmap' on the accelerators (platforms.py)."""
  if lowering == "auto":
    return "loop" if platforms.is_cpu(platform) else "vmap"
  return lowering


def num_generators(config, num_classes: int) -> int:
  """The real ensemble size G (ensemble.num_generators; 0 = one generator per class)."""
  return int(config.ensemble.num_generators) or num_classes


def member_class_ids(g: int, padded: int, num_classes: int) -> np.ndarray:
  """(padded,) int32: class of each member, ALL_CLASSES for a single all-class generator."""
  ids = np.arange(padded, dtype=np.int32) % num_classes
  if g == 1:
    ids[0] = ALL_CLASSES
  return ids


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


def member_key(seed: int, step, index):
  """The rng of member `index` at `step`: independent of lowering, sharding and chunking."""
  return jax.random.fold_in(common.step_key(seed, STAGE_SALT, step), index)


@dataclasses.dataclass(frozen=True)
class MemberSpec:
  """What one generator's update needs besides its arrays: modules, optimiser, loss settings."""
  gen: models.Generator
  teacher: Any                 # the teacher's flax module (its variables are an argument)
  tx: Any                      # optax.GradientTransformation
  num_classes: int
  seed: int
  batch: int                   # images per generator and step
  loss: str = "luo"            # 'luo' | 'dafl'
  single_target: str = "random"
  w_tv: float = 0.0
  w_l2: float = 0.0
  w_mm: float = 1.0
  mm_form: str = "l2"
  w_oh: float = 1.0            # loss 'dafl': DAFL's weights (config.generator)
  w_a: float = 0.1
  w_ie: float = 5.0
  conditional: bool = False    # a class-conditional generator (G = 1, single_target 'conditional')


def is_conditional(config, num_classes: int) -> bool:
  return (num_generators(config, num_classes) == 1
          and config.ensemble.single_target == "conditional")


def make_generator(config, info) -> models.Generator:
  """Generator k: config.generator's sizes with config.ensemble.style (class-conditional for a
  single conditional generator)."""
  gen = generator_parts.make_generator(config.generator, info, style=config.ensemble.style,
                            dtype=common.compute_dtype(config),
                            platform=platforms.of_config(config))
  if is_conditional(config, info.num_classes):
    gen = gen.clone(num_classes=info.num_classes)
  return gen


def member_spec(config, info, teacher_model) -> MemberSpec:
  e, g = config.ensemble, config.generator
  return MemberSpec(
      gen=make_generator(config, info), teacher=teacher_model,
      tx=common.make_optimizer(e, e.steps), num_classes=info.num_classes, seed=config.seed,
      batch=int(e.batch_per_generator), loss=e.loss, single_target=e.single_target,
      w_tv=e.w_tv, w_l2=e.w_l2, w_mm=e.w_mm, mm_form=e.mm_form, w_oh=g.w_oh, w_a=g.w_a,
      w_ie=g.w_ie, conditional=is_conditional(config, info.num_classes))


def member_loss(spec: MemberSpec, params, batch_stats, targets, class_id, key, teacher_vars):
  """The loss of one generator; returns (loss, (new batch_stats, metrics)). Pure.

  'luo': inceptionism_loss towards class `class_id` (ALL_CLASSES: per-sample random or argmax
  targets) + w_mm * bn_moment_matching against `targets`. 'dafl': losses.dafl_generator_loss
  (config.generator's weights) + the same moment matching. A conditional generator draws one
  class c per step (class_id when >= 0), generates class c and matches targets[c] (`targets`
  then holds every class's statistics).
  """
  k_z, k_free = jax.random.split(key)
  z = jax.random.normal(k_z, (spec.batch, spec.gen.latent_dim))
  if spec.conditional:
    c = jnp.where(class_id >= 0, class_id,
                  jax.random.randint(jax.random.fold_in(key, 2), (), 0, spec.num_classes))
    cond = jnp.full((spec.batch,), c)
    targets = jax.tree.map(lambda t: t[c], targets)
    images, new_bs = generator_parts.generate(spec.gen, params, batch_stats, z, cond)
  else:
    images, new_bs = generator_parts.generate(spec.gen, params, batch_stats, z)
  use_mm = spec.w_mm > 0
  logits, feats, moments = generator_parts.teacher_forward(spec.teacher, teacher_vars, images,
                                                  moments=use_mm)
  if spec.conditional:
    labels = cond
  elif spec.single_target == "argmax":
    labels = jnp.where(class_id >= 0, class_id, jnp.argmax(jax.lax.stop_gradient(logits), -1))
  else:
    free = jax.random.randint(k_free, logits.shape[:1], 0, spec.num_classes)
    labels = jnp.where(class_id >= 0, class_id, free)
  if spec.loss == "luo":
    loss = losses.inceptionism_loss(logits, labels, images, spec.w_tv, spec.w_l2)
    metrics = {"ce": losses.cross_entropy(logits, labels),
               "tv": losses.total_variation(images), "l2": losses.image_l2_prior(images)}
  else:
    loss, metrics = losses.dafl_generator_loss(logits, feats, spec.w_oh, spec.w_a, spec.w_ie)
    if not spec.conditional:
      labels = jnp.where(class_id >= 0, class_id, jnp.argmax(logits, -1))
  if use_mm:
    mm = losses.bn_moment_matching(moments, targets, form=spec.mm_form)
    loss = loss + spec.w_mm * mm
    metrics["mm"] = mm
  metrics["agreement"] = losses.accuracy(logits, labels)
  return loss, (new_bs, metrics)


def member_update(spec: MemberSpec, member, const, teacher_vars, step):
  """One generator's whole update: generator, teacher, loss, gradient, optimiser. Pure.

  member: {'params', 'batch_stats', 'opt_state'}; const: {'targets', 'class_id', 'index'}.
  Returns (new member, metrics of this member).
  """
  key = member_key(spec.seed, step, const["index"])
  (loss, (new_bs, metrics)), grads = jax.value_and_grad(member_loss, argnums=1, has_aux=True)(
      spec, member["params"], member["batch_stats"], const["targets"], const["class_id"], key,
      teacher_vars)
  updates, opt_state = spec.tx.update(grads, member["opt_state"], member["params"])
  new = {"params": optax.apply_updates(member["params"], updates), "batch_stats": new_bs,
         "opt_state": opt_state}
  return new, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))


MEMBER_KEYS = ("params", "batch_stats", "opt_state")


def _mean_over_real(per_member, real, g: int):
  return {k: jnp.sum(v * real) / g for k, v in per_member.items()}


def ensemble_step(sharded_update: Callable, g: int, state, batch, consts, teacher_vars):  # pylint: disable=unused-argument
  """The 'vmap' step: sharded_update (member_update mapped over each device's members, under a
  shard_map over 'gen') on the stacked state; metrics averaged over the G real members."""
  members = {k: state[k] for k in MEMBER_KEYS}
  new, per_member = sharded_update(members, consts, teacher_vars, state["step"])
  return dict(new, step=state["step"] + 1), _mean_over_real(per_member, consts["real"], g)


def make_step(spec: MemberSpec, mesh: Mesh, lowering: str, at_once: int, g: int,
              consts, teacher_vars) -> Callable:
  """step(state, batch) -> (state, metrics) (batch: None): member_update on every member, metrics
  averaged over the G real members. state: {'params', 'batch_stats', 'opt_state'} stacked and
  split over the mesh's axis, 'step' replicated. 'vmap': each device's members updated
  `at_once` at a time (a divisor of its member count, member_layout's chunk; 0 or all of them:
  at once), in place."""
  if lowering == "loop":
    return _LoopStep(spec, mesh, g, consts, teacher_vars)
  axis = mesh.axis_names[0]
  split, rep = NamedSharding(mesh, P(axis)), NamedSharding(mesh, P())
  # On platform 'cpu' the custom VJP of the convolution (models/cpu_conv.py) returns a
  # per-member cotangent for the replicated teacher kernels, which the varying-manual-axes check
  # rejects; no collective is used inside, so the check guards nothing there.
  sharded = jax.shard_map(
      lambda members, consts, tvars, step: update_members(
          functools.partial(member_update, spec), members, consts, at_once,
          shared=(tvars, step)),
      mesh=mesh, in_specs=(P(axis), P(axis), P(), P()), out_specs=(P(axis), P(axis)),
      check_vma=not platforms.is_cpu(spec.gen.platform))
  member_shardings = {k: split for k in MEMBER_KEYS}
  step_jit = jax.jit(functools.partial(ensemble_step, sharded, g),
                     out_shardings=(dict(member_shardings, step=rep), rep), donate_argnums=(0,))
  return functools.partial(step_jit, consts=consts, teacher_vars=teacher_vars)


def _device_blocks(tree) -> dict:
  """{device: this process's block of every leaf on that device} of a pytree of jax arrays."""
  leaves, treedef = jax.tree.flatten(tree)
  blocks: dict = {}
  for i, leaf in enumerate(leaves):
    for shard in leaf.addressable_shards:
      blocks.setdefault(shard.device, [None] * len(leaves))[i] = shard.data
  return {d: treedef.unflatten(b) for d, b in blocks.items()}


@functools.partial(jax.jit, static_argnums=1)
def _unstack_jit(tree, n: int):
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


@jax.jit
def _stack_jit(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, n: int) -> list:
  """The n members of a stacked pytree, cut MAX_UNROLLED at a time (one jitted call each)."""
  out = []
  for i in range(0, n, MAX_UNROLLED):
    m = min(MAX_UNROLLED, n - i)
    part = tree if m == n else jax.tree.map(lambda x, i=i, m=m: x[i:i + m], tree)
    out.extend(_unstack_jit(part, m))
  return out


def _stack(trees: list):
  """The members stacked again (MAX_UNROLLED at a time, then concatenated)."""
  if len(trees) <= MAX_UNROLLED:
    return _stack_jit(trees)
  parts = [_stack_jit(trees[i:i + MAX_UNROLLED]) for i in range(0, len(trees), MAX_UNROLLED)]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


class _LoopStep:
  """The 'loop' lowering: one jitted member_update per member, each on the device holding it.

  The stacked state is cut into members per device (one call), every member updated (the calls
  of independent members are dispatched asynchronously), restacked per device and reassembled
  into the global arrays; in a multi-process run each process updates its own devices' members.
  """

  def __init__(self, spec: MemberSpec, mesh: Mesh, g: int, consts, teacher_vars):
    self.update = jax.jit(functools.partial(member_update, spec), donate_argnums=(0,))
    self.split = NamedSharding(mesh, P(mesh.axis_names[0]))
    rep = NamedSharding(mesh, P())
    self.teacher = _device_blocks(jax.device_put(teacher_vars, rep))
    self.consts = {d: _unstack(c, jax.tree.leaves(c)[0].shape[0])
                   for d, c in _device_blocks(
                       {k: consts[k] for k in ("targets", "class_id", "index")}).items()}
    self.real = consts["real"]
    self.finish = jax.jit(lambda m, real, step: (_mean_over_real(m, real, g), step + 1),
                          out_shardings=(rep, rep))

  def __call__(self, state, batch):  # pylint: disable=unused-argument
    members = _device_blocks({k: state[k] for k in MEMBER_KEYS})
    steps = _device_blocks(state["step"])
    new_blocks = {}
    for device, block in members.items():
      outs = [self.update(m, c, self.teacher[device], steps[device])
              for m, c in zip(_unstack(block, len(self.consts[device])), self.consts[device])]
      new_blocks[device] = _stack(outs)
    new, per_member = self._assemble(new_blocks)
    metrics, step = self.finish(per_member, self.real, state["step"])
    return dict(new, step=step), metrics

  def _assemble(self, blocks: dict):
    """Global (members, metrics) arrays, split over the mesh, from the per-device blocks."""
    n = self.real.shape[0]
    order = list(self.split.addressable_devices_indices_map((n,)))
    per_device = [jax.tree.leaves(blocks[d]) for d in order]
    treedef = jax.tree.structure(blocks[order[0]])
    leaves = [jax.make_array_from_single_device_arrays(
        (n,) + tuple(parts[0].shape[1:]), self.split, list(parts))
              for parts in zip(*per_device)]
    return jax.tree.unflatten(treedef, leaves)


@dataclasses.dataclass
class Ensemble:
  """A built generator ensemble: its generator module, sizes, mesh, state and functions."""
  gen: models.Generator
  num_generators: int          # the real G
  padded: int                  # members, a multiple of the mesh size
  class_ids: np.ndarray        # (padded,) int32
  mesh: Mesh
  lowering: str
  state: Any                   # {'params', 'batch_stats', 'opt_state' (stacked), 'step'}
  consts: Any                  # {'targets', 'class_id', 'index', 'real'}, stacked
  step: Callable               # step(state, None) -> (state, metrics)
  sample: Callable             # sample(state, n, consts, first=0) -> (padded, n, H, W, C)
                               # images (first > 0: of the first members only); jit it with
                               # state and consts as arguments
  predict: Callable            # predict(state, n, consts, teacher_vars) -> (padded, n) int32:
                               # the teacher's class of n samples per member, computed chunk
                               # by chunk (no member's images outlive its chunk)
  chunk: int                   # members per device updated at once

  def sample_labels(self, n: int) -> np.ndarray:
    """(padded, n) the class of each image of sample(state, n): the member's class; for a
    conditional all-class generator the class it is conditioned on (k mod num_classes); -1
    for an unconditional all-class generator."""
    labels = np.asarray(sample_conditions(self.class_ids, n, max(self.gen.num_classes, 1)))
    if self.gen.num_classes:
      return labels
    return np.where(self.class_ids[:, None] >= 0, labels, ALL_CLASSES).astype(np.int32)


def sample_conditions(class_ids, n: int, num_classes: int, offset=0):
  """(G, n) labels a conditional generator is given: its class, or for an all-class generator
  the classes (offset + j) mod num_classes."""
  ids = jnp.asarray(class_ids)[:, None]
  return jnp.where(ids >= 0, ids, (offset + jnp.arange(n)[None, :]) % num_classes)


def _stack_targets(stats: dict, class_ids: np.ndarray, conditional_classes: int = 0):
  """Moment-matching targets stacked per member: class-conditional, or global for ALL_CLASSES;
  for a conditional generator (conditional_classes > 0) every class's statistics (leading axis:
  class)."""
  if not stats:
    return {}
  if conditional_classes:
    per_class = bn_stats_lib.targets_for(stats, np.arange(conditional_classes))
    return jax.tree.map(lambda t: jnp.broadcast_to(t, (len(class_ids),) + t.shape), per_class)
  targets = bn_stats_lib.targets_for(stats, np.maximum(class_ids, 0))
  if (class_ids >= 0).all():
    return targets
  all_classes = jnp.asarray(class_ids < 0)
  glob = bn_stats_lib.targets_for({"global": stats["global"]}, class_ids)
  return jax.tree.map(
      lambda t, g: jnp.where(all_classes.reshape((-1,) + (1,) * (t.ndim - 1)), g, t),
      targets, glob)


@functools.partial(jax.jit, static_argnums=(0, 1))
def init_generators(gen: models.Generator, seed: int, index):
  """(params, batch_stats) of the members `index`, stacked; member k's depend only on k.

  A module-level jit, so its compilation is shared by every ensemble of the same generator in a
  process.
  """
  key = jax.random.fold_in(jax.random.key(seed), INIT_SALT)
  # vmap: it runs once, the grouped convolutions of the init forward pass do not matter.
  return jax.vmap(lambda i: generator_parts.init_generator(gen, jax.random.fold_in(key, i)))(index)


def build(config, teacher: dict, info, mesh: Optional[Mesh] = None,
          abstract: bool = False) -> Ensemble:
  """The initial stacked state and the jitted ensemble step (used by the stage and tests).

  The members are initialised on the devices that hold them. With `abstract` (the dry run),
  state and consts are ShapeDtypeStructs (nothing materialised; `teacher` may be abstract too)
  and the lowering is 'vmap' (the one jitted step that accelerators run; a 'loop' step is many
  calls, not one program). Formulations follow config.platform (platforms.py).
  """
  e = config.ensemble
  mesh = mesh if mesh is not None else parallel.make_mesh("gen")
  axis = mesh.axis_names[0]
  g = num_generators(config, info.num_classes)
  at_once = int(e.max_generators_per_device_at_once)
  padded, _, chunk = member_layout(g, mesh.devices.size, at_once)
  class_ids = member_class_ids(g, padded, info.num_classes)
  platform = platforms.of_config(config)
  lowering = "vmap" if abstract else resolve_lowering(e.lowering, platform)
  spec = member_spec(config, info, teacher["model"])
  split, rep = NamedSharding(mesh, P(axis)), NamedSharding(mesh, P())
  index = np.arange(padded, dtype=np.int32)

  def init_state(idx):
    params, batch_stats = init_generators(spec.gen, config.seed, idx)
    return {"params": params, "batch_stats": batch_stats,
            "opt_state": jax.vmap(spec.tx.init)(params)}

  def make_consts(stats):
    return {"targets": _stack_targets(stats, class_ids, spec.gen.num_classes),
            "class_id": jnp.asarray(class_ids), "index": jnp.asarray(index),
            "real": jnp.asarray(index < g, jnp.float32)}
  stats = teacher.get("bn_stats") or {}
  if abstract:
    state = ckpt_lib.abstract_like(
        jax.eval_shape(init_state, jax.ShapeDtypeStruct(index.shape, jnp.int32)), split)
    state["step"] = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    consts = ckpt_lib.abstract_like(jax.eval_shape(make_consts, stats), split)
  else:
    state = jax.jit(init_state, out_shardings=split)(jax.device_put(index, split))
    state["step"] = jax.device_put(jnp.zeros((), jnp.int32), rep)
    consts = jax.jit(make_consts, out_shardings=split)(stats)
  step = make_step(spec, mesh, lowering, chunk, g, consts, teacher["variables"])

  def one(n, p, bs, i, c):
    z = jax.random.normal(jax.random.fold_in(jax.random.key(generator_parts.SAMPLE_SEED), i),
                          (n, spec.gen.latent_dim))
    return generator_parts.generate(spec.gen, p, bs, z, c if spec.conditional else None)[0]

  def sample(state, n: int, consts=consts, first: int = 0):
    conditions = sample_conditions(consts["class_id"], n, info.num_classes)
    members = (state["params"], state["batch_stats"], consts["index"], conditions)
    if first:  # the first members only, gathered: no other member is sampled
      return map_members(functools.partial(one, n), jax.tree.map(lambda x: x[:first], members),
                         lowering, at_once)
    fn = jax.shard_map(
        lambda *m: map_members(functools.partial(one, n), m, lowering, at_once),
        mesh=mesh, in_specs=P(axis), out_specs=P(axis),
        check_vma=not platforms.is_cpu(platform))
    return fn(*members)

  def predict(state, n: int, consts, tvars):
    def classify(p, bs, i, c, tvars):
      images = one(n, p, bs, i, c)
      return jnp.argmax(spec.teacher.apply(tvars, images, train=False), -1).astype(jnp.int32)
    conditions = sample_conditions(consts["class_id"], n, info.num_classes)
    fn = jax.shard_map(
        lambda p, bs, i, c, tv: map_members(classify, (p, bs, i, c), lowering, at_once,
                                            shared=(tv,)),
        mesh=mesh, in_specs=(P(axis), P(axis), P(axis), P(axis), P()), out_specs=P(axis),
        check_vma=not platforms.is_cpu(platform))
    return fn(state["params"], state["batch_stats"], consts["index"], conditions, tvars)

  return Ensemble(gen=spec.gen, num_generators=g, padded=padded, class_ids=class_ids,
                  mesh=mesh, lowering=lowering, state=state, consts=consts, step=step,
                  sample=sample, predict=predict, chunk=chunk)


def eval_program(ens: Ensemble, batch: int) -> Callable:
  """preds(state, consts, tvars) -> (padded, batch) the teacher's classes of `batch` samples
  per member, chunk by chunk: the evaluation's one device program."""
  return lambda state, consts, tvars: ens.predict(state, batch, consts, tvars)


def make_eval(ens: Ensemble, teacher: dict, batch: int, num_classes: int,
              loss: str = "luo") -> Callable:
  """eval_fn(state): the teacher's view of one fixed batch per real generator.

  agreement (loss 'luo' only: DAFL's losses have no target class): fraction of the images of
  the per-class (or conditional) generators that the teacher assigns to their class; class_entropy:
  entropy of the teacher's class histogram over all images of the real generators, divided by
  log(num_classes) (1 = perfectly balanced).
  """
  # Global arrays are arguments (a multi-process jit cannot close over them); the output is
  # replicated, so that every process can read it.
  preds = functools.partial(
      jax.jit(eval_program(ens, batch), out_shardings=parallel.replicated(ens.mesh)),
      consts=ens.consts, tvars=teacher["variables"])

  g = ens.num_generators
  labels = ens.sample_labels(batch)[:g]
  known = labels[:, 0] >= 0
  with_agreement = known.any() and loss == "luo"

  def eval_fn(state):
    p = np.asarray(jax.device_get(preds(state)))[:g]
    out = {}
    if with_agreement:
      out["agreement"] = float(np.mean(p[known] == labels[known]))
    hist = np.bincount(p.reshape(-1), minlength=num_classes) / p.size
    nz = hist[hist > 0]
    out["class_entropy"] = float(-np.sum(nz * np.log(nz)) / math.log(num_classes))
    return out
  return eval_fn


def _grid_writer(ctx, ens: Ensemble, batch: int):
  """on_eval callback: one row of samples per real generator, titled G0, G1, ... (the first
  GRID_GENERATORS of them)."""
  g = min(ens.num_generators, GRID_GENERATORS)
  per_gen = SAMPLES_PER_ROW if g > 1 else 4 * SAMPLES_PER_ROW
  n = max(batch, per_gen)

  def sample_fn(state, consts):
    images = ens.sample(state, n, consts, first=g)[:, :per_gen]
    return images.reshape((-1,) + images.shape[2:])
  rows = per_gen // SAMPLES_PER_ROW
  titles = [f"G{k}" if r == 0 else "" for k in range(g) for r in range(rows)]
  return students.make_sample_writer(ctx, sample_fn, "generators", row_titles=titles,
                                    args=(ens.consts,))


def generator_gflop(gen: models.Generator, batch: int, platform: str) -> float:
  """GFLOP of one generator's forward + backward (gradient of its parameters) at `batch`
  images, in XLA's count of the program lowered for `platform` (platforms.py): the generator's
  share of a member-step."""
  params, bs = jax.eval_shape(lambda: generator_parts.init_generator(gen, jax.random.key(0)))
  z = jax.ShapeDtypeStruct((batch, gen.latent_dim), jnp.float32)
  labels = jnp.zeros((batch,), jnp.int32) if gen.num_classes else None

  def total(p, bs, z):
    return jnp.sum(generator_parts.generate(gen, p, bs, z, labels)[0])
  lowered = jax.jit(jax.grad(total)).trace(params, bs, z).lower(
      lowering_platforms=(platforms.lowering_platform(platform),))
  return stage_lib.cost_flops(lowered.cost_analysis()) / 1e9


def teacher_has_bn(config, info) -> bool:
  shapes = jax.eval_shape(lambda: models.get_classifier(
      config.teacher.model, info.num_classes, config.teacher.width).init(
          jax.random.key(0), jnp.zeros((1,) + info.image_shape), train=False))
  return bool(shapes.get("batch_stats"))


class Generators(stage_lib.Stage):
  """Trains the ensemble. Its output is the 'generators' item of the final checkpoint (the
  members' params and BN state, the real G first), which stage 'distill_generators' loads. An Ensemble built
  by `build` from the same config and teacher in ctx.outputs['ensemble'] is used (its compiled
  step reused) instead of building one."""
  name = "generators"
  selector = "generators"

  def check(self, config, info):
    e = config.ensemble
    generator_parts.check_generator_fits(config, info)
    if e.w_mm > 0 and not teacher_has_bn(config, info):
      raise config_lib.ConfigError(
          f"ensemble.w_mm={e.w_mm} asks for BN moment matching, but the teacher "
          f"{config.teacher.model!r} has no BatchNorm layers; use a teacher with BN (e.g. "
          "teacher.model='lenet5_bn') or set ensemble.w_mm=0")
    g = num_generators(config, info.num_classes)
    if 1 < g < info.num_classes:
      log.warn(f"ensemble.num_generators={g}: classes {g}..{info.num_classes - 1} get no "
               "generator and no distillation images")

  def steps(self, config):
    return config.ensemble.steps

  def identity(self, ctx):
    config, info = ctx.config, ctx.info
    gen = make_generator(config, info)
    g = num_generators(config, info.num_classes)
    return {"num_generators": g, "image_shape": list(info.image_shape),
            "latent_dim": gen.latent_dim, "width": gen.width, "num_upsample": gen.num_upsample,
            "style": gen.style, "conditional": bool(gen.num_classes),
            "class_ids": [int(c) for c in member_class_ids(g, g, info.num_classes)]}

  def resume_hint(self, key, saved):
    if key != "padded":
      return ""
    return (" (the padding depends on the device count: resume on a device count that "
            f"divides {saved['padded']}, or start a new workdir)")

  def plan(self, ctx):
    config, info, e = ctx.config, ctx.info, ctx.config.ensemble
    ens = ctx.outputs.pop("ensemble", None) or build(config, ctx.teacher, info)
    log.info(f"generators: {ens.num_generators} generators ({ens.padded} members over "
             f"{ens.mesh.devices.size} devices, lowering {ens.lowering})")
    meta = {"kind": "generator_ensemble", "padded": ens.padded,
            "batch_per_generator": int(e.batch_per_generator),
            "num_classes": info.num_classes, "loss": e.loss,
            "teacher_model": ctx.teacher["meta"].get("model"), "dataset": info.name}
    return stage_lib.Plan(
        state=ens.state, step=ens.step,
        evaluate=make_eval(ens, ctx.teacher, e.batch_per_generator, info.num_classes, e.loss),
        eval_every=e.eval_every, meta=meta, resume_keys=("padded",),
        final_items=lambda s: {"generators": {"params": s["params"],
                                              "batch_stats": s["batch_stats"]}},
        on_eval=_grid_writer(ctx, ens, e.batch_per_generator))

  def programs(self, ctx):
    """The ensemble step, the evaluation (every member's samples through the teacher, chunk by
    chunk), the sample grid (the first GRID_GENERATORS members) and the checkpoint restore."""
    config, e = ctx.config, ctx.config.ensemble
    ens = build(config, ctx.teacher, ctx.info, abstract=True)
    per_device = ens.padded // ens.mesh.devices.size
    chunks = per_device // ens.chunk
    member_state = {k: ens.state[k] for k in MEMBER_KEYS}
    rep = parallel.replicated(ens.mesh)
    b = int(e.batch_per_generator)
    grid_g = min(ens.num_generators, GRID_GENERATORS)
    grid_n = max(b, SAMPLES_PER_ROW if grid_g > 1 else 4 * SAMPLES_PER_ROW)
    grid = jax.jit(lambda state, consts: ens.sample(state, grid_n, consts, first=grid_g),
                   out_shardings=rep)
    return [
        stage_lib.Program(
            f"{ens.num_generators} generators ({per_device} per device, {ens.chunk} at once), "
            f"batch {b} each", ens.step.func, (ens.state, None), ens.step.keywords,
            state=member_state, trips=chunks, steps=e.steps,
            note=(f"FLOPs: one chunk of {ens.chunk} members x {chunks} chunks per device; "
                  if chunks > 1 else "") + (
                      f"the generator's share of a member-step (forward + backward, batch {b}, "
                      f"{ens.gen.platform} program): "
                      f"{generator_gflop(ens.gen, b, ens.gen.platform):.0f} GFLOP")),
        stage_lib.Program(
            f"evaluation: {b} samples per generator through the teacher", jax.jit(
                eval_program(ens, b), out_shardings=rep),
            (ens.state, ens.consts, ctx.teacher["variables"]), trips=chunks, kind="eval"),
        stage_lib.Program(f"sample grid: {grid_n} samples of {grid_g} generators", grid,
                          (ens.state, ens.consts), kind="eval"),
        stage_lib.restore_program("generators", member_state)]

  def summarize(self, ctx, done):
    return {"generators": {"num_generators": done.meta["num_generators"],
                           "members": done.meta["padded"], "steps": done.step,
                           "eval": done.eval, "checkpoint": done.directory}}


GENERATORS = Generators()


def distill_layout(setting: str, g: int, devices: int) -> str:
  """config.ensemble.distill_layout resolved: 'sharded' or 'replicated'."""
  if setting != "auto":
    return setting
  return "sharded" if g >= devices else "replicated"


def load_generators(path: str, info, mesh: Optional[Mesh] = None, dtype=None,
                    layout: str = "replicated", platform: Optional[str] = None) -> dict:
  """The finished generators in `path` on `mesh`, checked against `info`; their module computes
  in `dtype`, in the form of `platform` (platforms.py). layout 'replicated': every device holds
  all G; 'sharded': the stacked members are split over the mesh's axis, padded with zero members
  to a multiple of its size (each device reads only its part); 'auto': distill_layout's
  choice.

  Works on any device count: the restore target is built from the checkpoint's own meta and
  item shapes. Returns {'gen', 'params', 'batch_stats' (stacked, leading axis G, or the padded
  count when sharded), 'meta', 'directory', 'layout', 'padded'}.

  Raises:
    CheckpointError: no finished generator checkpoint in `path`, or one made for other images
      or another number of classes.
  """
  d = ckpt_lib.stage_directory(path, "generators")
  hint = ("run the generators stage first (stage=generators or stage=all), or point "
          "generator_checkpoint at a generators directory")
  if not paths.isdir(d):
    raise ckpt_lib.CheckpointError(f"no generator checkpoint in {d}; {hint}")
  ckpt = ckpt_lib.StageCheckpoints(d, create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ckpt_lib.CheckpointError(f"no generator checkpoint in {d}; {hint}")
    meta = ckpt.restore_meta(step)
    if meta.get("kind") != "generator_ensemble":
      raise ckpt_lib.CheckpointError(f"the checkpoint in {d} is not a generator ensemble "
                                     f"(stage {meta.get('stage')!r}); {hint}")
    if not meta.get("done"):
      raise ckpt_lib.CheckpointError(
          f"the generators in {d} are unfinished (step {step} of {meta.get('total_steps')}); "
          "run the generators stage again to finish them")
    shape, classes = tuple(meta.get("image_shape", ())), meta.get("num_classes")
    if shape != tuple(info.image_shape) or classes != info.num_classes:
      raise ckpt_lib.CheckpointError(
          f"the generators in {d} were made for {classes} classes of {shape} images, but "
          f"dataset {info.name!r} has {info.num_classes} classes of {tuple(info.image_shape)} "
          "images")
    gen = models.Generator(latent_dim=meta["latent_dim"], image_size=shape[0],
                           channels=shape[2], width=meta["width"],
                           num_upsample=meta["num_upsample"], style=meta["style"],
                           num_classes=classes if meta.get("conditional") else 0,
                           dtype=dtype, platform=platform)
    g = int(meta["num_generators"])
    shapes = ckpt.item_shapes(step, "generators")
    expected = jax.eval_shape(lambda: generator_parts.init_generator(gen, jax.random.key(0)))
    expected = {"params": expected[0], "batch_stats": expected[1]}
    saved = {int(a.shape[0]) for a in jax.tree.leaves(shapes) if a.shape}
    same = (jax.tree.structure(shapes) == jax.tree.structure(expected) and len(saved) == 1
            and min(saved) >= g and all(
                tuple(a.shape[1:]) == tuple(b.shape)
                for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(expected))))
    if not same:
      raise ckpt_lib.CheckpointError(
          f"the generators in {d} do not match their meta ({g} generators {meta['style']!r}, "
          f"width {meta['width']}, latent {meta['latent_dim']}); the checkpoint is corrupt")
    mesh = mesh if mesh is not None else parallel.make_mesh("data")
    layout = distill_layout(layout, g, mesh.devices.size)
    # The checkpoint holds the real G first, then the padding of the run that wrote it: read
    # the first G (replicated) or as many members as this mesh splits evenly (sharded; the
    # slots past G, padding or zeros, are never drawn).
    padded = g
    if layout == "sharded":
      padded = -(-g // mesh.devices.size) * mesh.devices.size
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((padded,) + x.shape[1:], x.dtype),
                          shapes)
    target = ckpt_lib.abstract_like(shapes, parallel.split_leading(mesh) if layout == "sharded"
                                    else parallel.replicated(mesh))
    variables = ckpt.restore(step, "generators", target, pad=padded != min(saved))
  finally:
    ckpt.close()
  return {"gen": gen, "params": variables["params"], "batch_stats": variables["batch_stats"],
          "meta": meta, "directory": d, "layout": layout, "padded": padded}


def _draw_images(gen, bn_batch: int, lowering: str, key, size: int, variables, class_ids,
                 real):
  """`size` images from members [0, real) of the stacked `variables` (class_ids: theirs):
  k = ceil(size / bn_batch) draws, draw j is member perm[j mod real] of a random permutation
  of the real members, on latents keyed fold_in(key_z, j). `real` may be traced."""
  n = class_ids.shape[0]
  classes = max(gen.num_classes, 1)
  k = -(-size // bn_batch)
  k_perm, k_class, k_z = jax.random.split(key, 3)
  perm = jax.random.permutation(k_perm, n)
  if not isinstance(real, int) or real < n:  # the real members first, in permuted order
    perm = perm[jnp.argsort(perm >= real, stable=True)]
  draw = perm[jnp.arange(k) % jnp.maximum(real, 1)]
  offsets = jax.random.randint(k_class, (k,), 0, classes)
  conditions = sample_conditions(class_ids[draw], bn_batch, classes, offsets[:, None])

  def one(p, bs, j, c):
    z = jax.random.normal(jax.random.fold_in(k_z, j), (bn_batch, gen.latent_dim))
    return generator_parts.generate(gen, p, bs, z, c if gen.num_classes else None)[0]
  chosen = jax.tree.map(lambda x: x[draw], variables)
  images = map_members(one, (chosen["params"], chosen["batch_stats"], jnp.arange(k),
                             conditions), lowering)
  images = images.reshape((k * bn_batch,) + images.shape[2:])
  return jax.lax.stop_gradient(images[:size])


def make_images_fn(gens: dict, lowering: str, bn_batch: int,
                   mesh: Optional[Mesh] = None) -> Callable:
  """images_fn(key, n, batch, variables): n images from the frozen generators' `variables`
  (the loop's `batch` is unused), each generator drawing `bn_batch` images at a time: the BN
  batch it was trained with, so that its images do not depend on G or n.

  A step takes k = ceil(n / bn_batch) draws: draw j is generator perm[j mod G] of a random
  permutation of the G generators (every generator is drawn equally often over the steps, and
  at most once per step while k <= G), on latents keyed fold_in(key_z, j); a conditional
  all-class generator is given the classes (r_j + i) mod num_classes for its images i, r_j
  random. The draws' images are concatenated and the first n kept. Generator BN runs in
  training mode (its updated statistics are discarded).

  Sharded generators (gens['layout'] == 'sharded', on `mesh`): each of the D devices draws its
  n / D images the same way from its own real members, with the step key folded with its index
  (for D > 1). When D does not divide G the devices hold different numbers of real members
  r_d (the last ones fewer, possibly none), and images_fn returns (images, weights) with
  weight r_d D / G for the images of device d: a generator's share of the weighted loss is
  then the same for every generator, in expectation, as with replicated generators.
  """
  gen = gens["gen"]
  g = int(gens["meta"]["num_generators"])
  ids = np.asarray(gens["meta"]["class_ids"], np.int32)
  if gens.get("layout", "replicated") != "sharded":
    class_ids = jnp.asarray(ids)

    def images_fn(key, size, batch, variables):  # pylint: disable=unused-argument
      return _draw_images(gen, bn_batch, lowering, key, size, variables, class_ids, g)
    return images_fn

  axis = mesh.axis_names[0]
  d = mesh.devices.size
  padded = int(gens["padded"])
  per_device = padded // d
  ids = np.concatenate([ids, np.zeros((padded - g,), np.int32)])
  weighted = g % d != 0

  def local(key, variables, class_ids, size):
    index = jax.lax.axis_index(axis)
    real = g if d == 1 else jnp.clip(g - index * per_device, 0, per_device)
    k_dev = key if d == 1 else jax.random.fold_in(key, index)
    images = _draw_images(gen, bn_batch, lowering, k_dev, size, variables, class_ids, real)
    if not weighted:
      return images
    w = jnp.full((size,), real * d / g, jnp.float32)
    return images, w

  def images_fn(key, size, batch, variables):  # pylint: disable=unused-argument
    fn = jax.shard_map(functools.partial(local, size=size // d), mesh=mesh,
                       in_specs=(P(), P(axis), P(axis)),
                       out_specs=(P(axis), P(axis)) if weighted else P(axis),
                       check_vma=not platforms.is_cpu(gen.platform))
    return fn(key, variables, jax.device_put(ids, NamedSharding(mesh, P(axis))))
  return images_fn


class DistillGenerators(students.Distill):
  """Luo et al.'s second stage: the student distils on images of the frozen generators, loaded
  from config.generator_checkpoint (default <workdir>/generators)."""

  def __init__(self):
    super().__init__("generators")

  def prepare(self, ctx, finished):
    if not finished and GENERATORS.name not in ctx.running:  # Load them before writing.
      self._generators(ctx)

  def _generators(self, ctx) -> dict:
    if "frozen_generators" not in ctx.outputs:
      ctx.outputs["frozen_generators"] = load_generators(
          checkpoint_to_distill(ctx.config, ctx.workdir), ctx.info, parallel.make_mesh("data"),
          common.compute_dtype(ctx.config), ctx.config.ensemble.distill_layout,
          platforms.of_config(ctx.config))
    return ctx.outputs["frozen_generators"]

  def source_images(self, ctx, mesh):
    gens = self._generators(ctx)
    if gens["meta"].get("teacher_model") != ctx.teacher["meta"].get("model"):
      log.warn(f"the generators in {gens['directory']} were trained against a "
               f"{gens['meta'].get('teacher_model')!r} teacher; distilling from a "
               f"{ctx.teacher['meta'].get('model')!r}")
    variables = {"params": gens["params"], "batch_stats": gens["batch_stats"]}
    if gens["layout"] != "sharded":
      variables = parallel.put_replicated(variables, mesh)
    bn_batch = int(gens["meta"].get("batch_per_generator",
                                    ctx.config.ensemble.batch_per_generator))
    images_fn = make_images_fn(gens, resolve_lowering(ctx.config.ensemble.lowering,
                                                      gens["gen"].platform), bn_batch, mesh)
    return images_fn, None, variables, {"generators": gens["directory"],
                                        "num_generators": gens["meta"]["num_generators"]}

  def abstract_source(self, ctx, mesh):
    """The generators the generators stage of this config would save, as ShapeDtypeStructs."""
    config, info = ctx.config, ctx.info
    gen = make_generator(config, info)
    g = num_generators(config, info.num_classes)
    params, batch_stats = jax.eval_shape(
        lambda: generator_parts.init_generator(gen, jax.random.key(0)))
    layout = distill_layout(config.ensemble.distill_layout, g, mesh.devices.size)
    padded = -(-g // mesh.devices.size) * mesh.devices.size if layout == "sharded" else g
    sharding = (parallel.split_leading(mesh) if layout == "sharded"
                else parallel.replicated(mesh))
    variables = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((padded,) + x.shape, x.dtype, sharding=sharding),
        {"params": params, "batch_stats": batch_stats})
    gens = {"gen": gen, "layout": layout, "padded": padded, "meta": {
        "num_generators": g,
        "class_ids": [int(c) for c in member_class_ids(g, g, info.num_classes)]}}
    images_fn = make_images_fn(gens, resolve_lowering(config.ensemble.lowering, gen.platform),
                               int(config.ensemble.batch_per_generator), mesh)
    return images_fn, None, variables


DISTILL = DistillGenerators()
