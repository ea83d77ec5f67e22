"""Seconds per generator-ensemble step, each lowering of one step of G generators side by side.

    python benchmarks/ensemble_step_speed.py                  # mnist5k setting
    python benchmarks/ensemble_step_speed.py --lowerings=loop,unroll,separate --rounds=10

Rows (all update the same G generators with the package's `ensemble.member_update`):
  loop      the 'loop' lowering (the CPU default): a Python loop over one jitted member update,
            on the stacked state (cut into members and restacked every step)
  vmap      the 'vmap' lowering (the accelerator default): one jitted step, members vmapped
  unroll    one jitted step tracing every member's update in a Python loop inside the jit:
            the CPU default before the 'loop' lowering, kept here as the baseline
  separate  G independent single-generator states, one jitted step each: the floor of 'loop'
            (no cutting and restacking)
Uses the mnist5k config (configs/mnist5k.py:method=ensemble) with a randomly initialised
LeNet-5-BN teacher and BN statistics of random images: the cost of a step does not depend on
what the teacher learned. Every row is compiled first (its first call, reported), then timed in
--rounds rounds of --reps steps, the rows taking turns within each round. Prints a markdown
table: the median over all timed steps of a row and the range of its per-round medians.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position

from datafree_jax import bn_stats, common, config_lib, input_pipeline, models  # pylint: disable=g-import-not-at-top,wrong-import-position
from datafree_jax.stages import ensemble  # pylint: disable=g-import-not-at-top,wrong-import-position


def mnist5k_ensemble_config():
  return config_lib.load_config_file(os.path.join(REPO, "configs", "mnist5k.py"),
                                     "method=ensemble")


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
  """(state, seconds of each of `reps` calls of `step`)."""
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    state, _ = step(state, None)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - t)
  return state, times


def unrolled_step(ens, spec, teacher):
  """The former CPU default: one jit, each member's whole update traced in a Python loop."""
  def step_fn(state, consts, tvars):
    members = {k: state[k] for k in ensemble.MEMBER_KEYS}
    cs = {k: consts[k] for k in ("targets", "class_id", "index")}
    new, per_member = ensemble.map_members(
        functools.partial(ensemble.member_update, spec), (members, cs), "loop",
        shared=(tvars, state["step"]))
    g = ens.num_generators
    metrics = {k: jnp.sum(v * consts["real"]) / g for k, v in per_member.items()}
    return dict(new, step=state["step"] + 1), metrics
  step_jit = jax.jit(step_fn, donate_argnums=(0,))
  return lambda state, _: step_jit(state, ens.consts, teacher["variables"])


def build_steps(cfg, teacher, info, row: str, g: int):
  """(name, step, initial state) of one row."""
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("gen",))
  if row == "separate":
    cfg.ensemble.lowering, cfg.ensemble.num_generators = "loop", 1
    one = ensemble.build(cfg, teacher, info, mesh)
    cfg.ensemble.num_generators = g
    states = [jax.tree.map(jnp.copy, one.state) for _ in range(g)]

    def step(states, _):
      out = [one.step(s, None) for s in states]
      return [o[0] for o in out], out[-1][1]
    return f"{g} separate jitted single-generator steps", step, states
  cfg.ensemble.lowering = "loop" if row == "unroll" else row
  ens = ensemble.build(cfg, teacher, info, mesh)
  if row == "unroll":
    spec = ensemble.member_spec(cfg, info, teacher["model"])
    return (f"one step of {g} generators, unrolled in one jit (former CPU default)",
            unrolled_step(ens, spec, teacher), ens.state)
  return f"one step of {g} generators, lowering '{row}'", ens.step, ens.state


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--generators", type=int, default=10)
  p.add_argument("--width", type=int, default=0, help="generator width (0: the config's)")
  p.add_argument("--batch", type=int, default=0, help="images per generator (0: the config's)")
  p.add_argument("--reps", type=int, default=5, help="timed steps per row and round")
  p.add_argument("--rounds", type=int, default=3,
                 help="rounds; each times every row once, in turn, so that a slow spell of "
                      "the machine hits all rows alike")
  p.add_argument("--lowerings", default="loop,unroll,separate",
                 help="rows, comma-separated: loop, vmap, unroll, separate")
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
  for row in args.lowerings.split(","):
    name, step, state = build_steps(cfg, teacher, info, row, g)
    state, (first,) = time_steps(step, state, 1)
    rows.append({"name": name, "step": step, "state": state, "first": first, "times": [],
                 "round_medians": []})
    print(f"{name}: first call (compile) {first:.1f} s", flush=True)
  for r in range(args.rounds):
    for row in rows:
      row["state"], times = time_steps(row["step"], row["state"], args.reps)
      row["times"] += times
      row["round_medians"].append(float(np.median(times)))
    print(f"round {r + 1}/{args.rounds}: " + ", ".join(
        f"{row['round_medians'][-1]:.3f}" for row in rows) + " s/step", flush=True)

  print(f"\n{jax.devices()[0].platform}, one device, generator width "
        f"{cfg.generator.width}, {cfg.ensemble.batch_per_generator} images per generator, "
        f"teacher {cfg.teacher.model}, {args.rounds} rounds of {args.reps} timed steps per row")
  print("| step | s/step (median of all) | round medians, min - max | first call (compile) s |")
  print("|---|---|---|---|")
  for row in rows:
    print(f"| {row['name']} | {np.median(row['times']):.3f} | {min(row['round_medians']):.3f} - "
          f"{max(row['round_medians']):.3f} | {row['first']:.1f} |")


if __name__ == "__main__":
  main()
