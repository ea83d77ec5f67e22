"""Loss functions of DAFL (Chen et al. 2019) and Luo et al. 2020, as pure functions.

Every function takes jnp (or numpy) arrays and returns a scalar jnp array; none holds state or
knows about models. Notation: N is the batch size, K the number of classes, and
softmax / log_softmax act over the last (class) axis.

DAFL generator loss (teacher T, generator G, z ~ N(0, I)):
  L_G = w_oh * onehot_loss(T(G(z))) + w_a * activation_loss(f_T) + w_ie * information_entropy_loss
and the student is trained with kd_loss(T(x), S(x)) on x = stop_gradient(G(z)).

Luo et al. generator loss:
  L_G = inceptionism_loss(T(G(z)), y, G(z), w_tv, w_l2) + w_mm * bn_moment_matching(...)
and the student is again trained with kd_loss on images from the frozen generators.

DeepInversion (Yin et al. 2020) optimises images x directly:
  L(x) = w_oh * CE(T(x'), y) + w_bn * bn_moment_matching(..., form='l2')
         + w_adv * adi_competition_loss(T(x'), S(x')) + w_tv * deepinversion_tv_l1(x)
         + w_tv_l2 * deepinversion_tv_l2(x) + w_l2 * image_l2_prior(x)
with x' a randomly jittered and flipped copy of x.

CMI (Fang et al. 2021) optimises a generator G and latents z per round:
  L = w_bn * bn_moment_matching(..., form='l2') + w_oh * CE(T(x_g), y)
      + w_adv * decision_adversarial_loss(T(x_g), S(x_g))
      + w_cr * contrastive_instance_loss(h(f(x_l), bank_l), h(f(x_g), bank_g), tau, N, valid)
with x = G(z), x_g / x_l its global / local augmented views, f the teacher's per-image
features, h a projection head and bank_* the features of earlier rounds' images.
Fast-DFKD (Fang et al. 2022) trains a generator G (a few steps per round, from a
meta-learned initialisation):
  L_G = w_bn * bn_momentum_matching(...) + w_oh * CE(T(x'), y)
        + w_adv * decision_adversarial_loss(T(x'), S(x')),   x' = augment(G(z)).
"""
from __future__ import annotations

import collections.abc
import math
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import optax

BN_MOMENT_FORMS = ("l2", "kl")


