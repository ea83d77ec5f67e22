"""The image pool of the synthesis methods (DeepInversion, CMI, Fast-DFKD): synthesised images
kept as 8-bit pixels in a stage's checkpointed state, one batch per synthesis round, and what
reads it: the uniform draw of students.distill_step, runs of distillation steps on the pool so
far (distill_on_pool: the competing student's rounds, Fast-DFKD's student), DistillPool, a
students.Distill stage on a finished pool, and what the synthesis stages with a competing
student (DeepInversion, CMI) share: their targets, checks, competing student, initial state,
plan, dry-run programs and summary.

The pool is the state's 'pool' (rounds, batch_size, H, W, C) uint8, replicated; round r is
filled by step r of the synthesis stage (its 'step' counts the filled rounds).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import evaluation
from datafree_jax import log
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax import paths
from datafree_jax import stage as stage_lib
from datafree_jax import students

COMPETITOR_STEP_OFFSET = 1 << 30  # the competitor's KD steps are keyed past any Distill step
TARGETS = ("random", "balanced")  # a round's classes: random, or class i mod K for image i
GRID_IMAGES = 100                 # images of the latest round in a sample grid

# The config fields every synthesis stage with a competing student has (PoolSynthesis; its
# section's other fields are the stage's own).
ROUND_FIELDS = {
    "targets": ("random", config_lib.Choice(TARGETS)),
    "kd_steps": (400, config_lib.NON_NEGATIVE_INT),  # competing student's steps per round
    "eval_every": (10, config_lib.NON_NEGATIVE_INT),  # rounds
    # Rounds between checkpoints (a round is many steps' work); 0 = config.checkpoint_every.
    "checkpoint_every": (10, config_lib.NON_NEGATIVE_INT),
}


# --- Pixels: the pool's 8-bit form ------------------------------------------------------------

def pixel_range(info):
  """(low, high), (C,) float32 arrays: the normalised values of pixel values 0 and 1."""
  mean, std = np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)
  return (0.0 - mean) / std, (1.0 - mean) / std


def quantize_pixels(pixels):
  """Pixel values in [0, 1] (clipped) -> uint8 round(255 * p)."""
  return jnp.round(jnp.clip(pixels.astype(jnp.float32), 0.0, 1.0) * 255.0).astype(jnp.uint8)


def quantize(images, info):
  """Normalised float images -> uint8 pixels round(255 * clip(x * std + mean, 0, 1))."""
  mean, std = jnp.asarray(info.mean, jnp.float32), jnp.asarray(info.std, jnp.float32)
  return quantize_pixels(images.astype(jnp.float32) * std + mean)


def normalize(pixels, info):
  """Pixel values in [0, 1] -> the dataset's normalised images (p - mean) / std."""
  mean, std = jnp.asarray(info.mean, jnp.float32), jnp.asarray(info.std, jnp.float32)
  return (pixels.astype(jnp.float32) - mean) / std


def dequantize(pixels, info):
  """uint8 pixels -> normalised float32 images (u / 255 - mean) / std."""
  return normalize(pixels.astype(jnp.float32) / 255.0, info)


def empty(rounds: int, batch_size: int, info):
  """The pool before the first round: zeros (rounds, batch_size, H, W, C) uint8."""
  return jnp.zeros((rounds, batch_size) + tuple(info.image_shape), jnp.uint8)


def pool_images_fn(info):
  """images_fn(key, n, batch, source) of students.distill_step: n images drawn uniformly, with
  replacement, from the first source['filled'] rounds of source['pool'] (R, B, H, W, C)."""
  def images_fn(key, n, batch, source):  # pylint: disable=unused-argument
    pool = source["pool"]
    rounds, per_round = pool.shape[:2]
    flat = pool.reshape((rounds * per_round,) + pool.shape[2:])
    index = jax.random.randint(key, (n,), 0, jnp.maximum(source["filled"], 1) * per_round)
    return dequantize(flat[index], info)
  return images_fn


def latest_round(state, info, n: int):
  """The first n normalised images of the latest filled round of state['pool'] (sample
  grids)."""
  r = jnp.maximum(state["step"] - 1, 0)
  return dequantize(jax.lax.dynamic_index_in_dim(state["pool"], r, 0, keepdims=False)[:n], info)


# --- Distillation on the pool so far -----------------------------------------------------------

def pool_distill_iteration(distill, teacher_vars, source, i, carry):  # pylint: disable=unused-argument
  """One student step of distill_on_pool (the body of its lax.fori_loop): (state, metrics)."""
  return distill(carry[0], None, teacher_vars, source)


