"""Unit tests of small pieces: the CPU convolution's gradient, padded evaluation, BN statistics
helpers, optimisers and schedules, random shifts."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from datafree_jax import batching
from datafree_jax import bn_stats
from datafree_jax import common
from datafree_jax import evaluation
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax import students
from datafree_jax.ensemble import objective as ensemble_objective
from datafree_jax.models import cpu_conv

_DN = ("NHWC", "HWIO", "NHWC")


# ------------------------------------------------------------------ cpu_conv vs XLA's gradient

def _value_and_grads(conv, x, k, w):
  """(out, d/dx, d/dk) of sum(sin(conv(x, k)) * w): a random, non-constant cotangent."""
  def loss(x_, k_):
    out = conv(x_, k_)
    return jnp.sum(jnp.sin(out) * w), out
  (_, out), (gx, gk) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, k)
  return out, gx, gk


def _assert_close_to_lax(conv, x, k, wkey, strides, padding):
  ref_conv = lambda x_, k_: jax.lax.conv_general_dilated(x_, k_, strides, padding,
                                                         dimension_numbers=_DN)
  out_shape = jax.eval_shape(ref_conv, x, k).shape
  w = jax.random.normal(wkey, out_shape, jnp.float32)
  ref = _value_and_grads(ref_conv, x, k, w)
  got = _value_and_grads(conv, x, k, w)
  for name, a, b in zip(("output", "input gradient", "kernel gradient"), got, ref):
    assert a.shape == b.shape, name
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4, err_msg=name)


def _explicit(padding, x, k, strides):
  if isinstance(padding, str):
    return tuple(tuple(int(v) for v in p) for p in jax.lax.padtype_to_pads(
        x.shape[1:3], k.shape[:2], strides, padding))
  return padding


# (cin, cout, kernel, input size, stride, padding) -> the CPU path it takes. Every path of
# cpu_conv.cpu_path, with the models' own shapes among them (LeNet-5's conv1-3, the generators'
# upsampling and output convolutions at widths 16 and 128).
_CONV_CASES = [
    ((1, 6, 5, 32, 1, "VALID"), "space_to_depth"),          # LeNet-5 conv1 (f = 4)
    ((6, 16, 5, 14, 1, "VALID"), "space_to_depth"),         # LeNet-5 conv2 (f = 2)
    ((3, 5, 3, 9, 1, "SAME"), "space_to_depth"),            # odd size, SAME, cropped blocks
    ((2, 4, 3, 10, 1, ((2, 0), (0, 1))), "space_to_depth"),  # asymmetric padding
    ((16, 120, 5, 5, 1, "VALID"), "dense"),                 # LeNet-5 conv3
    ((4, 7, 3, 1, 2, "SAME"), "dense"),                     # 1x1 input padded to the window
    ((64, 128, 3, 6, 1, "SAME"), "matmul_kernel_grad"),     # a generator block at width 128
    ((64, 128, 3, 7, 1, ((1, 1), (1, 1))), "matmul_kernel_grad"),
    ((8, 1, 3, 12, 1, "SAME"), "xla"),                      # the generator's output conv
    ((16, 32, 3, 8, 1, "SAME"), "xla"),
    ((16, 32, 3, 9, 2, "SAME"), "xla"),                     # strided
    ((3, 8, 1, 8, 1, "VALID"), "xla"),                      # 1x1 kernel
]


def _case(cin, cout, ksize, size, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (2, size, size + (size > 1), cin), jnp.float32)
  k = jax.random.normal(keys[1], (ksize, ksize, cin, cout), jnp.float32) / math.sqrt(
      ksize * ksize * cin)
  return x, k, keys[2]


@pytest.mark.parametrize("case,path", _CONV_CASES, ids=[
    f"{p}-{c[0]}to{c[1]}-k{c[2]}-s{c[4]}-{i}" for i, (c, p) in enumerate(_CONV_CASES)])
def test_cpu_conv_paths_match_lax_value_and_gradients(case, path):
  cin, cout, ksize, size, stride, padding = case
  x, k, wkey = _case(cin, cout, ksize, size)
  if path == "dense":   # the window covers the padded input: square input
    x = x[:, :, :size]
  strides = (stride, stride)
  assert cpu_conv.cpu_path(x.shape, k.shape, strides, _explicit(padding, x, k, strides)) == path
  # As flax's nn.Conv calls it: dimension numbers from the shapes.
  dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, _DN)
  _assert_close_to_lax(
      lambda x_, k_: cpu_conv.conv_general_dilated(x_, k_, strides, padding,
                                                   dimension_numbers=dn),
      x, k, wkey, strides, padding)


def test_every_cpu_conv_path_is_tested():
  assert {p for _, p in _CONV_CASES} == set(cpu_conv.CPU_PATHS)


@pytest.mark.parametrize("padding", ["SAME", "VALID", ((2, 0), (0, 1))])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_nhwc_matches_lax_value_and_gradients(stride, padding):
  """The matrix-product kernel gradient at every stride and padding (the dispatcher sends it
  stride-1 convolutions only)."""
  x, k, wkey = _case(16, 32, 3, 8)
  strides = (stride, stride)
  _assert_close_to_lax(lambda x_, k_: cpu_conv.conv_nhwc(x_, k_, strides,
                                                          _explicit(padding, x, k, strides)),
                       x, k, wkey, strides, padding)


def test_cpu_conv_paths_are_in_the_program():
  """Each path puts its own operations in the jitted program: a plain convolution only on 'xla'."""
  def jaxpr(cin, cout, ksize, size, padding="SAME"):
    x, k, _ = _case(cin, cout, ksize, size)
    x = x[:, :, :size]
    dn = jax.lax.conv_dimension_numbers(x.shape, k.shape, _DN)
    f = lambda x_, k_: jnp.sum(cpu_conv.conv_general_dilated(x_, k_, (1, 1), padding,
                                                             dimension_numbers=dn) ** 2)
    return str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, k))
  ours = jaxpr(64, 128, 3, 6)            # matmul_kernel_grad: 3 * 3 matrix products
  assert ours.count("dot_general[") == 9
  assert "conv_general_dilated[" not in jaxpr(16, 120, 5, 5, "VALID")   # dense
  # space_to_depth: 4 x 4 blocks of the 32 x 32 image (8 x 8 of them, 16 channels).
  assert "f32[2,8,8,16]" in jaxpr(1, 6, 5, 32, "VALID")
  theirs = jaxpr(16, 32, 3, 8)           # xla
  assert theirs.count("conv_general_dilated[") == 3 and "dot_general[" not in theirs


def test_export_traces_the_portable_program():
  """export's model (no platform) traces XLA's own convolutions and max-pools (the exported
  program runs on other platforms); the same model for platform 'cpu' takes the CPU paths, and
  for 'gpu'/'tpu' XLA's own again, whatever backend traces it."""
  from datafree_jax import export  # pylint: disable=g-import-not-at-top
  model = models.get_classifier("lenet5_half_bn", 10)   # export.build_model's call
  assert model.platform is None
  params, batch_stats = common.init_model(model, jax.random.key(0), (32, 32, 1))
  v = common.variables_of(params, batch_stats)
  x = jnp.zeros((2, 32, 32, 1))

  def program(m):
    return str(jax.make_jaxpr(lambda v_, x_: m.apply(v_, x_, train=False))(v, x))
  exported = str(jax.make_jaxpr(export.logits_fn(model))(v, x))
  assert exported.count("conv_general_dilated[") == 3 and "reduce_window_max" in exported
  assert "dot_general[" in exported   # the two dense layers only
  for p in ("gpu", "tpu"):
    assert program(model.clone(platform=p)) == program(model)
  cpu = program(model.clone(platform="cpu"))
  assert "reduce_window_max" not in cpu and cpu.count("conv_general_dilated[") == 2


