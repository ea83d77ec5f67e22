"""DeepInversion (Yin et al., CVPR 2020) with Adaptive DeepInversion's competition term, as
zju-vipa/DataFree runs it for CIFAR (its `deepinv` synthesizer and datafree_kd.py), then the
DeepInversion paper's distillation of a student on the synthesised images.

Stage 'deepinversion' (checkpoints in <workdir>/deepinversion/, settings config.deepinversion):
one loop step is one synthesis round r = 0 .. rounds - 1.
  1. A batch x of `batch_size` images starts from N(0, 1) noise, with targets y (random
     classes, or 'balanced': image i gets class i mod K), and takes `iterations` Adam steps on
       L(x) = w_oh * CE(T(x'), y)
              + w_bn * sum_l ||mu_l(x') - mu_l^T||_2 + ||var_l(x') - var_l^T||_2
              + w_adv * (1 - JS(T(x'), S(x')))                  (losses.adi_competition_loss)
              + w_tv * TV_l1(x) + w_tv_l2 * TV_l2(x) + w_l2 * R_l2(x)
     T is the frozen teacher in evaluation mode; mu_l, var_l are the batch moments of the input
     of its BN layer l, mu_l^T, var_l^T that layer's running statistics
     (losses.bn_moment_matching, form 'l2'); S is the competing student in evaluation mode;
     x' is x rolled by a random offset in [-jitter, jitter] pixels along each image axis and
     flipped left-right with probability 1/2 (one draw for the whole batch per iteration: the
     authors' jitter_and_flip); TV_l1, TV_l2 are losses.deepinversion_tv_l1 / _l2 and R_l2
     losses.image_l2_prior, all on x. After each step x is clipped to the valid pixel range
     ((0 - mean) / std .. (1 - mean) / std per channel). The round keeps the final x (the
     authors' code means to keep the iterate of lowest loss, but its `best_inputs =
     inputs.data` shares storage with the optimised tensor, so it returns the final one too).
  2. x goes into the image pool as 8-bit pixels (the authors write PNG files): pool[r].
  3. The competing student takes `kd_steps` distillation steps (students.distill_step: KL at
     student.temperature, student's optimiser and random shifts/flips) on images drawn
     uniformly, with replacement, from pool[0 .. r]; DataFree's student, which is its result.
The state (the whole pool, the competing student and its optimiser, the round) is
checkpointed through the shared loop, so a stopped run resumes at its last saved round and
ends where an uninterrupted run ends. Its evaluation is the competing student's test
accuracy; its sample grid shows the latest round's images.

Stage 'distill_deepinversion' (config.stage 'distill'): students.Distill, a fresh student
learns KL(T || S) for student.steps steps on images drawn uniformly from the finished pool,
shifted/flipped as student.augment_* asks: the final student (export reads it).

Published settings (zju-vipa/DataFree, scripts/deepinv/deepinv_cifar10_wrn402_wrn161.sh with
datafree_kd.py and datafree/synthesis/deepinversion.py): 200 rounds ("epochs") of one batch
of 256 images, each 1,000 Adam iterations at lr 0.1, betas (0.5, 0.99), constant; w_bn 10,
w_oh 1, w_adv 1 (the JS at temperature 3, probabilities clamped to [0.01, 0.99]), w_tv 1e-3
(L1, four directions), w_l2 0; jitter 1/8 of the image size (4 pixels at 32) and flips;
random targets; 400 student steps per round, batch 256, SGD lr 0.1, momentum 0.9, weight
decay 1e-4, cosine over the run, KD temperature 20; the pool read with the training
augmentation (random 32x32 crops of the image padded by 4, horizontal flips). The benchmark's
table: CIFAR-10 ResNet-34 -> ResNet-18 93.26%, CIFAR-100 61.32%. NVlabs/DeepInversion's own
CIFAR-10 script: batch 256, 2,000 iterations at lr 0.05 (paper) or 0.1, w_bn 10, L2 total
variation 2.5e-5 (paper) or 1e-3, jitter 2 pixels, no flips.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import generator_parts
from datafree_jax import image_pool
from datafree_jax import losses
from datafree_jax import parallel
from datafree_jax import paths

STAGE_SALT = 7                  # rng of the synthesis rounds

CONFIG_SECTIONS = {"deepinversion": {
    "rounds": (200, config_lib.POSITIVE_INT),        # synthesis rounds: batches in the pool
    "batch_size": (256, config_lib.POSITIVE_INT),    # images per round
    "iterations": (1000, config_lib.POSITIVE_INT),   # optimiser steps on one round's images
    # The images' optimiser (reset every round; a schedule runs over one round's iterations).
    "optimizer": ("adam", config_lib.Choice(config_lib.OPTIMIZERS)),
    "lr": (0.1, config_lib.POSITIVE),
    "schedule": ("constant", config_lib.Choice(config_lib.SCHEDULES)),
    "warmup_steps": (0, config_lib.NON_NEGATIVE_INT),
    "weight_decay": (0.0, config_lib.NON_NEGATIVE),
    "b1": (0.5, config_lib.FRACTION), "b2": (0.99, config_lib.FRACTION),
    "w_bn": (10.0, config_lib.NON_NEGATIVE),         # BN feature-distribution regulariser
    "w_oh": (1.0, config_lib.NON_NEGATIVE),          # cross-entropy towards the targets
    "w_adv": (1.0, config_lib.NON_NEGATIVE),         # Adaptive DeepInversion's competition
    "adv_temperature": (3.0, config_lib.POSITIVE),
    "w_tv": (1e-3, config_lib.NON_NEGATIVE),         # L1 total variation (four directions)
    "w_tv_l2": (0.0, config_lib.NON_NEGATIVE),       # L2 total variation (NVlabs' CIFAR script)
    "w_l2": (0.0, config_lib.NON_NEGATIVE),          # RMS pixel value
    "jitter": (4, config_lib.NON_NEGATIVE_INT),      # random roll, pixels
    "flip": (True, config_lib.Flag()),
    "clip": (True, config_lib.Flag()),               # keep pixels in the valid range
    **image_pool.ROUND_FIELDS,  # targets, kd_steps, eval_every, checkpoint_every
}}


def directory(workdir: str) -> str:
  return paths.join(workdir, "deepinversion")


# The pool's pixels and draws (image_pool.py), under the names this module has always had.
pixel_range = image_pool.pixel_range
quantize = image_pool.quantize
dequantize = image_pool.dequantize
pool_images_fn = image_pool.pool_images_fn
competitor_round = image_pool.competitor_round


# --- One synthesis round ----------------------------------------------------------------------

def jitter_and_flip(key, images, jitter: int, flip: bool):
  """The authors' augmentation of one iteration: the whole batch rolled (circularly) by
  offsets drawn from [-jitter, jitter] along height and width, then flipped left-right with
  probability 1/2."""
  k_y, k_x, k_f = jax.random.split(key, 3)
  if jitter:
    dy = jax.random.randint(k_y, (), -jitter, jitter + 1)
    dx = jax.random.randint(k_x, (), -jitter, jitter + 1)
    images = jnp.roll(images, (dy, dx), axis=(1, 2))
  if flip:
    images = jnp.where(jax.random.bernoulli(k_f), images[:, :, ::-1, :], images)
  return images


def image_loss(dcfg, teacher_model, student_model, images, targets, key, teacher_vars,
               student_vars):
  """L(x) of the module docstring for images x (N, H, W, C): (loss, metrics). Pure."""
  jittered = jitter_and_flip(key, images, dcfg.jitter, dcfg.flip)
  logits, _, moments = generator_parts.teacher_forward(teacher_model, teacher_vars, jittered,
                                                       moments=dcfg.w_bn > 0)
  terms = {"ce": losses.cross_entropy(logits, targets),
           "tv": losses.deepinversion_tv_l1(images)}
  loss = dcfg.w_oh * terms["ce"] + dcfg.w_tv * terms["tv"]
  if dcfg.w_bn > 0:
    terms["bn"] = losses.bn_moment_matching(moments, teacher_vars["batch_stats"], form="l2")
    loss = loss + dcfg.w_bn * terms["bn"]
  if dcfg.w_adv > 0:
    s_logits = student_model.apply(student_vars, jittered, train=False)
    terms["adv"] = losses.adi_competition_loss(logits, s_logits, dcfg.adv_temperature)
    loss = loss + dcfg.w_adv * terms["adv"]
  if dcfg.w_tv_l2 > 0:
    terms["tv_l2"] = losses.deepinversion_tv_l2(images)
    loss = loss + dcfg.w_tv_l2 * terms["tv_l2"]
  if dcfg.w_l2 > 0:
    terms["l2"] = losses.image_l2_prior(images)
    loss = loss + dcfg.w_l2 * terms["l2"]
  return loss, terms


def image_iteration(grad_fn, tx, clip_range, data_sharding, targets, k_iter, teacher_vars,
                    student_vars, i, carry):
  """Iteration i of a round (the body of its lax.fori_loop): one optimiser step on the images,
  then clipped to `clip_range` (low, high) when given."""
  images, opt_state, _, _ = carry
  (loss, terms), grads = grad_fn(images, targets, jax.random.fold_in(k_iter, i), teacher_vars,
                                 student_vars)
  updates, opt_state = tx.update(grads, opt_state, images)
  images = optax.apply_updates(images, updates)
  if clip_range is not None:
    images = jnp.clip(images, *clip_range)
  images = jax.lax.with_sharding_constraint(images, data_sharding)
  return images, opt_state, loss, terms


def synthesis_round(dcfg, info, teacher_model, student_model, tx, data_sharding, seed: int,
                    state, teacher_vars):
  """Round state['step']: a fresh batch optimised for dcfg.iterations steps (lax.fori_loop),
  stored in state['pool'][round]; returns (state with step + 1, metrics of the last
  iteration and the teacher's agreement with the targets on the final images)."""
  r = state["step"]
  key = common.step_key(seed, STAGE_SALT, r)
  k_init, k_targets, k_iter = jax.random.split(key, 3)
  n = dcfg.batch_size
  images = jax.random.normal(k_init, (n,) + tuple(info.image_shape), jnp.float32)
  images = jax.lax.with_sharding_constraint(images, data_sharding)
  targets = jax.lax.with_sharding_constraint(
      image_pool.round_targets(k_targets, n, info.num_classes, dcfg.targets), data_sharding)
  s = state["student"]
  student_vars = common.variables_of(s["params"], s["batch_stats"])
  grad_fn = jax.value_and_grad(functools.partial(image_loss, dcfg, teacher_model,
                                                 student_model), has_aux=True)
  body = functools.partial(image_iteration, grad_fn, tx, pixel_range(info) if dcfg.clip else None,
                           data_sharding, targets, k_iter, teacher_vars, student_vars)

  zero_terms = jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), jax.eval_shape(
      lambda x: image_loss(dcfg, teacher_model, student_model, x, targets, k_iter, teacher_vars,
                           student_vars)[1], images))
  images, _, loss, terms = jax.lax.fori_loop(
      0, dcfg.iterations, body, (images, tx.init(images), jnp.zeros((), jnp.float32), zero_terms))
  logits = teacher_model.apply(teacher_vars, images, train=False)
  pool = jax.lax.dynamic_update_index_in_dim(state["pool"], quantize(images, info), r, 0)
  metrics = dict(terms, loss=loss, agreement=losses.accuracy(logits, targets))
  return dict(state, pool=pool, step=r + 1), metrics


