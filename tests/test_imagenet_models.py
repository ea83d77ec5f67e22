"""ImageNet classifiers (models/imagenet.py) and the computation dtype of every model.

Full-size models are only traced (jax.eval_shape): nothing of their size is materialised. The
tiny models get their variables from `_random_variables` (NumPy draws into the shapes of
eval_shape(model.init)) rather than from model.init, whose threefry initialisers take seconds
each to compile on the CPU.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from datafree_jax import models
from datafree_jax.models import imagenet

# The slow set (conftest.py; ImageNet-size architectures): CI runs it as a step of its own.
pytestmark = pytest.mark.slow

IMAGENET = ("resnet18_imagenet", "resnet34_imagenet", "resnet50_imagenet", "mobilenet_v2")
# The parameter counts torchvision documents (weights tables of resnet18/34/50, mobilenet_v2).
TORCHVISION_PARAMS = {"resnet18_imagenet": 11_689_512, "resnet34_imagenet": 21_797_672,
                      "resnet50_imagenet": 25_557_032, "mobilenet_v2": 3_504_872}
FEATURES = {"resnet18_imagenet": 512, "resnet34_imagenet": 512, "resnet50_imagenet": 2048,
            "mobilenet_v2": 1280}
# BatchNorm layers: stem + 2 (3) per basic block (bottleneck) + downsamples; MobileNetV2: stem,
# 2 in features.1, 3 in each of the 16 expanding blocks, features.18.
BN_LAYERS = {"resnet18_imagenet": 1 + 8 * 2 + 3, "resnet34_imagenet": 1 + 16 * 2 + 3,
             "resnet50_imagenet": 1 + 16 * 3 + 4, "mobilenet_v2": 1 + 2 + 16 * 3 + 1}
# Tiny widths for the training tests: ResNet base width 4, MobileNetV2 stem 4 (1/8 width).
TINY = 4


@functools.lru_cache(maxsize=None)
def _shapes(name: str, size: int = 224, width: int = 0):
  """eval_shape of the variables of `name` at 1000 classes."""
  model = models.get_classifier(name, 1000, width)
  return _params_and_stats(jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))))


def _params_and_stats(variables) -> dict:
  """The "params" and "batch_stats" of init's variables (init also records "bn_inputs"...)."""
  return {k: variables[k] for k in ("params", "batch_stats") if k in variables}


def _random_variables(model, x, seed: int = 0) -> dict:
  """Variables in the structure of model.init(key, x): He-normal kernels, scales 1 + 0.1 N,
  biases 0.1 N, BN running mean 0.1 N and var 1 + U(0, 0.5) (float32, NumPy-drawn)."""
  shapes = _params_and_stats(jax.eval_shape(lambda: model.init(jax.random.key(0), x)))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == "kernel":
      v = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif name in ("scale", "var"):
      v = 1 + (rng.uniform(0, 0.5, shape) if name == "var" else 0.1 * rng.normal(size=shape))
    else:  # bias, mean
      v = 0.1 * rng.normal(size=shape)
    return jnp.asarray(v, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


# Options for functions compiled to run once: without LLVM's optimisations and with XLA:CPU's
# older fusion emitters, a tiny MobileNetV2's training step compiles in 2.4 s of CPU time
# instead of 7.9 s. They compile the same operations, in the same dtypes.
_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _run_once(fn, *args):
  """jax.jit(fn)(*args), compiled with _RUN_ONCE_OPTIONS on the CPU."""
  options = _RUN_ONCE_OPTIONS if jax.default_backend() == "cpu" else None
  return jax.jit(fn).lower(*args).compile(options)(*args)


def _flat(tree):
  return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


def _rel(a, b) -> float:
  """Largest deviation of a from b relative to b's largest magnitude."""
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _rel_norm(a, b) -> float:
  """||a - b|| / ||b|| over all leaves of two pytrees."""
  return float(jnp.linalg.norm(_flat(a) - _flat(b)) / jnp.linalg.norm(_flat(b)))


@pytest.mark.parametrize("name", IMAGENET)
def test_parameter_count_is_torchvisions(name):
  params = _shapes(name)["params"]
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  assert count == TORCHVISION_PARAMS[name]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(_shapes(name)))


