"""Stage 'dafl': DAFL's joint loop (Chen et al. 2019), one jitted step for generator + student.

Each step draws z ~ N(0, I), generates x = G(z) (generator BN in training mode), and
  - updates G on  w_oh * L_oh + w_a * L_a + w_ie * L_ie  through the frozen teacher T;
  - updates the student S on kd_loss(T(x), S(x)) with x = stop_gradient(G(z)), the same images.
Both updates use the parameters from before the step, as the official code's single backward
pass does. Checkpoints go to <workdir>/dafl/; the final student is the result.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import evaluation
from datafree_jax import generator_parts
from datafree_jax import losses
from datafree_jax import parallel
from datafree_jax import paths
from datafree_jax import platforms
from datafree_jax import stage as stage_lib
from datafree_jax import students

STAGE_SALT = 2


def directory(workdir: str) -> str:
  return paths.join(workdir, "dafl")


def generator_dafl_loss(gen, teacher_model, teacher_vars, gcfg, gparams, gbs, z):
  """DAFL's generator objective; returns (loss, (images, teacher_logits, new_gen_bs, terms))."""
  images, new_bs = generator_parts.generate(gen, gparams, gbs, z)
  logits, feats, _ = generator_parts.teacher_forward(teacher_model, teacher_vars, images)
  loss, terms = losses.dafl_generator_loss(logits, feats, gcfg.w_oh, gcfg.w_a, gcfg.w_ie)
  return loss, (images, logits, new_bs, terms)


def dafl_step(gen, student, tx_g, tx_s, gcfg, scfg, teacher_model, data_sharding, seed: int,
              state, batch, teacher_vars):  # pylint: disable=unused-argument
  """One joint step: the generator on DAFL's loss, the student on KL to the teacher, both on
  the same images and from the parameters before the step."""
  key = common.step_key(seed, STAGE_SALT, state["step"])
  z = jax.random.normal(key, (scfg.batch_size, gcfg.latent_dim))
  z = jax.lax.with_sharding_constraint(z, data_sharding)
  (g_loss, (images, t_logits, new_gbs, terms)), g_grads = jax.value_and_grad(
      generator_dafl_loss, argnums=4, has_aux=True)(
          gen, teacher_model, teacher_vars, gcfg, state["gen"]["params"],
          state["gen"]["batch_stats"], z)
  g_updates, gen_opt = tx_g.update(g_grads, state["gen_opt"], state["gen"]["params"])
  s = state["student"]
  sp, sbs, s_opt, kd, s_gn = students.student_kd_update(
      student, tx_s, s["params"], s["batch_stats"], state["student_opt"],
      jax.lax.stop_gradient(images), jax.lax.stop_gradient(t_logits), scfg.temperature)
  new = {"gen": {"params": optax.apply_updates(state["gen"]["params"], g_updates),
                 "batch_stats": new_gbs},
         "gen_opt": gen_opt, "student": {"params": sp, "batch_stats": sbs},
         "student_opt": s_opt, "step": state["step"] + 1}
  metrics = dict(terms, loss_g=g_loss, loss_kd=kd, grad_norm_g=optax.tree.norm(g_grads),
                 grad_norm_s=s_gn)
  return new, metrics


def _init_state(config, info, gen, student, tx_g, tx_s):
  """The joint loop's initial state (unplaced)."""
  kg, ks = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), STAGE_SALT))
  gp, gbs = generator_parts.init_generator(gen, kg)
  sp, sbs = common.init_model(student, ks, info.image_shape)
  return {"gen": {"params": gp, "batch_stats": gbs}, "gen_opt": tx_g.init(gp),
          "student": {"params": sp, "batch_stats": sbs}, "student_opt": tx_s.init(sp),
          "step": jnp.zeros((), jnp.int32)}


def build(config, teacher: dict, info, abstract: bool = False):
  """(initial state, step(state, None), student, generator, mesh) of the joint loop; with
  `abstract`, the state as ShapeDtypeStructs (nothing materialised, for the dry run)."""
  gcfg, scfg = config.generator, config.student
  mesh = parallel.make_mesh("data")
  gen = generator_parts.make_generator(gcfg, info, dtype=common.compute_dtype(config),
                       platform=platforms.of_config(config))
  tx_g = common.make_optimizer(gcfg, scfg.steps)
  tx_s = common.make_optimizer(scfg, scfg.steps)
  student = students.make_student(config, info)
  rep = parallel.replicated(mesh)
  init = functools.partial(_init_state, config, info, gen, student, tx_g, tx_s)
  if abstract:
    state = ckpt_lib.abstract_like(jax.eval_shape(init), rep)
  else:  # One jitted init: op by op, every initialiser of the generator compiles on its own.
    state = parallel.put_replicated(jax.jit(init)(), mesh)
  step_jit = jax.jit(
      functools.partial(dafl_step, gen, student, tx_g, tx_s, gcfg, scfg, teacher["model"],
                        parallel.split_leading(mesh), config.seed),
      out_shardings=(rep, rep), donate_argnums=(0,))
  return (state, functools.partial(step_jit, teacher_vars=teacher["variables"]), student, gen,
          mesh)


class Dafl(stage_lib.Stage):
  name = "dafl"
  selector = ""  # runs after the teacher: stage=train

  def check(self, config, info):
    generator_parts.check_generator_fits(config, info)
    parallel.check_global_batch(config.student.batch_size)
    if config.student.augment_shift or config.student.augment_flip:
      raise config_lib.ConfigError(
          "student.augment_shift / augment_flip apply to the distillation stages; DAFL's "
          "student learns from the generator's images as they are (the authors' loop): leave "
          "them at 0 / False for method=dafl")

  def steps(self, config):
    return config.student.steps

  def identity(self, ctx):
    return dict(students.student_identity(ctx), method="dafl")

  def plan(self, ctx):
    state, step, student, gen, mesh = build(ctx.config, ctx.teacher, ctx.info)
    z = jax.random.normal(jax.random.key(generator_parts.SAMPLE_SEED), (100, gen.latent_dim))
    grid = students.make_sample_writer(
        ctx, lambda s: generator_parts.generate(gen, s["gen"]["params"], s["gen"]["batch_stats"], z)[0],
        "dafl")
    return stage_lib.Plan(
        state=state, step=step,
        evaluate=evaluation.make_classifier_eval(student, lambda s: s["student"], ctx.data, mesh),
        eval_every=ctx.config.student.eval_every, on_eval=grid)

  def programs(self, ctx):
    state, step, student, _, mesh = build(ctx.config, ctx.teacher, ctx.info, abstract=True)
    evaluation = stage_lib.classifier_eval_program(
        "student", student, common.variables_of(state["student"]["params"],
                                                state["student"]["batch_stats"]),
        ctx.info, mesh)
    return [stage_lib.Program(
        f"joint generator + student step, batch {ctx.config.student.batch_size}", step.func,
        (state, None), step.keywords, state=state, steps=ctx.config.student.steps),
            evaluation, stage_lib.restore_program(self.name, state)]

  def summarize(self, ctx, done):
    return students.student_summary(ctx, done)


STAGE = Dafl()
