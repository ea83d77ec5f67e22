"""The accelerator program, checked from a CPU: one target platform picks every formulation
(platforms.py); every program of every stage of every method lowers for 'tpu' and 'cuda' in the
accelerator's form (no CPU path of models/cpu_conv.py in it, convolutions as convolutions); the
accelerator form computes what the CPU form computes; member chunks pad instead of collapsing.
"""
import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO_ROOT, ensemble_config, tiny_config

from datafree_jax import config_lib
from datafree_jax import datasets
from datafree_jax import dry_run
from datafree_jax import platforms
from datafree_jax import registry
from datafree_jax import stage as stage_lib
from datafree_jax import pipeline
from datafree_jax.ensemble import members as ensemble_members
from datafree_jax.ensemble import objective as ensemble_objective
from datafree_jax.models import cpu_conv
from datafree_jax.stages import ensemble

IMAGENET = str(pathlib.Path(REPO_ROOT) / "configs" / "imagenet.py")

# The slow set (conftest.py; the programs of every method lowered for TPU and GPU): CI runs it as a step of its own.
pytestmark = pytest.mark.slow


def _programs(method: str, platform: str):
  """(stage name, Program) of every stage of `method` (the tiny mnist5k config), built for
  `platform` as the dry run builds them."""
  config = tiny_config(method, **{"ensemble.num_generators": 4,
                                  "ensemble.batch_per_generator": 4,
                                  "ensemble.max_generators_per_device_at_once": 2})
  config.platform = platform
  ctx = stage_lib.Context(config=config, workdir="", data=None,
                          info=datasets.config_info(config))
  out = []
  for s in pipeline.stages_to_run(config):
    out.extend((s.name, p) for p in s.programs(ctx))
  return out


@pytest.mark.parametrize("method", sorted(registry.METHODS))
def test_every_program_lowers_for_the_accelerators_in_their_form(method):
  """Each program (train step, evaluation, sampling) of each stage, built for 'tpu' and for
  'gpu', lowers for that platform with no CPU path's scope in its locations and with real
  convolutions; the same programs built for 'cpu' do carry CPU paths (so the check can fail)."""
  cpu_forms = 0
  for platform in ("tpu", "gpu"):
    programs = [(n, p) for n, p in _programs(method, platform) if p.fn is not None]
    assert {p.kind for _, p in programs} >= {"train", "eval"}
    for name, program in programs:
      text = dry_run.lower_for(program, platform).as_text(debug_info=True)
      assert cpu_conv.SCOPE not in text, (method, name, program.label, platform)
      assert "stablehlo.convolution" in text, (method, name, program.label)
  for _, program in _programs(method, "cpu"):
    if program.fn is not None:
      lowered = program.fn.trace(*program.args, **program.kwargs).lower()
      cpu_forms += cpu_conv.SCOPE in lowered.as_text(debug_info=True)
  assert cpu_forms > 0


def test_no_code_path_reads_the_backend_while_tracing():
  """The platform is a value (platforms.py), never jax.default_backend()."""
  offenders = []
  for path in sorted(pathlib.Path(REPO_ROOT, "datafree_jax").rglob("*.py")):
    for i, line in enumerate(path.read_text().splitlines(), 1):
      if re.search(r"default_backend\(", line):
        offenders.append(f"{path}:{i}")
  assert not offenders


def test_platform_is_resolved_once_from_the_devices():
  assert platforms.resolve("auto") == platforms.of_devices() == "cpu"
  assert platforms.resolve("tpu") == "tpu"
  assert platforms.lowering_platform("gpu") == "cuda"
  with pytest.raises(ValueError, match="unknown platform"):
    platforms.resolve("npu")
  config = tiny_config("dafl")
  assert platforms.of_config(config) == "cpu"
  config.platform = "gpu"
  assert platforms.of_config(config) == "gpu"


def _ensemble_after(platform: str, steps: int = 2, at_once: int = 0, width: int = 8):
  """The tiny ensemble built for `platform` after `steps` SGD steps. (SGD: Adam's first update,
  lr * g / (|g| + eps), turns float noise on gradients that are exactly 0 in exact arithmetic,
  the conv biases before a BN, into +-lr: test_ensemble.py says more.)"""
  config = ensemble_config(**{"ensemble.max_generators_per_device_at_once": at_once,
                              "ensemble.lowering": "auto", "ensemble.optimizer": "sgd",
                              "ensemble.lr": 0.05, "generator.width": width})
  config.platform = platform
  info = datasets.config_info(config)
  teacher = _random_bn_teacher(config, info)
  ens = ensemble.build(config, teacher, info)
  state = ens.state
  for _ in range(steps):
    state, metrics = ens.step(state, None)
  return ens, jax.device_get(state), jax.device_get(metrics)


def _random_bn_teacher(config, info):
  """A randomly initialised LeNet-5-BN teacher for config's platform, with BN statistics."""
  from datafree_jax import bn_stats, common, models  # pylint: disable=g-import-not-at-top
  model = models.get_classifier(config.teacher.model, info.num_classes,
                                platform=platforms.of_config(config))
  params, batch_stats = common.init_model(model, jax.random.key(7), info.image_shape)
  variables = common.variables_of(params, batch_stats)
  x = jax.random.normal(jax.random.key(8), (40,) + tuple(info.image_shape))
  stats = bn_stats.compute(model, params, batch_stats,
                           [x[k::info.num_classes] for k in range(info.num_classes)])
  return {"model": model, "variables": variables, "bn_stats": stats,
          "meta": {"model": config.teacher.model}}