# Shapes from torchvision's resnet.py / mobilenetv2.py (conv OIHW, linear (out, in)).
KNOWN_SHAPES = {
    "resnet18_imagenet": {
        "conv1.weight": (64, 3, 7, 7), "bn1.running_mean": (64,),
        "layer1.0.conv1.weight": (64, 64, 3, 3), "layer2.0.conv1.weight": (128, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_var": (128,), "layer4.1.bn2.weight": (512,),
        "fc.weight": (1000, 512), "fc.bias": (1000,)},
    "resnet34_imagenet": {
        "layer3.5.conv2.weight": (256, 256, 3, 3), "layer4.0.downsample.0.weight": (512, 256, 1, 1),
        "layer4.2.bn2.bias": (512,), "fc.weight": (1000, 512)},
    "resnet50_imagenet": {
        "conv1.weight": (64, 3, 7, 7), "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.conv3.weight": (256, 64, 1, 1), "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer2.0.conv1.weight": (128, 256, 1, 1), "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.running_mean": (1024,), "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048)},
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3), "features.0.1.weight": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3), "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.running_mean": (16,), "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3), "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.running_var": (24,), "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1), "features.18.1.bias": (1280,),
        "classifier.1.weight": (1000, 1280), "classifier.1.bias": (1000,)},
}


@pytest.mark.parametrize("name", IMAGENET)
def test_every_leaf_has_its_own_torchvision_key(name):
  shapes = _shapes(name)
  n_leaves = len(jax.tree.leaves(shapes))
  state = jax.eval_shape(imagenet.to_torchvision, shapes)
  assert len(state) == n_leaves  # distinct keys
  for key, shape in KNOWN_SHAPES[name].items():
    assert state[key].shape == shape, key
  # torchvision's key names only: module path of ints and known names, then a leaf name.
  leaf_names = {"weight", "bias", "running_mean", "running_var"}
  assert all(k.rsplit(".", 1)[1] in leaf_names for k in state)
  assert imagenet.torchvision_key("params", ("layer1_0", "downsample_0", "kernel")) == (
      "layer1.0.downsample.0.weight")
  assert imagenet.torchvision_key("batch_stats", ("bn1", "mean")) == "bn1.running_mean"


@pytest.mark.parametrize("name", ["resnet50_imagenet", "mobilenet_v2"])
def test_torchvision_state_dict_round_trip(name):
  model = models.get_classifier(name, 5, TINY)
  v = jax.tree.map(np.asarray, _random_variables(model, jnp.zeros((1, 32, 32, 3))))
  state = imagenet.to_torchvision(v)
  w = state["features.2.conv.1.0.weight" if name == "mobilenet_v2" else "layer2.0.conv2.weight"]
  np.testing.assert_array_equal(  # OIHW <- HWIO
      w[1, 0, 2, 1], (v["params"]["features_2"]["conv_1_0"] if name == "mobilenet_v2" else
                      v["params"]["layer2_0"]["conv2"])["kernel"][2, 1, 0, 1])
  back = imagenet.from_torchvision(dict(state, **{"bn1.num_batches_tracked": 3}), v)
  assert jax.tree.structure(back) == jax.tree.structure(v)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(v)))
  with pytest.raises(ValueError, match="not in the state_dict"):
    imagenet.from_torchvision({k: a for k, a in state.items() if "running_var" not in k}, v)
  with pytest.raises(ValueError, match="without a counterpart"):
    imagenet.from_torchvision(dict(state, extra=np.zeros(1)), v)


# (module path, output shape) at 224x224: torchvision's resolutions (stride 2 in the stem conv,
# max-pool, first block of layers 2-4 / the table's s = 2 blocks; v1.5: the 3x3 conv strides).
INTERMEDIATES = {
    "resnet18_imagenet": [("conv1", (112, 112, 64)), ("layer1_0", (56, 56, 64)),
                          ("layer2_0/conv1", (28, 28, 128)), ("layer3_1", (14, 14, 256)),
                          ("layer4_1", (7, 7, 512))],
    "resnet34_imagenet": [("layer1_2", (56, 56, 64)), ("layer2_3", (28, 28, 128)),
                          ("layer3_5", (14, 14, 256)), ("layer4_2", (7, 7, 512))],
    "resnet50_imagenet": [("layer1_0", (56, 56, 256)), ("layer2_0/conv1", (56, 56, 128)),
                          ("layer2_0/conv2", (28, 28, 128)), ("layer2_0/downsample_0",
                                                              (28, 28, 512)),
                          ("layer4_2", (7, 7, 2048))],
    "mobilenet_v2": [("features_0_0", (112, 112, 32)), ("features_1", (112, 112, 16)),
                     ("features_2/conv_0_0", (112, 112, 96)), ("features_2/conv_1_0",
                                                               (56, 56, 96)),
                     ("features_7", (14, 14, 64)), ("features_14", (7, 7, 160)),
                     ("features_17", (7, 7, 320)), ("features_18_0", (7, 7, 1280))],
}