def test_cpu_max_pool_matches_flax():
  """Values and gradients equal flax's, with ties (after a ReLU) too."""
  x = jax.random.normal(jax.random.key(3), (2, 8, 6, 3))
  ref = lambda x_: nn.max_pool(x_, (2, 2), strides=(2, 2))
  ours = lambda x_: cpu_conv.max_pool(x_, (2, 2), (2, 2), platform="cpu")
  w = jax.random.normal(jax.random.key(4), (2, 4, 3, 3))
  for f in (lambda p: (lambda x_: jnp.sum(p(x_) * w)),
            lambda p: (lambda x_: jnp.sum(p(jax.nn.relu(x_ - 0.5)) * w))):
    np.testing.assert_array_equal(jax.grad(f(ours))(x), jax.grad(f(ref))(x))
  # Ties: the gradient goes to the first maximum of the window, as flax's.
  t = jnp.round(x)
  np.testing.assert_array_equal(jax.grad(lambda x_: jnp.sum(ours(x_) * w))(t),
                                jax.grad(lambda x_: jnp.sum(ref(x_) * w))(t))
  np.testing.assert_array_equal(ours(x), ref(x))
  # Windows that do not tile the input, and overlapping windows: flax's own.
  y = jax.random.normal(jax.random.key(5), (1, 7, 7, 2))
  np.testing.assert_array_equal(cpu_conv.max_pool(y, (2, 2), (2, 2), platform="cpu"),
                                nn.max_pool(y, (2, 2), strides=(2, 2)))
  np.testing.assert_array_equal(cpu_conv.max_pool(y, (3, 3), (2, 2), platform="cpu"),
                                nn.max_pool(y, (3, 3), strides=(2, 2)))


