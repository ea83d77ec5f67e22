"""Stage 'teacher': supervised training of the teacher, evaluation, checkpoint and BN statistics.

Checkpoints go to <workdir>/teacher/. The final checkpoint also holds the items 'teacher' (the
model variables that later stages load) and 'bn_stats' (see bn_stats.py). This stage reads the
training split; the data-free stages after it do not.

With `teacher.init_from=PATH` the teacher is not trained (0 steps): it is read from a teacher
checkpoint of this project (a teacher stage directory or a workdir holding one), a PyTorch
state_dict (.pt/.pth/.bin, .safetensors), a Flax msgpack file or an orbax PyTree checkpoint
(teacher_import.py has the formats and names), then evaluated, and its BN statistics are
computed on the training split. A dataset without a training split (one registered with test
arrays only) then gets the imported running averages as its only, global, BN statistics.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from datafree_jax import batching
from datafree_jax import bn_stats as bn_stats_lib
from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import datasets
from datafree_jax import evaluation
from datafree_jax import input_pipeline
from datafree_jax import log
from datafree_jax import losses
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax import paths
from datafree_jax import platforms
from datafree_jax import stage as stage_lib
from datafree_jax import students
from datafree_jax import teacher_import
from datafree_jax.errors import TeacherError

STAGE_SALT = 1


def directory(workdir: str) -> str:
  return paths.join(workdir, "teacher")


def supervised_loss(model, params, batch_stats, images, labels):
  """Cross-entropy of the model in training mode: (loss, (logits, new batch_stats))."""
  logits, upd = model.apply(common.variables_of(params, batch_stats), images, train=True,
                            mutable=["batch_stats"])
  return losses.cross_entropy(logits, labels), (logits, upd.get("batch_stats", {}))


def train_step(model, tx, aug: dict, seed: int, info, state, batch):
  """One supervised step on cross-entropy, images randomly shifted (and flipped). uint8
  images (streamed datasets) are normalised here, on the device, with info's mean/std."""
  images, labels = batch
  images = input_pipeline.normalize_images(images, info)
  key = common.step_key(seed, STAGE_SALT, state["step"])
  images = students.random_shift(key, images, **aug)
  (loss, (logits, new_bs)), grads = jax.value_and_grad(supervised_loss, argnums=1, has_aux=True)(
      model, state["params"], state["batch_stats"], images, labels)
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  new = {"params": optax.apply_updates(state["params"], updates), "batch_stats": new_bs,
         "opt_state": opt_state, "step": state["step"] + 1}
  return new, {"loss": loss, "accuracy": losses.accuracy(logits, labels),
               "grad_norm": optax.tree.norm(grads)}


