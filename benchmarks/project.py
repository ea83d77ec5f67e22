"""This project's side of the benchmarks: the one module that imports the datafree_jax package.

Configs, datasets, random teachers, the DAFL and ensemble stages' builders and the pieces of
their steps, training runs and the accuracy plot, as the benchmarks use them. The other
benchmark modules reach the package only through these functions (and the objects they
return).
"""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import REPO
from datafree_jax import checkpoints
from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import datasets
from datafree_jax import dry_run
from datafree_jax import evaluation
from datafree_jax import generator_parts
from datafree_jax import input_pipeline
from datafree_jax import models
from datafree_jax import paths
from datafree_jax import pipeline
from datafree_jax import plots
from datafree_jax import registry
from datafree_jax import streaming
from datafree_jax import students
from datafree_jax import synthetic_imagenet
from datafree_jax import tfds_pipeline
from datafree_jax.ensemble import members as members_lib
from datafree_jax.ensemble import objective
from datafree_jax.stages import dafl
from datafree_jax.stages import ensemble
from datafree_jax.stages import teacher as teacher_stage


# ---------------------------------------------------------------------------------------------
# Configs, datasets, teachers.
# ---------------------------------------------------------------------------------------------

def load_config(name: str, arg: str = "", overrides=()):
  """configs/<name>.py with its argument `arg` ('k=v,...'), then apply_overrides(overrides)."""
  c = config_lib.load_config_file(os.path.join(REPO, "configs", f"{name}.py"), arg)
  return apply_overrides(c, overrides)


def apply_overrides(c, overrides):
  """`c` with `overrides` applied: 'a.b=value' strings, each value converted to the type of
  the value it replaces."""
  for item in overrides:
    key, value = item.split("=", 1)
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = config_lib.from_text(value, node[leaf])
  return c


def mnist5k_run_config(arg: str, overrides=()):
  """configs/mnist5k.py for a benchmark's training runs (progress logged once a minute), then
  `overrides`."""
  c = load_config("mnist5k", arg)
  c.log_every_secs = 60.0
  return apply_overrides(c, overrides)


def dataset_info(name: str):
  return datasets.dataset_info(name)


def load_dataset(name: str, split: str):
  return input_pipeline.load_dataset(name, split)


def random_teacher(model_name: str, info, seed: int = 0, width: int = 0,
                   class_stats: bool = False) -> dict:
  """A random teacher in the dict form the stages take, drawn with numpy on the Flax model's
  shapes (nothing compiled): kernels ~ N(0, 1/fan_in), biases, BN offsets and running means ~
  N(0, 0.1^2), BN scales ~ U(0.8, 1.2), running variances ~ U(0.5, 2). class_stats: also
  random per-class BN statistics ('bn_stats', the moment-matching targets).

  The cost of a step does not depend on what a teacher learned, and a teacher with every
  parameter and BN statistic drawn at random exercises the whole weight mapping of a comparison
  with PyTorch."""
  model = models.get_classifier(model_name, info.num_classes, width)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((2,) + tuple(info.image_shape), jnp.float32), train=False))
  rng = np.random.default_rng(seed)

  def draw(path, leaf, lead=()):
    name, shape = path[-1].key, tuple(lead) + tuple(leaf.shape)
    if name == "kernel":
      x = rng.normal(0.0, 1.0 / np.sqrt(np.prod(leaf.shape[:-1])), shape)
    elif name == "scale":
      x = rng.uniform(0.8, 1.2, shape)
    elif name == "var":
      x = rng.uniform(0.5, 2.0, shape)
    else:
      x = rng.normal(0.0, 0.1, shape)
    return jnp.asarray(x, jnp.float32)

  params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
  batch_stats = jax.tree_util.tree_map_with_path(draw, shapes.get("batch_stats", {}))
  stats = {}
  if class_stats and batch_stats:
    k = info.num_classes
    stats = {"global": batch_stats,
             "class": jax.tree_util.tree_map_with_path(
                 lambda p, x: draw(p, x, (k,)), shapes["batch_stats"]),
             "class_counts": jnp.full((k,), 100, jnp.int32)}
  return {"model": model, "variables": common.variables_of(params, batch_stats),
          "bn_stats": stats, "meta": {"model": model_name}}


def mnist5k_teacher(workdir: str, seed: int, model: str = "lenet5", overrides=()):
  """(run summary, teacher workdir) of the mnist5k teacher of `seed`: trained into
  <workdir>/seed<seed>/teacher_only, or reused from there (as mnist5k_table leaves it)."""
  teacher_dir = os.path.join(workdir, f"seed{seed}", "teacher_only")
  config = mnist5k_run_config(f"method=teacher,seed={seed},teacher={model}", overrides)
  return train_and_evaluate(config, teacher_dir), teacher_dir


def train_and_evaluate(config, workdir: str) -> dict:
  """A whole run of the package (its stages, reusing finished ones in `workdir`): its summary."""
  return pipeline.train_and_evaluate(config, workdir)


