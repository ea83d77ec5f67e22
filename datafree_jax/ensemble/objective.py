"""What one generator of Luo et al.'s ensemble is trained on: its loss (inceptionism towards its
class, or DAFL's terms, plus BN moment matching against its class's statistics) and its whole
update as pure functions of that member's arrays (member_loss, member_update); the generators'
sizes, classes and initialisation."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from datafree_jax import bn_stats as bn_stats_lib
from datafree_jax import common
from datafree_jax import generator_parts
from datafree_jax import losses
from datafree_jax import models
from datafree_jax import platforms

STAGE_SALT = 4          # rng of the generator steps
INIT_SALT = 40          # rng of the generators' initialisation
ALL_CLASSES = -1        # class id of a generator trained on all classes (G = 1)


def num_generators(config, num_classes: int) -> int:
  """The real ensemble size G (ensemble.num_generators; 0 = one generator per class)."""
  return int(config.ensemble.num_generators) or num_classes


def member_class_ids(g: int, padded: int, num_classes: int) -> np.ndarray:
  """(padded,) int32: class of each member, ALL_CLASSES for a single all-class generator."""
  ids = np.arange(padded, dtype=np.int32) % num_classes
  if g == 1:
    ids[0] = ALL_CLASSES
  return ids


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


def sample_conditions(class_ids, n: int, num_classes: int, offset=0):
  """(G, n) labels a conditional generator is given: its class, or for an all-class generator
  the classes (offset + j) mod num_classes."""
  ids = jnp.asarray(class_ids)[:, None]
  return jnp.where(ids >= 0, ids, (offset + jnp.arange(n)[None, :]) % num_classes)


def stack_targets(stats: dict, class_ids: np.ndarray, conditional_classes: int = 0):
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
