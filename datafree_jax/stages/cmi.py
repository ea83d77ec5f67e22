"""CMI, Contrastive Model Inversion (Fang et al., IJCAI 2021), as the authors' code runs it
(zju-vipa/CMI = zju-vipa/DataFree: datafree/synthesis/contrastive.py's CMISynthesizer with
datafree_kd.py), then a fresh student distilled on the synthesised images.

Stage 'cmi' (checkpoints in <workdir>/cmi/, settings config.cmi): one loop step is one
synthesis round r = 0 .. rounds - 1.
  1. A generator G (zju-vipa/DataFree's Generator: models.Generator style 'zju', latent size
     latent_dim, width = 2 ngf; pixels in [0, 1]) is re-initialised (reset_generator: the
     authors' reset_model, weights N(0, 0.02), biases 0, BN scales N(1, 0.02); or continued
     from the last round, Fast-Datafree's feature_reuse), latents z ~ N(0, I) and targets y
     (random classes, or 'balanced': image i gets class i mod K) are drawn, and G's parameters
     and z take `iterations` Adam steps together on
       L = w_bn * sum_l ||mu_l(x_g) - mu_l^T||_2 + ||var_l(x_g) - var_l^T||_2
                                                           (losses.bn_moment_matching, 'l2')
           + w_oh * CE(T(x_g), y)
           + w_adv * decision_adversarial_loss(T(x_g), S(x_g))
           + w_cr * contrastive_instance_loss(h([f(x_l); F_l]), h([f(x_g); F_g]),
                                              cr_temperature, batch_size, valid)
     x = G(z) (pixels); x_g, the global view: x shifted by up to crop_pad pixels with black
     borders (a random crop of x padded by crop_pad) and flipped left-right with probability
     1/2 (flip), per image; x_l, the local view: a random crop of x of area in
     [local_scale, 1] of the image and aspect ratio in [3/4, 4/3], resized bilinearly to the
     image size, flipped likewise; both then normalised with the dataset's mean/std. T is the
     frozen teacher in evaluation mode (mu_l, var_l the batch moments of its BN layer l's
     input, mu_l^T, var_l^T that layer's running statistics); S the competing student in
     evaluation mode. f(x) are the teacher's per-image features: the spatial mean of the input
     of every BN layer, concatenated (the authors' InstanceMeanHook on every BatchNorm2d); F_l,
     F_g the local and global features of up to n_neg images drawn without replacement from
     the memory bank (earlier rounds' images); valid marks the bank's filled rows. h, the
     projection head Dense(D) -> ReLU -> Dense(head_dim) -> L2 normalisation, is trained by
     its own Adam (lr, betas 0.9 / 0.999) on the same loss and kept across rounds.
     The round keeps the iterate of lowest loss (its images, and its features [f(x_l); f(x_g)]).
  2. The images go into the image pool as 8-bit pixels (the authors write PNG files):
     pool[r]; their features into the memory bank (a ring of bank_size rows).
  3. The competing student takes `kd_steps` distillation steps (students.distill_step: KL at
     student.temperature, student's optimiser and random shifts/flips) on images drawn
     uniformly, with replacement, from pool[0 .. r]: the authors' student, trained between
     rounds with its schedule over rounds x kd_steps steps (their reported accuracies are this
     student's).
The state (pool, bank, head and its optimiser, generator, competing student and its
optimiser, the round) is checkpointed through the shared loop, so a stopped run resumes at
its last saved round and ends where an uninterrupted run ends. Its evaluation is the
competing student's test accuracy; its sample grid shows the latest round's images.

Stage 'distill_cmi' (config.stage 'distill'): image_pool.DistillPool, a fresh student learns
KL(T || S) for student.steps steps on images drawn uniformly from the finished pool: the
final student (export reads it).

Published settings (zju-vipa/DataFree and zju-vipa/CMI, scripts/cmi/cmi_cifar10.sh and
datafree_kd.py, the same in Fast-Datafree's scripts/cmi_cifar.sh): 200 rounds ("epochs") of
one batch of 256 images, each 200 Adam iterations (g_steps) at lr 1e-3, betas (0.5, 0.999),
the generator reset every round (nz 256, ngf 64); w_bn 1, w_oh 1, w_adv 0.5, w_cr 0.8,
cr_T 0.2 (their wrn40_2 -> wrn16_1 adversarial and scratch scripts: 0.1, and w_oh 0.5 in the
first); memory bank 40,960, 4,096 negatives per iteration, head_dim 256; global view a random
32x32 crop of the image padded by 4 and a flip, local view RandomResizedCrop(scale 0.25 - 1)
and a flip; 400 student steps per round, batch 256, SGD lr 0.1, momentum 0.9, weight decay
1e-4, cosine over the 200 rounds, KD temperature 20, the pool read with random crops (pad 4)
and flips. For a ResNet-34 teacher the authors take the features of the inputs of its four
stages instead of every BN layer (here: every BN layer, 8,512 features). Their README's
tables: CIFAR-10 ResNet-34 -> ResNet-18 94.84%, WRN-40-2 -> WRN-16-1 90.01%; CIFAR-100
77.04% and 57.91% (configs/cifar10.py has the five pairs).
Differences: the local view's bilinear resize samples pixel centres (kornia's
align_corners=True stretches corner to corner), and an unfilled bank is masked rather than
sliced.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import config_lib
from datafree_jax import generator_parts
from datafree_jax import image_pool
from datafree_jax import losses
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax import paths
from datafree_jax import platforms
from datafree_jax import students

STAGE_SALT = 11                 # rng of the synthesis rounds
LOCAL_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect ratios

CONFIG_SECTIONS = {"cmi": {
    "rounds": (200, config_lib.POSITIVE_INT),        # synthesis rounds: batches in the pool
    "batch_size": (256, config_lib.POSITIVE_INT),    # images per round
    "iterations": (200, config_lib.POSITIVE_INT),    # generator steps per round
    # The generator's and latents' optimiser (reset every round), also the head's lr.
    "optimizer": ("adam", config_lib.Choice(config_lib.OPTIMIZERS)),
    "lr": (1e-3, config_lib.POSITIVE),
    "schedule": ("constant", config_lib.Choice(config_lib.SCHEDULES)),
    "warmup_steps": (0, config_lib.NON_NEGATIVE_INT),
    "weight_decay": (0.0, config_lib.NON_NEGATIVE),
    "b1": (0.5, config_lib.FRACTION), "b2": (0.999, config_lib.FRACTION),
    "latent_dim": (256, config_lib.POSITIVE_INT),
    "width": (128, config_lib.POSITIVE_INT),         # the generator's first block (2 ngf)
    "reset_generator": (True, config_lib.Flag()),    # re-initialise it every round
    "w_bn": (1.0, config_lib.NON_NEGATIVE),          # BN feature-distribution regulariser
    "w_oh": (1.0, config_lib.NON_NEGATIVE),          # cross-entropy towards the targets
    "w_adv": (0.5, config_lib.NON_NEGATIVE),         # decision-adversarial term
    "w_cr": (0.8, config_lib.NON_NEGATIVE),          # contrastive instance discrimination
    "cr_temperature": (0.2, config_lib.POSITIVE),
    "bank_size": (40960, config_lib.POSITIVE_INT),   # memory bank rows (a multiple of batch)
    "n_neg": (4096, config_lib.POSITIVE_INT),        # bank rows drawn per iteration
    "head_dim": (256, config_lib.POSITIVE_INT),
    "crop_pad": (4, config_lib.NON_NEGATIVE_INT),    # the global view's random crop padding
    "local_scale": (0.25, config_lib.FRACTION),      # the local view's smallest area
    "flip": (True, config_lib.Flag()),
    **image_pool.ROUND_FIELDS,  # targets, kd_steps, eval_every, checkpoint_every
}}


def directory(workdir: str) -> str:
  return paths.join(workdir, "cmi")


# --- The two views ------------------------------------------------------------------------------

def random_resized_crop(key, images, scale_min: float, ratio=LOCAL_RATIO):
  """Per image: a crop of area A * H * W, A ~ U[scale_min, 1], aspect ratio (width / height)
  r with log r ~ U[log ratio[0], log ratio[1]] (each side clipped to the image), at a uniform
  position, resized bilinearly back to H x W (torchvision's / kornia's RandomResizedCrop
  without their rejection sampling). Differentiable in the images."""
  n, h, w, c = images.shape
  k_a, k_r, k_y, k_x = jax.random.split(key, 4)
  area = jax.random.uniform(k_a, (n,), minval=scale_min, maxval=1.0) * (h * w)
  r = jnp.exp(jax.random.uniform(k_r, (n,), minval=math.log(ratio[0]),
                                 maxval=math.log(ratio[1])))
  cw = jnp.clip(jnp.sqrt(area * r), 1.0, w)
  ch = jnp.clip(jnp.sqrt(area / r), 1.0, h)
  y0 = jax.random.uniform(k_y, (n,)) * (h - ch)
  x0 = jax.random.uniform(k_x, (n,)) * (w - cw)

  def one(image, y0, x0, ch, cw):
    scale = jnp.stack([h / ch, w / cw])
    return jax.image.scale_and_translate(image, (h, w, c), (0, 1), scale,
                                         -jnp.stack([y0, x0]) * scale, method="linear",
                                         antialias=False)
  return jax.vmap(one)(images.astype(jnp.float32), y0, x0, ch, cw)


def views(key, pixels, ccfg, info):
  """(global view, local view) of pixel images (module docstring), normalised."""
  k_g, k_l, k_f = jax.random.split(key, 3)
  global_view = students.random_shift(k_g, pixels, ccfg.crop_pad, 0.0, ccfg.flip)
  local_view = random_resized_crop(k_l, pixels, ccfg.local_scale)
  if ccfg.flip:
    local_view = students.random_shift(k_f, local_view, 0, 0.0, True)
  return image_pool.normalize(global_view, info), image_pool.normalize(local_view, info)


# --- Teacher features, the head and the bank ----------------------------------------------------

def instance_features(example_moments):
  """(N, D): the per-image spatial means of every BN layer's input (the teacher's
  "bn_example_moments" collection), concatenated in the order of the layers' paths."""
  flat = jax.tree_util.tree_flatten_with_path(example_moments)[0]
  means = sorted((jax.tree_util.keystr(path), leaf) for path, leaf in flat
                 if getattr(path[-1], "key", None) == "mean")
  return jnp.concatenate([m.reshape(m.shape[0], -1) for _, m in means], axis=-1)