def load_teacher(config, workdir: str, info) -> dict:
  """The finished teacher stage of `workdir`."""
  return teacher_stage.load(config, workdir, info)


# ---------------------------------------------------------------------------------------------
# DAFL.
# ---------------------------------------------------------------------------------------------

def build_dafl(config, teacher: dict, info):
  """The DAFL stage: (initial state, jitted step(state, None) -> (state, metrics), student
  model, generator model, mesh). The step donates its input state."""
  return dafl.build(config, teacher, info)


def dafl_latents(config, step: int):
  """The latents the DAFL step draws at `step` (0-based), in the default float dtype."""
  key = common.step_key(config.seed, dafl.STAGE_SALT, step)
  return jax.random.normal(key, (config.student.batch_size, config.generator.latent_dim))


def dafl_pieces_fn(config, teacher_model, gen, student):
  """A jitted fn(teacher_vars, gen params, gen batch_stats, student params, student
  batch_stats, z, student_images=None) -> one DAFL step's quantities from the stage's building
  blocks, nothing updated: images, teacher logits and features, terms (l_oh, l_a, l_ie, loss_g,
  loss_kd), g_grads, s_grads, the new gen_bs and student_bs. The student distils on the
  generated images, or on `student_images` when given (the teacher's logits of those)."""
  gcfg, scfg = config.generator, config.student

  def pieces(teacher_vars, gp, gbs, sp, sbs, z, student_images=None):
    (loss_g, (images, logits, new_gbs, terms)), g_grads = jax.value_and_grad(
        dafl.generator_dafl_loss, argnums=4, has_aux=True)(
            gen, teacher_model, teacher_vars, gcfg, gp, gbs, z)
    _, feats, _ = generator_parts.teacher_forward(teacher_model, teacher_vars, images)
    kd_images, kd_logits = images, logits
    if student_images is not None:
      kd_images = student_images
      kd_logits = generator_parts.teacher_forward(teacher_model, teacher_vars, student_images)[0]
    (kd, new_sbs), s_grads = jax.value_and_grad(students.student_kd_loss, argnums=1,
                                                has_aux=True)(
        student, sp, sbs, jax.lax.stop_gradient(kd_images), jax.lax.stop_gradient(kd_logits),
        scfg.temperature)
    return {"images": images, "logits": logits, "features": feats,
            "terms": dict(terms, loss_g=loss_g, loss_kd=kd), "g_grads": g_grads,
            "s_grads": s_grads, "gen_bs": new_gbs, "student_bs": new_sbs}
  return jax.jit(pieces)


def generate_fn(gen):
  """A jitted fn(params, batch_stats, z) -> the generator's images (training-mode BN)."""
  return jax.jit(lambda p, bs, z: generator_parts.generate(gen, p, bs, z)[0])


def student_accuracy_fn(student, test, mesh):
  """fn(DAFL state) -> the student's test accuracy on the split `test`."""
  evaluate = evaluation.make_classifier_eval(student, lambda s: s["student"], {"test": test}, mesh)
  return lambda state: float(evaluate(state)["accuracy"])


# ---------------------------------------------------------------------------------------------
# The generator ensemble.
# ---------------------------------------------------------------------------------------------

def build_ensemble(config, teacher: dict, info):
  """The ensemble stage's build on one device: .state, .step(state, None), .consts,
  .class_ids, .lowering, .num_generators."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("gen",))
  return ensemble.build(config, teacher, info, mesh)


def ensemble_member0(ens) -> dict:
  """Member 0's params and batch_stats of the ensemble's state, on the host."""
  return jax.device_get({k: jax.tree.map(lambda x: x[0], ens.state[k])
                         for k in ("params", "batch_stats")})


def ensemble_member0_loss(config, info, teacher: dict, ens):
  """(member 0's loss at step 0, at full float32 matmul precision, from the ensemble's initial
  state; its latents as a numpy array)."""
  spec = objective.member_spec(config, info, teacher["model"])
  key = objective.member_key(config.seed, 0, 0)
  z = jax.random.normal(jax.random.split(key)[0], (spec.batch, spec.gen.latent_dim))
  member = ensemble_member0(ens)
  pick = lambda t: jax.tree.map(lambda x: x[0], t)
  loss_fn = jax.jit(lambda p, bs, t, c, k, tv: objective.member_loss(spec, p, bs, t, c, k, tv)[0])
  with jax.default_matmul_precision("highest"):
    loss = float(loss_fn(member["params"], member["batch_stats"], pick(ens.consts["targets"]),
                         ens.consts["class_id"][0], key, teacher["variables"]))
  return loss, np.array(z)


def ensemble_unrolled_step(config, info, teacher: dict, ens):
  """step(state, None) of `ens` as one jit tracing every member's update in a Python loop (the
  CPU default before the 'loop' lowering)."""
  spec = objective.member_spec(config, info, teacher["model"])

  def step_fn(state, consts, tvars):
    members = {k: state[k] for k in ensemble.MEMBER_KEYS}
    cs = {k: consts[k] for k in ("targets", "class_id", "index")}
    new, per_member = members_lib.map_members(
        functools.partial(objective.member_update, spec), (members, cs), "loop",
        shared=(tvars, state["step"]))
    g = ens.num_generators
    metrics = {k: jnp.sum(v * consts["real"]) / g for k, v in per_member.items()}
    return dict(new, step=state["step"] + 1), metrics
  step_jit = jax.jit(step_fn, donate_argnums=(0,))
  return lambda state, _: step_jit(state, ens.consts, teacher["variables"])


# ---------------------------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------------------------

def accuracy_curves(run_dir: str) -> dict:
  """{stage: [(step, test accuracy)]} of a run's TensorBoard scalars."""
  return plots.accuracy_curves(plots.read_workdir_scalars(run_dir))


