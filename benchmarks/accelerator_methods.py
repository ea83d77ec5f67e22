r"""One row per method: its measured dry run (the programs, seconds per call, hours of the
config's published schedule on these devices) and, where given, a time-limited run of it (the
last student test accuracy and the wall time). benchmarks/accelerator.sh step 5 runs it for
configs/cifar10.py.

    python -m benchmarks.accelerator_methods --methods=dafl,fast \
        --dry_runs=benchmarks/accelerator_cifar10_{method}.json [--runs=RUNS_TSV] [--out=FILE]

--dry_runs: the JSON a dry run with dry_run_measure and dry_run_out wrote for each method
({method} in the name). The hours are each train program's measured seconds per call times its
calls in the config's schedule (the dry run's `calls`), summed over the method's own stages;
the teacher stage (the same for every method of a config) is reported once, apart. A dry run
without dry_run_measure gives the programs only.

--runs: a file with one line per time-limited run, tab-separated: method, exit status, start
and end (Unix seconds), workdir. The accuracy is the student's final test accuracy from
<workdir>/results.json when the run finished, else the last `eval/accuracy` event of its
TensorBoard logs: the method's student stage's, or any non-teacher stage's (e.g. a competing
student's) when the student stage has not evaluated yet; the time beside it is when that event
was written, from the run's start.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from benchmarks import common, project

TIMED_OUT = (124, 137)   # timeout(1): the time limit reached (137: killed after --kill-after)


def load_dry_run(path: str):
  """The dry run's JSON at `path`, or None when it is missing or unreadable."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def dry_run_row(method: str, data) -> list:
  """[method, programs, measured s / call, hours] of one method's dry run JSON (None: failed):
  the programs of the method's own stages (the teacher's apart, restores left out)."""
  if data is None:
    return [method, "no rows: the dry run failed (its output is above)", "-", "-"]
  rows = [r for r in data.get("rows", []) if r["stage"] != project.teacher_stage(method)]
  compiled = [r for r in rows if r.get("kind") != "restore"]
  own = [r for r in compiled if r.get("kind") == "train"]
  programs = f"{len(compiled)} (train: " + "; ".join(
      f"{r['stage']}: {r['label']}, {r['steps']:,} calls" for r in own) + ")"
  if not own or any(r.get("measured_s") is None for r in own):
    return [method, programs, "not measured", "-"]
  seconds = "; ".join(f"{r['measured_s']:.4g}" for r in own)
  hours = sum(r["steps"] * r["measured_s"] for r in own) / 3600
  return [method, programs, seconds, f"{hours:,.2f}"]


def teacher_line(method: str, data) -> str:
  """The teacher stage's train program, measured, from one method's dry run ('' if none)."""
  for r in (data or {}).get("rows", []):
    if (r["stage"] == project.teacher_stage(method) and r.get("kind") == "train"
        and r.get("measured_s") is not None):
      return (f"teacher ({r['label']}; trained where no teacher.init_from is given, the same for "
              f"every method, not in the hours above): {r['steps']:,} calls x "
              f"{r['measured_s']:.4g} s = {r['steps'] * r['measured_s'] / 3600:,.2f} h "
              f"(from the {method} dry run)")
  return ""


def dry_run_table(method_names: list, pattern: str) -> list:
  """The lines of the dry runs' table, with where they were measured and the teacher."""
  found = {m: load_dry_run(pattern.format(method=m)) for m in method_names}
  where = sorted({f"{d.get('devices')} x {d.get('device_kind')} (target {d.get('target')})"
                  for d in found.values() if d})
  lines = [f"Measured dry runs ({pattern}), on " + ("; ".join(where) or "no devices") + ":", ""]
  lines += common.markdown_table(
      ["method", "programs", "measured s / call (its train programs)",
       "hours for the published schedule"],
      [dry_run_row(m, d) for m, d in found.items()])
  teacher = next((t for t in (teacher_line(m, d) for m, d in found.items()) if t), "")
  if teacher:
    lines += ["", teacher]
  return lines


def last_accuracy(workdir: str, method: str):
  """(accuracy, stage, step, Unix time or None, where) of a run's last student test accuracy;
  None when it has none."""
  try:
    with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
      student = json.load(f).get("student") or {}
    if student.get("test_accuracy") is not None:
      return (student["test_accuracy"], project.student_stage(method), student.get("steps"),
              None, "results.json")
  except (OSError, ValueError):
    pass
  try:
    events = project.scalar_events(os.path.join(workdir, "tensorboard"))
  except (OSError, ValueError):
    return None
  wanted = project.student_stage(method)
  stages = [wanted] if events.get(wanted) else [
      s for s in events if s != project.teacher_stage(method) and events[s]]
  last = max((events[s][-1] + (s,) for s in stages), default=None)   # the latest written
  if last is None:
    return None
  t, step, value, stage = last
  return value, stage, step, t, "events"


def run_row(line: str) -> list:
  """[method, result, wall s, accuracy, stage and step, seconds to it] of one --runs line."""
  method, rc, start, end, workdir = line.rstrip("\n").split("\t")
  rc, start, end = int(rc), float(start), float(end)
  result = ("finished" if rc == 0 else "stopped at the time limit" if rc in TIMED_OUT
            else f"failed, rc={rc}")
  got = last_accuracy(workdir, method)
  if got is None:
    return [method, result, f"{end - start:.0f}", "-", "no evaluation yet", "-"]
  value, stage, step, t, where = got
  at = f"{t - start:.0f}" if t is not None else f"{end - start:.0f}"
  return [method, result, f"{end - start:.0f}", f"{value:.4f}",
          f"{stage}, step {step} ({where})", at]


def runs_table(path: str) -> list:
  with open(path, encoding="utf-8") as f:
    lines = [l for l in f if l.strip()]
  return ["Time-limited runs:", ""] + common.markdown_table(
      ["method", "result", "wall s", "student test accuracy", "from", "s to it"],
      [run_row(l) for l in lines])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", required=True, help="comma-separated method names")
  p.add_argument("--dry_runs", default="", help="path of each method's dry run JSON, with "
                 "{method}")
  p.add_argument("--runs", default="", help="tab-separated lines: method, exit status, start, "
                 "end, workdir")
  p.add_argument("--out", default="", help="also append the tables to this file")
  argv = sys.argv[1:] if argv is None else argv
  args = p.parse_args(argv)
  names = [m for m in args.methods.split(",") if m]
  if args.dry_runs and "{method}" not in args.dry_runs:
    p.error("--dry_runs needs {method} in the path")
  out = ["### python -m benchmarks.accelerator_methods " + " ".join(argv), ""]
  if args.dry_runs:
    out += dry_run_table(names, args.dry_runs) + [""]
  if args.runs:
    out += runs_table(args.runs) + [""]
  text = "\n".join(out)
  print(text, flush=True)
  if args.out:
    with open(args.out, "a", encoding="utf-8") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