class Teacher(stage_lib.Stage):
  """Trains the teacher; once finished, publishes the frozen teacher as ctx.teacher
  ({'model', 'variables', 'bn_stats', 'meta'})."""
  name = "teacher"
  selector = "teacher"

  def check(self, config, info):
    parallel.check_global_batch(config.teacher.batch_size)

  def finished(self, config, step, meta):
    """A finished teacher is used as it is, whatever teacher.steps says now: one teacher is
    trained once and then serves many runs."""
    return bool(meta.get("done"))

  def steps(self, config):
    return 0 if config.teacher.init_from else config.teacher.steps

  def identity(self, ctx):
    return {"model": ctx.config.teacher.model, "num_classes": ctx.info.num_classes,
            "image_shape": list(ctx.info.image_shape)}

  def check_checkpoint(self, ctx, saved, d):
    _check_meta(saved, ctx.config.teacher, ctx.info, d)

  def prepare(self, ctx, finished):
    if finished:
      ctx.teacher = load(ctx.config, ctx.workdir, ctx.info)  # Its arrays are known intact.
      return
    _train_split(ctx)
    if ctx.config.teacher.init_from:
      ctx.outputs["teacher_init"] = load_variables(ctx.config, ctx.info)

  def plan(self, ctx):
    config, info = ctx.config, ctx.info
    cfg = config.teacher
    mesh = parallel.make_mesh("data")
    model, tx, step_jit = _build(config, info, mesh)
    if cfg.init_from:
      start = ctx.outputs.pop("teacher_init", None) or load_variables(config, info)
      params, batch_stats = start["params"], start["batch_stats"]
      log.info(f"teacher: starting from {cfg.init_from} (no training; evaluation and BN "
               "statistics)")
    else:
      params, batch_stats = common.init_model(model, jax.random.key(config.seed),
                                              info.image_shape)
    state = parallel.put_replicated(
        {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params),
         "step": jnp.zeros((), jnp.int32)}, mesh)
    train = _train_split(ctx)
    local = None if train is None else train.train_batches(
        parallel.check_global_batch(cfg.batch_size), config.seed)

    def final_items(state):
      if train is None:  # no data: the teacher's running averages (global statistics only)
        stats = {"global": state["batch_stats"]} if state["batch_stats"] else {}
        if stats:
          log.info(f"teacher: dataset {info.name!r} has no training split; its BN statistics "
                   "are the teacher's running averages (global, no class-conditional ones)")
      else:
        stats = class_statistics(model, state["params"], state["batch_stats"], train,
                                 cfg.bn_stats_per_class, info.num_classes, mesh, config.seed)
      items = {"teacher": {"params": state["params"], "batch_stats": state["batch_stats"]}}
      if stats:  # the same values on every process: replicated over the mesh, as saved
        items["bn_stats"] = parallel.replicate_host(stats, mesh)
      return items

    return stage_lib.Plan(
        state=state, step=step_jit,
        batches=None if local is None else parallel.PrefetchedBatches(local, mesh),
        evaluate=evaluation.make_classifier_eval(model, lambda s: s, ctx.data, mesh),
        eval_every=cfg.eval_every, meta={"dataset": info.name}, final_items=final_items)

  def programs(self, ctx):
    """The training step from abstract state and batch; publishes the abstract frozen teacher
    (variables and BN statistics as ShapeDtypeStructs) as ctx.teacher."""
    config, info = ctx.config, ctx.info
    cfg = config.teacher
    mesh = parallel.make_mesh("data")
    model, tx, step_jit = _build(config, info, mesh)
    rep, split = parallel.replicated(mesh), parallel.split_leading(mesh)
    params, batch_stats = jax.eval_shape(
        lambda: common.init_model(model, jax.random.key(0), info.image_shape))
    state = ckpt_lib.abstract_like({"params": params, "batch_stats": batch_stats,
                                    "opt_state": jax.eval_shape(tx.init, params),
                                    "step": jax.ShapeDtypeStruct((), jnp.int32)}, rep)
    b = cfg.batch_size
    batch = stage_lib.abstract_batch(b, info.image_shape, split,
                                     input_pipeline.train_image_dtype(info))
    stats = {}
    if batch_stats:
      k = info.num_classes
      stats = {"global": batch_stats,
               "class": jax.tree.map(lambda x: jax.ShapeDtypeStruct((k,) + x.shape, x.dtype),
                                     batch_stats),
               "class_counts": jax.ShapeDtypeStruct((k,), jnp.int32)}
    variables = common.variables_of(params, batch_stats)
    abstract_vars = ckpt_lib.abstract_like(variables, rep)
    ctx.teacher = stage_lib.abstract_teacher(model, abstract_vars,
                                             ckpt_lib.abstract_like(stats, rep), cfg.model)
    evaluation = stage_lib.classifier_eval_program("teacher", model, abstract_vars, info, mesh)
    return [stage_lib.Program(f"train step, batch {b}", step_jit, (state, batch), state=state,
                              steps=cfg.steps),
            evaluation,
            stage_lib.restore_program(
                "teacher", state, final_items=dict(
                    {"teacher": abstract_vars},
                    **({"bn_stats": ctx.teacher["bn_stats"]} if stats else {})))]

  def load(self, ctx) -> dict:
    """The frozen teacher of the finished teacher stage in ctx.workdir (or config.teacher's
    import), for a run that starts after it."""
    return load(ctx.config, ctx.workdir, ctx.info)

  def summarize(self, ctx, done):
    if ctx.teacher is None:
      ctx.teacher = load(ctx.config, ctx.workdir, ctx.info)
    return {"teacher": {"model": ctx.config.teacher.model,
                        "test_accuracy": done.eval.get("accuracy"),
                        "checkpoint": done.directory}}


STAGE = Teacher()