def teacher_views(teacher_model, teacher_vars, global_view, local_view, want_moments: bool):
  """(logits on the global view, its BN batch moments or None, global features, local
  features)."""
  cols = [models.BN_EXAMPLE_MOMENTS] + ([models.BN_INPUTS] if want_moments else [])
  logits, upd = teacher_model.apply(teacher_vars, global_view, train=False, mutable=cols)
  _, upd_l = teacher_model.apply(teacher_vars, local_view, train=False,
                                 mutable=[models.BN_EXAMPLE_MOMENTS])
  return (logits, upd.get(models.BN_INPUTS) if want_moments else None,
          instance_features(upd[models.BN_EXAMPLE_MOMENTS]),
          instance_features(upd_l[models.BN_EXAMPLE_MOMENTS]))


class ProjectionHead(nn.Module):
  """CMI's MLPHead: Dense(hidden) -> ReLU -> Dense(features) -> L2 normalisation (eps 1e-12)."""
  hidden: int
  features: int

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
    x = nn.Dense(self.features, name="fc2")(x)
    # max(||x||, eps) with a finite gradient at x = 0 (the unfilled bank's rows).
    return x / optax.safe_norm(x, 1e-12, axis=-1, keepdims=True)


def sample_bank(key, bank, filled, k: int):
  """(rows, valid): min(k, bank rows) rows of `bank`, the filled ones (row < filled) drawn
  uniformly without replacement first; valid marks the filled rows among them."""
  size = bank.shape[0]
  scores = jnp.where(jnp.arange(size) < filled, jax.random.uniform(key, (size,)), 2.0)
  _, index = jax.lax.top_k(-scores, min(k, size))
  return bank[index], index < filled