# ------------------------------------------------------------------ evaluate_classifier padding

_K = 3


def _linear_logits(variables, x):
  """A classifier whose predictions the test controls: logits = x[:, :K] @ w."""
  return x.reshape((x.shape[0], -1))[:, :_K] @ variables["w"]


@pytest.mark.parametrize("n,batch_size", [(7, 4), (13, 5)])
def test_evaluate_classifier_masks_the_padded_last_batch(n, batch_size):
  rng = np.random.default_rng(n)
  images = rng.normal(size=(n, 2, 2, 1)).astype(np.float32)
  w = rng.normal(size=(_K, _K)).astype(np.float32)
  # Padded zero images give all-zero logits, i.e. argmax 0 and label 0 (correct, CE ln K), if
  # they counted.
  logits = images.reshape(n, -1)[:, :_K].astype(np.float64) @ w
  labels = np.argmax(logits, -1).astype(np.int32)
  labels[::3] = (labels[::3] + 1) % _K  # A third wrong, the rest right.
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want_acc = np.mean(np.argmax(logits, -1) == labels)
  want_ce = -np.mean(logp[np.arange(n), labels])
  assert 0 < want_acc < 1
  got = evaluation.evaluate_classifier(_linear_logits, {"w": jnp.asarray(w)}, images, labels,
                                 parallel.make_mesh("data"), batch_size=batch_size)
  assert got["accuracy"] == pytest.approx(want_acc, abs=1e-6)
  assert got["loss"] == pytest.approx(want_ce, rel=1e-5)


# ------------------------------------------------------------------ BN statistics helpers

@pytest.fixture(scope="module")
def lenet_bn():
  model = models.get_classifier("lenet5_half_bn", 4)
  params, batch_stats = common.init_model(model, jax.random.key(0), (32, 32, 1))
  # Not the init values, and different across channels.
  leaves, treedef = jax.tree.flatten(batch_stats)
  rng = np.random.default_rng(1)
  batch_stats = jax.tree.unflatten(treedef, [
      jnp.asarray(x + 0.5 + rng.uniform(size=x.shape).astype(np.float32)) for x in leaves])
  return model, params, batch_stats


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bn_stats_class_without_images_gets_the_global_statistics(lenet_bn):
  model, params, batch_stats = lenet_bn
  rng = np.random.default_rng(0)
  class_images = [rng.normal(size=(3, 32, 32, 1)).astype(np.float32),
                  np.zeros((0, 32, 32, 1), np.float32),
                  rng.normal(size=(3, 32, 32, 1)).astype(np.float32) + 1.0,
                  np.zeros((0, 32, 32, 1), np.float32)]
  stats = bn_stats.compute(model, params, batch_stats, class_images)
  np.testing.assert_array_equal(stats["class_counts"], [3, 0, 3, 0])
  for k in (1, 3):
    _assert_tree_equal(bn_stats.for_class(stats, k), batch_stats)
  # The classes with images have their own statistics (not the running ones).
  for k in (0, 2):
    got = bn_stats.for_class(stats, k)
    assert not np.allclose(got["bn1"]["mean"], batch_stats["bn1"]["mean"])
    assert not np.allclose(got["bn3"]["var"], batch_stats["bn3"]["var"])


