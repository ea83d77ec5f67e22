"""Fast-DFKD (method 'fast', stages/fast_dfkd.py): the DataFree generator against the authors'
PyTorch one, a synthesis round's meta update (FOMAML and Reptile) and pool against a
recomputation, the stage through the pipeline, the command line, export and plots, and a run
stopped mid-way that resumes to the uninterrupted run's result."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import (check_method_command_line, check_resumes_after_sigterm,
                      check_synthesis_method_registered, copy_stages, stage_state,
                      teacher_context, tiny_config)

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import generator_parts
from datafree_jax import image_pool
from datafree_jax import models
from datafree_jax import pipeline
from datafree_jax import students
from datafree_jax.stages import fast_dfkd

# The tiny BN teacher of conftest's bn_teacher_workdir (10 steps), and a few small rounds.
TINY = {"teacher.steps": 10, "fast.rounds": 3, "fast.warmup": 1, "fast.batch_size": 16,
        "fast.iterations": 2, "fast.kd_steps": 2, "fast.latent_dim": 16, "fast.width": 8,
        "fast.eval_every": 0, "fast.checkpoint_every": 1, "student.batch_size": 16}


def fast_config(**overrides):
  return tiny_config("fast", **dict(TINY, **overrides))


def test_the_method_is_registered_with_its_stage_and_section():
  check_synthesis_method_registered("fast", ("teacher", "fast"), "fast", "w_bn")


@pytest.mark.parametrize("overrides,message", [
    ({"teacher.model": "lenet5"}, "has no BatchNorm layers"),
    ({"fast.warmup": 3}, "fast.warmup=3 leaves none of the fast.rounds=3 rounds"),
    ({"fast.num_upsample": 6}, "fast.num_upsample=6 does not fit the 32x32")])
def test_settings_it_cannot_run_are_refused(overrides, message):
  with pytest.raises(pipeline.config_lib.ConfigError, match=message):
    pipeline.validate(fast_config(**overrides))


def test_the_zju_generator_is_the_authors_pytorch_generator():
  """models.Generator(style='zju') and zju-vipa's datafree/models/generator.py Generator
  (transcribed below) give the same images from the same weights, BN in training mode."""
  torch = pytest.importorskip("torch")
  nn = torch.nn
  nz, ngf, size, nc, init = 6, 4, 16, 3, 4

  class Generator(nn.Module):  # zju-vipa/Fast-Datafree datafree/models/generator.py
    def __init__(self):
      super().__init__()
      self.l1 = nn.Sequential(nn.Linear(nz, ngf * 2 * init**2))
      self.conv_blocks = nn.Sequential(
          nn.BatchNorm2d(ngf * 2), nn.Upsample(scale_factor=2),
          nn.Conv2d(ngf * 2, ngf * 2, 3, stride=1, padding=1, bias=False),
          nn.BatchNorm2d(ngf * 2), nn.LeakyReLU(0.2, inplace=True), nn.Upsample(scale_factor=2),
          nn.Conv2d(ngf * 2, ngf, 3, stride=1, padding=1, bias=False),
          nn.BatchNorm2d(ngf), nn.LeakyReLU(0.2, inplace=True),
          nn.Conv2d(ngf, nc, 3, stride=1, padding=1), nn.Sigmoid())

    def forward(self, z):
      return self.conv_blocks(self.l1(z).view(z.shape[0], -1, init, init))

  gen = models.Generator(latent_dim=nz, image_size=size, channels=nc, width=2 * ngf,
                         style="zju")
  params, bs = generator_parts.init_generator(gen, jax.random.key(0))
  # Every parameter random (BN scales and offsets too); the convolutions' biases before a BN
  # are cancelled by it, so the bias-free PyTorch convolutions compute the same function.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, x.shape) + (x if x.ndim == 1 else 0)
                                     for k, x in zip(keys, leaves)])
  p = jax.tree.map(np.asarray, params)
  ref = Generator().double()
  t = lambda a: torch.tensor(np.asarray(a, np.float64))
  w = p["fc"]["kernel"].reshape(nz, init, init, 2 * ngf).transpose(3, 1, 2, 0).reshape(-1, nz)
  with torch.no_grad():
    ref.l1[0].weight.copy_(t(w))
    ref.l1[0].bias.copy_(t(p["fc"]["bias"].reshape(init, init, -1).transpose(2, 0, 1).reshape(-1)))
    for i, name in ((0, "bn0"), (3, "bn1"), (7, "bn2")):
      ref.conv_blocks[i].weight.copy_(t(p[name]["scale"]))
      ref.conv_blocks[i].bias.copy_(t(p[name]["bias"]))
    for i, name in ((2, "conv1"), (6, "conv2"), (9, "conv_out")):
      ref.conv_blocks[i].weight.copy_(t(p[name]["kernel"].transpose(3, 2, 0, 1)))
    ref.conv_blocks[9].bias.copy_(t(p["conv_out"]["bias"]))
  z = np.random.default_rng(0).normal(size=(5, nz))
  ours, _ = generator_parts.generate(gen, params, bs, jnp.asarray(z, jnp.float32))
  theirs = ref.train()(t(z)).detach().numpy().transpose(0, 2, 3, 1)
  assert ours.shape == (5, size, size, nc) and 0 < float(ours.min()) < float(ours.max()) < 1
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5)


def test_the_dense_layer_reset_draws_it_again():
  params = {"fc": {"kernel": jnp.ones((50, 400)), "bias": jnp.ones((400,))}, "bn0": {"x": 3.0}}
  fresh = fast_dfkd.reset_dense(jax.random.key(0), params)
  assert float(jnp.abs(fresh["fc"]["bias"]).max()) == 0.0 and fresh["bn0"] == {"x": 3.0}
  assert abs(float(jnp.std(fresh["fc"]["kernel"])) - fast_dfkd.RESET_STD) < 0.001


def _first_round(bn_teacher, **overrides):
  """(initial state, state after round 0, its metrics, the config) on host arrays."""
  teacher, _ = bn_teacher
  config = fast_config(**overrides)
  state, _, synth, _, _ = fast_dfkd.STAGE._build(teacher_context(bn_teacher, config))
  before = jax.device_get(state)
  after, metrics = synth(state, teacher["variables"])
  return before, jax.device_get(after), jax.device_get(metrics), config


def _recompute(bn_teacher, before, config):
  """Round 0's inner steps recomputed one by one: (the meta gradient the round should have
  taken, the best iterate's pixels, the last step's teacher BN moments)."""
  teacher, info = bn_teacher
  f = config.fast
  k_z, k_y, k_iter, _ = jax.random.split(
      common.step_key(config.seed, fast_dfkd.STAGE_SALT, 0), 4)
  z = jax.random.normal(k_z, (f.batch_size, f.latent_dim), jnp.float32)
  targets = jax.random.randint(k_y, (f.batch_size,), 0, info.num_classes)
  s, g = before["student"], before["generator"]
  student = students.make_student(config, info)

  def loss(params, z, bs, i):
    return fast_dfkd.round_loss(
        f, info, fast_dfkd.make_generator(config, info), teacher["model"], student,
        students.augmentation(f, info), params, z, bs, targets, jax.random.fold_in(k_iter, i),
        teacher["variables"], common.variables_of(s["params"], s["batch_stats"]),
        before["bn_previous"], 0.0, float(f.warmup <= 1))
  tx_g, tx_z = optax.adam(f.lr_g, b1=f.b1, b2=f.b2), optax.adam(f.lr_z, b1=f.b1, b2=f.b2)
  params, bs = g["params"], g["batch_stats"]
  opt_g, opt_z = tx_g.init(params), tx_z.init(z)
  summed, best = jax.tree.map(jnp.zeros_like, params), (np.inf, None)
  for i in range(f.iterations):
    (value, (_, pixels, bs, moments)), (gp, gz) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(params, z, bs, i)
    if value < best[0]:
      best = (value, pixels)
    summed = jax.tree.map(jnp.add, summed, gp)
    update, opt_g = tx_g.update(gp, opt_g, params)
    params = optax.apply_updates(params, update)
    update, opt_z = tx_z.update(gz, opt_z, z)
    z = optax.apply_updates(z, update)
  if f.meta == "fomaml":
    meta_grad = summed
  else:
    meta_grad = jax.tree.map(lambda m, p: fast_dfkd.REPTILE_SCALE * (m - p), g["params"], params)
  return meta_grad, best[1], moments


@pytest.mark.slow
@pytest.mark.parametrize("meta", ["fomaml", "reptile"])
def test_the_inner_steps_and_the_meta_update_match_a_recomputation(bn_teacher, meta):
  """Round 0 with two inner steps against the steps recomputed one by one: FOMAML's meta
  gradient is the sum of the inner steps' gradients, Reptile's 67 * (G_meta - G), each taken
  by the meta Adam at lr_g * iterations; the pool's round 0 holds the iterate of lowest loss;
  the BN moments of earlier rounds become the last step's."""
  before, after, metrics, config = _first_round(
      bn_teacher, **{"fast.iterations": 2, "fast.meta": meta, "fast.reset_fc_round": 0})
  _, info = bn_teacher
  f = config.fast
  meta_grad, pixels, moments = _recompute(bn_teacher, before, config)
  meta_params = before["generator"]["params"]
  tx = optax.adam(f.lr_g * f.iterations, b1=0.5, b2=0.999)
  update, _ = tx.update(meta_grad, tx.init(meta_params), meta_params)
  expected = optax.apply_updates(meta_params, update)
  # Adam's first step is lr * g / (|g| + 1e-8), about lr * sign(g): compared where the sign is
  # clear of float noise: |g| > 1e-5 (FOMAML), and for Reptile where the two inner steps did
  # not cancel (|G_meta - G| > lr_g / 2). The biases of conv1/conv2 are left out: the BN after
  # each cancels them, their gradient is float noise and Adam's steps on them its sign.
  compared = 0
  clear_of = 1e-5 if meta == "fomaml" else fast_dfkd.REPTILE_SCALE * f.lr_g / 2
  flat = lambda tree: {jax.tree_util.keystr(p): np.asarray(x)
                       for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  actual, wanted, grads = flat(after["generator"]["params"]), flat(expected), flat(meta_grad)
  for name, g in grads.items():
    if name in ("['conv1']['bias']", "['conv2']['bias']"):
      continue
    clear = np.abs(g) > clear_of
    np.testing.assert_allclose(actual[name][clear], wanted[name][clear], rtol=1e-4, atol=1e-6,
                               err_msg=name)
    compared += clear.sum()
  assert compared > 0.5 * sum(x.size for x in jax.tree.leaves(meta_params))
  # (to a grey level: a pixel at a rounding boundary may round either way)
  pool0 = np.asarray(after["pool"][0], int)
  want = np.asarray(image_pool.quantize(image_pool.normalize(pixels, info), info), int)
  assert np.abs(pool0 - want).max() <= 1 and np.mean(pool0 == want) > 0.99
  assert not np.any(after["pool"][1:]) and int(after["step"]) == 1
  for a, b in zip(jax.tree.leaves(after["bn_previous"]), jax.tree.leaves(moments)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert {"bn", "ce", "adv", "agreement", "best_loss", "loss"} <= set(metrics)


@pytest.mark.slow
def test_inner_steps_lower_the_rounds_loss(bn_teacher):
  _, _, one, _ = _first_round(bn_teacher, **{"fast.iterations": 1, "fast.lr_g": 0.02,
                                             "fast.lr_z": 0.05})
  _, _, many, _ = _first_round(bn_teacher, **{"fast.iterations": 30, "fast.lr_g": 0.02,
                                              "fast.lr_z": 0.05})
  assert many["best_loss"] < 0.7 * one["loss"] and many["bn"] < one["bn"]


@pytest.mark.slow
def test_the_stage_runs_and_the_student_learns_after_warmup(bn_teacher_workdir, tmp_path):
  workdir = copy_stages(bn_teacher_workdir, tmp_path / "w", "teacher")
  summary = pipeline.train_and_evaluate(fast_config(stage="train"), workdir)
  assert summary["fast"]["rounds"] == 3 and summary["fast"]["images"] == 48
  assert summary["fast"]["student_steps"] == 4 and summary["student"]["steps"] == 4
  assert summary["student"]["checkpoint"] == os.path.join(workdir, "fast")
  assert summary["student"]["test_accuracy"] is not None
  _, state, meta = stage_state(os.path.join(workdir, "fast"))
  assert meta["done"] and meta["kind"] == "fast_pool"
  assert state["pool"].shape == (3, 16, 32, 32, 1) and all(np.any(p) for p in state["pool"])
  # The finished stage keeps its final checkpoint only (the final save removes the periodic
  # ones; the resume test below stops the run between rounds and resumes).
  assert ckpt_lib.StageCheckpoints(os.path.join(workdir, "fast"),
                                   create=False).manager.all_steps() == [3]
  # The student's optimiser counted its 2 x 2 steps (none in the warmup round).
  counts = [int(x) for p, x in jax.tree_util.tree_leaves_with_path(state["student_opt"])
            if "count" in jax.tree_util.keystr(p)]
  assert counts and set(counts) == {4}


@pytest.mark.slow
def test_stopped_mid_run_it_resumes_to_the_uninterrupted_result(bn_teacher_workdir, tmp_path):
  """SIGTERM in round 2 of 4 (checkpoint of that round, exit 143); the same command again
  ends bitwise where the uninterrupted run ends: pool, meta-generator, BN moments, student."""
  overrides = {"fast.rounds": 4, "stage": "train"}
  _, workdir = check_resumes_after_sigterm(
      bn_teacher_workdir, tmp_path, "fast", fast_dfkd.STAGE, lambda: fast_config(**overrides),
      ("fast",))
  assert stage_state(os.path.join(workdir, "fast"))[0] == 4


@pytest.mark.slow
def test_the_command_line_runs_the_method_then_export_and_plots(bn_teacher_workdir, tmp_path,
                                                                capsys):
  check_method_command_line(bn_teacher_workdir, tmp_path, capsys, "fast", TINY, "fast",
                            student_steps=4)