@pytest.mark.parametrize("name", IMAGENET)
def test_classifier_interface(name):
  model = models.get_classifier(name, 1000)
  shapes = _shapes(name)
  x = jnp.zeros((2, 224, 224, 3))
  (logits, feats), state = jax.eval_shape(
      lambda v: model.apply(v, x, features=True, capture_intermediates=True,
                            mutable=["intermediates"]), shapes)
  assert logits.shape == (2, 1000) and feats.shape == (2, FEATURES[name])
  assert logits.dtype == feats.dtype == jnp.float32
  for path, shape in INTERMEDIATES[name]:
    node = state["intermediates"]
    for key in path.split("/"):
      node = node[key]
    assert node["__call__"][0].shape == (2,) + shape, path
  # Any image size >= 32, square or not.
  for size in ((32, 32), (33, 47)):
    out = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((2,) + size + (3,))), shapes)
    assert out.shape == (2, 1000)
  # mutable=['bn_inputs']: one (mean, var) per BN layer, in the structure of batch_stats.
  _, moments = jax.eval_shape(lambda v: model.apply(v, x, mutable=["bn_inputs"]), shapes)
  assert jax.tree.structure(moments["bn_inputs"]) == jax.tree.structure(shapes["batch_stats"])
  assert len(jax.tree.leaves(moments)) == 2 * BN_LAYERS[name]


# The BN that ends each residual branch, by block type.
LAST_BN = {"resnet18_imagenet": ("bn2",), "resnet50_imagenet": ("bn3",),
           "mobilenet_v2": ("conv_3", "conv_2")}  # conv_2: features.1 (t = 1)


@pytest.mark.parametrize("name", sorted(LAST_BN))
def test_blocks_that_keep_the_shape_are_residual(name):
  """With the scale and bias of its last BN zeroed, a block whose stride is 1 and whose
  channels do not change returns its input: its residual connection (ResNet blocks end with a
  ReLU, the identity on the previous block's non-negative output). The other blocks change the
  shape (torchvision's downsample / MobileNetV2's blocks without a residual)."""
  model = models.get_classifier(name, 10, TINY)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  v = _random_variables(model, x)
  if name == "mobilenet_v2":
    blocks = [f"features_{i}" for i in range(1, 18)]
    identity = {f"features_{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)}
  else:
    blocks = [f"layer{i + 1}_{j}" for i, n in enumerate(model.stage_sizes) for j in range(n)]
    identity = {k for k in blocks if not k.endswith("_0")}
    if name == "resnet18_imagenet":
      identity.add("layer1_0")  # 64 -> 64 channels, stride 1: no downsample
  params = dict(v["params"])
  for block in identity:
    last = [k for k in LAST_BN[name] if k in params[block]][0]
    params[block] = dict(params[block], **{last: jax.tree.map(jnp.zeros_like,
                                                              params[block][last])})
  _, state = _run_once(lambda v: model.apply(v, x, capture_intermediates=True,
                                            mutable=["intermediates"]), dict(v, params=params))
  out = {k: o["__call__"][0] for k, o in state["intermediates"].items() if "__call__" in o}
  inputs = dict(zip(blocks, [out["features_0_1" if name == "mobilenet_v2" else "bn1"]] +
                    [out[b] for b in blocks[:-1]]))
  if name != "mobilenet_v2":  # the block input after ReLU and max-pool
    inputs[blocks[0]] = nn.max_pool(nn.relu(inputs[blocks[0]]), (3, 3), (2, 2),
                                    ((1, 1), (1, 1)))
  else:
    inputs[blocks[0]] = jnp.clip(inputs[blocks[0]], 0, 6)
  assert {b for b in blocks if out[b].shape == inputs[b].shape} == identity
  for block in sorted(identity, key=blocks.index):
    assert float(jnp.abs(inputs[block]).max()) > 0.1, block
    np.testing.assert_allclose(out[block], inputs[block], atol=1e-5, err_msg=block)


def _train_step(model, tx):
  """One step of tx on the cross-entropy, BN in training mode, compiled by _run_once."""
  def step(params, batch_stats, opt_state, x, y):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, loss
  return functools.partial(_run_once, step)


@pytest.mark.parametrize("name", IMAGENET)
def test_one_training_step_at_tiny_width(name):
  model = models.get_classifier(name, 10, TINY)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  y = jnp.array([0, 3, 7, 9])
  v = _random_variables(model, x)
  tx = optax.sgd(0.05)
  params, batch_stats, _, loss = _train_step(model, tx)(v["params"], v["batch_stats"],
                                                        tx.init(v["params"]), x, y)
  assert np.isfinite(float(loss))
  changed = lambda new, old: jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                                                          new, old))
  assert all(changed(params, v["params"]))
  assert all(changed(batch_stats, v["batch_stats"]))
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves((params, batch_stats)))


