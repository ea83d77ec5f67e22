"""Luo et al. (2020): a per-class generator ensemble, then distillation from the frozen ensemble.

Stage 'generators' (checkpoints in <workdir>/generators/): G generators, generator k trained
towards class k against the frozen teacher T only (no data):
  L_k = inceptionism_loss(T(G_k(z)), k, G_k(z), w_tv, w_l2)
        + w_mm * bn_moment_matching(moments of T's BN inputs on G_k(z), class-k BN statistics)
(config.ensemble.loss='dafl' uses DAFL's generator terms instead of the inceptionism loss; w_mm
still adds moment matching when > 0). G = config.ensemble.num_generators, 0 meaning one per
class; generator k targets class k mod num_classes (G < num_classes leaves classes out: for
tests and debugging). G = 1 is the ablation "one generator instead of ten": a single generator
trained on all classes, each sample with a random target class (single_target='random') or the
teacher's argmax ('argmax'), matching the global BN statistics.

Layout: the params, BN state and optimiser state of all generators are stacked on a leading
"member" axis, sharded over the mesh axis 'gen'. One jitted step updates every member: a
shard_map gives each device its local members. 'vmap' vectorises the members' update over
that axis (the teacher half, whose kernels are shared, folds the member axis into its batch);
'unroll' traces every member's whole update (generator, teacher, gradient, optimiser) in a
Python loop inside the jit: XLA:CPU turns vmapped per-member convolutions into grouped
convolutions, several times slower than separate ones, while unrolling costs compile time (one
copy of the step per local member). The unrolled update runs the teacher per member too,
which XLA:CPU runs faster than the members folded into one teacher batch
(benchmarks/ensemble_step_speed.py). lowering='auto' is 'unroll' on the CPU backend and 'vmap'
elsewhere. With max_generators_per_device_at_once > 0 the local members are updated in chunks
in sequence (lax.map over chunks) to bound memory. Member k's randomness is the stage key with
the step and k folded in, so results do not depend on the lowering, the device count or the
chunking.

Padding: when G is not a multiple of the device count, the ensemble is padded with extra members
(member k, k >= G, trains towards class k mod num_classes). They cost compute, are left out of
the metrics, the sample grids and the 'generators' item of the final checkpoint, and the real G
is stored in the checkpoint's meta. A run resumes only on a device count that gives the same
padding; the distillation stage loads the generators on any device count.

Stage 'distill' (Luo et al.'s second stage, <workdir>/distill_generators/): the student learns
KL(T || S) on class-balanced batches from the frozen generators: each of the G generators draws
ceil(batch / G) images inside the jitted step (generator BN in training mode, its updated
statistics discarded) and the batch takes its images in turn from the generators, starting at a
random one when G does not divide the batch.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from datafree_jax import bn_stats as bn_stats_lib
from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import log
from datafree_jax import loop
from datafree_jax import losses
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax.stages import dafl
from datafree_jax.stages import distill

STAGE_SALT = 4          # rng of the generator steps
INIT_SALT = 40          # rng of the generators' initialisation
SAMPLE_SEED = 1234      # fixed latents of the evaluation samples and grids
SAMPLES_PER_ROW = 10    # samples per generator in the grids (visualize's 10 columns)
LOWERINGS = config_lib.LOWERINGS
ALL_CLASSES = -1        # class id of a generator trained on all classes (G = 1)


def directory(workdir: str) -> str:
  return os.path.join(workdir, "generators")


def checkpoint_to_distill(config, workdir: str) -> str:
  """Where stage 'distill' loads the generators: config.generator_checkpoint, else the workdir's."""
  return config.get("generator_checkpoint", "") or directory(workdir)


def validate(config, teacher_has_bn: Optional[bool] = None):
  """Checks config.ensemble; raises ConfigError. `teacher_has_bn` enables the BN check."""
  e = config.ensemble
  config_lib.check_section(config, "ensemble")
  if e.loss == "dafl":
    config_lib.check_section(config, "generator")
  if teacher_has_bn is False and e.w_mm > 0:
    raise config_lib.ConfigError(
        f"ensemble.w_mm={e.w_mm} asks for BN moment matching, but the teacher "
        f"{config.teacher.model!r} has no BatchNorm layers; use a teacher with BN (e.g. "
        "teacher.model='lenet5_bn') or set ensemble.w_mm=0")


