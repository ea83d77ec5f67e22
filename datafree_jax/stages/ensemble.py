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

The update of one generator is `member_update` (ensemble/objective.py), a pure function of
that member's arrays. The params, BN state and optimiser state of all generators are stacked on a leading "member" axis,
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

The final checkpoint holds 'generators' (params and BN state: what distillation reads) and
'resume' (the optimiser state and step: only for continuing the stage to more steps; it may be
deleted, checkpoints.py), not a second copy of the parameters; periodic checkpoints hold the
whole state as 'state'.

Stage 'distill_generators' (Luo et al.'s second stage; config.stage 'distill'): the student
learns KL(T || S) on images of the frozen generators, drawn inside the jitted step: each draw is
one generator's batch of batch_per_generator images (the BN batch it was trained with; BN in
training mode, its updated statistics discarded), the generators taken in a random order that
draws each equally often (frozen.make_images_fn).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import generator_parts
from datafree_jax import image_pool
from datafree_jax import log
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax import paths
from datafree_jax import platforms
from datafree_jax import stage as stage_lib
from datafree_jax import students
from datafree_jax.ensemble import frozen
from datafree_jax.ensemble import members as members_lib
from datafree_jax.ensemble import objective

SAMPLES_PER_ROW = 10    # samples per generator in the grids (visualize's 10 columns)
GRID_GENERATORS = 20    # generators shown in the sample grids


def directory(workdir: str) -> str:
  return paths.join(workdir, "generators")


def checkpoint_to_distill(config, workdir: str) -> str:
  """Where stage 'distill' loads the generators: config.generator_checkpoint, else the workdir's."""
  return config.get("generator_checkpoint", "") or directory(workdir)


MEMBER_KEYS = ("params", "batch_stats", "opt_state")


def _mean_over_real(per_member, real, g: int):
  return {k: jnp.sum(v * real) / g for k, v in per_member.items()}


def ensemble_step(sharded_update: Callable, g: int, state, batch,  # pylint: disable=unused-argument
                  consts, teacher_vars):
  """The 'vmap' step: sharded_update (member_update mapped over each device's members, under a
  shard_map over 'gen') on the stacked state; metrics averaged over the G real members."""
  members = {k: state[k] for k in MEMBER_KEYS}
  new, per_member = sharded_update(members, consts, teacher_vars, state["step"])
  return dict(new, step=state["step"] + 1), _mean_over_real(per_member, consts["real"], g)


