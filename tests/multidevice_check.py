"""Every stage on 8 host CPU devices; run by test_ensemble_multidevice.py in a subprocess.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice_check.py DIR

In this order:
  - the data-parallel teacher stage (batch split over a 'data' mesh of all 8 devices; the
    configs of stage_config) writes DIR/teacher, then DIR/teacher_done.json: the parent, which
    meanwhile trains the same teacher on its 1 device, then loads this one and runs DAFL and
    the distillation from it while this process goes on;
  - with a random LeNet-5-BN teacher (its BN statistics computed on random images): one step of
    G = 10 generators on 8 devices (padded to 16 members, 2 per device, lowering 'auto', i.e.
    'loop' on CPU: one jitted member update per member, on its device) goes to
    DIR/ensemble_step.npz: the parent takes it with G = 10 on its 1 device with lowering
    'vmap', all members at once, and compares (1e-5);
  - the state is sharded over 'gen' (2 members per device);
  - the generators stage preempted after 1 of 2 steps (tests/faults.py) leaves an
    unfinished checkpoint of 16 members in DIR/unfinished/generators (1 device, 10 members,
    must refuse to resume it);
  - the generators stage runs on 8 devices and writes DIR/generators; the real members' final
    parameters go to DIR/expected.npz for the parent to compare after restoring on 1 device;
  - on the teacher of the first step: DAFL_STEPS of DAFL's joint step (dafl.build) and the
    distillation stages from 'data' and 'noise' (DIR/distill_data, DIR/distill_noise).
    The teacher's and these results go to DIR/data_parallel.npz (flatten()'s names, prefixed
    'teacher/', 'dafl/', 'dafl_metrics/', 'distill_data/', 'distill_noise/').
Prints one JSON line of facts at the end.
"""
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

import faults  # pylint: disable=g-import-not-at-top
from conftest import flatten  # pylint: disable=g-import-not-at-top
from conftest import tiny_config  # pylint: disable=g-import-not-at-top

from datafree_jax import bn_stats  # pylint: disable=g-import-not-at-top
from datafree_jax import common  # pylint: disable=g-import-not-at-top
from datafree_jax import datasets
from datafree_jax import loop  # pylint: disable=g-import-not-at-top
from datafree_jax import models  # pylint: disable=g-import-not-at-top
from datafree_jax import parallel  # pylint: disable=g-import-not-at-top
from datafree_jax import stage as stage_lib  # pylint: disable=g-import-not-at-top
from datafree_jax import pipeline  # pylint: disable=g-import-not-at-top
from datafree_jax.stages import dafl  # pylint: disable=g-import-not-at-top
from datafree_jax.stages import distill  # pylint: disable=g-import-not-at-top
from datafree_jax.stages import ensemble  # pylint: disable=g-import-not-at-top
from datafree_jax.stages import teacher as teacher_stage  # pylint: disable=g-import-not-at-top

DAFL_STEPS = 3
TEACHER_DONE = "teacher_done.json"  # in DIR once DIR/teacher is final


def stage_config(method):
  """The tiny data-parallel configs: a LeNet-5-BN teacher (6 steps) and a LeNet-5-half-BN
  student (3 steps), global batch 16 (2 per device on 8), checkpoints every 3 steps. BN in every
  model: its batch statistics are reductions over the split batch, as the gradients are.

  SGD, not the configs' Adam: the biases of convolutions followed by BN have a gradient of
  exactly 0 up to rounding, which Adam's first steps (lr * g / |g|) turn into +-lr on either
  device count; SGD keeps rounding noise small, and its update scales with the gradient (a
  gradient summed instead of averaged over devices moves the parameters 8x as far).
  """
  sgd = {f"{part}.{k}": v for part in ("teacher", "student", "generator")
         for k, v in (("optimizer", "sgd"), ("lr", 0.05))}
  return tiny_config(method, **sgd, **{
      "teacher.model": "lenet5_bn", "teacher.steps": 6, "teacher.batch_size": 16,
      "teacher.bn_stats_per_class": 2, "student.model": "lenet5_half_bn", "student.steps": 3,
      "student.batch_size": 16, "checkpoint_every": 3})


def dafl_steps(config, teacher, info):
  """DAFL_STEPS joint steps from dafl.build's initial state: (state, {metric: per-step array})."""
  state, step_jit, _, _, _ = dafl.build(config, teacher, info)
  history = []
  for _ in range(DAFL_STEPS):
    state, metrics = step_jit(state, None)
    history.append(jax.device_get(metrics))
  return state, {k: np.asarray([m[k] for m in history]) for k in history[0]}


def teacher_result(t):
  return flatten({"variables": t["variables"], "bn_stats": t["bn_stats"]}, "teacher/")


def downstream(workdir, teacher, data):
  """DAFL's joint step and the distillation stages on `teacher`, as flatten()'s dict."""
  out = {}
  state, metrics = dafl_steps(stage_config("dafl"), teacher, data["test"].info)
  out.update(flatten(state, "dafl/"))
  out.update(flatten(metrics, "dafl_metrics/"))
  for method, source in (("kd_data", "data"), ("kd_noise", "noise")):
    res = stage_lib.run_alone(distill.RealOrNoise(source), stage_config(method), workdir,
                              data=data, teacher=teacher)
    assert res.step == 3, res.step
    out.update(flatten(res.state, f"distill_{source}/"))
  return out


