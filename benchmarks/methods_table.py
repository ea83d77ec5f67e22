"""Every method on mnist5k on the same wall-clock budget: final student accuracy over seeds and
the time at which each run's student first reaches 90% and 95% test accuracy.

    python -m benchmarks.methods_table                          # 7 methods x 3 seeds, 600 s each
    python -m benchmarks.methods_table --methods=fast,cmi --seeds=0 --budget=300
    python -m benchmarks.methods_table --report_only            # the table of the finished runs

For each seed, one LeNet-5-BN teacher is trained (configs/mnist5k.py, method=teacher; its time is
not counted) and copied into every method's workdir; all methods distil from that same teacher
(the BN teacher, which moment matching needs, for every method). Each method then runs as the
command line a user runs, in its own process:

    python -m datafree_jax.main --config=mnist5k:method=M,seed=S,teacher=lenet5_bn \\
        --workdir=<workdir>/seed<S>/<M> --config.student.eval_every=100 [<M>.eval_every=2]

with its mnist5k defaults, the students evaluated more often than by default (every 100 student
steps; every 2 rounds where the student learns inside a synthesis stage), so that the time to an
accuracy is resolved. The clock starts when the process starts (interpreter start and compiles
count) and the run is stopped with SIGTERM when the budget is spent. Methods:

  ensemble        Luo et al.: 10 per-class generators, then a student distilled from them
  dafl            DAFL: one generator trained with the student
  deepinversion   DeepInversion with Adaptive DeepInversion's competing student
  fast            Fast-DFKD: a meta-learned generator, the student learning as rounds accumulate
  cmi             CMI: contrastive model inversion
  kd_data         KD with the real training images (an upper bound)
  kd_noise        KD on N(0, 1) noise images (a lower bound)

Reported per method, over the seeds: the final student's test accuracy (mean +- std; a run that
finished: its results.json, the final student; a run stopped by the budget: its student's last
evaluation before the budget, marked), the seconds from the process's start to the first
evaluation at or above 90% and 95% (the mean over the runs that reached it, and how many did),
the wall time used and the cores the run used (its process's CPU seconds, user + system, over its
seconds to exit: what it got of the machine while other work ran), and the accuracy each
method has at shorter budgets (--at; read from the same runs: a run stopped by a shorter budget
reports its student's last evaluation by then, and runs the same until then; a method's config
set for a shorter budget could do better). A run's measurements are kept in
<workdir>/seed<S>/<M>/methods_table_run.json and reused by a later call with the same budget;
all rows go to <workdir>/methods_table.json. The table names the CPU and the load average
during the runs (processes at any priority count in it): compare numbers only within one
table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np

from benchmarks import REPO, common, project

METHODS = ("ensemble", "dafl", "deepinversion", "fast", "cmi", "kd_data", "kd_noise")
LABELS = {"ensemble": "ensemble (Luo et al.)", "dafl": "DAFL", "deepinversion": "DeepInversion",
          "fast": "Fast-DFKD", "cmi": "CMI", "kd_data": "KD with data (upper bound)",
          "kd_noise": "KD on noise (lower bound)"}
# Methods whose student learns inside their synthesis stage: that stage's evaluation interval
# (rounds) is set too.
ROUND_EVAL = {"deepinversion": "deepinversion.eval_every", "cmi": "cmi.eval_every",
              "fast": "fast.eval_every"}
THRESHOLDS = (0.90, 0.95)
TEACHER = "lenet5_bn"
RUN_FILE = "methods_table_run.json"
STOP_GRACE = 120.0   # seconds a stopped run may take to save and exit before it is killed


def run_flags(method: str, seed: int, workdir: str, overrides=()) -> list:
  """The command line of one method's run (after `python -m datafree_jax.main`)."""
  flags = [f"--config=mnist5k:method={method},seed={seed},teacher={TEACHER}",
           f"--workdir={workdir}", "--config.student.eval_every=100"]
  if method in ROUND_EVAL:
    flags.append(f"--config.{ROUND_EVAL[method]}=2")
  return flags + [f"--config.{o}" for o in overrides]


def student_evaluations(events: dict) -> list:
  """[(wall_time, stage, step, accuracy)] of every student evaluation of a run, in time order,
  from plots.scalar_events ({stage: [(wall_time, step, value)]}): every stage's but the
  teacher's."""
  out = [(t, stage, step, acc) for stage, evs in events.items() if stage != "teacher"
         for t, step, acc in evs]
  return sorted(out)