def resolve_lowering(lowering: str) -> str:
  """'auto' -> 'unroll' on the CPU backend, 'vmap' elsewhere."""
  config_lib.check_choice("ensemble.lowering", lowering, LOWERINGS)
  if lowering == "auto":
    return "unroll" if jax.default_backend() == "cpu" else "vmap"
  return lowering


def num_generators(config, num_classes: int) -> int:
  """The real ensemble size G (ensemble.num_generators; 0 = one generator per class)."""
  g = int(config.ensemble.num_generators) or num_classes
  if 1 < g < num_classes:
    log.warn(f"ensemble.num_generators={g}: classes {g}..{num_classes - 1} get no generator "
             "and no distillation images")
  return g


def member_class_ids(g: int, padded: int, num_classes: int) -> np.ndarray:
  """(padded,) int32: class of each member, ALL_CLASSES for a single all-class generator."""
  ids = np.arange(padded, dtype=np.int32) % num_classes
  if g == 1:
    ids[0] = ALL_CLASSES
  return ids


def chunk_size(n: int, at_once: int) -> int:
  """Members per chunk: the largest divisor of n that is <= at_once (0 = all n at once)."""
  if at_once <= 0 or at_once >= n:
    return n
  return max(d for d in range(1, at_once + 1) if n % d == 0)


