"""Seconds per generator-ensemble step: one step of G generators vs G separate jitted steps.

    python benchmarks/ensemble_step_speed.py                  # mnist5k setting, every lowering
    python benchmarks/ensemble_step_speed.py --width=32 --reps=5

One step of the ensemble updates all G generators (params, BN state, optimiser state stacked on
a leading axis) in one jitted call, lowered as `vmap` over the stacked axis or as a loop
`unroll`ed inside the jit ('auto' picks unroll on CPU, vmap on accelerators). The baseline is
what the ensemble replaces: G separate jitted single-generator steps called one after another.
Uses the mnist5k config (configs/mnist5k.py:method=ensemble) with a randomly initialised
LeNet-5-BN teacher and BN statistics of random images: the cost of a step does not depend on
what the teacher learned. Prints a markdown table (median over --reps timed steps, after one
untimed compiling call).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from datafree_jax import bn_stats, common, input_pipeline, models  # pylint: disable=g-import-not-at-top,wrong-import-position
from datafree_jax.stages import ensemble  # pylint: disable=g-import-not-at-top,wrong-import-position


def mnist5k_ensemble_config():
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(REPO, "configs",
                                                                    "mnist5k.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("method=ensemble")


def random_teacher(model_name: str, info):
  model = models.get_classifier(model_name, info.num_classes)
  params, batch_stats = common.init_model(model, jax.random.key(0), info.image_shape)
  rng = np.random.default_rng(0)
  examples = [rng.normal(size=(8,) + info.image_shape).astype(np.float32) + 0.1 * k
              for k in range(info.num_classes)]
  stats = bn_stats.compute(model, params, batch_stats, examples)
  return {"model": model, "variables": common.variables_of(params, batch_stats),
          "bn_stats": stats, "meta": {"model": model_name}}


def time_steps(step, state, reps: int):
  t = time.perf_counter()
  state, _ = step(state)
  jax.block_until_ready(state)
  first = time.perf_counter() - t
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    state, _ = step(state)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
  return first, float(np.median(times))


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--generators", type=int, default=10)
  p.add_argument("--width", type=int, default=0, help="generator width (0: the config's)")
  p.add_argument("--batch", type=int, default=0, help="images per generator (0: the config's)")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--lowerings", default="separate,unroll,vmap")
  args = p.parse_args()

  cfg = mnist5k_ensemble_config()
  cfg.ensemble.num_generators = args.generators
  if args.width:
    cfg.generator.width = args.width
  if args.batch:
    cfg.ensemble.batch_per_generator = args.batch
  info = input_pipeline.dataset_info(cfg.dataset)
  teacher = random_teacher(cfg.teacher.model, info)
  g = args.generators
  rows = []
  for lowering in args.lowerings.split(","):
    if lowering == "separate":
      cfg.ensemble.lowering, cfg.ensemble.num_generators = "unroll", 1
      one = ensemble.build(cfg, teacher, info)
      cfg.ensemble.num_generators = g
      states = [jax.tree.map(jnp.copy, one.state) for _ in range(g)]

      def step(states, one=one):
        out = [one.step(s) for s in states]
        return [o[0] for o in out], out[-1][1]
      first, median = time_steps(step, states, args.reps)
      name = f"{g} separate jitted single-generator steps"
    else:
      cfg.ensemble.lowering = lowering
      ens = ensemble.build(cfg, teacher, info)
      first, median = time_steps(ens.step, ens.state, args.reps)
      name = f"one ensemble step of {g} generators, lowering {lowering}"
    rows.append((name, median, first))
    print(f"{name}: {median:.3f} s/step (first call {first:.1f} s)", flush=True)

  print(f"\n{jax.devices()[0].platform} ({jax.device_count()} device(s)), generator width "
        f"{cfg.generator.width}, {cfg.ensemble.batch_per_generator} images per generator, "
        f"teacher {cfg.teacher.model}, median of {args.reps} steps")
  print("| step | s/step | first call (compile) s |")
  print("|---|---|---|")
  for name, median, first in rows:
    print(f"| {name} | {median:.3f} | {first:.1f} |")


if __name__ == "__main__":
  main()