def test_registered_names_and_width():
  for name in IMAGENET:
    assert name in models.CLASSIFIERS
  assert models.get_classifier("resnet18_imagenet", 10, 16).width == 16
  assert models.get_classifier("mobilenet_v2", 10).width == 32
  # The CIFAR ResNets stay CIFAR ResNets (3x3 stem, no max-pool).
  assert "stem_conv" in jax.eval_shape(lambda: models.get_classifier("resnet18", 10).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3))))["params"]
  # ResNet-50 at base width 4: planes 4, 8, 16, 32, expanded 4x.
  p = _shapes("resnet50_imagenet", 32, TINY)["params"]
  assert p["layer1_0"]["conv1"]["kernel"].shape == (1, 1, 4, 4)
  assert p["layer4_2"]["conv3"]["kernel"].shape == (1, 1, 32, 128)
  assert p["fc"]["kernel"].shape == (128, 1000)
  # MobileNetV2 at width 4 = 1/8 of every channel count, the last conv's 1280 included.
  p = _shapes("mobilenet_v2", 32, TINY)["params"]
  assert p["features_0_0"]["kernel"].shape == (3, 3, 3, 4)
  assert p["features_18_0"]["kernel"].shape == (1, 1, 40, 160)


# bfloat16 vs float32 with the same float32 parameters. bf16 keeps 8 significant bits (each
# rounding is off by up to 2^-9 relative, ~0.2%), and every layer adds such errors.
# `_bf16_errors` measured, on 8 seeds (variables and inputs), batch 32:
#   max |logits_bf16 - logits_f32| / max |logits_f32| (Generator: images): tiny
#   resnet18_imagenet 0.008-0.017 (0.008-0.020 at batch 8), LeNet-5-BN 0.006-0.011, DAFL
#   Generator 0.012-0.018;
#   ||batch_stats_bf16 - batch_stats_f32|| / ||batch_stats_f32|| after one training-mode apply
#   (running averages, momentum 0.9): at most 0.0005, 0.0004, 0.0001;
#   ||grads_bf16 - grads_f32|| / ||grads_f32||: ResNet 0.02-0.11, LeNet 0.017-0.06,
#   Generator 0.054-0.071.
# Bounds (BF16_TOLERANCES): 2-4x the largest measured value. The gradients are spread widely
# because they are ill-conditioned at these sizes (ReLU and max-pool switches): random relative
# perturbations of 0.4% to the tiny ResNet's float32 parameters and input move its float32
# gradient by ~10% in evaluation mode and ~30% with training-mode BN on a batch of 8-16, where
# bf16 and float32 differ by 0.3-0.6. So the classifiers' gradients are compared in evaluation
# mode (running statistics) on a batch of 32, and the Generator's loss is a random linear
# function of its images (sin(3 x) gave 0.07-0.29: its gradient's per-channel mean, which the
# output BN removes, dominates it). A lower bound on the outputs' difference checks that bf16
# is really used.
BF16_BATCH = 32
BF16_TOLERANCES = {"resnet18_imagenet": (0.04, 0.002, 0.25), "lenet5_bn": (0.025, 0.001, 0.15),
                   "generator": (0.04, 0.0005, 0.15)}


