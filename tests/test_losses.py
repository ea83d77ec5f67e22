"""Tests for datafree_jax.losses against values worked out by hand with math / numpy."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datafree_jax import losses

RTOL = 1e-5
E = math.e

# Shared small example: logits [[2, 0], [0, 1]].
#   row 0: softmax = [e^2, 1] / (e^2 + 1)
#   row 1: softmax = [1, e] / (1 + e)
LOGITS = np.array([[2.0, 0.0], [0.0, 1.0]], np.float32)
P_ROW0 = [E**2 / (E**2 + 1), 1 / (E**2 + 1)]
P_ROW1 = [1 / (1 + E), E / (1 + E)]


def test_cross_entropy_hand_value():
  # labels [0, 1]: -log(e^2/(e^2+1)) = log(1+e^-2); -log(e/(1+e)) = log(1+e^-1).
  expected = (math.log(1 + E**-2) + math.log(1 + E**-1)) / 2
  np.testing.assert_allclose(losses.cross_entropy(LOGITS, np.array([0, 1])), expected, rtol=RTOL)
  # labels [1, 0]: -log(1/(e^2+1)) = log(1+e^2); -log(1/(1+e)) = log(1+e).
  expected = (math.log(1 + E**2) + math.log(1 + E)) / 2
  np.testing.assert_allclose(losses.cross_entropy(LOGITS, np.array([1, 0])), expected, rtol=RTOL)


def test_onehot_loss_hand_value_and_gradient():
  logits = np.array([[0.0, 3.0], [1.0, -1.0]], np.float32)
  # argmax = [1, 0]: row 0 -log(e^3/(1+e^3)) = log(1+e^-3); row 1 -log(e/(e+e^-1)) = log(1+e^-2).
  expected = (math.log(1 + E**-3) + math.log(1 + E**-2)) / 2
  np.testing.assert_allclose(losses.onehot_loss(logits), expected, rtol=RTOL)
  # Gradient (softmax - onehot(argmax)) / N, the pseudo-labels being constants.
  p0 = [1 / (1 + E**3), E**3 / (1 + E**3)]
  p1 = [E / (E + E**-1), E**-1 / (E + E**-1)]
  expected_grad = np.array([[p0[0], p0[1] - 1], [p1[0] - 1, p1[1]]]) / 2
  np.testing.assert_allclose(jax.grad(losses.onehot_loss)(logits), expected_grad,
                             rtol=RTOL, atol=1e-7)


def test_onehot_loss_is_zero_for_confident_logits():
  logits = np.array([[100.0, 0.0, 0.0], [0.0, 0.0, 100.0]], np.float32)
  assert float(losses.onehot_loss(logits)) < 1e-6


def test_activation_loss_hand_value():
  features = np.array([[1.0, -2.0], [3.0, -4.0]], np.float32)
  np.testing.assert_allclose(losses.activation_loss(features), -(1 + 2 + 3 + 4) / 4, rtol=RTOL)
  features = np.array([[[0.5, -1.5, 0.0]]], np.float32)
  np.testing.assert_allclose(losses.activation_loss(features), -2.0 / 3, rtol=RTOL)


def test_information_entropy_loss_hand_value():
  p = [(P_ROW0[k] + P_ROW1[k]) / 2 for k in range(2)]
  expected = sum(pk * math.log10(pk) for pk in p)
  np.testing.assert_allclose(losses.information_entropy_loss(LOGITS), expected, rtol=RTOL)
  expected_nats = sum(pk * math.log(pk) for pk in p)
  np.testing.assert_allclose(losses.information_entropy_loss(LOGITS, base=E), expected_nats,
                             rtol=RTOL)


def test_information_entropy_loss_balanced_batch_is_minus_log10_k():
  # Each row is confident in a different class: the batch-mean distribution is uniform.
  logits = 5.0 * np.eye(4, dtype=np.float32)
  np.testing.assert_allclose(losses.information_entropy_loss(logits), -math.log10(4), rtol=RTOL)
  # A batch collapsed onto one class is far from the minimum.
  collapsed = np.tile(np.array([[5.0, 0.0, 0.0, 0.0]], np.float32), (4, 1))
  assert float(losses.information_entropy_loss(collapsed)) > -math.log10(4) + 0.2


def test_information_entropy_loss_no_nan_on_underflow():
  # exp(-1000) underflows to 0 in float32: p = [1, 0], so L_ie = 1*log(1) + 0 = 0.
  logits = np.array([[0.0, -1000.0], [0.0, -1000.0]], np.float32)
  value, grad = jax.value_and_grad(losses.information_entropy_loss)(logits)
  np.testing.assert_allclose(value, 0.0, atol=1e-7)
  assert np.all(np.isfinite(grad))


def test_kd_loss_hand_value():
  # Student logits equal per row: q = [1/2, 1/2].  KL(p||q) = sum_k p_k log(2 p_k).
  student = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
  kl = lambda p: sum(pk * math.log(2 * pk) for pk in p)
  expected = (kl(P_ROW0) + kl(P_ROW1)) / 2
  np.testing.assert_allclose(losses.kd_loss(LOGITS, student), expected, rtol=RTOL)
  # T = 2: teacher logits / 2 = [[1, 0], [0, 0.5]], student still uniform; times T^2 = 4.
  p0 = [E / (E + 1), 1 / (E + 1)]
  p1 = [1 / (1 + E**0.5), E**0.5 / (1 + E**0.5)]
  expected_t2 = 4 * (kl(p0) + kl(p1)) / 2
  np.testing.assert_allclose(losses.kd_loss(LOGITS, student, temperature=2.0), expected_t2,
                             rtol=RTOL)


def test_kd_loss_zero_when_equal():
  np.testing.assert_allclose(losses.kd_loss(LOGITS, LOGITS), 0.0, atol=1e-7)
  np.testing.assert_allclose(losses.kd_loss(LOGITS, LOGITS, temperature=3.0), 0.0, atol=1e-6)


def test_kd_loss_scales_with_temperature_squared():
  student = np.array([[0.5, -1.0], [2.0, 0.0]], np.float32)
  base = float(losses.kd_loss(LOGITS, student))
  for t in (2.0, 4.0):
    # Scaling both logits by T and dividing by T inside leaves the KL unchanged: only T^2 remains.
    np.testing.assert_allclose(losses.kd_loss(t * LOGITS, t * student, temperature=t),
                               t**2 * base, rtol=RTOL)


def test_kd_loss_gradients():
  student = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
  grad_t, grad_s = jax.grad(losses.kd_loss, argnums=(0, 1))(LOGITS, student)
  np.testing.assert_array_equal(grad_t, np.zeros_like(LOGITS))
  # d/ds of KL(p || softmax(s)) / N = (q - p) / N, with q = [1/2, 1/2].
  expected = (np.array([[0.5, 0.5], [0.5, 0.5]]) - np.array([P_ROW0, P_ROW1])) / 2
  np.testing.assert_allclose(grad_s, expected, rtol=RTOL, atol=1e-7)
  # With temperature T the student gradient is T * (q_T - p_T) / N.
  grad_t2, grad_s2 = jax.grad(losses.kd_loss, argnums=(0, 1))(LOGITS, student, 2.0)
  np.testing.assert_array_equal(grad_t2, np.zeros_like(LOGITS))
  p0 = [E / (E + 1), 1 / (E + 1)]
  p1 = [1 / (1 + E**0.5), E**0.5 / (1 + E**0.5)]
  expected = 2.0 * (np.full((2, 2), 0.5) - np.array([p0, p1])) / 2
  np.testing.assert_allclose(grad_s2, expected, rtol=RTOL, atol=1e-7)


def test_kd_loss_no_nan_when_teacher_prob_is_zero():
  # Teacher p = [1, 0] exactly; student uniform: KL = 1 * (log 1 - log 1/2) = log 2.
  teacher = np.array([[0.0, -np.inf]], np.float32)
  student = np.zeros((1, 2), np.float32)
  value, grad = jax.value_and_grad(losses.kd_loss, argnums=1)(teacher, student)
  np.testing.assert_allclose(value, math.log(2), rtol=RTOL)
  np.testing.assert_allclose(grad, [[-0.5, 0.5]], rtol=RTOL)
  # Underflowed (not -inf) teacher probability.
  teacher = np.array([[0.0, -1e4]], np.float32)
  np.testing.assert_allclose(losses.kd_loss(teacher, student), math.log(2), rtol=RTOL)


def test_accuracy_hand_value():
  logits = np.array([[2.0, 0.0], [0.0, 1.0], [3.0, 4.0]], np.float32)
  # argmax = [0, 1, 1] vs labels [0, 0, 1]: 2 of 3 right.
  np.testing.assert_allclose(losses.accuracy(logits, np.array([0, 0, 1])), 2 / 3, rtol=RTOL)
  np.testing.assert_allclose(losses.accuracy(logits, np.array([0, 1, 1])), 1.0, rtol=RTOL)


def test_total_variation_constant_image_is_zero():
  images = np.full((2, 5, 4, 3), 0.7, np.float32)
  np.testing.assert_allclose(losses.total_variation(images), 0.0, atol=1e-7)


def test_total_variation_hand_value():
  # x = [[1, 2], [4, 8]]: vertical |4-1|, |8-2| -> mean 4.5; horizontal |2-1|, |8-4| -> mean 2.5.
  image = np.array([[1.0, 2.0], [4.0, 8.0]], np.float32)[None, :, :, None]
  np.testing.assert_allclose(losses.total_variation(image), 7.0, rtol=RTOL)
  # A second image 2x the first has TV 14: batch mean 10.5.
  np.testing.assert_allclose(losses.total_variation(np.concatenate([image, 2 * image])), 10.5,
                             rtol=RTOL)


def test_total_variation_matches_loop_reference():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 3, 4, 2)).astype(np.float32)
  n, h, w, c = images.shape
  per_image = []
  for i in range(n):
    dh = [abs(images[i, y + 1, x, k] - images[i, y, x, k])
          for y in range(h - 1) for x in range(w) for k in range(c)]
    dw = [abs(images[i, y, x + 1, k] - images[i, y, x, k])
          for y in range(h) for x in range(w - 1) for k in range(c)]
    per_image.append(sum(dh) / len(dh) + sum(dw) / len(dw))
  np.testing.assert_allclose(losses.total_variation(images), sum(per_image) / n, rtol=RTOL)


def test_image_l2_prior_hand_value():
  # ||[1, 2, 4, 8]||_2 = sqrt(85), over sqrt(4 pixels); a zero image gives 0: batch mean / 2.
  image = np.array([[1.0, 2.0], [4.0, 8.0]], np.float32)[None, :, :, None]
  np.testing.assert_allclose(losses.image_l2_prior(image), math.sqrt(85) / 2, rtol=RTOL)
  batch = np.concatenate([image, np.zeros_like(image)])
  np.testing.assert_allclose(losses.image_l2_prior(batch), math.sqrt(85) / 4, rtol=RTOL)
  # Image-size invariant: tiling the image 3x2 (and over 2 channels) leaves the RMS unchanged.
  tiled = np.tile(image, (1, 3, 2, 2))
  np.testing.assert_allclose(losses.image_l2_prior(tiled), math.sqrt(85) / 2, rtol=RTOL)
  # Finite (zero) gradient at an all-zero image.
  grad = jax.grad(losses.image_l2_prior)(np.zeros((1, 2, 2, 1), np.float32))
  np.testing.assert_array_equal(grad, np.zeros((1, 2, 2, 1)))


def test_inceptionism_loss_hand_value():
  logits = np.array([[2.0, 0.0]], np.float32)
  image = np.array([[1.0, 2.0], [4.0, 8.0]], np.float32)[None, :, :, None]
  # CE log(1+e^-2) + 0.5 * TV 7 + 0.25 * sqrt(85)/2.
  expected = math.log(1 + E**-2) + 0.5 * 7.0 + 0.25 * math.sqrt(85) / 2
  value = losses.inceptionism_loss(logits, np.array([0]), image, w_tv=0.5, w_l2=0.25)
  assert value.shape == ()
  np.testing.assert_allclose(value, expected, rtol=RTOL)


def _moments(m0, v0, m1, v1, array=np.array):
  """A 2-layer nested pytree: conv1/BatchNorm_0 and BatchNorm_1."""
  return {
      "conv1": {"BatchNorm_0": {"mean": array(m0, np.float32), "var": array(v0, np.float32)}},
      "BatchNorm_1": {"mean": array(m1, np.float32), "var": array(v1, np.float32)},
  }


# conv1/BatchNorm_0: mean diff (-3, -4, 0) -> 5, var diff 0 -> 0: D = 5.
# BatchNorm_1:       mean diff (0, 2) -> 2, var diff (-3, -4) -> 5:  D = 7.
BATCH = _moments([0, 0, 0], [1, 1, 1], [1, 2], [1, 1])
TARGET = _moments([3, 4, 0], [1, 1, 1], [1, 0], [4, 5])


def test_bn_layers_flattens_and_sorts():
  for array in (np.array, jnp.array):
    tree = _moments([0, 0, 0], [1, 1, 1], [1, 2], [1, 1], array=array)
    layers = losses.bn_layers(tree)
    assert list(layers) == ["BatchNorm_1", "conv1/BatchNorm_0"]
    assert set(layers["BatchNorm_1"]) == {"mean", "var"}
    assert layers["conv1/BatchNorm_0"]["mean"] is tree["conv1"]["BatchNorm_0"]["mean"]
    assert layers["BatchNorm_1"]["var"] is tree["BatchNorm_1"]["var"]


def test_bn_layers_rejects_non_layer_leaf():
  with pytest.raises(ValueError):
    losses.bn_layers({"conv1": {"kernel": np.zeros(3)}})


def test_bn_moment_matching_l2_hand_value():
  np.testing.assert_allclose(losses.bn_moment_matching(BATCH, TARGET), 12.0, rtol=RTOL)
  np.testing.assert_allclose(losses.bn_moment_matching(BATCH, BATCH), 0.0, atol=1e-7)
  # Works under jit.
  np.testing.assert_allclose(jax.jit(losses.bn_moment_matching)(BATCH, TARGET), 12.0, rtol=RTOL)


def test_bn_moment_matching_layer_weights():
  value = losses.bn_moment_matching(BATCH, TARGET, layer_weights={"conv1/BatchNorm_0": 2.0})
  np.testing.assert_allclose(value, 2 * 5 + 7, rtol=RTOL)
  value = losses.bn_moment_matching(BATCH, TARGET,
                                    layer_weights={"conv1/BatchNorm_0": 0.0, "BatchNorm_1": 0.5})
  np.testing.assert_allclose(value, 3.5, rtol=RTOL)


def test_bn_moment_matching_kl_hand_value():
  # eps = 0:  KL(N(m, v) || N(mt, vt)) = 0.5 * (log(vt/v) + (v + (m - mt)^2)/vt - 1).
  #   conv1/BatchNorm_0, channels: (0,1 || 1,2) -> 0.5*log 2; (2,4 || 0,1) -> 0.5*(7 - log 4).
  #   BatchNorm_1, one channel: (1,2 || 1,2) -> 0.
  batch = _moments([0, 2], [1, 4], [1], [2])
  target = _moments([1, 0], [2, 1], [1], [2])
  layer0 = (0.5 * math.log(2) + 0.5 * (7 - math.log(4))) / 2
  np.testing.assert_allclose(losses.bn_moment_matching(batch, target, form="kl", eps=0.0),
                             layer0, rtol=RTOL)
  # BatchNorm_1 with a different target: (1,2 || 3,1) -> 0.5*(log(1/2) + (2 + 4)/1 - 1).
  target2 = _moments([1, 0], [2, 1], [3], [1])
  layer1 = 0.5 * (math.log(0.5) + 6 - 1)
  np.testing.assert_allclose(
      losses.bn_moment_matching(batch, target2, form="kl", eps=0.0,
                                layer_weights={"BatchNorm_1": 3.0}),
      layer0 + 3 * layer1, rtol=RTOL)
  # Default eps = 1e-5 added to both variances, first channel of layer 0 worked out explicitly.
  eps = 1e-5
  kl = lambda m, v, mt, vt: 0.5 * (math.log((vt + eps) / (v + eps)) + (v + eps + (m - mt)**2) /
                                   (vt + eps) - 1)
  expected = (kl(0, 1, 1, 2) + kl(2, 4, 0, 1)) / 2 + kl(1, 2, 3, 1)
  np.testing.assert_allclose(losses.bn_moment_matching(batch, target2, form="kl"), expected,
                             rtol=RTOL)


def test_bn_moment_matching_errors():
  with pytest.raises(ValueError, match="l2.*kl"):
    losses.bn_moment_matching(BATCH, TARGET, form="l1")
  with pytest.raises(ValueError, match="conv2/BatchNorm_0"):
    losses.bn_moment_matching(BATCH, TARGET, layer_weights={"conv2/BatchNorm_0": 1.0})
  with pytest.raises(ValueError):
    losses.bn_moment_matching(BATCH, {"BatchNorm_1": TARGET["BatchNorm_1"]})


@pytest.mark.parametrize("form", ["l2", "kl"])
def test_bn_moment_matching_gradient(form):
  # At equal moments the gradient is finite (zero); none flows into the target.
  grad_b, grad_t = jax.grad(losses.bn_moment_matching, argnums=(0, 1))(BATCH, BATCH, form)
  for leaf in jax.tree_util.tree_leaves(grad_b):
    np.testing.assert_allclose(leaf, np.zeros_like(leaf), atol=1e-6)
  for leaf in jax.tree_util.tree_leaves(grad_t):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  grad_b, grad_t = jax.grad(losses.bn_moment_matching, argnums=(0, 1))(BATCH, TARGET, form)
  for leaf in jax.tree_util.tree_leaves(grad_t):
    np.testing.assert_array_equal(leaf, np.zeros_like(leaf))
  if form == "l2":
    # d/dmu ||mu - mu_t|| = (mu - mu_t) / ||mu - mu_t||: BatchNorm_1 mean diff (0, 2) -> (0, 1),
    # var diff (-3, -4) -> (-0.6, -0.8); conv1 var diff is 0 -> gradient 0, not NaN.
    np.testing.assert_allclose(grad_b["BatchNorm_1"]["mean"], [0.0, 1.0], atol=1e-7)
    np.testing.assert_allclose(grad_b["BatchNorm_1"]["var"], [-0.6, -0.8], rtol=RTOL)
    np.testing.assert_allclose(grad_b["conv1"]["BatchNorm_0"]["mean"], [-0.6, -0.8, 0.0],
                               rtol=RTOL)
    np.testing.assert_array_equal(grad_b["conv1"]["BatchNorm_0"]["var"], [0.0, 0.0, 0.0])


def test_kd_loss_weighted_hand_value():
  # Per-example KLs k0, k1 (uniform student): weights (3, 1) give (3 k0 + k1) / 4; equal
  # weights the plain mean; weight 0 drops an example; all weights 0 give 0, not NaN.
  student = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
  kl = lambda p: sum(pk * math.log(2 * pk) for pk in p)
  k0, k1 = kl(P_ROW0), kl(P_ROW1)
  w = np.array([3.0, 1.0], np.float32)
  np.testing.assert_allclose(losses.kd_loss(LOGITS, student, weights=w), (3 * k0 + k1) / 4,
                             rtol=RTOL)
  np.testing.assert_allclose(losses.kd_loss(LOGITS, student, weights=np.ones(2, np.float32)),
                             (k0 + k1) / 2, rtol=RTOL)
  np.testing.assert_allclose(
      losses.kd_loss(LOGITS, student, weights=np.array([0.0, 2.0], np.float32)), k1, rtol=RTOL)
  assert float(losses.kd_loss(LOGITS, student, weights=np.zeros(2, np.float32))) == 0.0
  # Temperature: still times T^2.
  p0 = [E / (E + 1), 1 / (E + 1)]
  p1 = [1 / (1 + E**0.5), E**0.5 / (1 + E**0.5)]
  np.testing.assert_allclose(losses.kd_loss(LOGITS, student, 2.0, w),
                             4 * (3 * kl(p0) + kl(p1)) / 4, rtol=RTOL)


def test_adi_competition_loss_hand_value():
  # One example, K = 2, T = 1. Student logits [0, 0]: P = [0.5, 0.5]. Teacher logits
  # [log 3, 0]: Q = [0.75, 0.25]. M = [0.625, 0.375]; no clamp applies.
  #   KL(M || P) = 0.625 log(0.625/0.5) + 0.375 log(0.375/0.5)
  #   KL(M || Q) = 0.625 log(0.625/0.75) + 0.375 log(0.375/0.25)
  kl_mp = 0.625 * math.log(1.25) + 0.375 * math.log(0.75)
  kl_mq = 0.625 * math.log(0.625 / 0.75) + 0.375 * math.log(1.5)
  expected = 1.0 - (0.5 * kl_mp + 0.5 * kl_mq)
  t = np.array([[math.log(3.0), 0.0]], np.float32)
  s = np.zeros((1, 2), np.float32)
  np.testing.assert_allclose(losses.adi_competition_loss(t, s, temperature=1.0), expected,
                             rtol=RTOL)
  # The temperature divides the logits: logits x3 at T = 3 give the same value.
  np.testing.assert_allclose(losses.adi_competition_loss(3 * t, 3 * s, temperature=3.0),
                             expected, rtol=RTOL)
  # Equal outputs: JS = 0, the loss is 1.
  np.testing.assert_allclose(losses.adi_competition_loss(t, t), 1.0, rtol=RTOL)


def test_adi_competition_loss_clamps_probabilities():
  # Teacher certain of class 0: Q = [1, 0], clamped to [0.99, 0.01]; student P = [0.5, 0.5];
  # M = [0.75, 0.25] (inside the clamps).
  kl_mp = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
  kl_mq = 0.75 * math.log(0.75 / 0.99) + 0.25 * math.log(0.25 / 0.01)
  t = np.array([[100.0, 0.0]], np.float32)
  np.testing.assert_allclose(losses.adi_competition_loss(t, np.zeros((1, 2)), temperature=1.0),
                             1.0 - (0.5 * kl_mp + 0.5 * kl_mq), rtol=RTOL)
  # Opposite certainties: P = [0.01, 0.99], Q = [0.99, 0.01], M = [0.5, 0.5]; the divergence
  # 0.5 log(50) + 0.5 log(0.5 / 0.99) = 1.61 is clipped to 1: the loss is 0.
  s = np.array([[0.0, 100.0]], np.float32)
  np.testing.assert_allclose(losses.adi_competition_loss(t, s, temperature=1.0), 0.0, atol=1e-7)
  # Minimising it pushes teacher and student apart: at P = [0.5, 0.5], Q = [0.75, 0.25] the
  # gradient raises the student's logit 1 (away from the teacher's class 0).
  g = jax.grad(lambda s: losses.adi_competition_loss(
      jnp.array([[math.log(3.0), 0.0]]), s, temperature=1.0))(jnp.zeros((1, 2)))
  assert g[0, 1] < 0 < g[0, 0]


def test_deepinversion_tv_hand_values():
  # One 2x2 single-channel image [[0, 1], [3, 7]].
  #   horizontal pairs: |0-1|, |3-7| -> mean 2.5;  vertical: |0-3|, |1-7| -> mean 4.5
  #   anti-diagonal x[1,0] - x[0,1] = 3 - 1 -> 2;  diagonal x[0,0] - x[1,1] = -7 -> 7
  x = np.array([[0.0, 1.0], [3.0, 7.0]], np.float32).reshape(1, 2, 2, 1)
  np.testing.assert_allclose(losses.deepinversion_tv_l1(x), 2.5 + 4.5 + 2 + 7, rtol=RTOL)
  #   l2: sqrt(1 + 16) + sqrt(9 + 36) + 2 + 7
  np.testing.assert_allclose(losses.deepinversion_tv_l2(x),
                             math.sqrt(17) + math.sqrt(45) + 9, rtol=RTOL)
  const = np.full((2, 3, 4, 2), 0.3, np.float32)
  assert float(losses.deepinversion_tv_l1(const)) == 0.0
  assert float(losses.deepinversion_tv_l2(const)) == 0.0
  assert np.all(np.isfinite(jax.grad(losses.deepinversion_tv_l2)(jnp.asarray(const))))


def test_decision_adversarial_loss_hand_value():
  # Example 1: t = [log 3, 0] -> p = [0.75, 0.25]; s = [0, 0] -> q = [0.5, 0.5]; both predict
  # class 0: KL = 0.75 log 1.5 + 0.25 log 0.5. Example 2: s = [0, 1] predicts class 1, the
  # teacher (t = [1, 0]) class 0: masked out. L = -KL_1 / 2.
  kl1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
  t = np.array([[math.log(3.0), 0.0], [1.0, 0.0]], np.float32)
  s = np.array([[0.0, 0.0], [0.0, 1.0]], np.float32)
  np.testing.assert_allclose(losses.decision_adversarial_loss(t, s), -kl1 / 2, rtol=RTOL)
  # Equal outputs agree and match: 0.
  np.testing.assert_allclose(losses.decision_adversarial_loss(t, t), 0.0, atol=1e-7)
  # The masked example gets no gradient; the kept one is pushed apart: d/ds of -KL is
  # -(q - p) / N = -([0.5, 0.5] - [0.75, 0.25]) / 2 = [0.125, -0.125].
  g = jax.grad(lambda s: losses.decision_adversarial_loss(jnp.asarray(t), s))(jnp.asarray(s))
  np.testing.assert_allclose(g, [[0.125, -0.125], [0.0, 0.0]], atol=1e-6)
  # No agreeing example: 0.
  assert float(losses.decision_adversarial_loss(t[1:], s[1:])) == 0.0


def test_contrastive_instance_loss_hand_value():
  # Two current rows and two bank rows in 2-d, tau = 0.5: a = b = [e1, e2, e1, -e1].
  #   logits l = a b^T / 0.5:  row 0 [2, 0, 2, -2], row 1 [0, 2, 0, 0],
  #                            row 2 [2, 0, 2, -2], row 3 [-2, 0, -2, 2]
  #   CE_0 = log(2e^2 + 1 + e^-2) - 2;  CE_1 = log(e^2 + 3) - 2
  #   CE_2 = CE_0 (same row, its own column is entry 2);  CE_3 = log(2e^-2 + 1 + e^2) - 2
  e = math.exp
  ce0 = math.log(2 * e(2) + 1 + e(-2)) - 2
  ce1 = math.log(e(2) + 3) - 2
  ce3 = math.log(2 * e(-2) + 1 + e(2)) - 2
  f = np.array([[1, 0], [0, 1], [1, 0], [-1, 0]], np.float32)
  np.testing.assert_allclose(losses.contrastive_instance_loss(f, f, 0.5, 2),
                             (ce0 + ce1) / 2 + (ce0 + ce3) / 2, rtol=RTOL)
  # Bank row 3 unfilled: it is neither an anchor nor a candidate.
  #   CE_0 = log(2e^2 + 1) - 2, CE_1 = log(e^2 + 2) - 2, CE_2 = CE_0.
  ce0v = math.log(2 * e(2) + 1) - 2
  ce1v = math.log(e(2) + 2) - 2
  valid = np.array([True, True, True, False])
  np.testing.assert_allclose(losses.contrastive_instance_loss(f, f, 0.5, 2, valid),
                             (ce0v + ce1v) / 2 + ce0v, rtol=RTOL)
  # No bank row valid: the mean over the current rows only (log(e^2 + 1) - 2 for both).
  none = np.array([True, True, False, False])
  np.testing.assert_allclose(losses.contrastive_instance_loss(f, f, 0.5, 2, none),
                             math.log(e(2) + 1) - 2, rtol=RTOL)
  # Gradients reach the anchors only.
  ga, gb = jax.grad(lambda a, b: losses.contrastive_instance_loss(a, b, 0.5, 2),
                    argnums=(0, 1))(jnp.asarray(f), jnp.asarray(f))
  assert np.any(np.asarray(ga)) and not np.any(np.asarray(gb))


def test_bn_momentum_matching_hand_value():
  # One layer, two channels. Batch mean [1, 2], var [3, 4]; earlier rounds' mean [3, 0],
  # var [1, 0]; the teacher's mean [0, 0], var [1, 1].
  layer = lambda m, v: {"bn": {"mean": jnp.asarray(m, jnp.float32),
                               "var": jnp.asarray(v, jnp.float32)}}
  batch, prev, target = layer([1, 2], [3, 4]), layer([3, 0], [1, 0]), layer([0, 0], [1, 1])
  # rate 0.5: blended mean [2, 1], var [2, 2] -> ||[2, 1]|| + ||[1, 1]|| = sqrt 5 + sqrt 2.
  np.testing.assert_allclose(losses.bn_momentum_matching(batch, prev, target, 0.5),
                             math.sqrt(5) + math.sqrt(2), rtol=RTOL)
  # rate 0 ignores the earlier rounds: ||[1, 2]|| + ||[2, 3]||.
  np.testing.assert_allclose(losses.bn_momentum_matching(batch, prev, target, 0.0),
                             math.sqrt(5) + math.sqrt(13), rtol=RTOL)
  # No gradient flows into the earlier rounds' moments; the batch's is scaled by 1 - rate.
  g_prev = jax.grad(lambda p: losses.bn_momentum_matching(batch, p, target, 0.5))(prev)
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_prev))
  g = jax.grad(lambda b: losses.bn_momentum_matching(b, prev, target, 0.5))(batch)
  np.testing.assert_allclose(g["bn"]["mean"], 0.5 * np.array([2, 1]) / math.sqrt(5), rtol=1e-5)
