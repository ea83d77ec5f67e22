"""The command line as a user runs it (`python -m datafree_jax.main` subprocesses); config files."""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def _run(*args, cwd=REPO_ROOT):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([sys.executable, "-m", "datafree_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_bad_method_is_one_clear_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / "w"
  r = _run("--config=configs/mnist5k.py:method=dafll", f"--workdir={workdir}")
  assert r.returncode == 2, r.stderr
  assert "error: unknown method 'dafll'; choose one of: teacher, dafl" in r.stderr
  assert "Traceback" not in r.stderr
  assert not workdir.exists()


def test_teacher_only_run_prints_where_results_are(tmp_path):
  """Run from another directory without --workdir: the default workdir is
  ./workdir/<dataset>-<method>-seed<seed> there."""
  r = _run("--config.method=teacher", "--config.teacher.steps=20",
           "--config.teacher.batch_size=32", cwd=tmp_path)
  assert r.returncode == 0, r.stderr[-2000:]
  workdir = tmp_path / "workdir" / "mnist5k-teacher-seed0"
  assert f"checkpoint: {workdir}/teacher" in r.stdout
  assert f"TensorBoard logs: {workdir}/tensorboard" in r.stdout
  assert "teacher step 20/20" in r.stdout  # the console progress line, with steps/s and ETA
  assert "steps/s | ETA" in r.stdout
  assert os.listdir(workdir / "tensorboard")
  assert sorted(os.listdir(workdir / "teacher")) == ["20"]


@pytest.mark.parametrize("args,expected", [
    (["--config=configs/nope.py:method=dafl"],
     "error: config file 'configs/nope.py' does not exist"),
    (["extra", "words"], "error: unexpected arguments: extra words"),
])
def test_missing_config_file_and_extra_arguments(tmp_path, args, expected):
  r = _run(*args, f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]  # one line
  assert r.stderr.strip().startswith(expected), r.stderr
  assert not (tmp_path / "w").exists()


def test_debug_shows_the_traceback_and_the_error_line(tmp_path):
  r = _run("--config=configs/mnist5k.py:method=dafll", f"--workdir={tmp_path / 'w'}", "--debug")
  assert r.returncode == 2
  assert "Traceback (most recent call last)" in r.stderr
  assert "config_lib.ConfigError: unknown method 'dafll'" in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: unknown method 'dafll'")
  assert not (tmp_path / "w").exists()


def test_load_config_file_calls_get_config_with_its_argument(tmp_path):
  from datafree_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file(os.path.join(REPO_ROOT, "configs", "mnist5k.py"),
                                  "method=ensemble")
  assert c.method == "ensemble"
  assert config_lib.load_config_file(os.path.join(REPO_ROOT, "configs", "mnist5k.py")).method \
      == "dafl"
  with pytest.raises(config_lib.ConfigError, match="missing.py"):
    config_lib.load_config_file(str(tmp_path / "missing.py"))
  # A packaged config by name, from any directory.
  assert config_lib.load_config_file("cifar100", "method=kd_data").dataset == "cifar100"


def test_packaged_configs_by_name_after_a_non_editable_install(tmp_path):
  """`pip install .` (not -e, as Colab does) and a run from another directory: the default
  config and --config=NAME are found inside the installed package; cifar100 imports cifar10."""
  # From a copy of the source: setuptools builds in the tree and reuses an old build/ there.
  source = tmp_path / "source"
  shutil.copytree(REPO_ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(
      ".git", "build", "dist", "*.egg-info", "workdir", "__pycache__", ".pytest_cache"))
  target = tmp_path / "site"
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                  "--no-build-isolation", "--target", str(target), str(source)],
                 check=True, capture_output=True, timeout=300)
  assert sorted(p.name for p in (target / "datafree_jax" / "configs").glob("*.py")) == [
      "__init__.py", "cifar10.py", "cifar100.py", "mnist.py", "mnist5k.py"]
  env = dict(os.environ, PYTHONPATH=str(target), TF_CPP_MIN_LOG_LEVEL="3")
  run = lambda *args: subprocess.run([sys.executable, *args], cwd=tmp_path, env=env,
                                     capture_output=True, text=True, timeout=300)
  r = run("-c", "import datafree_jax, sys; print(datafree_jax.__file__)")
  assert r.stdout.strip() == str(target / "datafree_jax" / "__init__.py")
  # The default config (mnist5k) is loaded, then the bad method is refused: one line.
  r = run("-m", "datafree_jax.main", "--config.method=dafll", "--workdir=w")
  assert r.returncode == 2 and "error: unknown method 'dafll'" in r.stderr, r.stderr[-2000:]
  r = run("-m", "datafree_jax.main", "--config=cifar100:method=teacher", "--workdir=w",
          f"--config.data_dir={tmp_path / 'no_data'}")
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1].startswith(
      "error: TFDS dataset 'cifar100' is not prepared"), r.stderr[-2000:]
  assert not (tmp_path / "w").exists()