def test_bn_stats_global_only_targets_and_for_class(lenet_bn):
  _, _, batch_stats = lenet_bn
  stats = {"global": batch_stats}
  _assert_tree_equal(bn_stats.for_class(stats, 3), batch_stats)
  t = bn_stats.targets_for(stats, np.array([2, 0, 1], np.int32))
  assert jax.tree.structure(t) == jax.tree.structure(batch_stats)
  for leaf, ref in zip(jax.tree.leaves(t), jax.tree.leaves(batch_stats)):
    assert leaf.shape == (3,) + ref.shape
    for g in range(3):
      np.testing.assert_array_equal(np.asarray(leaf[g]), np.asarray(ref))


def test_ensemble_stack_targets_all_classes_member_gets_global_statistics(lenet_bn):
  _, _, batch_stats = lenet_bn
  num_classes = 4
  # Distinct class statistics: class c's leaves are the global ones + 10 * (c + 1).
  per_class = jax.tree.map(
      lambda x: jnp.stack([x + 10.0 * (c + 1) for c in range(num_classes)]), batch_stats)
  stats = {"global": batch_stats, "class": per_class,
           "class_counts": jnp.ones((num_classes,), jnp.int32)}
  class_ids = np.array([ensemble_objective.ALL_CLASSES, 2, 0, 3], np.int32)
  targets = ensemble_objective.stack_targets(stats, class_ids)
  assert jax.tree.structure(targets) == jax.tree.structure(batch_stats)
  for leaf, glob, cls in zip(jax.tree.leaves(targets), jax.tree.leaves(batch_stats),
                             jax.tree.leaves(per_class)):
    assert leaf.shape == (len(class_ids),) + glob.shape
    np.testing.assert_array_equal(np.asarray(leaf[0]), np.asarray(glob))
    for m in range(1, len(class_ids)):
      np.testing.assert_array_equal(np.asarray(leaf[m]), np.asarray(cls[class_ids[m]]))
  # Without an all-class member every member gets its class's statistics.
  ids = np.array([1, 3], np.int32)
  for leaf, cls in zip(jax.tree.leaves(ensemble_objective.stack_targets(stats, ids)),  # pylint: disable=protected-access
                       jax.tree.leaves(per_class)):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(cls[ids]))
  # The single all-class generator (G = 1) alone.
  single = ensemble_objective.stack_targets(stats, np.array([ensemble_objective.ALL_CLASSES], np.int32))
  for leaf, glob in zip(jax.tree.leaves(single), jax.tree.leaves(batch_stats)):
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(glob)[None])


# ------------------------------------------------------------------ make_optimizer

def _opt_cfg(**kw):
  base = {"optimizer": "sgd", "lr": 0.1, "schedule": "constant", "weight_decay": 0.0,
          "momentum": 0.0, "b1": 0.9, "b2": 0.999, "boundaries": (0.4, 0.8)}
  base.update(kw)
  return ml_collections.ConfigDict(base)


def _grads(g, steps):
  return np.broadcast_to(np.asarray(g, np.float64), (steps,))


def _run_optimizer(cfg, total_steps, p0, g, steps):
  """Applies `steps` updates of gradients g (a constant or one per step) to a scalar p0;
  returns the updates."""
  tx = common.make_optimizer(cfg, total_steps)
  p = jnp.float32(p0)

  @jax.jit
  def step(p, state, g_t):
    upd, state = tx.update(g_t, state, p)
    return p + upd, state, upd

  state = tx.init(p)
  out = []
  for g_t in _grads(g, steps):
    p, state, upd = step(p, state, jnp.float32(g_t))
    out.append(float(upd))
  return np.asarray(out)


def _lr_at(schedule, lr, t, total, boundaries=(0.4, 0.8)):
  if schedule == "constant":
    return lr
  if schedule == "cosine":
    return lr * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
  return lr * 0.1 ** sum(t >= int(f * total) for f in boundaries)


def _torch_reference(optimizer, lr_fn, p0, g, steps, wd, momentum=0.0, b1=0.9, b2=0.999,
                     eps=1e-8):
  """PyTorch's SGD / Adam (L2 weight decay added to the gradient), in float64."""
  p, buf, m, v, out = p0, 0.0, 0.0, 0.0, []
  for t, g_t in enumerate(_grads(g, steps)):
    d = g_t + wd * p
    if optimizer == "sgd":
      buf = momentum * buf + d if momentum else d
      upd = -lr_fn(t) * buf
    else:
      m = b1 * m + (1 - b1) * d
      v = b2 * v + (1 - b2) * d * d
      upd = -lr_fn(t) * (m / (1 - b1 ** (t + 1))) / (math.sqrt(v / (1 - b2 ** (t + 1))) + eps)
    out.append(upd)
    p += upd
  return np.asarray(out)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