def _bf16_errors(name: str, seed: int = 0) -> dict:
  """Relative bf16-vs-float32 differences of outputs, batch_stats and gradients (above), with
  the dtypes of the bf16 model's outputs, batch_stats and gradients."""
  if name == "generator":
    kw = dict(latent_dim=10, image_size=32, channels=3, width=16, style="dafl")
    m32, m16 = models.Generator(**kw), models.Generator(**kw, dtype=jnp.bfloat16)
    x = jax.random.normal(jax.random.key(seed + 100), (BF16_BATCH, 10))
    # Generators run in training mode. Their loss: a random linear function of the images
    # (one whose gradient has no large per-channel mean, which the output BN would remove).
    w = jax.random.normal(jax.random.key(seed + 200), (BF16_BATCH, 32, 32, 3))

    def forward(m, v):  # -> (loss, (images, batch_stats))
      images, stats = m.apply(v, x, mutable=["batch_stats"])
      return jnp.mean(w * images), (images, stats)
  else:
    m32 = models.get_classifier(name, 10, 8)  # width 8: the ResNet's; LeNet ignores it
    m16 = models.get_classifier(name, 10, 8, jnp.bfloat16)
    channels = 1 if name.startswith("lenet") else 3
    x = jax.random.normal(jax.random.key(seed + 100), (BF16_BATCH, 32, 32, channels))
    y = jnp.arange(BF16_BATCH) % 10

    def forward(m, v):  # -> (loss, (evaluation-mode logits, batch_stats after a training apply))
      logits = m.apply(v, x)
      _, stats = m.apply(v, x, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, stats)
  v = _random_variables(m32, x, seed)

  def run(v):
    out = {}
    for tag, m in (("32", m32), ("16", m16)):
      (_, (out["y" + tag], out["stats" + tag])), out["grads" + tag] = jax.value_and_grad(
          lambda p, m=m: forward(m, dict(v, params=p)), has_aux=True)(v["params"])
    return out

  out = _run_once(run, v)
  return {"y": _rel(out["y16"], out["y32"]),
          "stats": _rel_norm(out["stats16"], out["stats32"]),
          "grads": _rel_norm(out["grads16"], out["grads32"]),
          "dtypes": {str(a.dtype) for a in jax.tree.leaves(
              (out["y16"], out["stats16"], out["grads16"]))}}


@pytest.mark.parametrize("name", sorted(BF16_TOLERANCES))
def test_bfloat16_matches_float32(name):
  y_tol, stats_tol, grads_tol = BF16_TOLERANCES[name]
  err = _bf16_errors(name)
  assert err["dtypes"] == {"float32"}  # outputs, running statistics, gradients
  assert 1e-4 < err["y"] < y_tol, err
  assert err["stats"] < stats_tol, err
  assert err["grads"] < grads_tol, err


def test_bfloat16_models_keep_float32_variables():
  """Initialising a bf16 model gives float32 parameters and statistics; features are float32."""
  x = jnp.zeros((2, 32, 32, 3))
  for model in (models.get_classifier("resnet18_imagenet", 10, TINY, jnp.bfloat16),
                models.get_classifier("mobilenet_v2", 10, TINY, jnp.bfloat16),
                models.get_classifier("resnet18", 10, TINY, jnp.bfloat16),
                models.get_classifier("hinton", 10, 0, jnp.bfloat16)):
    v = _params_and_stats(jax.eval_shape(lambda m=model: m.init(jax.random.key(0), x)))
    assert {a.dtype for a in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
    _, feats = jax.eval_shape(lambda v, m=model: m.apply(v, x, features=True), v)
    assert feats.dtype == jnp.float32
  gen = models.Generator(latent_dim=4, image_size=16, channels=1, width=4, dtype=jnp.bfloat16)
  v = jax.eval_shape(lambda: gen.init(jax.random.key(0), jnp.zeros((2, 4))))
  assert {a.dtype for a in jax.tree.leaves(v)} == {jnp.dtype(jnp.float32)}
