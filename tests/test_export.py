"""A trained tiny student exported to every format (datafree_jax.export), each reloaded with its
own runtime and checked against the JAX student; `python -m datafree_jax.main export` and its
bad-input errors."""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, copy_stages, stage_state, tiny_config

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import export
from datafree_jax import input_pipeline
from datafree_jax import main
from datafree_jax import models
from datafree_jax import pipeline

# Absolute tolerance on logits. Every runtime computes in float32 (XLA in TensorFlow and JAX,
# TFLite's XNNPACK kernels, onnxruntime); the logits of this tiny student are O(1), and the
# runtimes differ only in the order of float32 sums (~1e-7 here).
ATOL = 1e-4
STUDENT = "lenet5_half_bn"  # with BatchNorm: its running statistics must be exported too


@pytest.fixture(scope="module")
def workdir(lenet5_teacher_workdir, tmp_path_factory):
  """A finished tiny kd_noise run: the session's tiny LeNet-5 teacher, then a LeNet-5-half-BN
  student distilled on noise for 5 steps."""
  wd = copy_stages(lenet5_teacher_workdir, tmp_path_factory.mktemp("export_run"), "teacher")
  pipeline.train_and_evaluate(tiny_config("kd_noise", **{
      "stage": "train", "student.steps": 5, "student.model": STUDENT,
      "checkpoint_every": 1000}), wd)
  return wd


@pytest.fixture(scope="module")
def exported(workdir):
  """{format: Exported} of the student exported to every format, and the printed lines."""
  lines = []
  results = export.export(workdir, export.FORMATS, printer=lines.append)
  return {ex.fmt: ex for ex in results}, lines


@pytest.fixture(scope="module")
def jax_student(workdir):
  """(apply(images) -> logits of the JAX student, 8 normalised mnist5k test images), rebuilt
  here from the checkpoint and the models registry, independently of export.py."""
  _, state, _ = stage_state(os.path.join(workdir, "distill_noise"))
  model = models.get_classifier(STUDENT, 10)
  variables = {"params": state["student"]["params"],
               "batch_stats": state["student"]["batch_stats"]}
  apply = jax.jit(lambda x: model.apply(variables, x, train=False))
  images = input_pipeline.load_dataset("mnist5k", "test").images[:8]
  return (lambda x: np.asarray(apply(x), np.float32)), images


def _savedmodel(path, x):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  serve = tf.saved_model.load(path).signatures["serving_default"]
  return serve(images=tf.constant(x))["logits"].numpy()


def _tflite(path, x):
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  except ImportError:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    Interpreter = tf.lite.Interpreter  # pylint: disable=invalid-name
  return Interpreter(model_path=path).get_signature_runner()(images=x)["logits"]


def _stablehlo(path, x):
  with open(path, "rb") as f:
    return np.asarray(jax.export.deserialize(bytearray(f.read())).call(x))


def _onnx(path, x):
  ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (test extra)")
  session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
  return session.run(["logits"], {"images": x})[0]


RUNTIMES = {"savedmodel": _savedmodel, "tflite": _tflite, "stablehlo": _stablehlo,
            "onnx": _onnx}


@pytest.mark.slow  # the exported files in TensorFlow, TFLite and ONNX Runtime
@pytest.mark.parametrize("fmt", export.FORMATS)
def test_each_format_reloads_and_matches_the_jax_student(exported, jax_student, fmt):
  by_format, _ = exported
  ex = by_format[fmt]
  if fmt == "onnx" and ex.skipped:
    pytest.importorskip("tf2onnx", reason="tf2onnx is not installed (export/test extra)")
    pytest.fail(f"ONNX was skipped although tf2onnx is installed: {ex.note}")
  assert not ex.skipped and os.path.exists(ex.path)
  assert ex.batch is None, f"{fmt}: the batch dimension should be polymorphic"
  apply, images = jax_student
  for n in (8, 3):  # two batch sizes through one exported model
    out = RUNTIMES[fmt](ex.path, images[:n])
    assert out.dtype == np.float32 and out.shape == (n, 10)
    np.testing.assert_allclose(out, apply(images[:n]), rtol=0, atol=ATOL)
  assert ex.max_diff is not None and ex.max_diff <= ATOL