@pytest.mark.parametrize("optimizer,momentum", [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_make_optimizer_updates_match_pytorch_style_reference(optimizer, momentum, schedule, wd):
  total, p0 = 10, 1.5
  g = 0.3 * np.array([1.0, 2.0, -0.5, 3.0, 1.0, -2.0, 0.5, 1.5, 1.0, -1.0, 2.0, 0.7])
  cfg = _opt_cfg(optimizer=optimizer, momentum=momentum, schedule=schedule, weight_decay=wd)
  got = _run_optimizer(cfg, total, p0, g, len(g))  # Past the end: cosine stays at 0.
  want = _torch_reference(optimizer, lambda t: _lr_at(schedule, 0.1, t, total), p0, g,
                          len(g), wd, momentum)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_make_optimizer_schedules_by_hand():
  g = 2.0
  # SGD without momentum: the update is -lr_t * g.
  cos = _run_optimizer(_opt_cfg(schedule="cosine", lr=0.4), 8, 0.0, g, 9)
  np.testing.assert_allclose(cos[[0, 2, 4, 6, 8]] / -g,
                             [0.4, 0.4 * 0.5 * (1 + math.cos(math.pi / 4)), 0.2,
                              0.4 * 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0],
                             rtol=1e-6, atol=1e-8)
  # total 7: boundaries int(0.4 * 7) = 2 and int(0.8 * 7) = 5.
  step = _run_optimizer(_opt_cfg(schedule="step", lr=0.4), 7, 0.0, g, 7)
  np.testing.assert_allclose(step / -g, [0.4, 0.4, 0.04, 0.04, 0.04, 0.004, 0.004], rtol=1e-6)
  custom = _run_optimizer(_opt_cfg(schedule="step", lr=0.4, boundaries=(0.5,)), 10, 0.0, g, 7)
  np.testing.assert_allclose(custom / -g, [0.4] * 5 + [0.04] * 2, rtol=1e-6)
  # Two boundaries on the same step (int(0.4 * 10) == int(0.45 * 10)): x0.01 there.
  same = _run_optimizer(_opt_cfg(schedule="step", lr=0.4, boundaries=(0.4, 0.45)), 10, 0.0, g, 6)
  np.testing.assert_allclose(same / -g, [0.4] * 4 + [0.004] * 2, rtol=1e-5)
  const = _run_optimizer(_opt_cfg(schedule="constant", lr=0.4), 3, 0.0, g, 5)
  np.testing.assert_allclose(const / -g, [0.4] * 5, rtol=1e-6)
  # Momentum 0.9: the second update is -lr * (g + 0.9 g).
  mom = _run_optimizer(_opt_cfg(momentum=0.9, lr=0.4), 5, 0.0, g, 2)
  np.testing.assert_allclose(mom, [-0.4 * g, -0.4 * 1.9 * g], rtol=1e-6)
  # Adam on a constant gradient: every bias-corrected update is ~ -lr * sign(g).
  adam = _run_optimizer(_opt_cfg(optimizer="adam", lr=0.01), 5, 0.0, -g, 3)
  np.testing.assert_allclose(adam, [0.01] * 3, rtol=1e-4)


def test_make_optimizer_sgd_weight_decay_is_added_to_the_gradient():
  lr, wd, p0, g = 0.1, 0.01, 3.0, 0.5
  for momentum in (0.0, 0.9):
    first = _run_optimizer(_opt_cfg(lr=lr, weight_decay=wd, momentum=momentum), 10, p0, g, 1)
    np.testing.assert_allclose(first, [-lr * (g + wd * p0)], rtol=1e-6)
  # Without weight decay the parameter does not enter the update.
  np.testing.assert_allclose(_run_optimizer(_opt_cfg(lr=lr), 10, p0, g, 1), [-lr * g], rtol=1e-6)


# ------------------------------------------------------------------ random_shift

_shift = jax.jit(students.random_shift, static_argnums=(2, 3, 4))


def _distinct_images(n, h=6, w=7, c=2):
  return (np.arange(n * h * w * c, dtype=np.float32).reshape(n, h, w, c) + 1.0)


def _find_shift(out, image, pad, fill):
  """The unique (dy, dx) with out == image translated by (dy, dx), `fill` outside; or None."""
  h, w, _ = image.shape
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), constant_values=fill)
  found = [(dy, dx) for dy in range(-pad, pad + 1) for dx in range(-pad, pad + 1)
           if np.array_equal(out, padded[pad - dy:pad - dy + h, pad - dx:pad - dx + w])]
  assert len(found) <= 1
  return found[0] if found else None


