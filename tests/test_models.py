import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from datafree_jax import common
from datafree_jax import generator_parts
from datafree_jax import models
from datafree_jax.models import cpu_conv, generators

FEATURES = {"lenet5": 120, "lenet5_half": 60, "lenet5_bn": 120, "lenet5_half_bn": 60,
            "hinton": 1200, "hinton_half": 800, "resnet18": 32, "resnet34": 32,
            # models/cifar_zoo.py at width 4: WRN-d-k 4 * 4k, VGG 512 * 4 / 64.
            "wrn16_1": 16, "wrn16_2": 32, "wrn40_1": 16, "wrn40_2": 32, "vgg8_bn": 32,
            "vgg11_bn": 32, "vgg13_bn": 32}
BN_LAYERS = {"lenet5": 0, "lenet5_half": 0, "lenet5_bn": 3, "lenet5_half_bn": 3, "hinton": 0,
             "hinton_half": 0, "resnet18": 1 + 8 * 2 + 3, "resnet34": 1 + 16 * 2 + 3,
             "wrn16_1": 6 * 2 + 1, "wrn16_2": 6 * 2 + 1, "wrn40_1": 18 * 2 + 1,
             "wrn40_2": 18 * 2 + 1, "vgg8_bn": 5, "vgg11_bn": 8, "vgg13_bn": 10}


# The ImageNet models (models/imagenet.py) have their own tests: test_imagenet_models.py.
IMAGENET_MODELS = {"resnet18_imagenet", "resnet34_imagenet", "resnet50_imagenet", "mobilenet_v2"}


def test_every_classifier_is_tested_here_or_in_test_imagenet_models():
  from datafree_jax.models import imagenet  # pylint: disable=g-import-not-at-top
  assert IMAGENET_MODELS <= set(models.CLASSIFIERS)
  for name in IMAGENET_MODELS:
    assert isinstance(models.get_classifier(name, 10, 8), (imagenet.ResNet, imagenet.MobileNetV2))


@pytest.mark.parametrize("name", sorted(set(models.CLASSIFIERS) - IMAGENET_MODELS))
def test_classifier_shapes(name):
  """Shapes and structures only: traced abstractly (jax.eval_shape), nothing compiled."""
  channels = 3 if name.startswith("resnet") else 1
  model = models.get_classifier(name, 7, width=4)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((2, 32, 32, channels)), train=False))
  batch_stats = variables.get("batch_stats", {})
  x = jax.ShapeDtypeStruct((3, 32, 32, channels), jnp.float32)
  logits, feats = jax.eval_shape(lambda v, x: model.apply(v, x, features=True), variables, x)
  assert logits.shape == (3, 7)
  assert feats.shape == (3, FEATURES[name])
  assert jax.eval_shape(lambda v, x: model.apply(v, x), variables, x).shape == (3, 7)
  # Every BN layer reports the moments of its input, in the structure of batch_stats.
  _, _, moments = jax.eval_shape(
      lambda v, x: generator_parts.teacher_forward(model, v, x, moments=True), variables, x)
  assert len(jax.tree.leaves(moments)) == 2 * BN_LAYERS[name]
  assert jax.tree.structure(moments) == jax.tree.structure(batch_stats)


def test_lenet5_half_is_half_width():
  model = models.get_classifier("lenet5_half", 10)
  params, _ = common.init_model(model, jax.random.key(0), (32, 32, 1))
  assert [params[k]["kernel"].shape[-1] for k in ("conv1", "conv2", "conv3", "fc1")] == [3, 8, 60,
                                                                                           42]


