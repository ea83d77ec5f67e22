"""Fast-DFKD (Fang et al., "Up to 100x Faster Data-free Knowledge Distillation", AAAI 2022), as
zju-vipa/Fast-Datafree runs it (datafree/synthesis/fast_meta.py with datafree_kd.py and
scripts/fast_cifar.sh).

Stage 'fast' (checkpoints in <workdir>/fast/, settings config.fast): one loop step is one round
r = 0 .. rounds - 1 (the authors' "epoch"), and the stage's student is the run's student.
  1. Synthesis from the meta-generator G_meta (models.Generator style 'zju': pixels in
     [0, 1], normalised before the teacher sees them). The round copies it, G = G_meta, draws
     latents z ~ N(0, I) (batch_size x latent_dim) and targets y (random classes), and takes
     `iterations` inner Adam steps (G at lr_g, z at lr_z, betas (b1, b2), fresh every round) on
       L(G, z) = w_bn * bn_momentum_matching(moments(T(x')), previous, stats(T), rate_r)
                 + w_oh * CE(T(x'), y)
                 + w_adv * [r + 1 >= warmup] * decision_adversarial_loss(T(x'), S(x'))
     x' = augment(G(z)): random crops of the image padded by augment_shift black pixels and
     horizontal flips (per image, as their kornia RandomCrop / RandomHorizontalFlip), then
     normalised. T is the frozen teacher and S the student, both in evaluation mode.
     bn_momentum_matching (losses.py) matches the BN inputs' batch moments blended with
     `previous` (rate_r = bn_momentum, 0 in round 0) against the teacher's running statistics;
     after the round `previous` takes the last iteration's moments (round 0) or
     bn_momentum * previous + (1 - bn_momentum) * those (their DeepInversionHook.update_mmt).
  2. The meta update of G_meta's initialisation (the "common features"), once per round, by
     Adam at lr_g * iterations, betas (0.5, 0.999), its state kept across rounds:
     meta='fomaml' (their is_maml=1, the published runs): the gradient is the sum of the inner
     steps' gradients of L with respect to G; meta='reptile' (is_maml=0): 67 * (G_meta - G).
     Before round reset_fc_round - 1 (counting from 0; their `ep == 120 + warmup` with
     reset_l0=1) G_meta's first (dense) layer is drawn again from N(0, 0.02), bias 0.
  3. The round's images, the iterate of lowest L among those the loss saw (their
     best_inputs), go into the image pool (image_pool.py, 8-bit pixels): pool[r].
  4. From round `warmup` on, the student takes `kd_steps` steps of students.distill_step
     (KL at student.temperature, student's optimiser; images drawn uniformly, with
     replacement, from pool[0 .. r] and shifted/flipped as student.augment_* asks; the authors
     shuffle the pool's files, re-read every round).
The state (pool, G_meta and its meta-optimiser, the BN moments of earlier rounds, the student
and its optimiser, the round) is checkpointed through the shared loop every checkpoint_every
rounds, so a stopped run resumes at its last saved round and ends where an uninterrupted run
ends. The student's optimiser schedule runs over its (rounds - warmup) * kd_steps steps;
student.steps is not read. Evaluation: the student's test accuracy every eval_every rounds;
the sample grid shows the latest round's images. On the CPU (platform 'cpu', cpu_forms) the
inner steps are unrolled and each student step is its own call, as XLA:CPU runs a step inside
a while loop several times slower; accelerators run each part as one lax.fori_loop program.

Published settings (scripts/fast_cifar.sh, the same for CIFAR-10 and CIFAR-100, Fast-N = N
inner steps): 220 rounds, warmup 20, synthesis batch 256, latent 256, ngf 64 (width 128),
w_bn 10, bn momentum 0.9, FOMAML, reset_l0 at round 140 (counting from 1); Fast-2: lr_g 5e-3,
lr_z 0.015; Fast-5: 3e-3, 0.01; Fast-10: 2e-3, 0.01; w_adv / w_oh: ResNet-34 teacher 1.33 /
0.5, VGG-11 1.0 / 0.5, WRN-40-2 1.1 / 0.4; student SGD 0.2, momentum 0.9, weight decay 1e-4,
batch 256, KD temperature 20, 400 steps per round, cosine over the 200 rounds after warmup
(to 2e-4; here to 0), the pool read with random crops (pad 4) and flips. Their tables (README,
ResNet-34 -> ResNet-18): CIFAR-10 Fast-2 / 5 / 10 92.62 / 93.63 / 94.05% (0.06 / 0.14 / 0.28
GPU-hours of synthesis), CIFAR-100 69.76 / 72.82 / 74.34%.
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
from datafree_jax import image_pool
from datafree_jax import losses
from datafree_jax import parallel
from datafree_jax import platforms
from datafree_jax import stage as stage_lib
from datafree_jax import students

STAGE_SALT = 11         # rng of the synthesis rounds
INIT_SALT = 12          # rng of the meta-generator's and the student's initialisation
META_RULES = ("fomaml", "reptile")
REPTILE_SCALE = 67.0    # the authors' reptile_grad: (G_meta - G) * 67
RESET_STD = 0.02        # the authors' reset_l0: N(0, 0.02) weights, zero bias
GRID_IMAGES = 100       # images of the latest round in a sample grid

CONFIG_SECTIONS = {"fast": {
    "rounds": (220, config_lib.POSITIVE_INT),        # synthesis rounds (the authors' epochs)
    "warmup": (20, config_lib.NON_NEGATIVE_INT),     # rounds before the student learns
    "iterations": (10, config_lib.POSITIVE_INT),     # inner steps per round (Fast-10)
    "batch_size": (256, config_lib.POSITIVE_INT),    # images per round
    # The generator (models.Generator style 'zju'; width = 2 x the authors' ngf).
    "latent_dim": (256, config_lib.POSITIVE_INT),
    "width": (128, config_lib.POSITIVE_INT),
    "num_upsample": (2, config_lib.NON_NEGATIVE_INT),
    # The inner Adam (restarted every round) and the meta update (Adam at lr_g * iterations).
    "lr_g": (2e-3, config_lib.POSITIVE), "lr_z": (0.01, config_lib.POSITIVE),
    "b1": (0.5, config_lib.FRACTION), "b2": (0.999, config_lib.FRACTION),
    "meta": ("fomaml", config_lib.Choice(META_RULES)),
    "reset_fc_round": (140, config_lib.NON_NEGATIVE_INT),  # 0: never
    "w_bn": (10.0, config_lib.NON_NEGATIVE),
    "w_oh": (0.5, config_lib.NON_NEGATIVE),
    "w_adv": (1.33, config_lib.NON_NEGATIVE),
    "bn_momentum": (0.9, config_lib.FRACTION),
    # The synthesis's view of the images (random crops of the padded image, flips).
    "augment_shift": (4, config_lib.NON_NEGATIVE_INT),
    "augment_flip": (True, config_lib.Flag()),
    "kd_steps": (400, config_lib.POSITIVE_INT),      # student steps per round after warmup
    "eval_every": (10, config_lib.NON_NEGATIVE_INT),  # rounds
    # Rounds between checkpoints; 0 = config.checkpoint_every.
    "checkpoint_every": (10, config_lib.NON_NEGATIVE_INT),
}}


def make_generator(config, info):
  f = config.fast
  return generator_parts.make_generator(f, info, style="zju",
                                        dtype=common.compute_dtype(config),
                                        platform=platforms.of_config(config))


def student_steps(fcfg, rounds: int) -> int:
  """The student's steps after `rounds` rounds."""
  return max(rounds - fcfg.warmup, 0) * fcfg.kd_steps