class Synthesis(image_pool.PoolSynthesis):
  """The synthesis rounds (image_pool.PoolSynthesis: the pool, the competing student, plan,
  programs and summary)."""
  name = "deepinversion"
  selector = "deepinversion"
  section = "deepinversion"
  kind = "deepinversion_pool"

  def _build(self, ctx, abstract: bool = False):
    """(initial state or its ShapeDtypeStructs, student, synthesis jit, competitor jit or None,
    mesh)."""
    config, info = ctx.config, ctx.info
    d = config.deepinversion
    mesh = parallel.make_mesh("data")
    rep, split = parallel.replicated(mesh), parallel.split_leading(mesh)
    student, tx_s, compete = image_pool.competing_student(ctx, d, mesh)

    def init():
      return image_pool.initial_state(
          ctx, d, tx_s, jax.random.fold_in(jax.random.key(config.seed), STAGE_SALT))
    if abstract:
      state = ckpt_lib.abstract_like(jax.eval_shape(init), rep)
    else:
      state = jax.jit(init, out_shardings=rep)()
    synth = jax.jit(functools.partial(
        synthesis_round, d, info, ctx.teacher["model"], student,
        common.make_optimizer(d, d.iterations), split, config.seed),
        out_shardings=(rep, rep), donate_argnums=(0,))
    return state, student, synth, compete, mesh

SYNTHESIS = Synthesis()


DISTILL = image_pool.DistillPool(SYNTHESIS.name, "deepinversion", "deepinversion_pool",
                                  "DeepInversion")