def map_members(fn: Callable, stacked, lowering: str, at_once: int = 0):
  """Applies `fn(member)` to every member of pytree `stacked` (leading member axis); stacks.

  lowering 'vmap' vectorises over members, 'unroll' traces `fn` once per member (a Python loop
  inside the caller's jit). With `at_once` > 0 the members are processed in sequential chunks of
  chunk_size(n, at_once) (lax.map over chunks), bounding the memory of one step.
  """
  n = jax.tree.leaves(stacked)[0].shape[0]
  c = chunk_size(n, at_once)

  def run_chunk(xs):
    if lowering == "vmap":
      return jax.vmap(fn)(xs)
    outs = [fn(jax.tree.map(lambda x, i=i: x[i], xs)) for i in range(c)]
    return jax.tree.map(lambda *ys: jnp.stack(ys), *outs)

  if c == n:
    return run_chunk(stacked)
  chunks = jax.tree.map(lambda x: x.reshape((n // c, c) + x.shape[1:]), stacked)
  out = jax.lax.map(run_chunk, chunks)
  return jax.tree.map(lambda y: y.reshape((n,) + y.shape[2:]), out)


def member_key(seed: int, step, index):
  """The rng of member `index` at `step`: independent of lowering, sharding and chunking."""
  return jax.random.fold_in(common.step_key(seed, STAGE_SALT, step), index)


@dataclasses.dataclass
class Ensemble:
  """A built generator ensemble: its modules, sizes, mesh and jitted functions."""
  gen: models.Generator
  num_generators: int          # the real G
  padded: int                  # members, a multiple of the mesh size
  class_ids: np.ndarray        # (padded,) int32
  num_classes: int
  mesh: Mesh
  lowering: str
  state: Any                   # {'params','batch_stats','opt_state' (stacked), 'step'}
  consts: Any                  # {'targets','class_ids','index','real'}, stacked
  step: Callable               # step(state) -> (state, metrics)
  sample: Callable             # sample(state, n) -> (padded, n, H, W, C) images
  state_shardings: Any
  step_jit: Callable           # the jitted step(state, consts, teacher_vars) behind `step`
  teacher_vars: Any


def make_generator(config, info) -> models.Generator:
  """Generator k: config.generator's sizes with config.ensemble.style."""
  gcfg = config.generator.copy_and_resolve_references()
  gcfg.style = config.ensemble.style
  return dafl.make_generator(gcfg, info)


def _stack_targets(stats: dict, class_ids: np.ndarray):
  """Moment-matching targets stacked per member: class-conditional, or global for ALL_CLASSES."""
  if not stats:
    return {}
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

  A module-level jit, so its compilation (XLA:CPU takes seconds for the truncated-normal kernel
  initialisers) is shared by every ensemble of the same generator in a process.
  """
  key = jax.random.fold_in(jax.random.key(seed), INIT_SALT)
  # vmap: it runs once, the grouped convolutions of the init forward pass do not matter.
  return jax.vmap(lambda i: dafl.init_generator(gen, jax.random.fold_in(key, i)))(index)


def generate(gen, params, batch_stats, key, batch: int):
  """Images of one generator (train-mode BN): (images, new batch_stats)."""
  z = jax.random.normal(jax.random.split(key)[0], (batch, gen.latent_dim))
  images, upd = gen.apply({"params": params, "batch_stats": batch_stats}, z, train=True,
                          mutable=["batch_stats"])
  return images, upd["batch_stats"]


def images_loss(config, teacher_model, teacher_vars, images, targets, class_id, key,
                num_classes: int):
  """The loss of one generator's images; returns (loss, metrics of this member).

  'luo': inceptionism_loss towards class `class_id` (ALL_CLASSES: per-sample random or argmax
  targets) + w_mm * bn_moment_matching against `targets`. 'dafl': DAFL's generator terms
  (w_oh * L_oh + w_a * L_a + w_ie * L_ie with config.generator's weights, as
  dafl.generator_dafl_loss) + the same moment matching.
  """
  e = config.ensemble
  use_mm = e.w_mm > 0
  logits, feats, moments = common.teacher_forward(teacher_model, teacher_vars, images,
                                                  moments=use_mm)
  if e.loss == "luo":
    if e.single_target == "argmax":
      free = jnp.argmax(jax.lax.stop_gradient(logits), -1)
    else:
      free = jax.random.randint(jax.random.split(key)[1], logits.shape[:1], 0, num_classes)
    labels = jnp.where(class_id >= 0, class_id, free)
    loss = losses.inceptionism_loss(logits, labels, images, e.w_tv, e.w_l2)
    metrics = {"ce": losses.cross_entropy(logits, labels),
               "tv": losses.total_variation(images), "l2": losses.image_l2_prior(images)}
  else:
    g = config.generator
    metrics = {"l_oh": losses.onehot_loss(logits), "l_a": losses.activation_loss(feats),
               "l_ie": losses.information_entropy_loss(logits)}
    loss = g.w_oh * metrics["l_oh"] + g.w_a * metrics["l_a"] + g.w_ie * metrics["l_ie"]
    labels = jnp.where(class_id >= 0, class_id, jnp.argmax(logits, -1))
  if use_mm:
    mm = losses.bn_moment_matching(moments, targets, form=e.mm_form)
    loss = loss + e.w_mm * mm
    metrics["mm"] = mm
  metrics["agreement"] = losses.accuracy(logits, labels)
  return loss, metrics


def member_loss(config, gen, teacher_model, teacher_vars, params, batch_stats, targets,
                class_id, key, batch: int, num_classes: int):
  """The loss of one generator; returns (loss, (new batch_stats, metrics)). Pure."""
  images, new_bs = generate(gen, params, batch_stats, key, batch)
  loss, metrics = images_loss(config, teacher_model, teacher_vars, images, targets, class_id,
                              key, num_classes)
  return loss, (new_bs, metrics)


def build(config, teacher: dict, info, mesh: Optional[Mesh] = None) -> Ensemble:
  """The initial stacked state and the jitted ensemble step (used by train and tests)."""
  e = config.ensemble
  stats = teacher.get("bn_stats") or {}
  validate(config, teacher_has_bn=bool(stats))
  mesh = mesh if mesh is not None else parallel.make_mesh("gen")
  axis = mesh.axis_names[0]
  n_dev = mesh.devices.size
  g = num_generators(config, info.num_classes)
  padded = -(-g // n_dev) * n_dev
  class_ids = member_class_ids(g, padded, info.num_classes)
  lowering = resolve_lowering(e.lowering)
  at_once = int(e.max_generators_per_device_at_once)
  gen = make_generator(config, info)
  tx = common.make_optimizer(e, e.steps)
  tmodel, tvars = teacher["model"], teacher["variables"]
  nan_at = config.get("debug_nan_at_step", -1)
  batch = int(e.batch_per_generator)

  split = NamedSharding(mesh, P(axis))
  rep = NamedSharding(mesh, P())
  index = np.arange(padded, dtype=np.int32)
  params, batch_stats = jax.device_put(
      init_generators(gen, config.seed, jnp.asarray(index)), split)
  members = {"params": params, "batch_stats": batch_stats,
             "opt_state": jax.jit(jax.vmap(tx.init), out_shardings=split)(params)}
  state = dict(members, step=jax.device_put(jnp.zeros((), jnp.int32), rep))
  state_shardings = jax.tree.map(lambda _: split, members)
  state_shardings["step"] = rep
  consts = jax.jit(lambda s: {
      "targets": _stack_targets(s, class_ids), "class_ids": jnp.asarray(class_ids),
      "index": jnp.asarray(index), "real": jnp.asarray(index < g, jnp.float32)},
      out_shardings=split)(stats)
  member_spec = {"params": P(axis), "batch_stats": P(axis), "opt_state": P(axis), "step": P()}

  def update_member(step, tvars, xs):
    """One member's whole update (generator, teacher, loss, gradient, optimiser): 'unroll'."""
    m, t, c, k = xs

    def loss_fn(params):
      loss, aux = member_loss(config, gen, tmodel, tvars, params, m["batch_stats"], t, c, k,
                              batch, info.num_classes)
      return loop.poison(loss, step, nan_at), aux
    (loss, (new_bs, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(m["params"])
    updates, opt_state = tx.update(grads, m["opt_state"], m["params"])
    new = {"params": optax.apply_updates(m["params"], updates), "batch_stats": new_bs,
           "opt_state": opt_state}
    return new, dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))

  def update_chunk(step, tvars, xs):
    """Updates the stacked members `xs` of one chunk.

    'unroll' traces each member's whole update separately (update_member). 'vmap' vmaps the
    generators and the teacher half of the step: the teacher's kernels are shared, so XLA folds
    the member axis into the batch and no grouped convolution arises there. The loss of the
    chunk is the sum of the members' losses; member k's parameters reach only its own term, so
    the gradient of the sum is every member's own gradient.
    """
    members, targets, cids, idxs = xs
    keys = jax.vmap(lambda i: member_key(config.seed, step, i))(idxs)
    if lowering == "unroll":
      return map_members(functools.partial(update_member, step, tvars),
                         (members, targets, cids, keys), lowering)

    def total(params):
      images, new_bs = map_members(
          lambda a: generate(gen, a[0], a[1], a[2], batch),
          (params, members["batch_stats"], keys), lowering)
      per_loss, metrics = jax.vmap(
          lambda x, t, c, k: images_loss(config, tmodel, tvars, x, t, c, k, info.num_classes))(
              images, targets, cids, keys)
      per_loss = loop.poison(per_loss, step, nan_at)
      return jnp.sum(per_loss), (per_loss, new_bs, metrics)
    (_, (per_loss, new_bs, metrics)), grads = jax.value_and_grad(total, has_aux=True)(
        members["params"])
    updates, opt_state = jax.vmap(tx.update)(grads, members["opt_state"], members["params"])
    new = {"params": jax.vmap(optax.apply_updates)(members["params"], updates),
           "batch_stats": new_bs, "opt_state": opt_state}
    return new, dict(metrics, loss=per_loss, grad_norm=jax.vmap(optax.tree.norm)(grads))

  def local_update(state, consts, tvars):
    step = state["step"]
    members = {k: state[k] for k in ("params", "batch_stats", "opt_state")}
    xs = (members, consts["targets"], consts["class_ids"], consts["index"])
    n = consts["index"].shape[0]
    c = chunk_size(n, at_once)
    if c == n:
      new, metrics = update_chunk(step, tvars, xs)
    else:
      chunks = jax.tree.map(lambda x: x.reshape((n // c, c) + x.shape[1:]), xs)
      new, metrics = jax.lax.map(functools.partial(update_chunk, step, tvars), chunks)
      new, metrics = jax.tree.map(lambda y: y.reshape((n,) + y.shape[2:]), (new, metrics))
    return dict(new, step=step + 1), metrics

  # check_vma=False: the custom VJP of the CPU convolution (models/cpu_conv.py) returns a
  # per-member cotangent for the replicated teacher kernels, which the varying-manual-axes check
  # rejects; no collective is used inside, so the check guards nothing here.
  sharded_update = jax.shard_map(local_update, mesh=mesh,
                                 in_specs=(member_spec, P(axis), P()),
                                 out_specs=(member_spec, P(axis)), check_vma=False)

  def step_fn(state, consts, tvars):
    new, per_member = sharded_update(state, consts, tvars)
    real = consts["real"]
    metrics = {k: jnp.sum(v * real) / g for k, v in per_member.items()}
    return new, metrics

  step_jit = jax.jit(step_fn, out_shardings=(state_shardings, rep), donate_argnums=(0,))

  def local_sample(params, batch_stats, idx, n):
    def one(args):
      p, bs, i = args
      z = jax.random.normal(jax.random.fold_in(jax.random.key(SAMPLE_SEED), i),
                            (n, gen.latent_dim))
      return gen.apply({"params": p, "batch_stats": bs}, z, train=True,
                       mutable=["batch_stats"])[0]
    return map_members(one, (params, batch_stats, idx), lowering, at_once)

  def sample(state, n: int):
    fn = jax.shard_map(lambda p, bs, i: local_sample(p, bs, i, n), mesh=mesh,
                       in_specs=P(axis), out_specs=P(axis), check_vma=False)
    return fn(state["params"], state["batch_stats"], consts["index"])

  return Ensemble(gen=gen, num_generators=g, padded=padded, class_ids=class_ids,
                  num_classes=info.num_classes, mesh=mesh, lowering=lowering, state=state,
                  consts=consts, step=lambda s: step_jit(s, consts, tvars),
                  sample=sample, state_shardings=state_shardings, step_jit=step_jit,
                  teacher_vars=tvars)


def make_eval(ens: Ensemble, teacher: dict, batch: int, loss: str = "luo") -> Callable:
  """eval_fn(state): the teacher's view of one fixed batch per real generator.

  agreement (loss 'luo' only: DAFL's losses have no target class): fraction of the images of
  the per-class generators that the teacher assigns to their generator's class; class_entropy:
  entropy of the teacher's class histogram over all images of the real generators, divided by
  log(num_classes) (1 = perfectly balanced).
  """
  tmodel, tvars = teacher["model"], teacher["variables"]

  def preds(state):
    images = ens.sample(state, batch)
    flat = images.reshape((-1,) + images.shape[2:])
    return jnp.argmax(tmodel.apply(tvars, flat, train=False), -1).reshape(images.shape[:2])
  # Replicated output: every process can read it.
  preds = jax.jit(preds, out_shardings=parallel.replicated(ens.mesh))

  g = ens.num_generators
  ids = ens.class_ids[:g]
  with_agreement = (ids >= 0).any() and loss == "luo"

  def eval_fn(state):
    p = np.asarray(jax.device_get(preds(state)))[:g]
    out = {}
    if with_agreement:
      out["agreement"] = float(np.mean(p[ids >= 0] == ids[ids >= 0, None]))
    hist = np.bincount(p.reshape(-1), minlength=ens.num_classes) / p.size
    nz = hist[hist > 0]
    out["class_entropy"] = float(-np.sum(nz * np.log(nz)) / math.log(ens.num_classes))
    return out
  return eval_fn


def _grid_writer(config, workdir, writer, teacher, info, ens: Ensemble, batch: int):
  """on_eval callback: one row of samples per real generator, titled G0, G1, ..."""
  g = ens.num_generators
  per_gen = SAMPLES_PER_ROW if g > 1 else 4 * SAMPLES_PER_ROW
  n = max(batch, per_gen)

  def sample_fn(state):
    images = ens.sample(state, n)[:g, :per_gen]
    return images.reshape((-1,) + images.shape[2:])
  rows = per_gen // SAMPLES_PER_ROW
  titles = [f"G{k}" if r == 0 else "" for k in range(g) for r in range(rows)]
  return distill.make_sample_writer(config, workdir, writer, teacher, info, sample_fn,
                                    "generators", row_titles=titles)


def _meta(config, ens: Ensemble, teacher: dict, info) -> dict:
  return {"kind": "generator_ensemble", "num_generators": ens.num_generators,
          "padded": ens.padded, "num_classes": info.num_classes,
          "image_shape": list(info.image_shape), "latent_dim": ens.gen.latent_dim,
          "width": ens.gen.width, "num_upsample": ens.gen.num_upsample, "style": ens.gen.style,
          "class_ids": [int(c) for c in ens.class_ids[:ens.num_generators]],
          "loss": config.ensemble.loss, "teacher_model": teacher["meta"].get("model"),
          "dataset": info.name}


_RESUME_KEYS = ("num_generators", "padded", "image_shape", "latent_dim", "width", "num_upsample",
                "style", "class_ids")


def _check_resume(ckpt: ckpt_lib.StageCheckpoints, meta: dict, keys=_RESUME_KEYS):
  step = ckpt.latest_step()
  if step is None:
    return
  saved = ckpt.restore_meta(step)
  for key in keys:
    if key in saved and saved[key] != meta[key]:
      extra = (" (the padding depends on the device count: resume on a device count that "
               f"divides {saved['padded']}, or start a new workdir)" if key == "padded" else "")
      raise ckpt_lib.CheckpointError(
          f"the generator checkpoint in {ckpt.directory} has {key}={saved[key]!r} but this run "
          f"has {key}={meta[key]!r}{extra}; use another workdir or the same config")


def train_generators(config, workdir: str, teacher: dict, info, writer,
                     ens: Optional[Ensemble] = None) -> dict:
  """Trains (or resumes) the ensemble; returns {'result', 'directory', 'ensemble',
  'num_generators', 'members'}. A stage that finished earlier is not loaded: 'ensemble' and
  result.state are then None (the distillation stage loads the generators itself).

  `ens`: an Ensemble built by `build` from the same config and teacher, whose state has not
  been stepped (tests pass one to reuse its compiled step); None builds it.
  """
  e = config.ensemble
  ckpt = ckpt_lib.StageCheckpoints(directory(workdir))
  done = _finished(ckpt, config, info, e.steps)
  if done is not None:  # On any device count: the padding does not matter any more.
    ckpt.close()
    return done
  ens = ens if ens is not None else build(config, teacher, info)
  log.info(f"generators: {ens.num_generators} generators ({ens.padded} members over "
           f"{ens.mesh.devices.size} devices, lowering {ens.lowering})")
  meta = _meta(config, ens, teacher, info)
  _check_resume(ckpt, meta)
  g = ens.num_generators
  rep = parallel.replicated(ens.mesh)
  real_only = jax.jit(lambda s: jax.tree.map(lambda x: x[:g], {
      "params": s["params"], "batch_stats": s["batch_stats"]}), out_shardings=rep)
  result = loop.run(
      stage="generators", ckpt=ckpt, state=ens.state, step_fn=lambda s, _: ens.step(s),
      total_steps=e.steps, eval_fn=make_eval(ens, teacher, e.batch_per_generator, e.loss),
      eval_every=e.eval_every, checkpoint_every=config.checkpoint_every, writer=writer,
      meta=meta, final_extras=lambda s: {"generators": real_only(s)},
      log_every_secs=config.log_every_secs,
      on_eval=_grid_writer(config, workdir, writer, teacher, info, ens, e.batch_per_generator),
      stop_after_steps=config.get("debug_stop_after_steps", -1))
  ckpt.close()
  if result.step < e.steps:
    raise loop.Preempted("generators", result.step, directory(workdir))
  return {"result": result, "directory": directory(workdir), "ensemble": ens,
          "num_generators": ens.num_generators, "members": ens.padded}


def _finished(ckpt: ckpt_lib.StageCheckpoints, config, info, steps: int) -> Optional[dict]:
  """train_generators' answer for a stage that finished earlier (no state is built), or None."""
  step = ckpt.latest_step()
  if step is None:
    return None
  saved = ckpt.restore_meta(step)
  if not (saved.get("done") and step >= steps):
    return None
  gen = make_generator(config, info)
  g = num_generators(config, info.num_classes)
  expected = {"num_generators": g, "image_shape": list(info.image_shape),
              "latent_dim": gen.latent_dim, "width": gen.width,
              "num_upsample": gen.num_upsample, "style": gen.style,
              "class_ids": [int(c) for c in member_class_ids(g, g, info.num_classes)]}
  _check_resume(ckpt, expected, keys=tuple(expected))
  log.info(f"generators: finished earlier at step {step}; loaded from {ckpt.directory}")
  result = loop.LoopResult(None, step, {}, saved.get("eval", {}), step, 0.0)
  return {"result": result, "directory": ckpt.directory, "ensemble": None,
          "num_generators": saved["num_generators"], "members": saved["padded"]}


def resolve_checkpoint_dir(path: str) -> str:
  """A generators stage directory; a workdir holding generators/ is accepted too."""
  path = os.path.abspath(path)
  nested = os.path.join(path, "generators")
  if os.path.isdir(nested) and not any(n.isdigit() for n in os.listdir(path)):
    return nested
  return path


def _saved_shapes(d: str, step: int, name: str):
  """ShapeDtypeStructs of item `name` of checkpoint `step` in `d`, read from its own metadata.

  (StageCheckpoints.item_shapes asks the manager, which knows no handler for an item it has
  not restored yet in this process, and then answers None.)
  """
  try:
    meta = ocp.StandardCheckpointer().metadata(os.path.join(d, str(step), name))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
  except Exception as e:  # pylint: disable=broad-except
    raise ckpt_lib.CheckpointError(
        f"cannot read {name!r} of checkpoint {d}/{step} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''})") from e


def load_generators(path: str, info, mesh: Optional[Mesh] = None) -> dict:
  """The finished generators in `path`, replicated over `mesh`, checked against `info`.

  Works on any device count: the restore target is built from the checkpoint's own meta and
  item shapes. Returns {'gen', 'params', 'batch_stats' (stacked, leading axis G), 'meta',
  'directory'}.

  Raises:
    CheckpointError: no finished generator checkpoint in `path`, or one made for other images
      or another number of classes.
  """
  d = resolve_checkpoint_dir(path)
  hint = ("run the generators stage first (stage=generators or stage=all), or point "
          "generator_checkpoint at a generators directory")
  if not os.path.isdir(d):
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
                           num_upsample=meta["num_upsample"], style=meta["style"])
    g = int(meta["num_generators"])
    shapes = _saved_shapes(d, step, "generators")
    expected = jax.eval_shape(lambda: dafl.init_generator(gen, jax.random.key(0)))
    expected = {"params": expected[0], "batch_stats": expected[1]}
    same = jax.tree.structure(shapes) == jax.tree.structure(expected) and all(
        tuple(a.shape) == (g,) + tuple(b.shape)
        for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(expected)))
    if not same:
      raise ckpt_lib.CheckpointError(
          f"the generators in {d} do not match their meta ({g} generators {meta['style']!r}, "
          f"width {meta['width']}, latent {meta['latent_dim']}); the checkpoint is corrupt")
    mesh = mesh if mesh is not None else parallel.make_mesh("data")
    variables = ckpt.restore(step, "generators",
                             ckpt_lib.abstract_like(shapes, parallel.replicated(mesh)))
  finally:
    ckpt.close()
  return {"gen": gen, "params": variables["params"], "batch_stats": variables["batch_stats"],
          "meta": meta, "directory": d}


def make_images_fn(gens: dict, lowering: str) -> Callable:
  """images_fn(key, batch, variables): a class-balanced batch from the frozen generators.

  Each of the G generators draws n = ceil(batch / G) images (train-mode BN, updated statistics
  discarded); image j of generator k goes to position j * G + (k - r) mod G, r random when G
  does not divide the batch, and the first `batch` positions are kept.
  """
  gen = gens["gen"]
  g = int(gens["meta"]["num_generators"])

  def images_fn(key, batch, variables):
    n = -(-batch // g)

    def one(args):
      p, bs, k = args
      z = jax.random.normal(jax.random.fold_in(key, k), (n, gen.latent_dim))
      return gen.apply({"params": p, "batch_stats": bs}, z, train=True,
                       mutable=["batch_stats"])[0]
    images = map_members(one, (variables["params"], variables["batch_stats"],
                               jnp.arange(g)), lowering)
    if batch % g:
      images = jnp.roll(images, -jax.random.randint(jax.random.fold_in(key, g), (), 0, g), 0)
    images = jnp.swapaxes(images, 0, 1).reshape((n * g,) + images.shape[2:])
    return jax.lax.stop_gradient(images[:batch])
  return images_fn


def distill_from_generators(config, workdir: str, teacher: dict, data: dict, writer,
                            generator_dir: Optional[str] = None,
                            gens: Optional[dict] = None) -> dict:
  """Luo et al.'s second stage: the student distils on images of the frozen generators.

  `gens` (from load_generators) skips loading them again.
  """
  info = data["test"].info
  gdir = generator_dir or checkpoint_to_distill(config, workdir)
  mesh = parallel.make_mesh("data")
  if gens is None:
    gens = load_generators(gdir, info, mesh)
  if gens["meta"].get("teacher_model") != teacher["meta"].get("model"):
    log.warn(f"the generators in {gens['directory']} were trained against a "
             f"{gens['meta'].get('teacher_model')!r} teacher; distilling from a "
             f"{teacher['meta'].get('model')!r}")
  variables = parallel.put_replicated(
      {"params": gens["params"], "batch_stats": gens["batch_stats"]}, mesh)
  images_fn = make_images_fn(gens, resolve_lowering(config.ensemble.lowering))
  return distill.train(config, workdir, teacher, data, writer, "generators", images_fn=images_fn,
                       images_args=variables,
                       meta_extra={"generators": gens["directory"],
                                   "num_generators": gens["meta"]["num_generators"]})