def _safe_l2_norm(x, axis):
  """Euclidean norm ||x||_2 along `axis` whose gradient is 0 (not NaN) where x == 0."""
  return optax.safe_norm(x, 0.0, axis=axis)


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy with integer labels.

    CE = -(1/N) sum_i log softmax(logits_i)[labels_i]
       = (1/N) sum_i (logsumexp(logits_i) - logits_i[labels_i]).

  Args:
    logits: (N, K) float array.
    labels: (N,) integer array with values in [0, K).

  Returns:
    Scalar mean cross-entropy (natural log).
  """
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  labels = jnp.asarray(labels)
  picked = jnp.take_along_axis(log_probs, labels[..., None].astype(jnp.int32), axis=-1)
  return -jnp.mean(picked)


def onehot_loss(logits):
  """DAFL one-hot (pseudo-label) loss L_oh = CE(logits, argmax(logits)).

  The pseudo-labels y_i = argmax_k logits_ik are constants (stop_gradient), so the gradient
  is (softmax(logits_i) - onehot(y_i)) / N: it pushes each output to be more confident in the
  class it already prefers. It is ~0 for very confident logits.

  Args:
    logits: (N, K) teacher logits on generated images.

  Returns:
    Scalar loss.
  """
  labels = jnp.argmax(jax.lax.stop_gradient(logits), axis=-1)
  return cross_entropy(logits, labels)


def activation_loss(features):
  """DAFL activation loss L_a = -mean(|f|), mean over all elements of the features.

  f are the teacher's features before its last fully-connected layer (e.g. (N, 120) in
  LeNet-5, (N, 512) after global average pooling in ResNet). Minimising L_a rewards large
  activations. Note it is unbounded below.

  Args:
    features: float array of any shape.

  Returns:
    Scalar loss (<= 0).
  """
  return -jnp.mean(jnp.abs(features))


def information_entropy_loss(logits, base=10.0):
  """DAFL information-entropy loss L_ie = sum_k p_k log_base(p_k), p = mean_i softmax(logits_i).

  L_ie is minus the entropy of the batch-averaged class distribution p, so -log_base(K) <= L_ie
  <= 0, with the minimum exactly when p is uniform: minimising it balances the classes of the
  generated batch (L_ie near 0 signals a generator collapsed onto one class). The official
  DAFL code uses log base 10, hence the default; base=math.e gives nats.

  log p_k is computed without forming log(0):
    log p_k = logsumexp_i(log_softmax(logits_i)_k) - log N,
  which stays finite when p_k underflows to 0 in floating point, so p_k log p_k = 0 and the
  gradient is finite there.

  Args:
    logits: (N, K) logits.
    base: logarithm base (> 0, != 1).

  Returns:
    Scalar loss (<= 0).
  """
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  n = log_probs.shape[0]
  log_p = jax.nn.logsumexp(log_probs, axis=0) - math.log(n)
  p = jnp.exp(log_p)
  return jnp.sum(p * log_p) / math.log(base)


def dafl_generator_loss(logits, features, w_oh, w_a, w_ie):
  """DAFL's generator objective w_oh * L_oh + w_a * L_a + w_ie * L_ie on the teacher's logits
  and penultimate features of generated images; returns (loss, {'l_oh', 'l_a', 'l_ie'})."""
  terms = {"l_oh": onehot_loss(logits), "l_a": activation_loss(features),
           "l_ie": information_entropy_loss(logits)}
  return w_oh * terms["l_oh"] + w_a * terms["l_a"] + w_ie * terms["l_ie"], terms


def kd_loss(teacher_logits, student_logits, temperature=1.0, weights=None):
  """Knowledge-distillation loss T^2 * KL(softmax(t/T) || softmax(s/T)), summed, / N.

    p_i = softmax(t_i / T),  q_i = softmax(s_i / T)
    L_kd = T^2 / N * sum_i sum_k p_ik (log p_ik - log q_ik)

  (PyTorch's KLDivLoss(reduction='batchmean') times T^2, as in DAFL's official code with T=1.)
  The T^2 factor (Hinton et al. 2015) keeps the student's gradient magnitude, T (q - p) / N
  per logit, comparable across temperatures; with T = 1 the loss is the plain KL.

  The teacher logits are wrapped in stop_gradient: the loss trains the student only. Both log
  probabilities come from log_softmax, and terms with p_ik = 0 (teacher logit -inf, or an
  underflowed probability) contribute exactly 0, so the loss is never NaN for finite student
  logits.

  Args:
    teacher_logits: (N, K) logits of the teacher.
    student_logits: (N, K) logits of the student.
    temperature: softmax temperature T > 0.
    weights: optional (N,) non-negative example weights w_i: the loss is then
      T^2 * sum_i w_i KL_i / sum_i w_i (the weighted mean; 0 when every weight is 0).

  Returns:
    Scalar loss (>= 0).
  """
  teacher_logits = jax.lax.stop_gradient(
      teacher_logits.astype(jnp.promote_types(teacher_logits.dtype, jnp.float32)))
  student_logits = student_logits.astype(jnp.promote_types(student_logits.dtype, jnp.float32))
  log_p = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  p = jnp.exp(log_p)
  terms = jnp.where(p > 0, p * (log_p - log_q), 0.0)
  if weights is not None:
    per_example = jnp.sum(terms, axis=-1)
    total = jnp.sum(weights)
    return jnp.sum(weights * per_example) / jnp.maximum(total, 1e-30) * temperature**2
  n = teacher_logits.shape[0]
  return jnp.sum(terms) / n * temperature**2


def accuracy(logits, labels):
  """Top-1 accuracy: (1/N) sum_i [argmax_k logits_ik == labels_i], as a float32 scalar."""
  return jnp.mean((jnp.argmax(logits, axis=-1) == jnp.asarray(labels)).astype(jnp.float32))


def total_variation(images):
  """Anisotropic L1 total variation, normalised to be independent of the image size.

  For an image x of shape (H, W, C):
    TV(x) = mean_{h<H-1, w, c} |x[h+1, w, c] - x[h, w, c]|
          + mean_{h, w<W-1, c} |x[h, w+1, c] - x[h, w, c]|
  i.e. the mean absolute difference between vertical neighbours plus that between horizontal
  neighbours (not their sum, as in the usual definition), so an image prior weight w_tv means
  the same for 32x32 and 224x224 images. The batch value is the mean of TV over the images.
  A direction with a single row/column contributes 0.

  Args:
    images: (N, H, W, C) float array.

  Returns:
    Scalar loss (>= 0; 0 for constant images).
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"total_variation expects NHWC images, got shape {images.shape}")
  _, h, w, _ = images.shape
  tv = jnp.zeros((), images.dtype)
  if h > 1:
    tv = tv + jnp.mean(jnp.abs(images[:, 1:, :, :] - images[:, :-1, :, :]))
  if w > 1:
    tv = tv + jnp.mean(jnp.abs(images[:, :, 1:, :] - images[:, :, :-1, :]))
  # Every image has the same number of differences, so the mean over all elements equals the
  # mean over the batch of the per-image means.
  return tv