def test_the_accelerator_form_computes_what_the_cpu_form_computes():
  """The generator ensemble built for 'tpu' (XLA's convolutions and pooling, vmapped members,
  run here on the CPU backend) and for 'cpu' (the CPU paths, one call per member) take the same
  two steps from the same initial members. Width 32: the generators' upsampling blocks take
  their 2x2 form on 'cpu', the teacher its space-to-depth, dense and tile max-pool paths."""
  cpu_ens, cpu_state, cpu_metrics = _ensemble_after("cpu", width=32)
  tpu_ens, tpu_state, tpu_metrics = _ensemble_after("tpu", width=32)
  assert (cpu_ens.lowering, tpu_ens.lowering) == ("loop", "vmap")
  assert cpu_ens.gen.platform == "cpu" and tpu_ens.gen.platform == "tpu"
  for a, b in zip(jax.tree.leaves(cpu_state), jax.tree.leaves(tpu_state)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
  for k in cpu_metrics:
    np.testing.assert_allclose(cpu_metrics[k], tpu_metrics[k], rtol=1e-4, atol=1e-5)


def test_chunked_updates_equal_all_at_once():
  """Members updated two at a time (the in-place fori_loop) take the steps all-at-once takes."""
  _, whole, _ = _ensemble_after("tpu", at_once=0)
  ens, chunked, _ = _ensemble_after("tpu", at_once=2)
  assert ens.chunk == 2 and ens.padded == 4   # 3 generators: one chunk of 2 padded
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(chunked)):
    if a.ndim and a.shape[0] == 3:   # the 3 real members of the unchunked ensemble
      np.testing.assert_allclose(a, b[:3], rtol=0, atol=1e-5)


@pytest.mark.parametrize("g,devices,at_once,expected", [
    (1000, 8, 5, (1000, 125, 5)),      # divides: no padding
    (1000, 6, 5, (1020, 170, 5)),      # 167 per device (a prime) -> 34 chunks of 5, not 167 of 1
    (1000, 16, 3, (1008, 63, 3)),
    (1000, 16, 2, (1024, 64, 2)),
    (10, 4, 0, (12, 3, 3)),            # 0: all of a device's members at once
    (7, 1, 3, (9, 9, 3)),
])
def test_member_counts_that_do_not_divide_are_padded(g, devices, at_once, expected):
  assert ensemble_members.member_layout(g, devices, at_once) == expected
  padded, per_device, chunk = expected
  assert per_device % chunk == 0 and padded == per_device * devices
  assert padded - g < devices * max(-(-per_device // max(at_once, 1)), 1)


def test_map_members_pads_a_last_partial_chunk():
  """5 members 2 at a time: three chunks, the last padded with a repeat, results dropped."""
  xs = jnp.arange(5.0)
  out = jax.jit(lambda x: ensemble_members.map_members(lambda v: v * 2, (x,), "vmap", 2))(xs)
  np.testing.assert_array_equal(out, 2 * np.arange(5.0))
  assert ensemble_members.chunking(5, 2) == (3, 2) and ensemble_members.chunking(125, 5) == (25, 5)


def test_a_shared_jit_traces_each_platform_apart():
  """A jit that takes the generator as a static argument (as ensemble_objective.init_generators does),
  asked for the 'tpu' generator after the 'cpu' one in the same process, traces anew: the
  platform is a field of the module, so part of the cache key. The 'cpu' program carries the
  CPU paths, the 'tpu' one none."""
  config = ensemble_config(**{"generator.width": 32})   # upsampling blocks in their 2x2 form
  info = datasets.config_info(config)

  @functools.partial(jax.jit, static_argnums=0)
  def generate(gen, variables, z):
    return gen.apply(variables, z, mutable=["batch_stats"])[0]
  texts = {}
  for platform in ("cpu", "tpu"):
    config.platform = platform
    gen = ensemble_objective.make_generator(config, info)
    variables = gen.init(jax.random.key(0), jnp.zeros((2, gen.latent_dim)))
    z = jnp.zeros((4, gen.latent_dim))
    generate(gen, variables, z)   # the first call fills the jit's cache
    texts[platform] = generate.lower(gen, variables, z).as_text(debug_info=True)
  assert cpu_conv.SCOPE in texts["cpu"] and cpu_conv.SCOPE not in texts["tpu"]


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_streamed_training_steps_take_the_uint8_batch_they_are_fed(platform):
  """configs/imagenet.py (a streamed dataset), method kd_data at smoke size: the teacher's
  step and the distillation step on real images take the uint8 batch the streamed pipeline
  delivers (stage.abstract_batch with input_pipeline.train_image_dtype) and convert it on the
  device; the same steps of mnist5k (held in memory) take float32."""
  config = config_lib.load_config_file(IMAGENET, "smoke=True")
  config.method, config.platform = "kd_data", platform
  ctx = stage_lib.Context(config=config, workdir="", data=None,
                          info=datasets.config_info(config))
  trains = [p for s in pipeline.stages_to_run(config) for p in s.programs(ctx)
            if p.kind == "train"]
  assert len(trains) == 2  # teacher, distill_data
  for program in trains:
    images = program.args[1][0]
    assert images.dtype == np.uint8 and images.shape == (16, 32, 32, 3), program.label
    text = dry_run.lower_for(program, platform).as_text()
    assert re.search(r"tensor<16x32x32x3xui8", text), program.label
    assert "stablehlo.convert" in text, program.label
  memory = _programs("kd_data", platform)
  batches = [p.args[1][0] for _, p in memory if p.kind == "train"]
  assert len(batches) == 2 and all(b.dtype == np.float32 for b in batches)