def distill_on_pool(kd_steps: int, distill, state, teacher_vars, first_step, filled):
  """kd_steps steps of students.distill_step (`distill`: its partial up to the state, with
  pool_images_fn as image source) for state['student'] on the first `filled` rounds of
  state['pool'] (a lax.fori_loop; one step is computed without a loop); the steps' rng is
  keyed by first_step, first_step + 1, ... Returns (state with the new student and its
  optimiser, {'loss_kd': the last step's})."""
  source = {"pool": state["pool"], "filled": filled}
  sub = {"student": state["student"], "student_opt": state["student_opt"], "step": first_step}
  if kd_steps == 1:
    sub, metrics = distill(sub, None, teacher_vars, source)
  else:
    shapes = jax.eval_shape(lambda s: distill(s, None, teacher_vars, source)[1], sub)
    sub, metrics = jax.lax.fori_loop(
        0, kd_steps, functools.partial(pool_distill_iteration, distill, teacher_vars, source),
        (sub, jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), shapes)))
  return (dict(state, student=sub["student"], student_opt=sub["student_opt"]),
          {"loss_kd": metrics["loss_kd"]})


def competitor_round(kd_steps: int, distill, state, teacher_vars):
  """kd_steps steps of students.distill_step (`distill`: its partial up to the state) for the
  competing student state['student'] on the rounds in the pool so far (state['step'] of
  them)."""
  first = (state["step"] - 1) * kd_steps + COMPETITOR_STEP_OFFSET
  return distill_on_pool(kd_steps, distill, state, teacher_vars, first, state["step"])


def teacher_has_bn(config, info) -> bool:
  """Whether config.teacher.model (for `info`'s images and classes) has BatchNorm layers."""
  shapes = jax.eval_shape(lambda: models.get_classifier(
      config.teacher.model, info.num_classes, config.teacher.width).init(
          jax.random.key(0), jnp.zeros((1,) + tuple(info.image_shape)), train=False))
  return bool(shapes.get("batch_stats"))


def check_teacher_bn(config, info, section: str, weight: str = "w_bn"):
  """ConfigError when config[section][weight] > 0 asks for BN statistics the teacher lacks."""
  w = config[section][weight]
  if w > 0 and not teacher_has_bn(config, info):
    raise config_lib.ConfigError(
        f"{section}.{weight}={w} asks for the BN feature-distribution regulariser, but "
        f"the teacher {config.teacher.model!r} has no BatchNorm layers; use a teacher with BN "
        f"(e.g. teacher.model='lenet5_bn') or set {section}.{weight}=0")


# --- A finished pool and the distillation from it ----------------------------------------------

