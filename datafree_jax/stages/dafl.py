"""Stage 'dafl': DAFL's joint loop (Chen et al. 2019), one jitted step for generator + student.

Each step draws z ~ N(0, I), generates x = G(z) (generator BN in training mode), and
  - updates G on  w_oh * L_oh + w_a * L_a + w_ie * L_ie  through the frozen teacher T;
  - updates the student S on kd_loss(T(x), S(x)) with x = stop_gradient(G(z)), the same images.
Both updates use the parameters from before the step, as the official code's single backward
pass does. Checkpoints go to <workdir>/dafl/; the final student is the result.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import loop
from datafree_jax import losses
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax.stages import distill

STAGE_SALT = 2


def directory(workdir: str) -> str:
  return os.path.join(workdir, "dafl")


def make_generator(gcfg, info) -> models.Generator:
  config_lib.check_choice("generator.style", gcfg.style, ("dafl", "luo"))
  config_lib.check_positive("generator.latent_dim", gcfg.latent_dim)
  config_lib.check_positive("generator.width", gcfg.width)
  return models.Generator(latent_dim=gcfg.latent_dim, image_size=info.image_size,
                          channels=info.channels, width=gcfg.width,
                          num_upsample=gcfg.num_upsample, style=gcfg.style)


def init_generator(gen: models.Generator, key):
  v = gen.init(key, jnp.zeros((2, gen.latent_dim), jnp.float32))
  return v["params"], v["batch_stats"]


def check_weights(gcfg, names):
  for n in names:
    config_lib.check_non_negative(f"generator.{n}", gcfg[n])


def generator_dafl_loss(gen, teacher_model, teacher_vars, gcfg, gparams, gbs, z):
  """DAFL's generator objective; returns (loss, (images, teacher_logits, new_gen_bs, terms))."""
  images, upd = gen.apply({"params": gparams, "batch_stats": gbs}, z, train=True,
                          mutable=["batch_stats"])
  logits, feats, _ = common.teacher_forward(teacher_model, teacher_vars, images)
  terms = {"l_oh": losses.onehot_loss(logits), "l_a": losses.activation_loss(feats),
           "l_ie": losses.information_entropy_loss(logits)}
  loss = gcfg.w_oh * terms["l_oh"] + gcfg.w_a * terms["l_a"] + gcfg.w_ie * terms["l_ie"]
  return loss, (images, logits, upd["batch_stats"], terms)


def build(config, teacher: dict, info):
  """(initial state, jitted step, student model) of the joint loop; used by train and tests."""
  gcfg, scfg = config.generator, config.student
  check_weights(gcfg, ("w_oh", "w_a", "w_ie"))
  config_lib.check_positive("student.steps", scfg.steps)
  config_lib.check_positive("student.temperature", scfg.temperature)
  mesh = parallel.make_mesh("data")
  batch = scfg.batch_size
  parallel.check_global_batch(batch)
  gen = make_generator(gcfg, info)
  student = models.get_classifier(scfg.model, info.num_classes, scfg.get("width", 0))
  tx_g = common.make_optimizer(gcfg, scfg.steps)
  tx_s = common.make_optimizer(scfg, scfg.steps)
  kg, ks = jax.random.split(jax.random.fold_in(jax.random.key(config.seed), STAGE_SALT))
  gp, gbs = init_generator(gen, kg)
  sp, sbs = common.init_model(student, ks, info.image_shape)
  state = parallel.put_replicated({
      "gen": {"params": gp, "batch_stats": gbs}, "gen_opt": tx_g.init(gp),
      "student": {"params": sp, "batch_stats": sbs}, "student_opt": tx_s.init(sp),
      "step": jnp.zeros((), jnp.int32)}, mesh)
  tmodel, tvars = teacher["model"], teacher["variables"]
  nan_at = config.get("debug_nan_at_step", -1)
  data_sharding = parallel.split_leading(mesh)

  def step_fn(state, _):
    key = common.step_key(config.seed, STAGE_SALT, state["step"])
    z = jax.random.normal(key, (batch, gcfg.latent_dim))
    z = jax.lax.with_sharding_constraint(z, data_sharding)

    def gloss(gp):
      loss, aux = generator_dafl_loss(gen, tmodel, tvars, gcfg, gp, state["gen"]["batch_stats"],
                                      z)
      return loop.poison(loss, state["step"], nan_at), aux
    (g_loss, (images, t_logits, new_gbs, terms)), g_grads = jax.value_and_grad(
        gloss, has_aux=True)(state["gen"]["params"])
    g_updates, gen_opt = tx_g.update(g_grads, state["gen_opt"], state["gen"]["params"])
    images = jax.lax.stop_gradient(images)
    t_logits = jax.lax.stop_gradient(t_logits)
    s = state["student"]
    sp, sbs, s_opt, kd, s_gn = common.student_kd_update(
        student, tx_s, s["params"], s["batch_stats"], state["student_opt"], images, t_logits,
        scfg.temperature)
    new = {"gen": {"params": optax.apply_updates(state["gen"]["params"], g_updates),
                   "batch_stats": new_gbs},
           "gen_opt": gen_opt, "student": {"params": sp, "batch_stats": sbs},
           "student_opt": s_opt, "step": state["step"] + 1}
    metrics = dict(terms, loss_g=g_loss, loss_kd=kd, grad_norm_g=optax.tree.norm(g_grads),
                   grad_norm_s=s_gn)
    return new, metrics

  rep = parallel.replicated(mesh)
  step_jit = jax.jit(step_fn, out_shardings=(rep, rep), donate_argnums=(0,))
  return state, step_jit, student, gen, mesh


def train(config, workdir: str, teacher: dict, data: dict, writer) -> dict:
  info = data["test"].info
  scfg = config.student
  state, step_jit, student, gen, mesh = build(config, teacher, info)
  ckpt = ckpt_lib.StageCheckpoints(directory(workdir))
  eval_fn = distill.make_student_eval(student, data["test"], mesh)
  on_eval = distill.make_sample_writer(config, workdir, writer, teacher, info, gen, "dafl")
  meta = {"method": "dafl", "student_model": scfg.model, "num_classes": info.num_classes,
          "image_shape": list(info.image_shape), "teacher_model": teacher["meta"]["model"]}
  result = loop.run(
      stage="dafl", ckpt=ckpt, state=state, step_fn=step_jit, total_steps=scfg.steps,
      eval_fn=eval_fn, eval_every=scfg.eval_every, checkpoint_every=config.checkpoint_every,
      writer=writer, meta=meta, log_every_secs=config.log_every_secs,
      on_eval=on_eval, stop_after_steps=config.get("debug_stop_after_steps", -1))
  ckpt.close()
  return {"result": result, "directory": directory(workdir)}