def test_random_shift_translates_each_image_by_its_own_shift():
  n, pad, fill = 64, 2, -5.0
  images = _distinct_images(n)
  out = np.asarray(_shift(jax.random.key(0), jnp.asarray(images), pad, fill, False))
  assert out.shape == images.shape
  shifts = []
  for i in range(n):
    s = _find_shift(out[i], images[i], pad, fill)
    assert s is not None, f"image {i} is not a translation of its input"
    shifts.append(s)
  dys, dxs = np.array(shifts).T
  # Every offset in [-pad, pad] occurs in both directions, independently of each other.
  assert set(dys) == set(range(-pad, pad + 1))
  assert set(dxs) == set(range(-pad, pad + 1))
  assert len(set(shifts)) > 10
  assert not np.all(dys == dxs)
  # The fill value appears exactly where the shifted image does not cover the output.
  for i in range(n):
    dy, dx = shifts[i]
    assert np.sum(out[i] == fill) == images.shape[3] * (
        images.shape[1] * images.shape[2] - (images.shape[1] - abs(dy)) * (images.shape[2] - abs(dx)))
  # Another key, other shifts.
  out2 = np.asarray(_shift(jax.random.key(1), jnp.asarray(images), pad, fill, False))
  assert not np.array_equal(out, out2)


def test_random_shift_fills_each_channel_with_its_own_value():
  """A per-channel fill (the teacher pads with black pixels: (0 - mean_c) / std_c)."""
  images = _distinct_images(64)
  out = np.asarray(_shift(jax.random.key(3), jnp.asarray(images), 2, (-5.0, -7.0), False))
  for i in range(64):
    for c, fill in enumerate((-5.0, -7.0)):
      s = _find_shift(out[i, :, :, c:c + 1], images[i, :, :, c:c + 1], 2, fill)
      assert s is not None, (i, c)
  assert (out == -5.0)[..., 0].any() and (out == -7.0)[..., 1].any()
  assert not (out == -7.0)[..., 0].any() and not (out == -5.0)[..., 1].any()


def test_random_shift_pad_zero_is_identity_and_flip_mirrors_about_half():
  n = 64
  images = _distinct_images(n)
  same = np.asarray(_shift(jax.random.key(0), jnp.asarray(images), 0, 0.0, False))
  np.testing.assert_array_equal(same, images)
  flipped = np.asarray(_shift(jax.random.key(0), jnp.asarray(images), 0, 0.0, True))
  mirror = images[:, :, ::-1, :]
  is_same = np.array([np.array_equal(flipped[i], images[i]) for i in range(n)])
  is_mirror = np.array([np.array_equal(flipped[i], mirror[i]) for i in range(n)])
  assert np.all(is_same | is_mirror), "a flipped image is neither the input nor its mirror"
  assert 0.25 * n < is_mirror.sum() < 0.75 * n
  # Flip and shift together: each output is a translation of the input or of its mirror.
  both = np.asarray(_shift(jax.random.key(2), jnp.asarray(images), 2, -1.0, True))
  kinds = []
  for i in range(n):
    s, m = _find_shift(both[i], images[i], 2, -1.0), _find_shift(both[i], mirror[i], 2, -1.0)
    assert (s is None) != (m is None)
    kinds.append(m is not None)
  assert 0 < sum(kinds) < n


# ------------------------------------------------------------------ distillation augmentation