def load_pool(path: str, info, mesh, stage: str, kind: str, label: str) -> tuple:
  """(pool, meta) of the finished checkpoint of synthesis stage `stage` at `path` (its directory,
  or a workdir holding it; its meta kind `kind`), the pool replicated on `mesh`. Raises CheckpointError when there is
  none, it is unfinished or made for other images; `label` names the method in the messages."""
  d = ckpt_lib.stage_directory(path, stage)
  hint = f"run the {stage} stage first (stage={stage} or stage=all)"
  if not paths.isdir(d):
    raise ckpt_lib.CheckpointError(f"no {label} image pool in {d}; {hint}")
  ckpt = ckpt_lib.StageCheckpoints(d, create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ckpt_lib.CheckpointError(f"no {label} image pool in {d}; {hint}")
    meta = ckpt.restore_meta(step)
    if meta.get("kind") != kind:
      raise ckpt_lib.CheckpointError(f"the checkpoint in {d} is not a {label} image pool")
    if not meta.get("done"):
      raise ckpt_lib.CheckpointError(
          f"the {label} image pool in {d} is unfinished (round {step} of "
          f"{meta.get('total_steps')}); run the {stage} stage again to finish it")
    if tuple(meta.get("image_shape", ())) != tuple(info.image_shape):
      raise ckpt_lib.CheckpointError(
          f"the {label} image pool in {d} holds {tuple(meta.get('image_shape', ()))} "
          f"images, but dataset {info.name!r} has {tuple(info.image_shape)} images")
    target = ckpt_lib.abstract_like(ckpt.item_shapes(step, "state"), parallel.replicated(mesh))
    pool = ckpt.restore(step, "state", target)["pool"]
  finally:
    ckpt.close()
  return pool, dict(meta, directory=d)


class DistillPool(students.Distill):
  """A fresh student distilled on the finished pool of synthesis stage `synthesis` (in
  <workdir>/<synthesis>, meta kind `kind`); config[section].rounds and .batch_size give the
  pool's shape. Checkpoints in <workdir>/distill_<synthesis>."""

  def __init__(self, synthesis: str, section: str, kind: str, label: str):
    super().__init__(synthesis)
    self.synthesis, self.section, self.kind, self.label = synthesis, section, kind, label

  def prepare(self, ctx, finished):
    if not finished and self.synthesis not in ctx.running:  # Load it before writing.
      self._pool(ctx)

  def _pool(self, ctx):
    key = self.kind
    if key not in ctx.outputs:
      mesh = parallel.make_mesh("data")
      done = ctx.outputs.get(self.synthesis)
      if done is not None and done.state is not None:
        ctx.outputs[key] = (done.state["pool"], dict(done.meta, directory=done.directory))
      else:
        ctx.outputs[key] = load_pool(paths.join(ctx.workdir, self.synthesis), ctx.info, mesh, self.synthesis,
                                     self.kind, self.label)
    return ctx.outputs[key]

  def source_images(self, ctx, mesh):
    pool, meta = self._pool(ctx)
    if meta.get("teacher_model") != ctx.config.teacher.model:
      log.warn(f"the image pool in {meta['directory']} was synthesised from a "
               f"{meta.get('teacher_model')!r} teacher; distilling from a "
               f"{ctx.config.teacher.model!r}")
    source = {"pool": pool, "filled": parallel.put_replicated(
        jnp.asarray(pool.shape[0], jnp.int32), mesh)}
    return pool_images_fn(ctx.info), None, source, {
        "pool": meta["directory"], "pool_images": int(pool.shape[0] * pool.shape[1])}

  def abstract_source(self, ctx, mesh):
    d, rep = ctx.config[self.section], parallel.replicated(mesh)
    source = {"pool": jax.ShapeDtypeStruct((d.rounds, d.batch_size) + tuple(ctx.info.image_shape),
                                           jnp.uint8, sharding=rep),
              "filled": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)}
    return pool_images_fn(ctx.info), None, source


# --- What the synthesis stages with a competing student share (DeepInversion, CMI) ----------

def round_targets(key, n: int, num_classes: int, kind: str):
  """The (n,) int32 classes of a round's images: `kind` 'balanced' gives image i class
  i mod num_classes, 'random' draws them uniformly with `key`."""
  if kind == "balanced":
    return jnp.arange(n, dtype=jnp.int32) % num_classes
  return jax.random.randint(key, (n,), 0, num_classes)


def check_synthesis(config, info, section: str, bn_weights=("w_bn",)):
  """The checks of a synthesis stage with a competing student (config[section]: batch_size,
  w_adv, kd_steps and the weights `bn_weights` of terms that read the teacher's BN layers):
  its batches and the student's divide over the devices, and those terms have a teacher with
  BN (ConfigError); a warning when the images compete with a student that never trains."""
  cfg = config[section]
  parallel.check_global_batch(cfg.batch_size)
  parallel.check_global_batch(config.student.batch_size)
  for weight in bn_weights:
    check_teacher_bn(config, info, section, weight)
  if cfg.w_adv > 0 and cfg.kd_steps == 0:
    log.warn(f"{section}.w_adv > 0 with kd_steps=0: the images compete with an untrained "
             "student")


def pool_distill_step(ctx, student, tx, split):
  """students.distill_step up to its state for `student` (optimiser tx, config.student's
  temperature, batch and augmentation) learning from ctx's teacher on images drawn from the
  pool (pool_images_fn), split over the devices by `split`."""
  config, info = ctx.config, ctx.info
  scfg = config.student
  return functools.partial(
      students.distill_step, student, tx, scfg.temperature, ctx.teacher["model"],
      pool_images_fn(info), split, config.seed, scfg.batch_size,
      students.augmentation(scfg, info))


def competing_student(ctx, cfg, mesh) -> tuple:
  """(student model, its optimiser, the jitted competitor_round or None when cfg.kd_steps is
  0) of a synthesis stage's competing student (cfg: its config section, with rounds and
  kd_steps); the optimiser's schedule runs over rounds x kd_steps steps."""
  tx = common.make_optimizer(ctx.config.student, cfg.rounds * cfg.kd_steps)
  student = students.make_student(ctx.config, ctx.info)
  compete = None
  if cfg.kd_steps:
    rep = parallel.replicated(mesh)
    distill = pool_distill_step(ctx, student, tx, parallel.split_leading(mesh))
    compete = jax.jit(functools.partial(competitor_round, cfg.kd_steps, distill),
                      out_shardings=(rep, rep), donate_argnums=(0,))
  return student, tx, compete


