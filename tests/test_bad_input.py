"""Bad input: one clear line on stderr, exit code 2, no traceback, and the workdir unchanged.

Each case goes through `pipeline.main_entry`, the body of the command line (config parsing errors,
which happen in the flag parser, go through the real command line in a subprocess).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, tiny_config

from datafree_jax import main
from datafree_jax import pipeline
from datafree_jax.stages import ensemble
from datafree_jax.stages import teacher as teacher_stage


def snapshot(path):
  """Every file under `path` with its size, mtime and content hash (None: `path` is absent)."""
  if not os.path.lexists(path):
    return None
  if not os.path.isdir(path):
    with open(path, "rb") as f:
      return ("file", hashlib.sha256(f.read()).hexdigest())
  out = {}
  for root, dirs, files in os.walk(path):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), path)] = "dir"
    for name in files:
      p = os.path.join(root, name)
      st = os.stat(p)
      with open(p, "rb") as f:
        out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns,
                                         hashlib.sha256(f.read()).hexdigest())
  return out


def assert_rejected(config, workdir, capsys, expected):
  """main_entry fails with exit code 2 and the one line `error: ...expected...`, writing nothing."""
  capsys.readouterr()
  before = snapshot(workdir)
  code = pipeline.main_entry(config, str(workdir))
  err = capsys.readouterr().err
  assert code == 2, err
  assert "Traceback" not in err
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, err
  assert expected in errors[0], errors[0]
  assert snapshot(workdir) == before, "the workdir changed"
  return errors[0]


def ens_config(**overrides):
  base = {"ensemble.num_generators": 2, "ensemble.batch_per_generator": 4,
          "ensemble.steps": 2, "ensemble.eval_every": 0, "teacher.model": "lenet5_bn"}
  base.update(overrides)
  return tiny_config("ensemble", **base)


@pytest.fixture(scope="module")
def finished(generators_workdir):
  """A workdir with a finished tiny LeNet-5-BN teacher and finished tiny generators."""
  workdir, _ = generators_workdir
  assert os.path.isdir(ensemble.directory(workdir))
  return workdir


@pytest.fixture
def work(finished, tmp_path):
  """A private copy of the finished workdir."""
  workdir = tmp_path / "work"
  shutil.copytree(finished, workdir)
  return workdir


def _step_dirs(stage_dir):
  return sorted(n for n in os.listdir(stage_dir) if n.isdigit())


# --- config values -------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,expected", [
    ("method", "dafll", "unknown method 'dafll'; choose one of: teacher, dafl"),
    ("stage", "distil", "unknown stage 'distil'"),
    ("dataset", "mnist6k", "unknown dataset 'mnist6k'"),
    ("teacher.model", "lenet7", "unknown teacher model 'lenet7'; known models:"),
    ("student.model", "resnet5", "unknown student model 'resnet5'"),
    ("teacher.lr", -1e-3, "teacher.lr must be positive, got -0.001"),
    ("student.lr", 0.0, "student.lr must be positive, got 0.0"),
    ("generator.lr", -0.2, "generator.lr must be positive, got -0.2"),
    ("generator.w_oh", -1.0, "generator.w_oh must be >= 0, got -1.0"),
    ("generator.w_ie", -5.0, "generator.w_ie must be >= 0, got -5.0"),
    ("student.steps", -3, "student.steps must be positive, got -3"),
    ("student.augment_shift", 2, "student.augment_shift / augment_flip apply to the "
                                 "distillation stages"),
    ("student.augment_flip", True, "leave them at 0 / False for method=dafl"),
])
def test_bad_config_value(tmp_path, capsys, key, value, expected):
  workdir = tmp_path / "w"
  config = tiny_config("dafl")
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  assert_rejected(config, workdir, capsys, expected)
  assert not workdir.exists()


@pytest.mark.parametrize("key,value,expected", [
    ("ensemble.lr", -0.01, "ensemble.lr must be positive, got -0.01"),
    ("ensemble.w_mm", -1.0, "ensemble.w_mm must be >= 0, got -1.0"),
    ("ensemble.w_tv", -0.1, "ensemble.w_tv must be >= 0, got -0.1"),
    ("ensemble.mm_form", "l3", "unknown ensemble.mm_form 'l3'"),
])
def test_bad_ensemble_value(tmp_path, capsys, key, value, expected):
  workdir = tmp_path / "w"
  assert_rejected(ens_config(**{key: value}), workdir, capsys, expected)
  assert not workdir.exists()


def test_batch_not_divisible_by_the_data_parallel_devices(tmp_path):
  """With 8 (fake CPU) devices a global batch of 12 cannot be split; the real command line."""
  workdir = tmp_path / "w"
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  r = subprocess.run(
      [sys.executable, "-m", "datafree_jax.main", "--config=configs/mnist5k.py:method=teacher",
       "--config.teacher.batch_size=12", f"--workdir={workdir}"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  assert r.stderr.strip().splitlines()[-1] == (
      "error: global batch size 12 is not divisible by the 8 data-parallel devices")
  assert "Traceback" not in r.stderr
  assert not workdir.exists()


# --- config syntax: parsed by the command line's flags -------------------------------------

@pytest.mark.parametrize("args,expected", [
    (["--config=configs/mnist5k.py:seed=abc"],
     "error: config argument seed='abc': expected an integer"),
    (["--config=configs/mnist5k.py:methd=dafl"],
     "error: unknown config argument 'methd'; this config takes:"),
    (["--config.teacher.lr=fast"],
     "error: flag --config.teacher.lr=fast: could not convert string to float: 'fast'"),
    (["--config.teacher.stepz=3"],
     "error: unknown config field: 'stepz' Did you mean \"steps\" instead of \"stepz\"?"),
    (["--config.student.optimizer=adamx"], "error: unknown student.optimizer 'adamx'; choose "
                                           "one of: adam, sgd"),
])
def test_bad_config_syntax_on_the_command_line(work, args, expected, capsys):
  """The command line's body in this process (test_cli.py runs the command itself)."""
  before = snapshot(work)
  assert main.main(["main", *args, f"--workdir={work}"]) == 2
  err = capsys.readouterr().err
  assert "Traceback" not in err
  lines = err.strip().splitlines()
  assert lines[-1].startswith(expected), lines[-1]
  assert snapshot(work) == before