def measure(evaluations: list, start: float, deadline: float, finished_accuracy=None,
            thresholds=THRESHOLDS) -> dict:
  """A run's numbers from its student evaluations (student_evaluations), the process's start
  and the budget's end (Unix times). Evaluations after the deadline do not count.

  final: `finished_accuracy` (the finished run's final student) when given, else the last
  evaluation before the deadline (None without one); reached: {threshold: seconds from start
  to the first evaluation at or above it, or None}."""
  counted = [e for e in evaluations if e[0] <= deadline]
  final = finished_accuracy
  if final is None and counted:
    final = counted[-1][3]
  reached = {}
  for th in thresholds:
    hit = next((t for t, _, _, acc in counted if acc >= th), None)
    reached[th] = None if hit is None else hit - start
  return {"final": final, "reached": {str(k): v for k, v in reached.items()},
          "evaluations": len(counted)}


def run_method(method: str, seed: int, workdir: str, teacher_dir: str, budget: float,
               overrides=()) -> dict:
  """Runs one method for at most `budget` seconds (SIGTERM then), measures it (measure) and
  writes the record to <workdir>/RUN_FILE; a record of the same budget there is returned
  instead of running again."""
  record_path = os.path.join(workdir, RUN_FILE)
  if os.path.exists(record_path):
    with open(record_path, encoding="utf-8") as f:
      record = json.load(f)
    if record.get("budget") == budget and record.get("overrides") == list(overrides):
      return record
  if os.path.exists(workdir):
    shutil.rmtree(workdir)
  shutil.copytree(os.path.join(teacher_dir, "teacher"), os.path.join(workdir, "teacher"))
  cmd = [sys.executable, "-m", "datafree_jax.main", *run_flags(method, seed, workdir, overrides)]
  load_before = os.getloadavg()
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu_before = usage.ru_utime + usage.ru_stime
  with open(os.path.join(workdir, "run.log"), "w", encoding="utf-8") as log_file:
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    stopped = False
    try:
      proc.wait(timeout=budget)
    except subprocess.TimeoutExpired:
      stopped = True
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(timeout=STOP_GRACE)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    end = time.time()
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = usage.ru_utime + usage.ru_stime - cpu_before
  finished = None
  results = os.path.join(workdir, "results.json")
  if not stopped and proc.returncode == 0 and os.path.exists(results):
    with open(results, encoding="utf-8") as f:
      finished = json.load(f)["student"]["test_accuracy"]
  evaluations = []
  if os.path.isdir(os.path.join(workdir, "tensorboard")):
    evaluations = student_evaluations(project.scalar_events(os.path.join(workdir,
                                                                         "tensorboard")))
  record = {"method": method, "seed": seed, "budget": budget, "overrides": list(overrides),
            "command": " ".join(cmd[1:]), "returncode": proc.returncode, "stopped": stopped,
            "finished": finished is not None, "wall": min(end, start + budget) - start,
            "cpu": round(cpu, 1), "exit": round(end - start, 2),
            "loadavg": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            **measure(evaluations, start, start + budget, finished),
            "curve": [(round(t - start, 2), stage, step, acc)
                      for t, stage, step, acc in evaluations]}
  with open(record_path, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  return record


def end_time(record: dict) -> float:
  """Seconds from a run's start to its process's exit (a stopped run: past the budget, while
  it saved)."""
  return record.get("exit", record["wall"])


def accuracy_at(record: dict, seconds: float):
  """The accuracy a run's student had `seconds` after its start: the final student's when the
  run had ended by then, else its last evaluation by then (None before the first). This is
  what the same run stopped by a budget of `seconds` reports; a shorter budget does not change
  what a run does before it."""
  if seconds >= record["budget"] or (record["finished"] and end_time(record) <= seconds):
    return record["final"]
  got = [acc for t, _, _, acc in record["curve"] if t <= seconds]
  return got[-1] if got else None


def _accuracy_cell(values) -> str:
  got = [100 * v for v in values if v is not None]
  if not got:
    return "-"
  cell = f"{np.mean(got):.2f}"
  return cell if len(got) == len(values) else f"{cell} ({len(got)}/{len(values)})"


def _mark(record: dict) -> str:
  """'' for a finished run, '*' for one stopped by the budget, '!' for one that failed."""
  return "" if record["finished"] else "*" if record["stopped"] else "!"


def _seconds(values) -> str:
  got = [v for v in values if v is not None]
  if not got:
    return f"not reached (0/{len(values)})"
  return f"{np.mean(got):.0f} s ({len(got)}/{len(values)})"


def table(records: list, methods, at=()) -> list:
  """The markdown lines of the table of `records` (run_method's), one row per method; with
  `at` (seconds), a column per budget of the mean accuracy_at it."""
  rows = []
  for m in methods:
    rs = [r for r in records if r["method"] == m]
    if not rs:
      continue
    finals = [r["final"] for r in rs]
    acc = np.array([x for x in finals if x is not None]) * 100
    mean = f"{acc.mean():.2f} +- {acc.std():.2f}" if len(acc) else "no evaluation"
    per_seed = ", ".join(("-" if x is None else f"{100 * x:.2f}") + _mark(r)
                         for r, x in zip(rs, finals))
    ended = sum(r["finished"] for r in rs)
    rows.append([LABELS.get(m, m), mean, per_seed,
                 *(_seconds([r["reached"][str(th)] for r in rs]) for th in THRESHOLDS),
                 f"{np.mean([r['wall'] for r in rs]):.0f} s",
                 f"{np.mean([r['cpu'] / max(end_time(r), 1e-9) for r in rs]):.2f}",
                 f"{ended}/{len(rs)}" if ended < len(rs) else "all",
                 *(_accuracy_cell([accuracy_at(r, t) for r in rs]) for t in at)])
  columns = ["method", "final accuracy % (mean +- std)",
             "per seed (* = stopped by the budget, ! = failed)",
             *(f"time to {int(100 * th)}%" for th in THRESHOLDS), "wall time / run",
             "cores used",
             "finished within the budget", *(f"accuracy % at {t:.0f} s" for t in at)]
  return common.markdown_table(columns, rows)


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--methods", default=",".join(METHODS), help=", ".join(METHODS))
  p.add_argument("--budget", type=float, default=600.0,
                 help="wall-clock seconds per run, from the process's start")
  p.add_argument("--workdir", default="/tmp/methods_table")
  p.add_argument("--set", action="append", default=[],
                 help="config override key=value for the teacher and every run, e.g. "
                      "student.steps=500")
  p.add_argument("--at", default=None,
                 help="budgets (seconds, at most --budget) at which the table also gives each "
                      "method's accuracy, read from the same runs (default: those of 60, 120, "
                      "300 under --budget)")
  p.add_argument("--report_only", action="store_true",
                 help="print the table of the runs already measured in --workdir")
  args = p.parse_args()
  seeds, methods = common.seeds_and_methods(p, args, METHODS)
  if args.budget <= 0:
    p.error("--budget must be positive")
  at = ([t for t in (60.0, 120.0, 300.0) if t < args.budget] if args.at is None
        else [float(t) for t in args.at.split(",") if t])
  if any(not 0 < t <= args.budget for t in at):
    p.error(f"--at: each budget must be in (0, --budget={args.budget:g}]")
  records, teachers = [], []
  for seed in seeds:
    base = os.path.join(args.workdir, f"seed{seed}")
    if args.report_only:
      for m in methods:
        path = os.path.join(base, m, RUN_FILE)
        if os.path.exists(path):
          with open(path, encoding="utf-8") as f:
            records.append(json.load(f))
      continue
    summary, teacher_dir = project.mnist5k_teacher(args.workdir, seed, TEACHER, args.set)
    teachers.append(summary["teacher"]["test_accuracy"])
    for m in methods:
      print(f"seed {seed}, {m}: at most {args.budget:.0f} s ...", flush=True)
      r = run_method(m, seed, os.path.join(base, m), teacher_dir, args.budget, args.set)
      records.append(r)
      final = "no evaluation" if r["final"] is None else f"{100 * r['final']:.2f}%"
      print(f"seed {seed}, {m}: {final} "
            f"({ {'': 'finished', '*': 'stopped by the budget', '!': 'FAILED, see run.log'}[_mark(r)]}"
            f", rc {r['returncode']}, "
            f"{r['wall']:.0f} s, load {r['loadavg'][0]} -> {r['loadavg'][1]})", flush=True)
  with open(os.path.join(args.workdir, "methods_table.json"), "w", encoding="utf-8") as f:
    json.dump({"budget": args.budget, "seeds": seeds, "teachers": teachers,
               "records": records}, f, indent=1)
  loads = [x for r in records for x in r["loadavg"]]
  print(f"\nmnist5k, {TEACHER} teacher"
        + (f" ({', '.join(f'{100 * t:.2f}%' for t in teachers)})" if teachers else "")
        + f", seeds {seeds}, budget {args.budget:.0f} s per run; test accuracy on the 1,000 "
        "held-out digits")
  if loads:
    print(f"1-minute load average at the runs' starts and ends: {min(loads):.1f} .. "
          f"{max(loads):.1f}")
  print(common.machine_line())
  print("\n".join(table(records, methods, at)))


if __name__ == "__main__":
  main()