# --- One synthesis round ----------------------------------------------------------------------

def round_loss(fcfg, info, gen, teacher_model, student_model, augment, params, z, batch_stats,
               targets, key, teacher_vars, student_vars, previous, rate, adv_on):
  """L(G, z) of the module docstring: (loss, (terms, pixels in [0, 1], the generator's new
  batch_stats, the teacher's BN input moments or {})). Pure."""
  pixels, new_bs = generator_parts.generate(gen, params, batch_stats, z)
  x = image_pool.normalize(pixels, info)
  if augment["pad"] or augment["flip"]:
    x = students.random_shift(key, x, **augment)
  logits, _, moments = generator_parts.teacher_forward(teacher_model, teacher_vars, x,
                                                       moments=fcfg.w_bn > 0)
  terms = {"ce": losses.cross_entropy(logits, targets)}
  loss = fcfg.w_oh * terms["ce"]
  if fcfg.w_bn > 0:
    terms["bn"] = losses.bn_momentum_matching(moments, previous, teacher_vars["batch_stats"],
                                              rate)
    loss = loss + fcfg.w_bn * terms["bn"]
  if fcfg.w_adv > 0:
    s_logits = student_model.apply(student_vars, x, train=False)
    terms["adv"] = losses.decision_adversarial_loss(logits, s_logits)
    loss = loss + fcfg.w_adv * adv_on * terms["adv"]
  return loss, (terms, pixels, new_bs, moments or {})