def random_teacher(info):
  model = models.get_classifier("lenet5_bn", info.num_classes)
  params, batch_stats = common.init_model(model, jax.random.key(0), info.image_shape)
  rng = np.random.default_rng(0)
  images = [rng.normal(0.1 * k, 1.0, (6,) + info.image_shape).astype(np.float32)
            for k in range(info.num_classes)]
  return {"model": model, "variables": common.variables_of(params, batch_stats),
          "bn_stats": bn_stats.compute(model, params, batch_stats, images),
          "meta": {"model": "lenet5_bn"}}


def config_for(lowering, at_once=0, **overrides):
  # SGD: Adam's first step lr * g / |g| turns float noise on exactly-zero gradients into +-lr.
  return tiny_config("ensemble", **overrides, **{
      "ensemble.batch_per_generator": 4, "ensemble.steps": 2, "ensemble.eval_every": 0,
      "ensemble.optimizer": "sgd", "ensemble.lr": 0.05, "ensemble.w_tv": 0.1,
      "ensemble.w_l2": 0.1, "ensemble.lowering": lowering,
      "ensemble.max_generators_per_device_at_once": at_once})


def main(workdir):
  t0 = time.time()
  seconds = {}
  assert jax.device_count() == 8, jax.devices()
  # The teacher stage first: the parent waits for it (TEACHER_DONE) to run DAFL and the
  # distillation on 1 device from the same teacher while this process goes on.
  data = pipeline.load_data(stage_config("teacher"))
  t = teacher_stage.train(stage_config("teacher"), workdir, data, None)
  results = teacher_result(t)
  with open(os.path.join(workdir, TEACHER_DONE + ".tmp"), "w") as f:
    json.dump({"step": 6}, f)
  os.rename(os.path.join(workdir, TEACHER_DONE + ".tmp"), os.path.join(workdir, TEACHER_DONE))
  seconds["teacher"] = time.time() - t0

  info = datasets.dataset_info("mnist5k")
  teacher = random_teacher(info)
  mesh8 = parallel.make_mesh("gen")
  config8 = config_for("auto", at_once=1)
  e8 = ensemble.build(config8, teacher, info, mesh8)
  assert (e8.num_generators, e8.padded) == (10, 16), e8.padded
  assert list(e8.class_ids) == [k % 10 for k in range(16)]
  kernel = e8.state["params"]["fc"]["kernel"]
  assert kernel.sharding.spec == P("gen"), kernel.sharding
  local = {s.data.shape[0] for s in kernel.addressable_shards}
  assert local == {2} and len(kernel.addressable_shards) == 8, local
  # One step (of a copy: e8.state trains below); the parent compares the real members with
  # its 1-device 'vmap' step.
  s8, m8 = e8.step(jax.tree.map(jnp.copy, e8.state), None)
  step8 = flatten({"params": s8["params"], "batch_stats": s8["batch_stats"]}, "state/")
  step8 = {k: v[:10] for k, v in step8.items()}
  step8.update(flatten(jax.device_get(m8), "metrics/"))
  np.savez(os.path.join(workdir, "ensemble_step.npz"), **step8)

  # Stopped after 1 of 2 steps: an unfinished checkpoint of 16 members (from a copy of e8's
  # initial state: e8.state trains below).
  unfinished = os.path.join(workdir, "unfinished")
  ctx = stage_lib.Context(config=config_for("auto", at_once=1), workdir=unfinished, data=None,
                          info=info, teacher=teacher, outputs={"ensemble": dataclasses.replace(
                              e8, state=jax.tree.map(jnp.copy, e8.state))})
  try:
    stage_lib.run(faults.sigterm_at(ensemble.GENERATORS, 1), ctx)
    raise AssertionError("the SIGTERM in step 1 did not stop the generators stage")
  except loop.Preempted:
    pass
  out = stage_lib.run_alone(ensemble.GENERATORS, config8, workdir, info=info, teacher=teacher,
                            outputs={"ensemble": e8})
  state = out.state
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)[:10]
          for path, v in jax.tree_util.tree_flatten_with_path(
              {"params": state["params"], "batch_stats": state["batch_stats"]})[0]}
  np.savez(os.path.join(workdir, "expected.npz"), **flat)
  seconds["ensemble"] = time.time() - t0

  results.update(downstream(workdir, t, data))
  np.savez(os.path.join(workdir, "data_parallel.npz"), **results)
  seconds["dafl_distill"] = time.time() - t0
  print(json.dumps({"devices": jax.device_count(), "padded": e8.padded,
                    "lowering_8": e8.lowering, "local_members": sorted(local),
                    "steps": out.step,
                    "seconds": {k: round(v, 1) for k, v in seconds.items()}}))


if __name__ == "__main__":
  main(sys.argv[1])