def _build(config, info, mesh):
  """(model, optimiser, jitted train step) of the teacher stage."""
  cfg = config.teacher
  model = models.get_classifier(cfg.model, info.num_classes, cfg.width,
                                 common.compute_dtype(config), platforms.of_config(config))
  tx = common.make_optimizer(cfg, cfg.steps)
  rep = parallel.replicated(mesh)
  step_jit = jax.jit(functools.partial(train_step, model, tx, students.augmentation(cfg, info),
                                       config.seed, info),
                     out_shardings=(rep, rep), donate_argnums=(0,))
  return model, tx, step_jit


def class_statistics(model, params, batch_stats, train, per_class: int, num_classes: int, mesh,
                     seed: int) -> dict:
  """The teacher's class-conditional BN statistics (bn_stats.py) from `per_class` training
  examples of each class, all processes together.

  One process with the split in memory: bn_stats.compute on class_examples. With P processes
  each takes its share, ceil(per_class / P) examples of each class from its own shard (fewer
  where its shard has fewer), and the per-class sums are reduced over devices and processes
  (bn_stats.compute_streaming): from class_examples of its in-memory shard, or from one pass
  over its shard of a streamed split (streaming.class_batches, which reads it in stored order).
  So the statistics use about per_class examples of each class whatever the process count.
  """
  if isinstance(train, input_pipeline.Dataset) and jax.process_count() == 1:
    return bn_stats_lib.compute(model, params, batch_stats,
                                input_pipeline.class_examples(train, per_class, seed))
  per_process = -(-per_class // jax.process_count())
  if isinstance(train, input_pipeline.Dataset):
    images = input_pipeline.class_examples(train, per_process, seed)
    labels = np.concatenate([np.full(len(x), k, np.int32) for k, x in enumerate(images)])
    batches = batching.masked_batches(np.concatenate(images), labels,
                                      evaluation.eval_local_batch())
  else:  # streamed: per-class running sums over one pass of this process's shard
    batches = train.class_batches(evaluation.eval_local_batch(), per_process)
  return bn_stats_lib.compute_streaming(model, params, batch_stats, batches, num_classes, mesh)


def _train_split(ctx):
  """The training split; None for an imported teacher (teacher.init_from) of a dataset that
  has none (registered with test arrays only), whose BN statistics are then its running
  averages."""
  try:
    return ctx.data["train"]
  except datasets.UnknownDatasetError:
    if not ctx.config.teacher.init_from:
      raise
    return None


def _check_meta(meta: dict, cfg, info, d: str):
  if meta.get("model") != cfg.model:
    raise TeacherError(f"the teacher in {d} is a {meta.get('model')!r} but the config says "
                       f"teacher.model={cfg.model!r}")
  if info is not None:
    if meta.get("num_classes") != info.num_classes or tuple(meta.get("image_shape", ())) != tuple(
        info.image_shape):
      raise TeacherError(
          f"the teacher in {d} was made for {meta.get('num_classes')} classes of "
          f"{tuple(meta.get('image_shape', ()))} images, but dataset {info.name!r} has "
          f"{info.num_classes} classes of {tuple(info.image_shape)} images")


def load_variables(config, info) -> dict:
  """{'params', 'batch_stats'} of the teacher in config.teacher.init_from, in
  config.teacher.model's shapes. The path is a teacher checkpoint of this project (a teacher
  stage directory or a workdir holding one: its latest checkpoint's 'teacher' item), a PyTorch
  state_dict file (.pt/.pth/.bin, .safetensors), a Flax msgpack file (.msgpack) or another
  orbax PyTree checkpoint directory (teacher_import.py). Raises TeacherError when there is
  none or it does not fit the model (CheckpointError for this project's checkpoints)."""
  cfg = config.teacher
  path = epath.Path(cfg.init_from)
  model = models.get_classifier(cfg.model, info.num_classes, cfg.width)
  params, batch_stats = jax.eval_shape(
      lambda: common.init_model(model, jax.random.key(0), info.image_shape))
  target = {"params": params, "batch_stats": batch_stats}
  where = (f"teacher.init_from={cfg.init_from!r} (teacher.model={cfg.model!r}, "
           f"{info.num_classes} classes)")
  if not path.exists():
    raise TeacherError(f"teacher.init_from={cfg.init_from!r}: no such directory or file")
  if path.is_dir():
    d = _project_teacher_directory(path)
    if d is not None:
      return _restore_project_teacher(d, target, cfg.init_from)
  try:
    if path.is_dir():
      return teacher_import.read_flax(path, target)
    suffix = path.suffix.lower()
    if suffix in teacher_import.STATE_DICT_SUFFIXES:
      return teacher_import.to_flax(cfg.model, teacher_import.read_state_dict(path), target)
    if suffix == teacher_import.MSGPACK_SUFFIX:
      return teacher_import.read_flax(path, target)
  except TeacherError as e:
    raise TeacherError(f"{where}: {e}") from e
  raise TeacherError(
      f"{where}: a file must be a PyTorch state_dict "
      f"({', '.join(teacher_import.STATE_DICT_SUFFIXES)}) or a Flax msgpack file "
      f"({teacher_import.MSGPACK_SUFFIX}); got {suffix or 'no suffix'!r}")


def _project_teacher_directory(path: epath.Path):
  """The teacher stage directory of this project at `path` (itself, or `path`/teacher of a
  workdir) when it holds a step with a 'teacher' item, or is a workdir's teacher/ without any
  step yet; else None (then `path` is read as another project's orbax checkpoint)."""
  d = epath.Path(ckpt_lib.stage_directory(os.fspath(path), "teacher"))
  steps = [c for c in d.iterdir() if c.name.isdigit() and c.is_dir()]
  if any((s / "teacher").is_dir() for s in steps):
    return d
  nested = d != epath.Path(paths.resolve(os.fspath(path)))
  if nested and not steps:  # a workdir whose teacher has no checkpoint yet
    return d
  return None


def _restore_project_teacher(d: epath.Path, target: dict, init_from: str) -> dict:
  ckpt = ckpt_lib.StageCheckpoints(os.fspath(d), create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise TeacherError(f"teacher.init_from={init_from!r}: no checkpoint in {d}")
    rep = parallel.replicated(parallel.make_mesh("data"))
    return ckpt.restore(step, "teacher", ckpt_lib.abstract_like(target, rep))
  finally:
    ckpt.close()


def load(config, workdir: str, info=None) -> dict:
  """The finished teacher of `workdir`, checked against the config and dataset."""
  cfg = config.teacher
  d = directory(workdir)
  if not paths.isdir(d):
    raise TeacherError(f"no teacher checkpoint in {d}; run the teacher stage first "
                       f"(--config=...:stage=teacher or stage=all)")
  ckpt = ckpt_lib.StageCheckpoints(d, create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise TeacherError(f"no teacher checkpoint in {d}; run the teacher stage first")
    meta = ckpt.restore_meta(step)
    if not meta.get("done"):
      raise TeacherError(f"the teacher in {d} is unfinished (step {step} of "
                         f"{meta.get('total_steps')}); run the teacher stage again to finish it")
    _check_meta(meta, cfg, info, d)
    model = models.get_classifier(cfg.model, meta["num_classes"], cfg.width,
                                  common.compute_dtype(config), platforms.of_config(config))
    rep = parallel.replicated(parallel.make_mesh("data"))
    params, batch_stats = jax.eval_shape(
        lambda: common.init_model(model, jax.random.key(0), meta["image_shape"]))
    variables = ckpt.restore(step, "teacher", ckpt_lib.abstract_like(
        {"params": params, "batch_stats": batch_stats}, rep))
    stats = {}
    if variables["batch_stats"]:
      stats = ckpt.restore(step, "bn_stats",
                           ckpt_lib.abstract_like(ckpt.item_shapes(step, "bn_stats"), rep))
  finally:
    ckpt.close()
  return {"model": model, "variables": common.variables_of(variables["params"],
                                                            variables["batch_stats"]),
          "bn_stats": stats, "meta": meta}


def train(config, workdir: str, data, writer=None) -> dict:
  """Runs the teacher stage alone (resumes or loads it); returns the frozen teacher."""
  ctx = stage_lib.Context(config=config, workdir=workdir, data=data, info=data["test"].info,
                          writer=writer)
  stage_lib.run(STAGE, ctx)
  return ctx.teacher