# --- the workdir ---------------------------------------------------------------------------

def test_workdir_that_is_a_file(tmp_path, capsys):
  path = tmp_path / "results.txt"
  path.write_text("not a directory")
  assert_rejected(tiny_config("teacher"), path, capsys, f"workdir {path} exists and is not a "
                                                        "directory")


def test_workdir_below_a_file(tmp_path, capsys):
  path = tmp_path / "results.txt"
  path.write_text("not a directory")
  assert_rejected(tiny_config("teacher"), path / "w", capsys,
                  f"cannot create workdir {path}/w: {path} is not a directory")
  assert path.read_text() == "not a directory"


def test_unwritable_workdir(capsys):
  # /sys refuses new files even to root, where permission bits would not.
  assert_rejected(tiny_config("teacher"), "/sys/datafree_jax_workdir", capsys,
                  "cannot create workdir /sys/datafree_jax_workdir: /sys is not writable")


@pytest.mark.parametrize("method,stage", [("dafl", "train"), ("ensemble", "distill"),
                                          ("ensemble", "generators")])
def test_missing_workdir_for_a_later_stage(tmp_path, capsys, method, stage):
  workdir = tmp_path / "typo"
  config = ens_config(stage=stage) if method == "ensemble" else tiny_config(method, stage=stage)
  assert_rejected(config, workdir, capsys,
                  f"workdir {workdir} does not exist; stage='{stage}' continues from the teacher")
  assert not workdir.exists()


# --- datasets ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_tfds_dataset_not_prepared(tmp_path, capsys, name):
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  config = tiny_config("teacher", dataset=name, data_dir=str(data_dir))
  line = assert_rejected(config, tmp_path / "w", capsys, f"'{name}' is not prepared")
  assert str(data_dir) in line and "tfds build" in line
  assert not (tmp_path / "w").exists()
  assert os.listdir(data_dir) == []


# --- the teacher checkpoint ----------------------------------------------------------------

def test_teacher_checkpoint_missing(tmp_path, capsys):
  workdir = tmp_path / "w"
  workdir.mkdir()
  assert_rejected(tiny_config("dafl", stage="train"), workdir, capsys,
                  f"no teacher checkpoint in {workdir}/teacher; run the teacher stage first")