def initial_state(ctx, cfg, tx, key) -> dict:
  """The state a synthesis stage with a competing student starts from (cfg: its config
  section): an empty pool, the student initialised from `key` with its optimiser state, step
  0. A stage adds its own parts."""
  _, svars, sopt = students.init_student(ctx.config, ctx.info, tx, key)
  return {"pool": empty(cfg.rounds, cfg.batch_size, ctx.info), "student": svars,
          "student_opt": sopt, "step": jnp.zeros((), jnp.int32)}


def synthesis_step(synth, compete, teacher_vars, state, batch):  # pylint: disable=unused-argument
  """One loop step of a synthesis stage: a synthesis round, then the competing student's steps
  when there is one; (state, the round's metrics with the student's)."""
  state, metrics = synth(state, teacher_vars)
  if compete is not None:
    state, kd = compete(state, teacher_vars)
    metrics = dict(metrics, **kd)
  return state, metrics


class PoolSynthesis(stage_lib.Stage):
  """A synthesis stage with a competing student (DeepInversion, CMI), settings config[section]
  (rounds, batch_size, iterations, kd_steps, eval_every, checkpoint_every, w_bn, w_adv): one
  loop step is one synthesis round, synth(state, teacher_vars), then the competing student's
  kd_steps (when there are any). The state holds the pool 'pool' (rounds, batch_size, H, W, C)
  uint8, replicated, round r filled by step r, and the competing student ('student',
  'student_opt'), evaluated as the stage's evaluation; sample grids show the latest round.

  A subclass sets name, selector, section and kind (its checkpoints' meta kind) and builds the
  stage: _build(ctx, abstract) -> (initial state, or its ShapeDtypeStructs when abstract,
  student model, synthesis jit, competitor jit or None, mesh)."""
  section = ""
  kind = ""
  round_unit = "iterations"   # what a round's iterations are, for the dry run's label

  def _build(self, ctx, abstract: bool = False):
    raise NotImplementedError

  def check(self, config, info):
    check_synthesis(config, info, self.section)

  def steps(self, config):
    return config[self.section].rounds

  def identity(self, ctx):
    cfg = ctx.config[self.section]
    return dict(students.student_identity(ctx), rounds=cfg.rounds, batch_size=cfg.batch_size)

  def plan(self, ctx):
    cfg, info = ctx.config[self.section], ctx.info
    state, student, synth, compete, mesh = self._build(ctx)
    step = functools.partial(synthesis_step, synth, compete, ctx.teacher["variables"])
    n = min(cfg.batch_size, GRID_IMAGES)
    return stage_lib.Plan(
        state=state, step=step,
        evaluate=evaluation.make_classifier_eval(student, lambda s: s["student"], ctx.data,
                                                 mesh),
        eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every or None,
        on_eval=students.make_sample_writer(ctx, lambda s: latest_round(s, info, n), self.name),
        meta={"kind": self.kind, "dataset": info.name, "method": ctx.config.method})

  def programs(self, ctx):
    """The dry run's programs: a synthesis round, the competing student's steps (when there
    are any), its evaluation and the restore."""
    cfg, tvars = ctx.config[self.section], ctx.teacher["variables"]
    state, student, synth, compete, mesh = self._build(ctx, abstract=True)
    out = [stage_lib.Program(
        f"synthesis round: {cfg.iterations} {self.round_unit} on {cfg.batch_size} images", synth,
        (state,), {"teacher_vars": tvars}, state=state, trips=cfg.iterations, steps=cfg.rounds)]
    if compete is not None:
      out.append(stage_lib.Program(
          f"competing student: {cfg.kd_steps} steps of batch {ctx.config.student.batch_size}",
          compete, (state,), {"teacher_vars": tvars}, state=state, trips=cfg.kd_steps,
          steps=cfg.rounds))
    s = state["student"]
    out.append(stage_lib.classifier_eval_program(
        "competing student", student, common.variables_of(s["params"], s["batch_stats"]),
        ctx.info, mesh))
    out.append(stage_lib.restore_program(self.name, state))
    return out

  def summarize(self, ctx, done):
    """Its summary entry: rounds, images, evaluation, checkpoint."""
    return {self.name: {"rounds": done.step,
                        "images": done.step * ctx.config[self.section].batch_size,
                        "eval": done.eval, "checkpoint": done.directory}}