@pytest.mark.slow  # the exported files in TensorFlow, TFLite and ONNX Runtime
def test_json_beside_each_file_and_the_printed_lines(workdir, exported):
  by_format, lines = exported
  assert "checked on 8 mnist5k test images" in lines[0]
  made = [ex for ex in by_format.values() if not ex.skipped]
  for ex in made:
    with open(ex.path + ".json") as f:
      meta = json.load(f)
    assert meta["format"] == ex.fmt and meta["model"] == STUDENT
    assert meta["input"] == {"name": "images", "shape_hwc": [32, 32, 1], "layout": "NHWC",
                             "dtype": "float32", "batch": "any"}
    assert meta["output"]["dtype"] == "float32" and meta["num_classes"] == 10
    assert meta["normalisation"]["mean"] == [0.1307] and meta["normalisation"]["std"] == [0.3081]
    assert meta["class_names"] == [str(i) for i in range(10)]
    assert meta["source"]["checkpoint"] == os.path.join(workdir, "distill_noise")
    assert meta["source"]["step"] == 5
    line = next(l for l in lines if l.startswith(ex.fmt + " "))
    assert ex.path in line and "max |logit - JAX|" in line and ("KiB" in line or "MiB" in line)
  assert os.path.dirname(made[0].path) == os.path.join(workdir, "export")


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-m", "datafree_jax.main", "export", *args], cwd=REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # the command in another process
def test_cli_exports_the_teacher_as_stablehlo(workdir, tmp_path, jax_student):
  run = _cli(f"--workdir={workdir}", "--stage=teacher", "--format=stablehlo",
             f"--out={tmp_path}")
  assert run.returncode == 0, run.stderr
  path = str(tmp_path / "teacher.stablehlo")
  assert f"stablehlo   {path}" in run.stdout and "teacher lenet5 " in run.stdout
  _, images = jax_student
  assert _stablehlo(path, images).shape == (8, 10)
  assert sorted(os.listdir(tmp_path)) == ["teacher.stablehlo", "teacher.stablehlo.json"]


def _unfinished_copy(workdir, dst):
  """A copy of the run whose student has a later, unfinished checkpoint."""
  shutil.copytree(workdir, dst, ignore=shutil.ignore_patterns("export"))
  d = os.path.join(dst, "distill_noise")
  step, state, meta = stage_state(d)
  ckpt = ckpt_lib.StageCheckpoints(d)
  ckpt.save(step + 1, state, dict(meta, step=step + 1, total_steps=step + 10, done=False))
  ckpt.close()
  return dst


def test_cli_bad_input_is_one_line_and_exit_2(workdir, tmp_path, capsys):
  teacher_only = tmp_path / "no_results"
  shutil.copytree(os.path.join(workdir, "teacher"), teacher_only / "teacher")
  cases = [
      ([f"--workdir={teacher_only}"], "no results.json"),
      ([f"--workdir={_unfinished_copy(workdir, str(tmp_path / 'unfinished'))}"],
       "is unfinished (step 6 of 15)"),
      ([f"--workdir={workdir}", "--format=savedmodel,pdf"], "unknown format 'pdf'"),
      ([f"--workdir={workdir}", "--stage=dafl"], "no stage 'dafl'"),
      ([f"--workdir={workdir}", "--formats=onnx"], "unknown argument '--formats=onnx'"),
      (["--stage=teacher"], "export needs --workdir=DIR"),
  ]
  for args, expected in cases:  # in this process: main.main is the command's body
    assert main.main(["main", "export"] + args + [f"--out={tmp_path / 'out'}"]) == 2, args
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and expected in err, (args, err)
  assert not os.path.exists(tmp_path / "out")
  run = _cli(f"--workdir={tmp_path / 'missing'}")  # and as a command
  assert run.returncode == 2 and run.stdout == ""
  assert run.stderr.strip() == f"error: workdir {tmp_path / 'missing'} does not exist or is not a directory"


def test_fixed_batch_when_a_symbolic_batch_does_not_trace_and_format_lists():
  def build(batch):
    if batch is None:
      raise ValueError("no symbolic batch here")
    return f"built for {batch}"
  assert export._polymorphic_or_fixed(build) == (f"built for {export.EXPORT_BATCH}",
                                                 export.EXPORT_BATCH)
  assert export._polymorphic_or_fixed(lambda b: "any") == ("any", None)
  x = np.arange(6, dtype=np.float32).reshape(3, 2)
  assert export._in_batches(lambda b: b * 2, x, 1).tolist() == (x * 2).tolist()
  assert export.parse_formats("onnx, savedmodel") == ("savedmodel", "onnx")
  assert export.parse_formats("all") == export.FORMATS
  assert export.to_build(("onnx",)) == ("savedmodel", "tflite", "onnx")


@pytest.mark.slow  # the exported files in TensorFlow, TFLite and ONNX Runtime
def test_onnx_without_tf2onnx_is_skipped_with_a_message(workdir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tf2onnx", None)  # import tf2onnx raises ImportError
  lines = []
  (ex,) = export.export(workdir, ("onnx",), out=str(tmp_path), printer=lines.append)
  assert ex.skipped and lines[-1] == (
      "onnx        skipped: tf2onnx is not installed (pip install tf2onnx onnxruntime)")
  assert os.listdir(tmp_path) == []  # the SavedModel and TFLite it needed were temporary
