"""Seconds per generator-ensemble step, each lowering of one step of G generators side by side.

    python -m benchmarks.ensemble_step_speed                  # mnist5k setting
    python -m benchmarks.ensemble_step_speed --lowerings=loop,unroll,separate --rounds=10

Rows (all update the same G generators with the package's `ensemble.objective.member_update`):
  loop      the 'loop' lowering (the CPU default): a Python loop over one jitted member update,
            on the stacked state (cut into members and restacked every step)
  vmap      the 'vmap' lowering (the accelerator default): one jitted step, members vmapped
  unroll    one jitted step tracing every member's update in a Python loop inside the jit:
            the CPU default before the 'loop' lowering, kept here as the baseline
  separate  G independent single-generator states, one jitted step each: the floor of 'loop'
            (no cutting and restacking)
Uses the mnist5k config (configs/mnist5k.py:method=ensemble) with a random LeNet-5-BN teacher
and random per-class BN statistics: the cost of a step does not depend on what the teacher
learned. Every row is compiled first (its first call, reported), then timed in
--rounds rounds of --reps steps, the rows taking turns within each round. Prints a markdown
table: the median over all timed steps of a row and the range of its per-round medians.
"""
from __future__ import annotations

import argparse

from benchmarks import common, speed


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
                 help="rows, comma-separated: " + ", ".join(speed.LOWERINGS))
  args = p.parse_args()
  lowerings = args.lowerings.split(",")
  unknown = [x for x in lowerings if x not in speed.LOWERINGS]
  if unknown:
    p.error(f"unknown lowerings {unknown}; choose from {', '.join(speed.LOWERINGS)}")

  cfg = speed.ensemble_config(False, args.generators, width=args.width, batch=args.batch)
  info, teacher = speed.ensemble_teacher(cfg)
  rows = []
  for lowering in lowerings:
    rows.append(speed.ensemble_lowering_timed(cfg, info, teacher, lowering))
    rows[-1].compile()
  common.time_rounds([[r] for r in rows], args.rounds, args.reps)

  print(f"\n{common.machine_line()}\none device, generator width {cfg.generator.width}, "
        f"{cfg.ensemble.batch_per_generator} images per generator, teacher "
        f"{cfg.teacher.model}, {args.rounds} rounds of {args.reps} timed steps per row")
  print("\n".join(common.markdown_table(
      ["step", "s/step (median of all)", "round medians, min - max", "first call (compile) s"],
      [[r.name, f"{r.median():.3f}", r.spread(), f"{r.first:.1f}"] for r in rows])))


if __name__ == "__main__":
  main()
