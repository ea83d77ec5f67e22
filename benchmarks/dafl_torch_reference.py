"""DAFL in JAX against the official DAFL loop in PyTorch, on the same mnist5k teachers.

    pip install torch==2.13.0        # the reference only: not a dependency of the package
    python -m benchmarks.dafl_torch_reference --seeds=0,1,2,3,4,5,6,7,8,9 --teacher_seed=0 \
        --workdir=/tmp/dafl_parity

The mnist5k LeNet-5 teacher is trained, or reused from --workdir/seed<k>/teacher_only as
benchmarks.mnist5k_table leaves it (k: each DAFL seed's own, or --teacher_seed for all of
them), and copied into a PyTorch LeNet-5. Then:

1. Agreement (the first seed only): from the JAX loop's initial generator and student and the
   latents of its first step, one DAFL step in each implementation: the generator's loss terms,
   and the relative difference ||g_jax - g_torch|| / ||g_torch|| of every generator and student
   gradient. The same again after --check_after steps of the PyTorch loop, its weights copied
   into JAX (saturated generator, trained student).
2. Training: DAFL for the config's student.steps (or --steps) with both, for every seed. PyTorch
   runs the authors' loop (torch_dafl, DAFL-train.py's MNIST branch: one backward of generator
   loss + KD loss, then both Adam steps, latents from torch.randn); JAX runs this project's
   jitted step (stages/dafl.py).
   With --init=jax (the default) the PyTorch generator and student start from the JAX stage's
   initial weights of the same seed, so the two differ only in their latents and float
   rounding; --init=own keeps PyTorch's default initialisation. Same hyperparameters
   (configs/mnist5k.py, `--set` overrides), including the student's learning-rate schedule.
   Prints the student's test accuracy every --eval_every steps, the final one per seed, mean +-
   std over seeds and, with both implementations, Welch's t-test of the finals.

Both implementations compute the same step (part 1); the spread of part 2 over seeds is the
spread of DAFL itself at this size.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

try:
  import torch  # pylint: disable=g-import-not-at-top
except ImportError:
  sys.exit("this benchmark needs PyTorch: pip install torch==2.13.0")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from benchmarks import common, dafl_compare, project, torch_dafl  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--workdir", default="/tmp/mnist5k_table",
                 help="where the teachers are (or are trained), as in mnist5k_table")
  p.add_argument("--steps", type=int, default=0, help="DAFL steps (0: the config's)")
  p.add_argument("--eval_every", type=int, default=250)
  p.add_argument("--check_after", type=int, default=300,
                 help="PyTorch steps before the second agreement check")
  p.add_argument("--skip_training", action="store_true", help="agreement check only")
  p.add_argument("--impls", default="torch,jax",
                 help="implementations to train: torch, jax or both (the JAX runs are the "
                      "DAFL rows of mnist5k_table with the same seeds and settings)")
  p.add_argument("--init", choices=("jax", "own"), default="jax",
                 help="PyTorch's initial weights: the JAX stage's of the same seed, or its own")
  p.add_argument("--teacher_seed", type=int, default=-1,
                 help="train (or reuse) one teacher with this seed for every DAFL seed; "
                      "-1: each seed its own teacher")
  p.add_argument("--set", action="append", default=[], help="config override key=value")
  args = p.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  torch.set_num_threads(os.cpu_count() or 1)
  test = project.load_dataset("mnist5k", "test")
  info = test.info
  test_torch = (torch.tensor(np.ascontiguousarray(test.images.transpose(0, 3, 1, 2))),
                torch.tensor(test.labels.astype(np.int64)))
  results = {}
  for n, seed in enumerate(seeds):
    tseed = seed if args.teacher_seed < 0 else args.teacher_seed
    summary, teacher_dir = project.mnist5k_teacher(args.workdir, tseed, overrides=args.set)
    config = project.mnist5k_run_config(f"method=dafl,seed={seed}", args.set)
    why = torch_dafl.unsupported(config)
    if why:
      p.error(f"no PyTorch transcription of this config: {why}")
    if args.steps:
      config.student.steps = args.steps
    teacher = project.load_teacher(config, teacher_dir, info)
    t_teacher = torch_dafl.teacher_module(config.teacher.model, info,
                                          jax.device_get(teacher["variables"]))
    t_acc = torch_dafl.accuracy(t_teacher, *test_torch)
    print(f"seed {seed}: teacher (seed {tseed}) {summary['teacher']['test_accuracy']:.2%} (JAX), "
          f"{t_acc:.2%} (its PyTorch copy)", flush=True)
    if n == 0:
      rows = dafl_compare.agreement(dafl_compare.Setting(config, teacher, info), args.check_after)
      print("\n" + "\n".join(common.markdown_table(["when", "quantity", "value"], rows)) + "\n",
            flush=True)
    if not args.skip_training:
      results[seed] = dafl_compare.train_both(config, teacher, info, t_teacher, test, test_torch,
                                              args.eval_every, args.impls.split(","), args.init)
  if not results:
    return
  print(f"\nmnist5k DAFL, {config.student.steps} steps, generator width "
        f"{config.generator.width}, batch {config.student.batch_size}, lr_G "
        f"{config.generator.lr}, student schedule {config.student.schedule}, PyTorch init "
        f"{args.init}, teacher seed {'each' if args.teacher_seed < 0 else args.teacher_seed}; "
        f"{jax.devices()[0].platform}, torch {torch.__version__} ({torch.get_num_threads()} "
        "threads)")
  first = next(iter(results.values()))
  steps = " / ".join(str(s) for s, _ in next(iter(first.values()))[0])
  cells, finals = [], {}
  for impl in first:
    finals[impl] = []
    for seed, res in results.items():
      curve, sps = res[impl]
      finals[impl].append(curve[-1][1] * 100)
      cells.append([impl, seed, " / ".join(f"{a * 100:.1f}" for _, a in curve),
                    f"{finals[impl][-1]:.2f}", f"{sps:.3f}"])
    cells.append([impl, f"mean +- std (n = {len(finals[impl])})", "",
                  f"{np.mean(finals[impl]):.2f} +- {np.std(finals[impl]):.2f}", ""])
  print("\n".join(common.markdown_table(
      ["implementation", "seed", f"student accuracy % at steps {steps}", "final %", "s/step"],
      cells)))
  if len(finals) == 2 and len(seeds) > 1:
    jx, th = finals[dafl_compare.JAX], finals[dafl_compare.TORCH]
    t, p_value, dof = common.welch(jx, th)
    print(f"\nWelch's t-test, JAX - PyTorch finals: difference of means "
          f"{np.mean(jx) - np.mean(th):+.2f} points, t = {t:.3f}, {dof:.1f} degrees of freedom, "
          f"two-sided p = {p_value:.3f}")


if __name__ == "__main__":
  main()