def image_l2_prior(images):
  """Image L2 prior: per image ||x||_2 / sqrt(H*W*C) (the RMS pixel value), mean over batch.

    R_l2 = (1/N) sum_i sqrt( (1/(H W C)) sum_{h,w,c} x_i[h, w, c]^2 )

  This is the ||x||_2 prior of Luo et al. scaled by 1/sqrt(H*W*C), so that its weight w_l2 does
  not depend on the image size (tiling an image leaves it unchanged). The norm is computed so
  that its gradient is 0, not NaN, at an all-zero image.

  Args:
    images: (N, H, W, C) float array.

  Returns:
    Scalar loss (>= 0).
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"image_l2_prior expects NHWC images, got shape {images.shape}")
  n = images.shape[0]
  flat = images.reshape(n, -1)
  norms = _safe_l2_norm(flat, axis=1)
  return jnp.mean(norms) / math.sqrt(flat.shape[1])


def inceptionism_loss(logits, labels, images, w_tv, w_l2):
  """Luo et al.'s inceptionism loss: CE(logits, labels) + w_tv * TV(x) + w_l2 * R_l2(x).

  logits are the teacher's outputs on the generated images x, labels the target classes (the
  generator's class in a per-class ensemble, or the teacher's argmax). TV is total_variation and
  R_l2 is image_l2_prior, both size-normalised (see their docstrings).

  Args:
    logits: (N, K) teacher logits on the images.
    labels: (N,) integer target classes.
    images: (N, H, W, C) generated images.
    w_tv: weight of the total-variation prior.
    w_l2: weight of the L2 prior.

  Returns:
    Scalar loss.
  """
  return (cross_entropy(logits, labels) + w_tv * total_variation(images) +
          w_l2 * image_l2_prior(images))


def _is_layer(node) -> bool:
  return isinstance(node, collections.abc.Mapping) and set(node.keys()) == {"mean", "var"}


def bn_layers(moments) -> dict[str, dict]:
  """Flattens a nested moments pytree into {'path/to/layer': {'mean': m, 'var': v}}.

  A "layer" node is a mapping with exactly the keys 'mean' and 'var' (per-channel arrays of
  shape (C,)); every other node must be a mapping, and the path of keys down to a layer is
  joined with '/'. E.g. {'conv1': {'BatchNorm_0': {'mean': m0, 'var': v0}},
  'BatchNorm_1': {'mean': m1, 'var': v1}} gives {'BatchNorm_1': {...}, 'conv1/BatchNorm_0':
  {...}}. The result is sorted by layer name and the leaves are returned as they are (jnp or
  numpy). Any mapping (dict, flax FrozenDict) is accepted.

  Args:
    moments: nested mapping of moments.

  Returns:
    dict from '/'-joined layer name to {'mean': ..., 'var': ...}, in sorted order.

  Raises:
    ValueError: if a node is neither a mapping nor inside a layer node.
  """
  found = {}

  def visit(node, path):
    if _is_layer(node):
      found["/".join(path)] = {"mean": node["mean"], "var": node["var"]}
    elif isinstance(node, collections.abc.Mapping):
      for key, child in node.items():
        visit(child, path + (str(key),))
    else:
      raise ValueError(
          f"bn_layers: node {'/'.join(path) or '<root>'!r} is not a mapping nor a layer "
          f"with exactly the keys 'mean' and 'var' (got {type(node).__name__})")

  visit(moments, ())
  return {name: found[name] for name in sorted(found)}


def bn_moment_matching(batch_moments, target_moments, form="l2",
                       layer_weights: Optional[Mapping[str, float]] = None, eps=1e-5):
  """BatchNorm moment-matching loss of Luo et al.: sum over BN layers l of lambda_l * D_l.

  For every BN layer l (per-channel batch mean mu, variance var of the layer's input on the
  generated images; stored teacher statistics mu_t, var_t):
    form='l2' (the paper's choice):
      D_l = ||mu - mu_t||_2 + ||var - var_t||_2            (Euclidean norms over channels,
                                                            not squared)
    form='kl' (the alternative it discusses), mean over channels c of KL(N(mu, var) ||
      N(mu_t, var_t)) with eps added to both variances:
      D_l = mean_c 0.5 * ( log((var_t + eps) / (var + eps))
                           + (var + eps + (mu - mu_t)^2) / (var_t + eps) - 1 )
  and lambda_l = layer_weights.get(l, 1.0) (1 for all layers when layer_weights is None).
  Layer names are the '/'-joined paths of bn_layers. The l2 norms have gradient 0 (not NaN)
  where the moments already match. target_moments are wrapped in stop_gradient: gradients flow
  into batch_moments only.

  Args:
    batch_moments: nested moments pytree of the generated batch (see bn_layers).
    target_moments: pytree with the same layers: the teacher's running statistics.
    form: 'l2' or 'kl'.
    layer_weights: optional mapping from layer name to weight.
    eps: variance offset of the 'kl' form (unused by 'l2').

  Returns:
    Scalar loss (>= 0).

  Raises:
    ValueError: on an unknown form, a layer_weights key that names no layer, pytrees with
      different layers or moment shapes, or pytrees without any layer.
  """
  if form not in BN_MOMENT_FORMS:
    raise ValueError(f"Unknown moment-matching form {form!r}; allowed forms: {BN_MOMENT_FORMS}")
  batch = bn_layers(batch_moments)
  target = bn_layers(target_moments)
  if batch.keys() != target.keys():
    raise ValueError(
        f"batch and target moments have different layers: {sorted(batch)} vs {sorted(target)}")
  if not batch:
    raise ValueError("bn_moment_matching: the moments pytrees contain no BN layer")
  layer_weights = dict(layer_weights or {})
  unknown = sorted(set(layer_weights) - set(batch))
  if unknown:
    raise ValueError(f"layer_weights names unknown layers {unknown}; layers: {sorted(batch)}")

  total = jnp.zeros((), jnp.float32)
  for name, moments in batch.items():
    mu, var = jnp.asarray(moments["mean"]), jnp.asarray(moments["var"])
    mu_t = jax.lax.stop_gradient(jnp.asarray(target[name]["mean"]))
    var_t = jax.lax.stop_gradient(jnp.asarray(target[name]["var"]))
    if mu.shape != mu_t.shape or var.shape != var_t.shape:
      raise ValueError(
          f"layer {name!r}: moment shapes differ: mean {mu.shape} vs {mu_t.shape}, "
          f"var {var.shape} vs {var_t.shape}")
    if form == "l2":
      d = _safe_l2_norm(mu - mu_t, axis=None) + _safe_l2_norm(var - var_t, axis=None)
    else:
      kl = 0.5 * (jnp.log((var_t + eps) / (var + eps)) +
                  (var + eps + (mu - mu_t)**2) / (var_t + eps) - 1.0)
      d = jnp.mean(kl)
    total = total + layer_weights.get(name, 1.0) * d
  return total


def adi_competition_loss(teacher_logits, student_logits, temperature=3.0, low=0.01, high=0.99):
  """Adaptive DeepInversion's competition term: 1 - clip(JS, 0, 1), small where teacher and
  student disagree, so that minimising it moves the images to where they do.

  As in the authors' code (NVlabs/DeepInversion, zju-vipa/DataFree's jsdiv):
    P = softmax(s / T), Q = softmax(t / T), M = (P + Q) / 2, each then clamped to [low, high];
    JS = 0.5 * KL(M || P) + 0.5 * KL(M || Q),  KL(M || P) = (1/N) sum_i sum_k M_ik log(M_ik / P_ik)
  (PyTorch's kl_div(log P, M, reduction='batchmean'): the mixture M is the first argument of
  both KL terms, the reverse of the textbook Jensen-Shannon divergence). The clamps make the
  gradient 0 through probabilities outside [low, high]. Gradients flow into both logits (the
  images reach the loss through teacher and student).

  Args:
    teacher_logits: (N, K) teacher logits.
    student_logits: (N, K) student logits.
    temperature: softmax temperature T (the authors' 3).
    low, high: the probability clamps (the authors' 0.01, 0.99).

  Returns:
    Scalar loss in [0, 1].
  """
  p = jax.nn.softmax(student_logits / temperature, axis=-1)
  q = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  m = jnp.clip(0.5 * (p + q), low, high)
  p, q = jnp.clip(p, low, high), jnp.clip(q, low, high)
  n = teacher_logits.shape[0]
  kl_mp = jnp.sum(m * (jnp.log(m) - jnp.log(p))) / n
  kl_mq = jnp.sum(m * (jnp.log(m) - jnp.log(q))) / n
  return 1.0 - jnp.clip(0.5 * kl_mp + 0.5 * kl_mq, 0.0, 1.0)


def _neighbour_differences(images):
  """DeepInversion's four neighbour differences of NHWC images: horizontal, vertical and the
  two diagonals (the authors' diff1..diff4)."""
  x = jnp.asarray(images)
  if x.ndim != 4:
    raise ValueError(f"expected NHWC images, got shape {x.shape}")
  return (x[:, :, :-1, :] - x[:, :, 1:, :],        # horizontal neighbours
          x[:, :-1, :, :] - x[:, 1:, :, :],        # vertical neighbours
          x[:, 1:, :-1, :] - x[:, :-1, 1:, :],     # anti-diagonal
          x[:, :-1, :-1, :] - x[:, 1:, 1:, :])     # diagonal


def deepinversion_tv_l1(images):
  """DeepInversion's L1 total variation: the sum over the four neighbour directions
  (horizontal, vertical, both diagonals) of the mean absolute difference of neighbours.

    TV_l1(x) = sum_{d in 4 directions} mean |x[p] - x[p + d]|   (mean over batch, pixels, channels)

  (the authors' get_image_prior_losses' loss_var_l1; its /255 and *255 cancel). Unlike
  total_variation it counts the diagonals too. A direction with no pairs contributes 0.

  Args:
    images: (N, H, W, C) float array.

  Returns:
    Scalar loss (>= 0; 0 for constant images).
  """
  return sum((jnp.mean(jnp.abs(d)) if d.size else jnp.zeros(()))
             for d in _neighbour_differences(images))


def deepinversion_tv_l2(images):
  """DeepInversion's L2 total variation: the sum over the four neighbour directions of the
  Frobenius norm of the neighbour differences over the whole batch (the authors'
  loss_var_l2; NVlabs' CIFAR-10 script weights it by 2.5e-5). It grows with batch and image
  size. The norms have gradient 0, not NaN, at constant images.

  Args:
    images: (N, H, W, C) float array.

  Returns:
    Scalar loss (>= 0).
  """
  return sum(_safe_l2_norm(d, axis=None) for d in _neighbour_differences(images))


def decision_adversarial_loss(teacher_logits, student_logits):
  """CMI's and Fast-DFKD's (zju-vipa/DataFree's and Fast-Datafree's) "decision adversarial"
  term: minus the mean over the batch of KL(softmax(t_i) || softmax(s_i)) over the examples on
  which student and teacher predict the same class, so that minimising it moves images to where
  the student still agrees with the teacher but matches it badly:

    L_adv = -(1/N) sum_i [argmax_k s_ik == argmax_k t_ik] * sum_k p_ik (log p_ik - log q_ik),
    p_i = softmax(t_i), q_i = softmax(s_i)

  (the authors' -(kldiv(s_out, t_out, reduction='none').sum(1) * mask).mean(), temperature 1;
  the mask is a constant). Gradients flow into both logits. Terms with p_ik = 0 add 0.

  Args:
    teacher_logits: (N, K) teacher logits.
    student_logits: (N, K) student logits.

  Returns:
    Scalar loss (<= 0).
  """
  t = teacher_logits.astype(jnp.promote_types(teacher_logits.dtype, jnp.float32))
  s = student_logits.astype(jnp.promote_types(student_logits.dtype, jnp.float32))
  log_p, log_q = jax.nn.log_softmax(t, axis=-1), jax.nn.log_softmax(s, axis=-1)
  p = jnp.exp(log_p)
  kl = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
  agree = jax.lax.stop_gradient(
      (jnp.argmax(s, axis=-1) == jnp.argmax(t, axis=-1)).astype(kl.dtype))
  return -jnp.mean(kl * agree)


def contrastive_instance_loss(anchors, positives, temperature, num_current: int, valid=None):
  """CMI's contrastive instance-discrimination loss (zju-vipa/CMI's "naive implementation").

  Row i of `anchors` (the projected features of one view of image i) should pick row i of
  `positives` (the other view of the same image) among all rows j of `positives`:

    l_ij = <a_i, b_j> / tau,   CE_i = logsumexp_{j valid} l_ij - l_ii
    L = mean_{i < n} CE_i + mean_{i >= n, i valid} CE_i

  where the first n = num_current rows are the images being synthesised (always valid) and the
  rest come from the memory bank (rows with valid_i False, unfilled slots of the bank, are
  neither anchors nor candidates; the second mean is 0 when no bank row is valid). The two
  means are taken apart, as the authors do, so that a large bank does not shrink the gradient
  of the current images. `positives` are constants (the authors detach that side): gradients
  flow into `anchors` only. The features are used as given (CMI's projection head
  L2-normalises them).

  Args:
    anchors: (M, d) float array, M >= num_current.
    positives: (M, d) float array.
    temperature: tau > 0.
    num_current: n, the number of leading rows that are the current batch.
    valid: optional (M,) bool array; rows >= n with False are left out. None: all valid.

  Returns:
    Scalar loss (>= 0).
  """
  a = anchors.astype(jnp.promote_types(anchors.dtype, jnp.float32))
  b = jax.lax.stop_gradient(positives.astype(a.dtype))
  m = a.shape[0]
  if valid is None:
    valid = jnp.ones((m,), bool)
  valid = jnp.asarray(valid, bool).at[:num_current].set(True)
  logits = (a @ b.T) / temperature
  masked = jnp.where(valid[None, :], logits, -jnp.inf)
  ce = jax.nn.logsumexp(masked, axis=-1) - jnp.diagonal(logits)
  current = jnp.mean(ce[:num_current])
  rest = valid[num_current:].astype(ce.dtype)
  cached = jnp.sum(jnp.where(rest > 0, ce[num_current:], 0.0)) / jnp.maximum(jnp.sum(rest), 1.0)
  return current + cached


def bn_momentum_matching(batch_moments, previous_moments, target_moments, rate):
  """Fast-DFKD's BN feature regulariser with momentum (the authors' DeepInversionHook with
  bn_mmt): the l2 form of bn_moment_matching on moments blended with those of earlier rounds.

    mu'_l = (1 - rate) * mu_l + rate * mu_l^prev,   var'_l = (1 - rate) * var_l + rate * var_l^prev
    L = sum_l ||mu'_l - mu_l^T||_2 + ||var'_l - var_l^T||_2

  mu_l, var_l: layer l's batch moments now; mu_l^prev, var_l^prev: the running average of the
  last iteration's moments of the previous rounds (constants: no gradient flows into them);
  mu_l^T, var_l^T: the teacher's running statistics. rate = 0 is bn_moment_matching(form='l2')
  (the authors' first round). The blend lets one round's batch match the statistics together
  with the earlier rounds' batches instead of alone.

  Args:
    batch_moments, previous_moments, target_moments: moments pytrees with the same layers
      (see bn_layers).
    rate: the momentum in [0, 1] (the authors' 0.9); a number or a scalar array.

  Returns:
    Scalar loss (>= 0).
  """
  previous = jax.lax.stop_gradient(previous_moments)
  blended = jax.tree.map(lambda m, p: (1.0 - rate) * m + rate * p, batch_moments, previous)
  return bn_moment_matching(blended, target_moments, form="l2")