def test_distill_step_augments_the_images_both_networks_see():
  """student.augment_shift/flip: one distill_step equals an unaugmented step on the images
  random_shift makes with the step's key folded with AUGMENT_SALT (teacher and student see the
  same shifted images), and differs from the unaugmented step on the raw images."""
  import functools  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from datafree_jax.stages import distill  # pylint: disable=g-import-not-at-top
  teacher = models.get_classifier("lenet5_bn", 10)
  tp, tbs = common.init_model(teacher, jax.random.key(1), (32, 32, 1))
  tvars = common.variables_of(tp, tbs)
  student = models.get_classifier("lenet5_half_bn", 10)
  sp, sbs = common.init_model(student, jax.random.key(2), (32, 32, 1))
  tx = optax.sgd(0.1)
  state = {"student": {"params": sp, "batch_stats": sbs}, "student_opt": tx.init(sp),
           "step": jnp.asarray(3, jnp.int32)}
  raw = jax.random.normal(jax.random.key(4), (16, 32, 32, 1))
  mesh = parallel.make_mesh("data")
  augment = dict(pad=2, fill=(-0.4242,), flip=True)
  off = dict(pad=0, fill=(0.0,), flip=False)

  def step(aug, images):
    fn = jax.jit(functools.partial(students.distill_step, student, tx, 2.0, teacher,
                                   distill.data_images, parallel.split_leading(mesh), 7, 16,
                                   aug))
    return fn(state, (images, None), tvars, None)
  key = common.step_key(7, students.STAGE_SALT, 3)
  shifted = students.random_shift(jax.random.fold_in(key, students.AUGMENT_SALT), raw, **augment)
  assert not np.allclose(shifted, raw)
  got, m_got = step(augment, raw)
  want, m_want = step(off, shifted)
  plain, m_plain = step(off, raw)
  np.testing.assert_allclose(m_got["loss_kd"], m_want["loss_kd"], rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), got, want)
  assert abs(float(m_got["loss_kd"]) - float(m_plain["loss_kd"])) > 1e-4


def test_bn_stats_streaming_pass_equals_the_in_memory_statistics():
  """bn_stats.compute_streaming over masked batches (per-class running sums of each example's
  moments) gives compute()'s statistics of the same images: class-conditional means and
  variances of every BN input, counts, and the global statistics for a class with no images."""
  model = models.get_classifier("resnet18_imagenet", 5, 8)
  params, batch_stats = common.init_model(model, jax.random.key(0), (32, 32, 3))
  batch_stats = jax.tree.map(lambda x: x + 0.3, batch_stats)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 32, 32, 3)).astype(np.float32)
  y = rng.integers(0, 4, 40).astype(np.int32)  # class 4 has no images
  want = bn_stats.compute(model, params, batch_stats, [x[y == k] for k in range(5)])
  got = bn_stats.compute_streaming(model, params, batch_stats,
                                   batching.masked_batches(x, y, 16), 5,
                                   parallel.make_mesh("data"))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  np.testing.assert_array_equal(got["class_counts"], np.bincount(y, minlength=5))
  for a, b in zip(jax.tree.leaves(got["class"]), jax.tree.leaves(want["class"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # Class 4: the global running statistics.
  _assert_tree_equal(bn_stats.for_class(got, 4), batch_stats)


def test_linear_warmup_scales_the_schedule_until_warmup_steps():
  """SGD without momentum on loss p (gradient 1): each step moves p by the learning rate,
  here 0.5 * min(1, (step + 1) / 4): 0.125, 0.25, 0.375, 0.5, 0.5; with a cosine schedule over
  8 steps the warmup factor multiplies cos: step 1's rate is 0.5 * 2/4 * (1 + cos(pi/8)) / 2."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict({"optimizer": "sgd", "lr": 0.5, "schedule": "constant",
                                   "warmup_steps": 4, "momentum": 0.0, "weight_decay": 0.0})
  tx = common.make_optimizer(cfg, 100)
  p = jnp.float32(1.0)
  state = tx.init(p)
  moves = []
  for _ in range(5):
    updates, state = tx.update(jnp.float32(1.0), state, p)
    moves.append(-float(updates))
  np.testing.assert_allclose(moves, [0.125, 0.25, 0.375, 0.5, 0.5], rtol=1e-6)
  cfg.schedule = "cosine"
  tx = common.make_optimizer(cfg, 8)
  state = tx.init(p)
  _, state = tx.update(jnp.float32(1.0), state, p)
  updates, _ = tx.update(jnp.float32(1.0), state, p)
  np.testing.assert_allclose(-float(updates), 0.5 * 0.5 * (1 + np.cos(np.pi / 8)) / 2, rtol=1e-6)
