"""Accuracy table on mnist5k: teacher, KD with data, KD on noise, DAFL and the generator
ensemble with its ablations, over several seeds.

    python -m benchmarks.mnist5k_table --seeds=0,1,2 --workdir=/tmp/mnist5k_table
    python -m benchmarks.mnist5k_table --teacher=lenet5_bn --seeds=0,1,2 \
        --methods=dafl,ensemble,ensemble_no_mm,ensemble_one_generator

Each seed trains its own teacher (configs/mnist5k.py; --teacher picks LeNet-5 or LeNet-5-BN,
which moment matching needs), then every student method distils from that same teacher with
the same seed. Methods:

  kd_data                 KD with the real training images (upper bound)
  kd_noise                KD on N(0, 1) noise images (lower bound)
  dafl                    DAFL: one generator, trained jointly with the student
  dafl_cifar_hparams      DAFL with the generator settings the paper uses for BN teachers
                          (CIFAR-10: lr_G 0.02, w_oh 0.05, w_a 0.01, w_ie 5)
  ensemble                Luo et al.: 10 per-class generators, target-class CE + BN moment
                          matching, then distillation from the frozen generators
  ensemble_no_mm          the same without moment matching (ensemble.w_mm=0)
  ensemble_one_generator  one class-conditional generator for all classes (one class per step,
                          that class's BN statistics: the authors' conditional generator)
  ensemble_one_generator_unconditional
                          one unconditional generator (random target class per image, global
                          BN statistics)
  ensemble_dafl_loss      10 per-class generators trained with DAFL's losses

Prints a markdown table: final test accuracy (mean +- std over seeds; the final student, never
the best-on-test one), steps and wall time per run (teacher excluded: it is shared). Reruns
reuse finished stages in the workdir. Also draws test accuracy vs step of the teacher and of
every method's student in one figure, <workdir>/accuracy_vs_step.png (each seed a thin line,
their mean a thick one; from the runs' TensorBoard scalars, datafree_jax.plots); --no-plot
skips it, --plot_only redraws it from the runs already in the workdir without training.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np

from benchmarks import common, project

METHODS = ("kd_data", "kd_noise", "dafl")
# name: (config method, overrides, label)
SPECS = {
    "kd_data": ("kd_data", {}, "KD with data (upper bound)"),
    "kd_noise": ("kd_noise", {}, "KD on N(0,1) noise (lower bound)"),
    "dafl": ("dafl", {}, "DAFL"),
    "dafl_cifar_hparams": ("dafl", {"generator.lr": "0.02", "generator.w_oh": "0.05",
                                    "generator.w_a": "0.01"},
                           "DAFL with the paper's CIFAR-10 generator settings (for BN teachers)"),
    "ensemble": ("ensemble", {}, "ensemble: 10 per-class generators, CE + BN moment matching"),
    "ensemble_no_mm": ("ensemble", {"ensemble.w_mm": "0"},
                       "ensemble without moment matching (10 generators, CE only)"),
    "ensemble_one_generator": ("ensemble", {"ensemble.num_generators": "1"},
                               "one conditional generator, CE + BN moment matching"),
    "ensemble_one_generator_unconditional": (
        "ensemble", {"ensemble.num_generators": "1", "ensemble.single_target": "random"},
        "one unconditional generator, CE + global BN moment matching"),
    "ensemble_dafl_loss": ("ensemble", {"ensemble.loss": "dafl"},
                           "10 per-class generators with DAFL's losses"),
}


def plot_accuracy(workdir: str, seeds, methods, labels: dict) -> str | None:
  """Draws test accuracy vs step of the teacher and of each method's student, all seeds, in
  one figure: <workdir>/accuracy_vs_step.png (returned; None when no run has an evaluation).
  Reads the TensorBoard scalars of <workdir>/seed<S>/teacher_only and <workdir>/seed<S>/<method>
  (runs missing there are left out)."""
  curves = {}
  for method in ("teacher",) + tuple(methods):
    runs = []
    for seed in seeds:
      run = os.path.join(workdir, f"seed{seed}", "teacher_only" if method == "teacher" else method)
      if not os.path.isdir(os.path.join(run, "tensorboard")):
        continue
      acc = project.accuracy_curves(run)
      # A method's workdir holds the teacher copied from teacher_only, not its events: its
      # curve is the student's (the stage other than the teacher's).
      stage = "teacher" if method == "teacher" else next((s for s in acc if s != "teacher"), None)
      if stage in acc:
        runs.append(acc[stage])
    if runs:
      curves[labels.get(method, method)] = runs
  if not curves:
    return None
  path = os.path.join(workdir, "accuracy_vs_step.png")
  project.write_accuracy_figure(
      path, curves, f"mnist5k: test accuracy vs step, seeds {', '.join(map(str, seeds))}")
  return path


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--methods", default=",".join(METHODS), help=", ".join(SPECS))
  p.add_argument("--teacher", default="lenet5", choices=("lenet5", "lenet5_bn"))
  p.add_argument("--workdir", default="/tmp/mnist5k_table")
  p.add_argument("--set", action="append", default=[],
                 help="config override key=value for every run, e.g. student.steps=500")
  p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                 help="draw <workdir>/accuracy_vs_step.png after the table")
  p.add_argument("--plot_only", action="store_true",
                 help="only redraw the figure from the runs already in --workdir")
  args = p.parse_args()
  seeds, methods = common.seeds_and_methods(p, args, SPECS)
  rows = {m: [] for m in ("teacher",) + tuple(methods)}
  labels = {m: SPECS[m][2] for m in methods}
  labels["teacher"] = f"teacher {args.teacher}"
  if args.plot_only:
    print(plot_accuracy(args.workdir, seeds, methods, labels) or
          f"no evaluated runs in {args.workdir}")
    return
  for seed in seeds:
    base = os.path.join(args.workdir, f"seed{seed}")
    t0 = time.time()
    summary, teacher_dir = project.mnist5k_teacher(args.workdir, seed, args.teacher, args.set)
    rows["teacher"].append((summary["teacher"]["test_accuracy"],
                            summary["config"]["teacher"]["steps"], time.time() - t0))
    for method in methods:
      workdir = os.path.join(base, method)
      if not os.path.exists(os.path.join(workdir, "teacher")):
        shutil.copytree(os.path.join(teacher_dir, "teacher"),
                        os.path.join(workdir, "teacher"))
      t0 = time.time()
      config_method, overrides, _ = SPECS[method]
      config = project.mnist5k_run_config(
          f"method={config_method},seed={seed},stage=train,teacher={args.teacher}",
          args.set + [f"{k}={v}" for k, v in overrides.items()])
      summary = project.train_and_evaluate(config, workdir)
      steps = str(summary["student"]["steps"])
      if "generators" in summary:
        steps = f"{summary['generators']['steps']} generator + {steps} student"
      rows[method].append((summary["student"]["test_accuracy"], steps, time.time() - t0))
      print(json.dumps({"seed": seed, "method": method, "row": rows[method][-1]}), flush=True)
  print(f"\nmnist5k, seeds {seeds}, teacher {args.teacher}, final test accuracy on the 1,000 "
        "held-out digits")
  cells = []
  for m, r in rows.items():
    acc = np.array([x[0] for x in r]) * 100
    cells.append([labels[m], f"{acc.mean():.2f} +- {acc.std():.2f}",
                  ", ".join(f"{a:.2f}" for a in acc), r[0][1],
                  f"{np.mean([x[2] for x in r]):.0f} s"])
  print("\n".join(common.markdown_table(
      ["method", "accuracy % (mean +- std)", "per seed", "steps", "wall time / run"], cells)))
  if args.plot:
    figure = plot_accuracy(args.workdir, seeds, methods, labels)
    if figure:
      print(f"\naccuracy vs step: {figure}")


if __name__ == "__main__":
  main()