def reset_dense(key, params):
  """params with the dense layer ('fc') drawn again: N(0, RESET_STD) kernel, zero bias."""
  fc = params["fc"]
  fresh = {"kernel": RESET_STD * jax.random.normal(key, fc["kernel"].shape, fc["kernel"].dtype),
           "bias": jnp.zeros_like(fc["bias"])}
  return dict(params, fc=fresh)


def inner_iteration(grad_fn, targets, k_iter, rest, tx_g, tx_z, data_sharding, i, carry):
  """Inner step i of a round (the body of its lax.fori_loop): one Adam step of the generator
  and of the latents on grad_fn(params, z, batch_stats, targets, key of step i, *rest), the
  meta-gradient summed, the lowest-loss images kept."""
  params, bs, z, opt_g, opt_z, meta_grad, best_loss, best, _, _, _ = carry
  (loss, (terms, pixels, new_bs, moments)), (g_params, g_z) = grad_fn(
      params, z, bs, targets, jax.random.fold_in(k_iter, i), *rest)
  better = loss < best_loss
  best = jax.lax.with_sharding_constraint(jnp.where(better, pixels, best), data_sharding)
  best_loss = jnp.where(better, loss, best_loss)
  meta_grad = jax.tree.map(jnp.add, meta_grad, g_params)
  updates, opt_g = tx_g.update(g_params, opt_g, params)
  params = optax.apply_updates(params, updates)
  updates, opt_z = tx_z.update(g_z, opt_z, z)
  z = jax.lax.with_sharding_constraint(optax.apply_updates(z, updates), data_sharding)
  return params, new_bs, z, opt_g, opt_z, meta_grad, best_loss, best, moments, terms, loss


def synthesis_round(fcfg, info, gen, teacher_model, student_model, inner, tx_meta, data_sharding,
                    seed: int, augment: dict, unroll: bool, state, teacher_vars):
  """Round state['step'] (steps 1-3 of the module docstring): returns (state with the round's
  images in the pool, the updated meta-generator and BN moments, step + 1; metrics of the last
  inner step, the best iterate's loss and the teacher's agreement with the targets on it)."""
  r = state["step"]
  k_z, k_y, k_iter, k_reset = jax.random.split(common.step_key(seed, STAGE_SALT, r), 4)
  meta = state["generator"]
  meta_params = meta["params"]
  if fcfg.reset_fc_round:
    fresh = reset_dense(k_reset, meta_params)
    now = r + 1 == fcfg.reset_fc_round
    meta_params = jax.tree.map(lambda a, b: jnp.where(now, a, b), fresh, meta_params)
  n = fcfg.batch_size
  z = jax.lax.with_sharding_constraint(
      jax.random.normal(k_z, (n, fcfg.latent_dim), jnp.float32), data_sharding)
  targets = jax.lax.with_sharding_constraint(
      jax.random.randint(k_y, (n,), 0, info.num_classes), data_sharding)
  s = state["student"]
  student_vars = common.variables_of(s["params"], s["batch_stats"])
  previous = state["bn_previous"]
  rate = jnp.where(r > 0, fcfg.bn_momentum, 0.0).astype(jnp.float32)
  adv_on = (r + 1 >= fcfg.warmup).astype(jnp.float32)
  tx_g, tx_z = inner
  loss_fn = functools.partial(round_loss, fcfg, info, gen, teacher_model, student_model, augment)
  grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)

  rest = (teacher_vars, student_vars, previous, rate, adv_on)
  body = functools.partial(inner_iteration, grad_fn, targets, k_iter, rest, tx_g, tx_z,
                           data_sharding)

  (_, (terms0, pixels0, _, moments0)), _ = jax.eval_shape(
      lambda: grad_fn(meta_params, z, meta["batch_stats"], targets, k_iter, *rest))
  zeros = lambda tree: jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), tree)
  carry = (meta_params, meta["batch_stats"], z, tx_g.init(meta_params), tx_z.init(z),
           zeros(meta_params), jnp.asarray(jnp.inf, jnp.float32),
           jax.lax.with_sharding_constraint(zeros(pixels0), data_sharding), zeros(moments0),
           zeros(terms0), jnp.zeros((), jnp.float32))
  params, bs, _, _, _, meta_grad, best_loss, best, moments, terms, loss = jax.lax.fori_loop(
      0, fcfg.iterations, body, carry, unroll=True if unroll else 1)

  if fcfg.meta == "reptile":
    meta_grad = jax.tree.map(lambda m, p: REPTILE_SCALE * (m - p), meta_params, params)
  updates, meta_opt = tx_meta.update(meta_grad, state["meta_opt"], meta_params)
  meta_params = optax.apply_updates(meta_params, updates)
  m = fcfg.bn_momentum
  previous = jax.tree.map(lambda p, new: jnp.where(r > 0, m * p + (1.0 - m) * new, new),
                          previous, moments)
  images = image_pool.normalize(best, info)
  logits = teacher_model.apply(teacher_vars, images, train=False)
  pool = jax.lax.dynamic_update_index_in_dim(state["pool"], image_pool.quantize(images, info),
                                             r, 0)
  metrics = dict(terms, loss=loss, best_loss=best_loss,
                 agreement=losses.accuracy(logits, targets))
  return dict(state, pool=pool, generator={"params": meta_params, "batch_stats": bs},
              meta_opt=meta_opt, bn_previous=previous, step=r + 1), metrics