def reset_generator(generator, key):
  """The authors' reset_model: dense and conv kernels N(0, 0.02), biases 0, BN scales
  N(1, 0.02), BN offsets 0; BN running statistics as initialised. (params, batch_stats)."""
  params, batch_stats = generator_parts.init_generator(generator, key)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(flat))
  out = []
  for (path, leaf), k in zip(flat, keys):
    name = getattr(path[-1], "key", "")
    if name == "kernel":
      out.append(0.02 * jax.random.normal(k, leaf.shape, leaf.dtype))
    elif name == "scale":
      out.append(1.0 + 0.02 * jax.random.normal(k, leaf.shape, leaf.dtype))
    else:
      out.append(jnp.zeros_like(leaf))
  return jax.tree_util.tree_unflatten(treedef, out), batch_stats


# --- One synthesis round ------------------------------------------------------------------------

def round_loss(ccfg, info, parts, trainable, gen_stats, key, targets, cached, valid,
               teacher_vars, student_vars):
  """L of the module docstring for trainable = {'generator', 'z', 'head'}: (loss, (terms,
  new generator batch_stats, pixels, features [f(x_l); f(x_g)])). Pure."""
  generator, head, teacher_model, student_model = parts
  pixels, gen_stats = generator_parts.generate(generator, trainable["generator"], gen_stats,
                                               trainable["z"])
  global_view, local_view = views(key, pixels, ccfg, info)
  logits, moments, f_g, f_l = teacher_views(teacher_model, teacher_vars, global_view,
                                            local_view, ccfg.w_bn > 0)
  terms = {"ce": losses.cross_entropy(logits, targets)}
  loss = ccfg.w_oh * terms["ce"]
  if ccfg.w_bn > 0:
    terms["bn"] = losses.bn_moment_matching(moments, teacher_vars["batch_stats"], form="l2")
    loss = loss + ccfg.w_bn * terms["bn"]
  if ccfg.w_adv > 0:
    s_logits = student_model.apply(student_vars, global_view, train=False)
    terms["adv"] = losses.decision_adversarial_loss(logits, s_logits)
    loss = loss + ccfg.w_adv * terms["adv"]
  if ccfg.w_cr > 0:
    d = f_l.shape[-1]
    both = jnp.concatenate([f_l, cached[:, :d], f_g, cached[:, d:]], axis=0)
    proj = head.apply({"params": trainable["head"]}, both)
    proj_l, proj_g = jnp.split(proj, 2, axis=0)
    mask = jnp.concatenate([jnp.ones((f_l.shape[0],), bool), valid])
    terms["cr"] = losses.contrastive_instance_loss(proj_l, proj_g, ccfg.cr_temperature,
                                                   f_l.shape[0], mask)
    loss = loss + ccfg.w_cr * terms["cr"]
  feats = jax.lax.stop_gradient(jnp.concatenate([f_l, f_g], axis=-1))
  return loss, (terms, gen_stats, jax.lax.stop_gradient(pixels), feats)