def _corrupt_arrays(stage_dir, item):
  """Overwrites every array file of `item` in the latest checkpoint of `stage_dir` with junk."""
  step_dir = os.path.join(stage_dir, _step_dirs(stage_dir)[-1], item)
  n = 0
  for root, _, files in os.walk(step_dir):
    for name in files:
      if "_METADATA" in name or name.endswith(".json"):
        continue
      p = os.path.join(root, name)
      with open(p, "r+b") as f:
        size = max(os.path.getsize(p), 16)
        f.seek(0)
        f.write(b"\x5a" * size)
      n += 1
  assert n, f"no array files under {step_dir}"


@pytest.mark.parametrize("stage", ["train", "all"])
def test_teacher_checkpoint_corrupt_arrays(work, capsys, stage):
  _corrupt_arrays(teacher_stage.directory(str(work)), "teacher")
  assert_rejected(ens_config(stage=stage), work, capsys, "is corrupt")


def test_teacher_checkpoint_corrupt_meta(work, capsys):
  d = teacher_stage.directory(str(work))
  meta_dir = os.path.join(d, _step_dirs(d)[-1], "meta")
  for name in os.listdir(meta_dir):
    with open(os.path.join(meta_dir, name), "w") as f:
      f.write("{ not json")
  assert_rejected(ens_config(stage="train"), work, capsys, "unreadable or corrupt")


def _rewrite_meta(stage_dir, **changes):
  path = os.path.join(stage_dir, _step_dirs(stage_dir)[-1], "meta", "metadata")
  with open(path) as f:
    meta = json.load(f)
  meta.update(changes)
  with open(path, "w") as f:
    json.dump(meta, f)


@pytest.mark.parametrize("changes,expected", [
    ({"num_classes": 100}, "was made for 100 classes of (32, 32, 1) images, but dataset "
                           "'mnist5k' has 10 classes of (32, 32, 1) images"),
    ({"image_shape": [28, 28, 1]}, "was made for 10 classes of (28, 28, 1) images"),
    ({"model": "resnet18"}, "is a 'resnet18' but the config says teacher.model='lenet5_bn'"),
])
@pytest.mark.parametrize("stage", ["train", "all"])
def test_teacher_and_dataset_disagree(work, capsys, changes, expected, stage):
  _rewrite_meta(teacher_stage.directory(str(work)), **changes)
  assert_rejected(ens_config(stage=stage), work, capsys, expected)


def test_teacher_checkpoint_unfinished(work, capsys):
  _rewrite_meta(teacher_stage.directory(str(work)), done=False)
  assert_rejected(ens_config(stage="train"), work, capsys, "is unfinished (step ")


# --- the generator checkpoint --------------------------------------------------------------

def test_generator_checkpoint_unfinished(work, capsys):
  _rewrite_meta(ensemble.directory(str(work)), done=False)
  assert_rejected(ens_config(stage="distill"), work, capsys, "are unfinished (step ")


def test_distill_with_no_generators_to_load(work, capsys):
  shutil.rmtree(ensemble.directory(str(work)))
  assert_rejected(ens_config(stage="distill"), work, capsys,
                  f"no generator checkpoint in {work}/generators; run the generators stage first")


def test_generator_checkpoint_path_missing(work, tmp_path, capsys):
  config = ens_config(stage="distill", generator_checkpoint=str(tmp_path / "nowhere"))
  assert_rejected(config, work, capsys, f"no generator checkpoint in {tmp_path}/nowhere")


def test_generator_checkpoint_corrupt(work, capsys):
  _corrupt_arrays(ensemble.directory(str(work)), "generators")
  assert_rejected(ens_config(stage="distill"), work, capsys, "corrupt")


@pytest.mark.parametrize("changes,expected", [
    ({"num_classes": 100}, "were made for 100 classes of (32, 32, 1) images, but dataset "
                           "'mnist5k' has 10 classes"),
    ({"image_shape": [28, 28, 1]}, "were made for 10 classes of (28, 28, 1) images"),
    ({"width": 64}, "do not match their meta"),
])
def test_generator_checkpoint_for_other_images_or_classes(work, capsys, changes, expected):
  _rewrite_meta(ensemble.directory(str(work)), **changes)
  assert_rejected(ens_config(stage="distill"), work, capsys, expected)


def test_a_teacher_checkpoint_is_not_a_generator_checkpoint(work, capsys):
  config = ens_config(stage="distill",
                      generator_checkpoint=teacher_stage.directory(str(work)))
  assert_rejected(config, work, capsys, "is not a generator ensemble")