def make_step(spec: objective.MemberSpec, mesh: Mesh, lowering: str, at_once: int, g: int,
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
      lambda members, consts, tvars, step: members_lib.update_members(
          functools.partial(objective.member_update, spec), members, consts, at_once,
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
  for i in range(0, n, members_lib.MAX_UNROLLED):
    m = min(members_lib.MAX_UNROLLED, n - i)
    part = tree if m == n else jax.tree.map(lambda x, i=i, m=m: x[i:i + m], tree)
    out.extend(_unstack_jit(part, m))
  return out


def _stack(trees: list):
  """The members stacked again (members_lib.MAX_UNROLLED at a time, then concatenated)."""
  if len(trees) <= members_lib.MAX_UNROLLED:
    return _stack_jit(trees)
  step = members_lib.MAX_UNROLLED
  parts = [_stack_jit(trees[i:i + step]) for i in range(0, len(trees), step)]
  return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


class _LoopStep:
  """The 'loop' lowering: one jitted member_update per member, each on the device holding it.

  The stacked state is cut into members per device (one call), every member updated (the calls
  of independent members are dispatched asynchronously), restacked per device and reassembled
  into the global arrays; in a multi-process run each process updates its own devices' members.
  """

  def __init__(self, spec: objective.MemberSpec, mesh: Mesh, g: int, consts, teacher_vars):
    self.update = jax.jit(functools.partial(objective.member_update, spec), donate_argnums=(0,))
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
    labels = np.asarray(objective.sample_conditions(
        self.class_ids, n, max(self.gen.num_classes, 1)))
    if self.gen.num_classes:
      return labels
    return np.where(self.class_ids[:, None] >= 0, labels, objective.ALL_CLASSES).astype(np.int32)


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
  g = objective.num_generators(config, info.num_classes)
  at_once = int(e.max_generators_per_device_at_once)
  padded, _, chunk = members_lib.member_layout(g, mesh.devices.size, at_once)
  class_ids = objective.member_class_ids(g, padded, info.num_classes)
  platform = platforms.of_config(config)
  lowering = "vmap" if abstract else members_lib.resolve_lowering(e.lowering, platform)
  spec = objective.member_spec(config, info, teacher["model"])
  split, rep = NamedSharding(mesh, P(axis)), NamedSharding(mesh, P())
  index = np.arange(padded, dtype=np.int32)

  def init_state(idx):
    params, batch_stats = objective.init_generators(spec.gen, config.seed, idx)
    return {"params": params, "batch_stats": batch_stats,
            "opt_state": jax.vmap(spec.tx.init)(params)}

  def make_consts(stats):
    return {"targets": objective.stack_targets(stats, class_ids, spec.gen.num_classes),
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
    conditions = objective.sample_conditions(consts["class_id"], n, info.num_classes)
    members = (state["params"], state["batch_stats"], consts["index"], conditions)
    if first:  # the first members only, gathered: no other member is sampled
      return members_lib.map_members(functools.partial(one, n),
                                     jax.tree.map(lambda x: x[:first], members), lowering, at_once)
    fn = jax.shard_map(
        lambda *m: members_lib.map_members(functools.partial(one, n), m, lowering, at_once),
        mesh=mesh, in_specs=P(axis), out_specs=P(axis),
        check_vma=not platforms.is_cpu(platform))
    return fn(*members)

  def predict(state, n: int, consts, tvars):
    def classify(p, bs, i, c, tvars):
      images = one(n, p, bs, i, c)
      return jnp.argmax(spec.teacher.apply(tvars, images, train=False), -1).astype(jnp.int32)
    conditions = objective.sample_conditions(consts["class_id"], n, info.num_classes)
    fn = jax.shard_map(
        lambda p, bs, i, c, tv: members_lib.map_members(classify, (p, bs, i, c), lowering, at_once,
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


class Generators(stage_lib.Stage):
  """Trains the ensemble. Its output is the 'generators' item of the final checkpoint (the
  members' params and BN state, the real G first), which stage 'distill_generators' loads. An
  Ensemble built by `build` from the same config and teacher in ctx.outputs['ensemble'] is used (its compiled
  step reused) instead of building one."""
  name = "generators"
  selector = "generators"

  def check(self, config, info):
    e = config.ensemble
    generator_parts.check_generator_fits(config, info)
    if e.w_mm > 0 and not image_pool.teacher_has_bn(config, info):
      raise config_lib.ConfigError(
          f"ensemble.w_mm={e.w_mm} asks for BN moment matching, but the teacher "
          f"{config.teacher.model!r} has no BatchNorm layers; use a teacher with BN (e.g. "
          "teacher.model='lenet5_bn') or set ensemble.w_mm=0")
    g = objective.num_generators(config, info.num_classes)
    if 1 < g < info.num_classes:
      log.warn(f"ensemble.num_generators={g}: classes {g}..{info.num_classes - 1} get no "
               "generator and no distillation images")

  def steps(self, config):
    return config.ensemble.steps

  def identity(self, ctx):
    config, info = ctx.config, ctx.info
    gen = objective.make_generator(config, info)
    g = objective.num_generators(config, info.num_classes)
    return {"num_generators": g, "image_shape": list(info.image_shape),
            "latent_dim": gen.latent_dim, "width": gen.width, "num_upsample": gen.num_upsample,
            "style": gen.style, "conditional": bool(gen.num_classes),
            "class_ids": [int(c) for c in objective.member_class_ids(g, g, info.num_classes)]}

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
        final_state_item="generators",
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
        stage_lib.restore_program(
            "generators", member_state, ens.state,
            {"generators": {"params": ens.state["params"],
                            "batch_stats": ens.state["batch_stats"]}}, "generators")]

  def summarize(self, ctx, done):
    return {"generators": {"num_generators": done.meta["num_generators"],
                           "members": done.meta["padded"], "steps": done.step,
                           "eval": done.eval, "checkpoint": done.directory}}


GENERATORS = Generators()


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
      ctx.outputs["frozen_generators"] = frozen.load_generators(
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
    lowering = members_lib.resolve_lowering(ctx.config.ensemble.lowering, gens["gen"].platform)
    images_fn = frozen.make_images_fn(gens, lowering, bn_batch, mesh)
    return images_fn, None, variables, {"generators": gens["directory"],
                                        "num_generators": gens["meta"]["num_generators"]}

  def abstract_source(self, ctx, mesh):
    """The generators the generators stage of this config would save, as ShapeDtypeStructs."""
    config, info = ctx.config, ctx.info
    gen = objective.make_generator(config, info)
    g = objective.num_generators(config, info.num_classes)
    params, batch_stats = jax.eval_shape(
        lambda: generator_parts.init_generator(gen, jax.random.key(0)))
    layout = frozen.distill_layout(config.ensemble.distill_layout, g, mesh.devices.size)
    padded = -(-g // mesh.devices.size) * mesh.devices.size if layout == "sharded" else g
    sharding = (parallel.split_leading(mesh) if layout == "sharded"
                else parallel.replicated(mesh))
    variables = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((padded,) + x.shape, x.dtype, sharding=sharding),
        {"params": params, "batch_stats": batch_stats})
    gens = {"gen": gen, "layout": layout, "padded": padded, "meta": {
        "num_generators": g,
        "class_ids": [int(c) for c in objective.member_class_ids(g, g, info.num_classes)]}}
    lowering = members_lib.resolve_lowering(config.ensemble.lowering, gen.platform)
    images_fn = frozen.make_images_fn(gens, lowering, int(config.ensemble.batch_per_generator),
                                      mesh)
    return images_fn, None, variables


DISTILL = DistillGenerators()