def round_iteration(ccfg, grad_fn, gen_tx, head_tx, k_iter, bank, filled, targets,
                    teacher_vars, student_vars, i, carry):
  """Iteration i of a synthesis round (the body of its lax.fori_loop): one step of the
  generator, its latents and the projection head on round_loss, keeping the lowest-loss
  images and features seen so far."""
  gen_part, gen_opt, head_params, head_opt, gen_stats, best, _, _ = carry
  k = jax.random.fold_in(k_iter, i)
  k_views, k_bank = jax.random.split(k)
  cached, valid = sample_bank(k_bank, bank, filled, ccfg.n_neg)
  trainable = dict(gen_part, head=head_params)
  (loss, (terms, new_stats, pixels, feats)), grads = grad_fn(
      trainable, gen_stats, k_views, targets, cached, valid, teacher_vars, student_vars)
  better = loss < best["loss"]
  best = {"loss": jnp.where(better, loss, best["loss"]),
          "pixels": jnp.where(better, pixels, best["pixels"]),
          "feats": jnp.where(better, feats, best["feats"])}
  g_part = {"generator": grads["generator"], "z": grads["z"]}
  updates, gen_opt = gen_tx.update(g_part, gen_opt, gen_part)
  gen_part = optax.apply_updates(gen_part, updates)
  h_updates, head_opt = head_tx.update(grads["head"], head_opt, head_params)
  head_params = optax.apply_updates(head_params, h_updates)
  return gen_part, gen_opt, head_params, head_opt, new_stats, best, loss, terms


