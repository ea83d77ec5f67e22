"""The command line as a user runs it (`python -m datafree_jax.main` subprocesses), its parsing
of argv and of --config.a.b=VALUE (main.parse_command_line, main.apply_override); config files."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

from datafree_jax import main


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


@pytest.mark.slow
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
def test_missing_config_file_and_extra_arguments(tmp_path, args, expected, capsys,
                                                 monkeypatch):
  monkeypatch.chdir(REPO_ROOT)  # (the command's body in this process, from the repository)
  assert main.main(["main", *args, f"--workdir={tmp_path / 'w'}"]) == 2
  err = capsys.readouterr().err
  assert err.strip().splitlines() == [err.strip().splitlines()[-1]]  # one line
  assert err.strip().startswith(expected), err
  assert not (tmp_path / "w").exists()


def test_debug_shows_the_traceback_and_the_error_line(tmp_path):
  r = _run("--config=configs/mnist5k.py:method=dafll", f"--workdir={tmp_path / 'w'}", "--debug")
  assert r.returncode == 2
  assert "Traceback (most recent call last)" in r.stderr
  assert "errors.ConfigError: unknown method 'dafll'" in r.stderr
  assert r.stderr.strip().splitlines()[-1].startswith("error: unknown method 'dafll'")
  assert not (tmp_path / "w").exists()


def test_load_config_file_calls_get_config_with_its_argument(tmp_path):
  from datafree_jax import config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.load_config_file(os.path.join(REPO_ROOT, "configs", "mnist5k.py"),
                                  "method=dafl")
  assert c.method == "dafl"
  assert config_lib.load_config_file(os.path.join(REPO_ROOT, "configs", "mnist5k.py")).method \
      == "ensemble"  # the default job
  with pytest.raises(config_lib.ConfigError, match="missing.py"):
    config_lib.load_config_file(str(tmp_path / "missing.py"))
  # A packaged config by name, from any directory.
  assert config_lib.load_config_file("cifar100", "method=kd_data").dataset == "cifar100"


@pytest.mark.slow
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
      "__init__.py", "cifar10.py", "cifar100.py", "imagenet.py", "mnist.py", "mnist5k.py"]
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


# --- --config.a.b=VALUE: main.apply_override ------------------------------------------------

def _field(config, key):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


@pytest.fixture
def config():
  from datafree_jax import main  # pylint: disable=g-import-not-at-top
  return main.load_config("mnist5k")  # locked, as the command line has it


@pytest.mark.parametrize("key,text,expected", [
    ("teacher.augment_flip", "TRUE", True),
    ("teacher.augment_flip", "yes", True),
    ("teacher.augment_flip", "1", True),
    ("teacher.steps", "7", 7),
    ("teacher.lr", "0.5", 0.5),
    ("teacher.lr", "1", 1.0),
    ("dataset", "cifar10", "cifar10"),
    ("data_dir", " /a dir/ ", " /a dir/ "),  # a string as given
    ("student.boundaries", "0.3,0.6", (0.3, 0.6)),
    ("student.boundaries", "(0.2, 0.7)", (0.2, 0.7)),
    ("student.boundaries", "[0.5]", (0.5,)),
    ("student.boundaries", "0.5", (0.5,)),
    ("student.boundaries", "0.1, 1", (0.1, 1.0)),  # elements read as the existing ones (float)
    ("student.boundaries", "(0.1, 1)", (0.1, 1.0)),
])
def test_apply_override_reads_the_value_as_the_fields_type(config, key, text, expected):
  from datafree_jax import main  # pylint: disable=g-import-not-at-top
  assert _field(config, key) != expected
  main.apply_override(config, key, text)
  value = _field(config, key)
  assert value == expected and type(value) is type(expected)
  if isinstance(expected, tuple):
    assert [type(v) for v in value] == [type(v) for v in expected]


def test_load_config_splits_at_the_first_colon_and_locks():
  from datafree_jax import main  # pylint: disable=g-import-not-at-top
  c = main.load_config(os.path.join(REPO_ROOT, "configs", "mnist5k.py") + ":method=teacher")
  assert c.method == "teacher" and c.is_locked
  with pytest.raises(AttributeError):
    c.new_field = 1


def test_apply_override_bool_false_and_bare_flag(config):
  from datafree_jax import main  # pylint: disable=g-import-not-at-top
  for text, expected in [(None, True), ("No", False), ("on", True), ("false", False),
                         ("yes", True), ("0", False)]:
    main.apply_override(config, "teacher.augment_flip", text)
    assert config.teacher.augment_flip is expected, text


def test_apply_override_of_a_none_field_takes_the_string():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from datafree_jax import main  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict({"x": None, "sub": {"n": 1}})
  c.lock()
  main.apply_override(c, "x", "3")
  main.apply_override(c, "sub.n", "4")
  assert c.x == "3" and c.sub.n == 4


@pytest.mark.parametrize("key,text,expected", [
    ("teacher.stepz", "3",
     "unknown config field: 'stepz' Did you mean \"steps\" instead of \"stepz\"?"),
    ("nope", "3", "unknown config field: 'nope' (--config.nope=3; the config has: "),
    ("nope.x", "3", "unknown config field: 'nope' (--config.nope.x=3; the config has: "),
    ("teacher.zzz", "3", "unknown config field: 'zzz' (--config.teacher.zzz=3; teacher has: "),
    ("teacher.steps.x", "3", "unknown config field: 'x' (--config.teacher.steps.x=3; "
                             "teacher.steps is a field, not a section"),
])
def test_apply_override_of_an_unknown_field(config, key, text, expected):
  _assert_override_refused(config, key, text, expected)


@pytest.mark.parametrize("key,text,expected", [
    ("teacher.steps", "2.5", "flag --config.teacher.steps=2.5: could not convert string to int: "
                             "'2.5' (teacher.steps is an integer)"),
    ("teacher.lr", "fast", "flag --config.teacher.lr=fast: could not convert string to float: "
                           "'fast' (teacher.lr is a number)"),
    ("teacher.augment_flip", "maybe", "flag --config.teacher.augment_flip=maybe: could not "
                                      "convert string to bool: 'maybe' (teacher.augment_flip "
                                      "is a boolean"),
    ("student.boundaries", "0.3,x", "flag --config.student.boundaries=0.3,x: could not convert "
                                    "string to float: 'x' in '0.3,x' (student.boundaries is a "
                                    "tuple of numbers"),
    ("student.boundaries", "(0.3,", "flag --config.student.boundaries=(0.3,: could not read "
                                    "'(0.3,' as a tuple"),
    ("teacher", "3", "flag --config.teacher=3: teacher is a section; set its fields"),
    ("teacher.steps", None, "flag --config.teacher.steps needs a value"),
])
def test_apply_override_of_a_bad_value(config, key, text, expected):
  _assert_override_refused(config, key, text, expected)


def _assert_override_refused(config, key, text, expected):
  """apply_override raises ConfigError starting with `expected` and leaves `config` as it was."""
  from datafree_jax import config_lib, main  # pylint: disable=g-import-not-at-top
  before = config.to_dict()
  with pytest.raises(config_lib.ConfigError) as e:
    main.apply_override(config, key, text)
  assert str(e.value).startswith(expected), str(e.value)
  assert config.to_dict() == before


@pytest.mark.parametrize("args,expected", [
    (["--config", "cifar10:seed=1", "--config.seed", "-1", "--workdir", "w", "--debug"],
     {"config": "cifar10:seed=1", "overrides": [("seed", "-1")], "workdir": "w",
      "debug": True}),
    (["--config.teacher.augment_flip", "--nodebug", "--config.a.b=x=y", "--debug=false"],
     {"config": "mnist5k", "overrides": [("teacher.augment_flip", None), ("a.b", "x=y")],
      "workdir": None, "debug": False}),
    (["--workdir=gs://b/run", "--distributed=on", "--coordinator_address", "h:1234",
      "--num_processes=2", "--process_id=1"],
     {"config": "mnist5k", "overrides": [], "workdir": "gs://b/run", "debug": False,
      "distributed": {"mode": "on", "coordinator_address": "h:1234", "num_processes": "2",
                      "process_id": "1"}}),
])
def test_parse_command_line(args, expected):
  from datafree_jax import main  # pylint: disable=g-import-not-at-top
  assert main.parse_command_line(args) == dict({"distributed": {}}, **expected, help=False)


@pytest.mark.parametrize("args,expected", [
    (["--bogus=1"], "unknown flag: --bogus (the options are"),
    (["--config.seed=1", "-x", "--nope"], "unknown flags: -x --nope (the options are"),
    (["--workdir"], "flag --workdir needs a value"),
    (["--config", "--debug"], "flag --config needs a value"),
    (["--debug=maybe"], "flag --debug=maybe: expected true or false"),
    (["--", "--debug"], "unexpected arguments: --debug (the options are"),
    (["--num_processes"], "flag --num_processes needs a value"),
])
def test_parse_command_line_refuses(args, expected):
  from datafree_jax import main  # pylint: disable=g-import-not-at-top
  with pytest.raises(main.CommandLineError, match="^" + re.escape(expected)):
    main.parse_command_line(args)


def test_help(capsys):
  assert main.main(["main", "--help"]) == 0
  out = capsys.readouterr()
  assert out.out.startswith("Command line: python -m datafree_jax.main") and not out.err


def test_config_file_that_raises_is_one_line_or_with_debug_the_traceback(tmp_path):
  path = tmp_path / "broken.py"
  path.write_text("def get_config(arg=None):\n  return {}['key_' + arg]\n")
  r = _run(f"--config={path}:x", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines() == [
      f"error: config file {path} failed: KeyError: 'key_x'"], r.stderr
  r = _run(f"--config={path}:x", f"--workdir={tmp_path / 'w'}", "--debug")
  assert r.returncode == 2, r.stderr[-2000:]
  assert "Traceback (most recent call last)" in r.stderr
  assert "return {}['key_' + arg]" in r.stderr  # the config file's own line
  assert r.stderr.strip().splitlines()[-1] == (
      f"error: config file {path} failed: KeyError: 'key_x'")
  assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_tuple_and_bool_overrides_reach_the_run(tmp_path):
  """A tiny teacher run; its results.json has the config the overrides made (both spellings,
  --config.a.b=VALUE and --config.a.b VALUE; a bare bool flag)."""
  workdir = tmp_path / "w"
  r = _run("--config", "mnist5k:method=teacher", "--config.teacher.steps=2",
           "--config.teacher.batch_size", "8", "--config.teacher.eval_every=0",
           "--config.student.boundaries=0.3,0.6", "--config.teacher.boundaries", "(0.25, 0.5)",
           "--config.teacher.augment_flip", "--config.teacher.lr=0.01", f"--workdir={workdir}")
  assert r.returncode == 0, r.stderr[-2000:]
  with open(workdir / "results.json") as f:
    config = json.load(f)["config"]
  assert config["student"]["boundaries"] == [0.3, 0.6]
  assert config["teacher"]["boundaries"] == [0.25, 0.5]
  assert config["teacher"]["augment_flip"] is True
  assert config["teacher"]["lr"] == 0.01 and config["teacher"]["steps"] == 2