@pytest.mark.parametrize("style", ["dafl", "luo"])
@pytest.mark.parametrize("size,channels,ups", [(32, 1, 2), (32, 3, 3)])
def test_generator_shapes(style, size, channels, ups):
  g = models.Generator(latent_dim=10, image_size=size, channels=channels, width=8,
                       num_upsample=ups, style=style)
  v = jax.jit(g.init)(jax.random.key(0), jnp.zeros((2, 10)))
  x, _ = jax.jit(functools.partial(g.apply, mutable=["batch_stats"]))(
      v, jax.random.normal(jax.random.key(1), (5, 10)))
  assert x.shape == (5, size, size, channels)
  # The last BN normalises each channel over the batch (DAFL: no scale/offset).
  if style == "dafl":
    assert "bn_out" not in v["params"]
    assert jnp.allclose(x.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
  else:
    assert "scale" in v["params"]["bn_out"] and "bias" not in v["params"]["bn_out"]
  assert v["params"]["bn1"]["scale"].shape == (8,)


def test_luo_generator_is_the_authors_layout():
  """Block widths w // (i + 1) (their 128 // (i + 1)) and the output BN with eps 0.8 (their
  arg_scope's), computed here by hand from the layer before it."""
  g = models.Generator(latent_dim=6, image_size=32, channels=3, width=12, num_upsample=3,
                       style="luo")
  v = jax.jit(g.init)(jax.random.key(0), jnp.zeros((2, 6)))
  assert [v["params"][f"bn{i}"]["scale"].shape[0] for i in (1, 2, 3)] == [12, 6, 4]
  z = jax.random.normal(jax.random.key(1), (7, 6))
  scale = jax.random.uniform(jax.random.key(2), (3,), minval=0.5, maxval=2.0)
  v = {"params": dict(v["params"], bn_out={"scale": scale}), "batch_stats": v["batch_stats"]}
  x, state = jax.jit(lambda v, z: g.apply(
      v, z, mutable=["batch_stats", "intermediates"],
      capture_intermediates=lambda mdl, _: mdl.name == "conv_out"))(v, z)
  t = jnp.tanh(state["intermediates"]["conv_out"]["__call__"][0])
  mean, var = t.mean(axis=(0, 1, 2)), t.var(axis=(0, 1, 2))
  np.testing.assert_allclose(x, (t - mean) / jnp.sqrt(var + 0.8) * scale, atol=1e-5)


def test_conditional_generator_is_the_generator_of_z_and_the_one_hot_label():
  cond = models.Generator(latent_dim=5, image_size=16, channels=1, width=4, style="luo",
                          num_classes=3)
  plain = models.Generator(latent_dim=8, image_size=16, channels=1, width=4, style="luo")
  labels = jnp.array([0, 2, 1, 2])
  v = jax.jit(cond.init)(jax.random.key(0), jnp.zeros((2, 5)), jnp.zeros((2,), jnp.int32))
  z = jax.random.normal(jax.random.key(1), (4, 5))
  apply_cond = jax.jit(lambda v, z, y: cond.apply(v, z, y, mutable=["batch_stats"])[0])
  x = apply_cond(v, z, labels)
  ref, _ = jax.jit(lambda v, z: plain.apply(v, z, mutable=["batch_stats"]))(
      v, jnp.concatenate([z, jax.nn.one_hot(labels, 3)], -1))
  np.testing.assert_array_equal(x, ref)
  other = apply_cond(v, z, (labels + 1) % 3)
  assert np.abs(np.asarray(other - x)).max() > 1e-3  # the label matters
  with pytest.raises(ValueError, match="needs the class labels"):
    cond.apply(v, z, mutable=["batch_stats"])


def test_unknown_model_is_a_clear_error():
  with pytest.raises(models.UnknownModelError, match="unknown model 'lenet6'"):
    models.get_classifier("lenet6", 10)


@pytest.mark.parametrize("features,platform,form", [(5, "cpu", "3x3"), (16, "cpu", "2x2"),
                                                    (16, "tpu", "3x3"), (16, None, "3x3")])
def test_upsample_conv_is_upsample_then_conv(features, platform, form):
  """UpsampleConv == nearest x2 then a padded 3x3 nn.Conv: same params, outputs, gradients, in
  both of its forms (features 16: 4 * 16 low-resolution outputs, the 2x2 form on 'cpu'; the
  3x3 form for the accelerators, computed here on the CPU backend)."""
  assert cpu_conv.upsample_conv_form(features, platform) == form

  class Reference(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(features, (3, 3), padding=1, name="c")(generators.upsample_nearest(x))

  class Fused(nn.Module):
    @nn.compact
    def __call__(self, x):
      return generators.UpsampleConv(features, platform=platform, name="c")(x)

  x = jax.random.normal(jax.random.key(1), (2, 4, 6, 3))
  ref_v = jax.jit(Reference().init)(jax.random.key(0), x)
  fused_v = jax.jit(Fused().init)(jax.random.key(0), x)
  assert jax.tree.all(jax.tree.map(jnp.array_equal, ref_v, fused_v))
  # A kernel with distinct taps, so that a wrong tap or parity shows.
  v = {"params": {"c": {"kernel": jax.random.normal(jax.random.key(2), (3, 3, 3, features)),
                        "bias": jnp.arange(float(features))}}}
  out = jax.jit(Fused().apply)(v, x)
  assert out.shape == (2, 8, 12, features)
  assert jnp.allclose(out, jax.jit(Reference().apply)(v, x), atol=1e-5)
  loss = lambda m: lambda v, x: jnp.sum(jnp.sin(m.apply(v, x)))
  g_ref = jax.jit(jax.grad(loss(Reference()), argnums=(0, 1)))(v, x)
  g_fused = jax.jit(jax.grad(loss(Fused()), argnums=(0, 1)))(v, x)
  assert jax.tree.all(jax.tree.map(lambda a, b: jnp.allclose(a, b, atol=1e-4), g_ref, g_fused))