def synthesis_round(ccfg, info, parts, gen_tx, head_tx, data_sharding, seed: int, state,
                    teacher_vars):
  """Round state['step']: a generator optimised for ccfg.iterations steps (lax.fori_loop); its
  lowest-loss images stored in state['pool'][round], their features in the bank; returns
  (state with step + 1, metrics of the last iteration, the lowest loss and the teacher's
  agreement with the targets on the kept images)."""
  generator, head, teacher_model, _ = parts
  r = state["step"]
  key = common.step_key(seed, STAGE_SALT, r)
  k_gen, k_z, k_targets, k_iter = jax.random.split(key, 4)
  n = ccfg.batch_size
  if ccfg.reset_generator:
    gen_params, gen_stats = reset_generator(generator, k_gen)
  else:
    gen_params, gen_stats = state["generator"]["params"], state["generator"]["batch_stats"]
  z = jax.lax.with_sharding_constraint(
      jax.random.normal(k_z, (n, ccfg.latent_dim), jnp.float32), data_sharding)
  targets = jax.lax.with_sharding_constraint(
      image_pool.round_targets(k_targets, n, info.num_classes, ccfg.targets), data_sharding)
  s = state["student"]
  student_vars = common.variables_of(s["params"], s["batch_stats"])
  bank = state["bank"]
  filled = jnp.minimum(r * n, bank.shape[0])
  grad_fn = jax.value_and_grad(functools.partial(round_loss, ccfg, info, parts), has_aux=True)
  gen_part = {"generator": gen_params, "z": z}

  body = functools.partial(round_iteration, ccfg, grad_fn, gen_tx, head_tx, k_iter, bank, filled,
                           targets, teacher_vars, student_vars)
  shapes = jax.eval_shape(
      lambda: round_loss(ccfg, info, parts, dict(gen_part, head=state["head"]), gen_stats,
                         k_iter, targets, *sample_bank(k_iter, bank, filled, ccfg.n_neg),
                         teacher_vars, student_vars)[1])
  zeros = lambda t: jnp.zeros(t.shape, t.dtype)  # pylint: disable=unnecessary-lambda-assignment
  best = {"loss": jnp.asarray(jnp.inf, jnp.float32), "pixels": zeros(shapes[2]),
          "feats": zeros(shapes[3])}
  carry = (gen_part, gen_tx.init(gen_part), state["head"], state["head_opt"], gen_stats, best,
           jnp.zeros((), jnp.float32), jax.tree.map(zeros, shapes[0]))
  gen_part, _, head_params, head_opt, gen_stats, best, loss, terms = jax.lax.fori_loop(
      0, ccfg.iterations, body, carry)
  logits = teacher_model.apply(teacher_vars, image_pool.normalize(best["pixels"], info),
                               train=False)
  pool = jax.lax.dynamic_update_index_in_dim(state["pool"], image_pool.quantize_pixels(
      best["pixels"]), r, 0)
  start = (r * n) % bank.shape[0]
  bank = jax.lax.dynamic_update_slice_in_dim(bank, best["feats"].astype(bank.dtype), start, 0)
  metrics = dict(terms, loss=loss, best_loss=best["loss"],
                 agreement=losses.accuracy(logits, targets))
  return dict(state, pool=pool, bank=bank, head=head_params, head_opt=head_opt,
              generator={"params": gen_part["generator"], "batch_stats": gen_stats},
              step=r + 1), metrics