def kd_round(fcfg, distill, n: int, state, teacher_vars, offset=0):
  """Student steps offset .. offset + n - 1 of the kd_steps after round state['step'] - 1 (step
  4): n = kd_steps in one call, or 1 per call on the CPU (cpu_forms)."""
  first = (state["step"] - 1 - fcfg.warmup) * fcfg.kd_steps + offset
  return image_pool.distill_on_pool(n, distill, state, teacher_vars, first, state["step"])


def cpu_forms(config) -> bool:
  """Whether the run takes the CPU forms of the loops: XLA:CPU runs a step inside a while loop
  several times slower than the same step on its own (benchmarks/RESULTS.md), so there the
  round's inner steps are unrolled and its student steps are one call each; accelerators get
  lax.fori_loop programs."""
  return platforms.is_cpu(platforms.of_config(config))


def round_step(synth, kd, teacher_vars, warmup: int, kd_steps: int, calls: int, state, r):
  """One loop step of the stage: round r's synthesis, then (from round `warmup` on) the
  student's kd_steps in `calls` calls."""
  state, metrics = synth(state, teacher_vars)
  if r >= warmup:
    for i in range(calls):
      state, kd_metrics = kd(state, teacher_vars, i * (kd_steps // calls))
    metrics = dict(metrics, **kd_metrics)
  return state, metrics


class FastSynthesis(stage_lib.Stage):
  """The rounds of synthesis and distillation; the pool is the state's 'pool' (rounds,
  batch_size, H, W, C) uint8, replicated, round r filled by step r."""
  name = "fast"
  selector = "fast"

  def check(self, config, info):
    f = config.fast
    parallel.check_global_batch(f.batch_size)
    parallel.check_global_batch(config.student.batch_size)
    if info.image_size % 2**f.num_upsample:
      raise config_lib.ConfigError(
          f"fast.num_upsample={f.num_upsample} does not fit the {info.image_size}x"
          f"{info.image_size} images of dataset {info.name!r}: the image size must be a "
          f"multiple of 2^{f.num_upsample}")
    if f.warmup >= f.rounds:
      raise config_lib.ConfigError(
          f"fast.warmup={f.warmup} leaves none of the fast.rounds={f.rounds} rounds to the "
          "student; use warmup < rounds")
    image_pool.check_teacher_bn(config, info, "fast")

  def steps(self, config):
    return config.fast.rounds

  def identity(self, ctx):
    f = ctx.config.fast
    return dict(students.student_identity(ctx), rounds=f.rounds, batch_size=f.batch_size,
                latent_dim=f.latent_dim, width=f.width)

  def _build(self, ctx, abstract: bool = False):
    """(initial state or its ShapeDtypeStructs, student, synthesis jit, KD jit, mesh)."""
    config, info = ctx.config, ctx.info
    f, scfg = config.fast, config.student
    mesh = parallel.make_mesh("data")
    rep, split = parallel.replicated(mesh), parallel.split_leading(mesh)
    tx_s = common.make_optimizer(scfg, student_steps(f, f.rounds))
    student = students.make_student(config, info)
    gen = make_generator(config, info)
    adam = lambda lr: optax.adam(lr, b1=f.b1, b2=f.b2)
    inner = (adam(f.lr_g), adam(f.lr_z))
    tx_meta = optax.adam(f.lr_g * f.iterations, b1=0.5, b2=0.999)
    teacher_model, tvars = ctx.teacher["model"], ctx.teacher["variables"]

    def init():
      key = jax.random.fold_in(jax.random.key(config.seed), INIT_SALT)
      k_g, k_s = jax.random.split(key)
      gparams, gbs = generator_parts.init_generator(gen, k_g)
      _, svars, sopt = students.init_student(config, info, tx_s, k_s)
      moments = {}
      if f.w_bn > 0:
        moments = jax.eval_shape(lambda v: generator_parts.teacher_forward(
            teacher_model, v, jnp.zeros((2,) + tuple(info.image_shape)), moments=True)[2],
                                 tvars)
      return {"pool": image_pool.empty(f.rounds, f.batch_size, info),
              "generator": {"params": gparams, "batch_stats": gbs},
              "meta_opt": tx_meta.init(gparams),
              "bn_previous": jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), moments),
              "student": svars, "student_opt": sopt, "step": jnp.zeros((), jnp.int32)}
    if abstract:
      state = ckpt_lib.abstract_like(jax.eval_shape(init), rep)
    else:
      state = jax.jit(init, out_shardings=rep)()
    cpu = cpu_forms(config)
    synth = jax.jit(functools.partial(
        synthesis_round, f, info, gen, teacher_model, student, inner, tx_meta, split,
        config.seed, students.augmentation(f, info), cpu),
        out_shardings=(rep, rep), donate_argnums=(0,))
    distill = image_pool.pool_distill_step(ctx, student, tx_s, split)
    kd = jax.jit(functools.partial(kd_round, f, distill, 1 if cpu else f.kd_steps),
                 out_shardings=(rep, rep), donate_argnums=(0,))
    return state, student, synth, kd, mesh

  def plan(self, ctx):
    state, student, synth, kd, mesh = self._build(ctx)
    f, info = ctx.config.fast, ctx.info
    calls = f.kd_steps if cpu_forms(ctx.config) else 1
    step = functools.partial(round_step, synth, kd, ctx.teacher["variables"], f.warmup,
                             f.kd_steps, calls)

    n = min(f.batch_size, GRID_IMAGES)
    return stage_lib.Plan(
        state=state, step=step, batches=lambda r: r,  # a round's "batch" is its number
        evaluate=evaluation.make_classifier_eval(student, lambda s: s["student"], ctx.data,
                                                 mesh),
        eval_every=f.eval_every, checkpoint_every=f.checkpoint_every or None,
        on_eval=students.make_sample_writer(
            ctx, lambda s: image_pool.latest_round(s, info, n), self.name),
        meta={"kind": "fast_pool", "dataset": info.name, "method": ctx.config.method})

  def programs(self, ctx):
    f, scfg = ctx.config.fast, ctx.config.student
    state, student, synth, kd, mesh = self._build(ctx, abstract=True)
    tvars = ctx.teacher["variables"]
    s = state["student"]
    per_call = 1 if cpu_forms(ctx.config) else f.kd_steps
    return [
        stage_lib.Program(
            f"synthesis round: {f.iterations} generator steps on {f.batch_size} images", synth,
            (state,), {"teacher_vars": tvars}, state=state, trips=f.iterations,
            steps=f.rounds),
        stage_lib.Program(
            f"student: {per_call} step(s) of batch {scfg.batch_size}", kd, (state,),
            {"teacher_vars": tvars}, state=state, trips=per_call,
            steps=(f.rounds - f.warmup) * f.kd_steps // per_call),
        stage_lib.classifier_eval_program(
            "student", student, common.variables_of(s["params"], s["batch_stats"]), ctx.info,
            mesh),
        stage_lib.restore_program(self.name, state)]

  def summarize(self, ctx, done):
    f = ctx.config.fast
    out = students.student_summary(ctx, done)
    out["student"]["steps"] = student_steps(f, done.step)
    out[self.name] = {"rounds": done.step, "images": done.step * f.batch_size,
                      "student_steps": student_steps(f, done.step), "eval": done.eval,
                      "checkpoint": done.directory}
    return out


STAGE = FastSynthesis()