def teacher_stage(method: str) -> str:
  """The name of `method`'s teacher stage ('teacher' for a method the package does not know)."""
  return registry.get(method).teacher.name if method in registry.METHODS else "teacher"


def student_stage(method: str) -> str:
  """The stage that holds `method`'s final student ('' for an unknown method or none)."""
  return registry.student_stage(method)


def scalar_events(event_dir: str, key: str = "eval/accuracy") -> dict:
  """{stage: [(wall_time, step, value)]} of scalar `key` in a local event directory, in the
  order written (plots.scalar_events)."""
  return plots.scalar_events(event_dir, key)


def write_accuracy_figure(path: str, curves: dict, title: str):
  """Draws plots.accuracy_figure of `curves` ({label: [runs]}) into `path`."""
  paths.write_bytes(path, plots.accuracy_figure(curves, title))


# ---------------------------------------------------------------------------------------------
# The streamed input pipeline on the locally built synthetic_imagenet (input_speed).
# ---------------------------------------------------------------------------------------------

def build_synthetic_imagenet(data_dir: str, train_examples: int, validation_examples: int,
                             min_side: int, max_side: int, printer=print) -> dict:
  """Builds (or reuses) synthetic_imagenet in data_dir: {name, dir, train_files (the train
  split's record files), train_examples, mean_bytes (per train image, encoded)}."""
  settings = synthetic_imagenet.Settings(train_examples=train_examples,
                                         validation_examples=validation_examples,
                                         min_side=min_side, max_side=max_side)
  path = synthetic_imagenet.build(data_dir, settings, printer=printer)
  split = tfds_pipeline.prepared_builder(synthetic_imagenet.NAME, data_dir).info.splits["train"]
  return {"name": synthetic_imagenet.NAME, "dir": path,
          "train_files": [os.fspath(f) for f in split.filepaths],
          "train_examples": split.num_examples,
          "mean_bytes": split.num_bytes / max(split.num_examples, 1)}


def crop_parameters() -> dict:
  """The training crop's ranges (streaming.py's Inception crop), for sample_distorted_bounding_box."""
  return {"area_range": streaming.CROP_AREA, "aspect_ratio_range": streaming.CROP_ASPECT_RATIO,
          "min_object_covered": streaming.CROP_MIN_OBJECT_COVERED,
          "max_attempts": streaming.CROP_MAX_ATTEMPTS}


def streamed_train_batches(data_dir: str, local_batch: int, image_size: int, seed: int = 0):
  """The project's training batches of synthetic_imagenet at image_size: batches(step) ->
  host arrays (streaming.train_batches); .close() stops its prefetch thread."""
  info = dataclasses.replace(datasets.dataset_info(synthetic_imagenet.NAME),
                             image_size=image_size)
  return streaming.train_batches(synthetic_imagenet.NAME, info, local_batch, seed, data_dir)


def import_tf():
  """TensorFlow as the project imports it (quiet, kept off the accelerators)."""
  return tfds_pipeline.import_tf()


def dry_run_rate_inputs() -> dict:
  """What the dry run's hours rest on: {mfu: the config's default dry_run_mfu, peak: {device
  kind: peak dense bfloat16 FLOP/s}} (dry_run.DEVICES)."""
  peak = {name: flops for kinds in dry_run.DEVICES.values() for name, flops, _, _ in kinds}
  return {"mfu": float(config_lib.base_config().dry_run_mfu), "peak": peak}


# ---------------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------------

def stage_checkpoints(directory: str):
  """The project's checkpoint manager of one stage directory (checkpoints.StageCheckpoints:
  .save(step, state, meta, wait=...) -> SaveReport, .wait(), .close())."""
  return checkpoints.StageCheckpoints(directory)


def mnist5k_ensemble_state():
  """The mnist5k ensemble stage's train state (configs/mnist5k.py, method=ensemble: params, BN
  state and Adam state of its generators, stacked), built against a random LeNet-5-BN
  teacher with random class statistics, on one device."""
  config = load_config("mnist5k", "method=ensemble")
  info = dataset_info(config.dataset)
  teacher = random_teacher(config.teacher.model, info, class_stats=True)
  ens = build_ensemble(config, teacher, info)
  return ens.state, objective.num_generators(config, info.num_classes)