def feature_dim(config, info) -> int:
  """D: the teacher's per-image features (the channels of all its BN layers)."""
  model = models.get_classifier(config.teacher.model, info.num_classes, config.teacher.width)
  x = jnp.zeros((2,) + tuple(info.image_shape), jnp.float32)

  def f():
    variables = model.init(jax.random.key(0), x, train=False)
    _, upd = model.apply(variables, x, train=False, mutable=[models.BN_EXAMPLE_MOMENTS])
    return instance_features(upd.get(models.BN_EXAMPLE_MOMENTS, {"none": {"mean": x[:, :0]}}))
  return int(jax.eval_shape(f).shape[-1])


class Synthesis(image_pool.PoolSynthesis):
  """The synthesis rounds (image_pool.PoolSynthesis: the pool, the competing student, plan,
  programs and summary); the memory bank is the state's 'bank' (bank_size, 2 D) float32,
  replicated; round r fills bank rows (r * batch_size) mod bank_size onwards."""
  name = "cmi"
  selector = "cmi"
  section = "cmi"
  kind = "cmi_pool"
  round_unit = "generator steps"

  def check(self, config, info):
    c = config.cmi
    image_pool.check_synthesis(config, info, "cmi", bn_weights=("w_bn", "w_cr"))
    if c.bank_size % c.batch_size:
      raise config_lib.ConfigError(
          f"cmi.bank_size={c.bank_size} must be a multiple of cmi.batch_size={c.batch_size} "
          "(each round writes one batch of features into the bank)")
    if info.image_size % 4:
      raise config_lib.ConfigError(
          f"CMI's generator upsamples twice: the {info.image_size}x{info.image_size} images of "
          f"dataset {info.name!r} are not a multiple of 4 pixels wide")

  def identity(self, ctx):
    return dict(super().identity(ctx), bank_size=ctx.config.cmi.bank_size)

  def _parts(self, config, info):
    c = config.cmi
    generator = models.Generator(
        latent_dim=c.latent_dim, image_size=info.image_size, channels=info.channels,
        width=c.width, num_upsample=2, style="zju", dtype=common.compute_dtype(config),
        platform=platforms.of_config(config))
    return generator, ProjectionHead(feature_dim(config, info), c.head_dim)

  def _build(self, ctx, abstract: bool = False):
    """(initial state or its ShapeDtypeStructs, student, synthesis jit, competitor jit or None,
    mesh)."""
    config, info = ctx.config, ctx.info
    c = config.cmi
    mesh = parallel.make_mesh("data")
    rep, split = parallel.replicated(mesh), parallel.split_leading(mesh)
    student, tx_s, compete = image_pool.competing_student(ctx, c, mesh)
    generator, head = self._parts(config, info)
    head_tx = optax.adam(c.lr)
    d = head.hidden

    def init():
      key = jax.random.fold_in(jax.random.key(config.seed), STAGE_SALT)
      gp, gbs = reset_generator(generator, jax.random.fold_in(key, 1))
      hp = head.init(jax.random.fold_in(key, 2), jnp.zeros((2, d), jnp.float32))["params"]
      return dict(image_pool.initial_state(ctx, c, tx_s, key),
                  bank=jnp.zeros((c.bank_size, 2 * d), jnp.float32),
                  head=hp, head_opt=head_tx.init(hp),
                  generator={"params": gp, "batch_stats": gbs})
    if abstract:
      state = ckpt_lib.abstract_like(jax.eval_shape(init), rep)
    else:
      state = jax.jit(init, out_shardings=rep)()
    parts = (generator, head, ctx.teacher["model"], student)
    synth = jax.jit(functools.partial(
        synthesis_round, c, info, parts, common.make_optimizer(c, c.iterations), head_tx, split,
        config.seed), out_shardings=(rep, rep), donate_argnums=(0,))
    return state, student, synth, compete, mesh

SYNTHESIS = Synthesis()
DISTILL = image_pool.DistillPool(SYNTHESIS.name, "cmi", "cmi_pool", "CMI")
