"""Exports the final student (or the teacher) of a finished run for deployment.

    python -m datafree_jax.main export --workdir=DIR
        [--format=savedmodel,tflite,stablehlo,onnx|all] [--out=DIR] [--stage=NAME] [--debug]

  --workdir   a finished run's workdir (results.json and the stage checkpoints); local or
              gs:// (any path etils.epath opens), as the run's --workdir
  --format    comma-separated formats, or 'all' (default):
                savedmodel  TensorFlow SavedModel (jax2tf), signature 'serving_default'
                tflite      TFLite flatbuffer converted from that SavedModel
                stablehlo   jax.export serialization (StableHLO), jax.export.deserialize
                onnx        ONNX converted from the TFLite file by tf2onnx (skipped with a
                            message when tf2onnx is not installed or cannot convert the model)
  --out       where the files go (default: WORKDIR/export; local or gs://)
  --stage     the checkpoint to export: the run's student stage (default: the one
              results.json names, else its method's registry.Method.student_stage), a stage
              directory name, or 'teacher'
  --debug     full tracebacks instead of one-line errors

Every model takes float32 images (N, H, W, C), normalised as the training pipeline did (the
JSON beside each file says how), with any batch size N (fixed to EXPORT_BATCH only when the
model cannot be traced with a symbolic batch), and returns float32 logits (N, num_classes).
The SavedModel and StableHLO modules are lowered for PLATFORMS. Beside each file, FILE.json
holds the model, input shape, dtype, normalisation, class names, source checkpoint and step.

For each file one line is printed: its size and the largest absolute difference of its logits
to the JAX model's on a few test images (the run's test split when it can be read cheaply,
else deterministic N(0, 1) images; the first line says which). Bad input (no such workdir, an
unfinished run, an unknown format) is one line `error: ...` on stderr and exit code 2.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import posixpath
import shutil
import tempfile
import warnings
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import common
from datafree_jax import datasets
from datafree_jax import input_pipeline
from datafree_jax import methods  # pylint: disable=unused-import (registers the built-ins)
from datafree_jax import models
from datafree_jax import paths
from datafree_jax import registry
from datafree_jax import streaming
from datafree_jax import tfds_pipeline
from datafree_jax.errors import ExportError

FORMATS = ("savedmodel", "tflite", "stablehlo", "onnx")
FILE_SUFFIX = {"savedmodel": ".savedmodel", "tflite": ".tflite", "stablehlo": ".stablehlo",
               "onnx": ".onnx"}
# Formats each format is converted from (built in a temporary directory when not asked for).
NEEDS = {"savedmodel": (), "tflite": ("savedmodel",), "stablehlo": (), "onnx": ("tflite",)}
PLATFORMS = ("cpu", "cuda", "tpu")  # what the SavedModel and StableHLO modules are lowered for
EXPORT_BATCH = 1      # the batch size when a model cannot be exported with a symbolic batch
ONNX_OPSET = 17
NUM_CHECK_IMAGES = 8
CHECK_SEED = 0        # the N(0, 1) check images when the test split cannot be read
INPUT_NAME, OUTPUT_NAME = "images", "logits"
NOT_STAGES = ("tensorboard", "samples", "export", "plots")  # workdir entries that are no stage
DIGITS = tuple(str(i) for i in range(10))
KNOWN_CLASS_NAMES = {"mnist5k": DIGITS}


@dataclasses.dataclass(frozen=True)
class Source:
  """A finished checkpoint to export and what rebuilds its model."""
  role: str                 # 'student' or 'teacher': the files' base name
  stage: str                # its stage directory under the workdir
  directory: str            # absolute checkpoint directory
  step: int
  model: str                # models registry name
  width: int
  dtype: str                # the run's config.dtype: what the model computes in
  num_classes: int
  image_shape: tuple        # (H, W, C)
  dataset: str
  data_dir: str
  method: str
  meta: dict                # the checkpoint's meta


@dataclasses.dataclass
class Exported:
  """One format's outcome: its file and JSON, or why it was skipped."""
  fmt: str
  path: str = ""
  json_path: str = ""
  size: int = 0
  batch: Optional[int] = None    # None: any batch size
  max_diff: Optional[float] = None
  note: str = ""                 # why it was skipped or not checked
  skipped: bool = False


# --- what to export --------------------------------------------------------------------------

def parse_formats(text: str) -> tuple:
  """The formats of a comma-separated list ('all' = every one), in FORMATS order; ExportError
  for an unknown or empty one."""
  names = [t.strip().lower() for t in text.split(",") if t.strip()]
  unknown = [n for n in names if n not in FORMATS + ("all",)]
  if unknown or not names:
    raise ExportError(f"unknown format {unknown[0] if unknown else text!r}; formats: "
                      f"{', '.join(FORMATS)} (comma-separated) or all")
  return FORMATS if "all" in names else tuple(f for f in FORMATS if f in names)


def read_results(workdir: str) -> dict:
  """The run's results.json; ExportError when the workdir or the file is missing (the file is
  written when a run finishes)."""
  if not paths.isdir(workdir):
    raise ExportError(f"workdir {workdir} does not exist or is not a directory")
  path = paths.join(workdir, "results.json")
  if not paths.exists(path):
    raise ExportError(f"{workdir} holds no finished run: no results.json (a run writes it when "
                      "it ends; run or resume the pipeline there first)")
  try:
    results = json.loads(paths.read_bytes(path))
  except (OSError, ValueError) as e:
    raise ExportError(f"cannot read {path}: {e}") from None
  if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
    raise ExportError(f"{path} has no 'config'; it is not a results.json of this pipeline")
  return results


def student_stage(results: dict, workdir: str) -> str:
  """The stage directory of the run's final student: the one results.json's 'student' names,
  else the method's student stage (registry.Method.student_stage) when its directory exists
  (results.json of a later stage=teacher run names no student); ExportError when the run has
  no student."""
  checkpoint = (results.get("student") or {}).get("checkpoint")
  if checkpoint:
    return posixpath.basename(checkpoint.replace(os.sep, "/").rstrip("/"))
  method = results["config"].get("method")
  fallback = registry.student_stage(method)
  if fallback and paths.isdir(paths.join(workdir, fallback)):
    return fallback
  raise ExportError(
      f"the run has no finished student (method {method!r}, stage "
      f"{results['config'].get('stage')!r}); finish its student stage, or export the teacher "
      "with --stage=teacher")


def read_checkpoint_meta(directory: str) -> tuple:
  """(latest step, meta) of a stage directory; ExportError when it has none or is unfinished."""
  if not paths.isdir(directory):
    raise ExportError(f"no checkpoint directory {directory}")
  step, meta = ckpt_lib.latest_meta(directory)
  if step is None:
    raise ExportError(f"no checkpoint in {directory}")
  if not meta.get("done"):
    raise ExportError(f"the checkpoint in {directory} is unfinished (step {step} of "
                      f"{meta.get('total_steps')}); resume the run to finish it first")
  return step, meta


def locate(workdir: str, stage: str = "") -> Source:
  """The Source of `stage` ('' or 'student': the run's student; 'teacher'; or a stage
  directory name) of the finished run in `workdir`."""
  workdir = paths.resolve(workdir)
  results = read_results(workdir)
  config = results["config"]
  name = student_stage(results, workdir) if stage in ("", "student") else stage
  if not paths.isdir(paths.join(workdir, name)):
    stages = [d for d in paths.listdir(workdir) if d not in NOT_STAGES
              and paths.isdir(paths.join(workdir, d))]
    raise ExportError(f"no stage {name!r} in {workdir} (its stages: "
                      f"{', '.join(stages) or 'none'})")
  step, meta = read_checkpoint_meta(paths.join(workdir, name))
  role = "teacher" if name == "teacher" else "student"
  section = config.get(role, {})
  model = meta.get("model" if role == "teacher" else "student_model") or section.get("model")
  if not model or "image_shape" not in meta or "num_classes" not in meta:
    raise ExportError(f"the {name} checkpoint in {workdir} is not a classifier's (its meta "
                      "names no model, image shape or classes)")
  return Source(role=role, stage=name, directory=paths.join(workdir, name), step=int(step),
                model=model, width=int(section.get("width", 0) or 0),
                dtype=config.get("dtype", "float32"), num_classes=int(meta["num_classes"]),
                image_shape=tuple(int(d) for d in meta["image_shape"]),
                dataset=config.get("dataset", ""), data_dir=config.get("data_dir") or "",
                method=config.get("method", ""), meta=meta)


# --- the JAX model ---------------------------------------------------------------------------

def restore_variables(source: Source) -> dict:
  """The classifier's {'params'[, 'batch_stats']} from the source checkpoint, on one device."""
  item = "teacher" if source.role == "teacher" else "state"
  ckpt = ckpt_lib.StageCheckpoints(source.directory, create=False)
  try:
    with _quiet_absl():  # orbax warns that an item has no metadata file of its own
      shapes = ckpt.item_shapes(source.step, item)
    tree = ckpt.restore(source.step, item, ckpt_lib.abstract_like(
        shapes, jax.sharding.SingleDeviceSharding(jax.devices()[0])))
  finally:
    ckpt.close()
  v = tree if source.role == "teacher" else tree.get("student")
  if not isinstance(v, dict) or "params" not in v:
    raise ExportError(f"the {source.stage} checkpoint in {source.directory} holds no "
                      f"classifier variables under {item!r}")
  return common.variables_of(v["params"], v.get("batch_stats") or {})


@contextlib.contextmanager
def _quiet_absl():
  """absl's warnings (orbax logs through absl) silenced; errors still shown."""
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)
  try:
    yield
  finally:
    absl_logging.set_verbosity(verbosity)


def build_model(source: Source):
  """The source's classifier from the models registry, computing in the run's dtype."""
  return models.get_classifier(source.model, source.num_classes, source.width,
                               common.compute_dtype({"dtype": source.dtype}))


def logits_fn(model) -> Callable:
  """apply(variables, images) -> float32 logits, the model in evaluation mode. build_model's
  models have no platform (platforms.py): they trace XLA's own convolutions and pooling, since
  the exported programs run on other platforms and runtimes than the CPU that traces them."""
  def apply(variables, images):
    return jnp.asarray(model.apply(variables, images, train=False), jnp.float32)
  return apply


# --- metadata --------------------------------------------------------------------------------

def dataset_info(name: str):
  """The project's DatasetInfo of `name`, or None (e.g. a dataset registered in another
  process)."""
  try:
    return datasets.dataset_info(name)
  except datasets.UnknownDatasetError:
    return None


def normalisation(source: Source) -> dict:
  """What the pipeline does to pixels before the model, as the exported model expects them."""
  info = dataset_info(source.dataset)
  size = source.image_shape[0]
  if info is None:
    return {"mean": None, "std": None, "steps": f"unknown: dataset {source.dataset!r} is not "
            "known to this process (registered at run time?); images were (x - mean) / std of "
            "pixels in [0, 1] with the mean/std given to register_dataset"}
  if source.dataset in datasets.STREAMED:
    steps = (f"decode to uint8 RGB; resize the shorter side to "
             f"{streaming.eval_resize_size(size)} (bilinear, antialiased); take the centre "
             f"{size}x{size}; x / 255; (x - mean) / std per channel")
  else:
    steps = (f"uint8 pixels / 255 -> [0, 1]; resize to {size}x{size} (bilinear) when the source "
             "images are another size (MNIST: 28 -> 32); (x - mean) / std per channel")
  return {"mean": list(info.mean), "std": list(info.std), "steps": steps}


def class_names(source: Source) -> Optional[list]:
  """The dataset's class names: its DatasetInfo's, the tfds label names of a prepared
  dataset, or KNOWN_CLASS_NAMES; None when none is known."""
  info = dataset_info(source.dataset)
  if info is not None and info.class_names:
    return list(info.class_names)
  if source.dataset in KNOWN_CLASS_NAMES:
    return list(KNOWN_CLASS_NAMES[source.dataset])
  try:
    builder = tfds_pipeline.prepared_builder(source.dataset, source.data_dir or None)
    names = list(builder.info.features["label"].names)
    return names if len(names) == source.num_classes else None
  except Exception:  # pylint: disable=broad-except
    return None


def metadata(source: Source, ex: Exported, classes, norm: dict, checked_on: str) -> dict:
  """The JSON written beside an exported file."""
  return {
      "format": ex.fmt, "file": os.path.basename(ex.path), "load": LOAD_HINT[ex.fmt],
      "model": source.model, "role": source.role, "dataset": source.dataset,
      "method": source.method,
      "input": {"name": INPUT_NAME, "shape_hwc": list(source.image_shape), "layout": "NHWC",
                "dtype": "float32", "batch": "any" if ex.batch is None else ex.batch},
      "output": {"name": OUTPUT_NAME, "shape": [None if ex.batch is None else ex.batch,
                                                source.num_classes], "dtype": "float32",
                 "meaning": "logits (softmax gives class probabilities)"},
      "normalisation": norm, "num_classes": source.num_classes, "class_names": classes,
      "compute_dtype": source.dtype,
      "platforms": list(PLATFORMS) if ex.fmt in ("savedmodel", "stablehlo") else None,
      "source": {"checkpoint": source.directory, "stage": source.stage, "step": source.step,
                 "test_accuracy": (source.meta.get("eval") or {}).get("accuracy")},
      "max_abs_logit_diff_vs_jax": ex.max_diff, "checked_on": checked_on,
  }


LOAD_HINT = {
    "savedmodel": "tf.saved_model.load(PATH).signatures['serving_default'](images=x)['logits']",
    "tflite": "ai_edge_litert.interpreter.Interpreter(model_path=PATH).get_signature_runner()"
              "(images=x)['logits']",
    "stablehlo": "jax.export.deserialize(open(PATH, 'rb').read()).call(x)",
    "onnx": "onnxruntime.InferenceSession(PATH).run(['logits'], {'images': x})[0]",
}


# --- check images ----------------------------------------------------------------------------

def check_images(source: Source, n: int = NUM_CHECK_IMAGES) -> tuple:
  """(float32 images (n, H, W, C), what they are): the first n of the run's test split when it
  is held in memory and readable, else deterministic N(0, 1) images."""
  info = dataset_info(source.dataset)
  why = "the dataset is streamed (reading it is not cheap)"
  if info is None:
    why = f"dataset {source.dataset!r} is not known to this process"
  elif source.dataset not in datasets.STREAMED:
    info = dataclasses.replace(info, image_size=source.image_shape[0])
    try:
      test = input_pipeline.load_dataset(source.dataset, "test", source.data_dir or None, info)
      if len(test) and test.images.shape[1:] == source.image_shape:
        return (np.asarray(test.images[:n], np.float32),
                f"{min(n, len(test))} {source.dataset} test images")
      why = "its test split is empty or of another shape"
    except Exception as e:  # pylint: disable=broad-except
      why = f"its test split could not be read: {str(e).splitlines()[0] if str(e) else e!r}"
  rng = np.random.default_rng(CHECK_SEED)
  images = rng.standard_normal((n,) + source.image_shape).astype(np.float32)
  return images, f"{n} N(0, 1) random images, seed {CHECK_SEED} ({why})"


# --- exporters: each writes one file (or directory) and returns the batch size it took -------

def _polymorphic_or_fixed(build: Callable[[Optional[int]], Any]) -> tuple:
  """(build(None), None): a symbolic batch; else (build(EXPORT_BATCH), EXPORT_BATCH)."""
  try:
    return build(None), None
  except Exception:  # pylint: disable=broad-except
    return build(EXPORT_BATCH), EXPORT_BATCH


def export_savedmodel(apply: Callable, variables, image_shape: tuple, path: str) -> Optional[int]:
  """Writes a SavedModel (jax2tf, lowered for PLATFORMS) with the signature 'serving_default'
  images -> {'logits'}; the variables are tf.Variables. Returns the batch size (None: any)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  module = tf.Module()
  module.variables_tree = tf.nest.map_structure(
      lambda a: tf.Variable(a, trainable=False), jax.tree.map(np.asarray, variables))

  def build(batch):
    spec = "(b, " + ", ".join(map(str, image_shape)) + ")" if batch is None else None
    converted = jax2tf.convert(apply, polymorphic_shapes=[None, spec], with_gradient=False,
                               native_serialization_platforms=PLATFORMS)
    serve = tf.function(
        lambda images: {OUTPUT_NAME: converted(module.variables_tree, images)}, autograph=False,
        input_signature=[tf.TensorSpec((batch,) + tuple(image_shape), tf.float32, INPUT_NAME)])
    serve.get_concrete_function()  # traces: raises here when the shapes do not work
    return serve

  serve, batch = _polymorphic_or_fixed(build)
  module.serve = serve
  _remove(path)
  tf.saved_model.save(module, path, signatures={"serving_default": serve})
  return batch


def export_tflite(savedmodel_path: str, path: str) -> None:
  """Converts the SavedModel to a TFLite flatbuffer at `path` (float32, builtin ops)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  converter = tf.lite.TFLiteConverter.from_saved_model(savedmodel_path)
  with open(path, "wb") as f:
    f.write(converter.convert())


def export_stablehlo(apply: Callable, variables, image_shape: tuple, path: str) -> Optional[int]:
  """Writes jax.export's serialization of the model (weights as constants, lowered for
  PLATFORMS) to `path`. Returns the batch size (None: any)."""
  fn = jax.jit(functools.partial(apply, variables))

  def build(batch):
    shape = (jax.export.symbolic_shape("b")[0] if batch is None else batch,) + tuple(image_shape)
    return jax.export.export(fn, platforms=PLATFORMS)(jax.ShapeDtypeStruct(shape, np.float32))

  exported, batch = _polymorphic_or_fixed(build)
  with open(path, "wb") as f:
    f.write(exported.serialize())
  return batch


def export_onnx(tflite_path: str, path: str) -> None:
  """Converts the TFLite file to ONNX with tf2onnx (ONNX_OPSET), inputs/outputs renamed to
  INPUT_NAME/OUTPUT_NAME. ImportError when tf2onnx is not installed."""
  import onnx  # pylint: disable=g-import-not-at-top
  import tf2onnx  # pylint: disable=g-import-not-at-top
  with _quiet_tf2onnx(tf2onnx):
    proto, _ = tf2onnx.convert.from_tflite(tflite_path, opset=ONNX_OPSET)
  graph = proto.graph
  if len(graph.input) != 1 or len(graph.output) != 1:
    raise ValueError(f"expected one input and one output, got {len(graph.input)} and "
                     f"{len(graph.output)}")
  _rename_value(graph, graph.input[0].name, INPUT_NAME)
  _rename_value(graph, graph.output[0].name, OUTPUT_NAME)
  onnx.save(proto, path)


def _rename_value(graph, old: str, new: str) -> None:
  """Renames value `old` of an ONNX graph to `new` wherever nodes and graph I/O use it."""
  for v in list(graph.input) + list(graph.output):
    if v.name == old:
      v.name = new
  for node in graph.node:
    node.input[:] = [new if n == old else n for n in node.input]
    node.output[:] = [new if n == old else n for n in node.output]


@contextlib.contextmanager
def _quiet_tf2onnx(tf2onnx):
  """tf2onnx's INFO logs and the TFLite interpreter's deprecation warning, silenced."""
  import logging  # pylint: disable=g-import-not-at-top
  logger = logging.getLogger("tf2onnx")
  level = logger.level
  tf2onnx.logging.set_level(logging.ERROR)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      yield
  finally:
    logger.setLevel(level)


# --- runtimes: each runs an exported file on images -> float32 logits ------------------------

def _in_batches(run_batch: Callable, images: np.ndarray, batch: Optional[int]) -> np.ndarray:
  """run_batch on all images at once (batch None), else on consecutive chunks of `batch`."""
  if batch is None:
    return np.asarray(run_batch(images), np.float32)
  return np.concatenate([np.asarray(run_batch(images[i:i + batch]), np.float32)
                         for i in range(0, len(images), batch)])


def run_savedmodel(path: str, images: np.ndarray, batch: Optional[int] = None) -> np.ndarray:
  """Logits of the SavedModel's serving signature (TensorFlow)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  serve = tf.saved_model.load(path).signatures["serving_default"]
  return _in_batches(lambda x: serve(**{INPUT_NAME: tf.constant(x)})[OUTPUT_NAME].numpy(),
                     images, batch)


def tflite_interpreter(path: str):
  """A TFLite interpreter of `path`: LiteRT's (ai_edge_litert) when installed, else
  TensorFlow's tf.lite.Interpreter."""
  try:
    from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  except ImportError:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    Interpreter = tf.lite.Interpreter  # pylint: disable=invalid-name
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return Interpreter(model_path=path)


def run_tflite(path: str, images: np.ndarray, batch: Optional[int] = None) -> np.ndarray:
  """Logits of the TFLite file's signature runner."""
  runner = tflite_interpreter(path).get_signature_runner()
  return _in_batches(lambda x: runner(**{INPUT_NAME: x})[OUTPUT_NAME], images, batch)


def run_stablehlo(path: str, images: np.ndarray, batch: Optional[int] = None) -> np.ndarray:
  """Logits of the deserialized jax.export module."""
  with open(path, "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  return _in_batches(exported.call, images, batch)


def run_onnx(path: str, images: np.ndarray, batch: Optional[int] = None) -> np.ndarray:
  """Logits of the ONNX model (onnxruntime, CPU); ImportError without onnxruntime."""
  import onnxruntime  # pylint: disable=g-import-not-at-top
  session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
  return _in_batches(lambda x: session.run([OUTPUT_NAME], {INPUT_NAME: x})[0], images, batch)


RUNNERS = {"savedmodel": run_savedmodel, "tflite": run_tflite, "stablehlo": run_stablehlo,
           "onnx": run_onnx}


# --- the export ------------------------------------------------------------------------------

def file_size(path: str) -> int:
  """Bytes of a file, or of all files under a directory."""
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
  return os.path.getsize(path)


def _remove(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  elif os.path.exists(path):
    os.remove(path)


def to_build(formats: tuple) -> tuple:
  """`formats` and what they are converted from, in FORMATS order."""
  need = set()
  stack = list(formats)
  while stack:
    f = stack.pop()
    if f not in need:
      need.add(f)
      stack.extend(NEEDS[f])
  return tuple(f for f in FORMATS if f in need)


def write_format(fmt: str, path: str, apply, variables, source: Source,
                 built: dict) -> Exported:
  """Writes one format to `path` (from the already `built` formats it needs); an Exported
  with skipped=True and the reason when ONNX cannot be made."""
  ex = Exported(fmt, path)
  if fmt == "savedmodel":
    ex.batch = export_savedmodel(apply, variables, source.image_shape, path)
  elif fmt == "tflite":
    export_tflite(built["savedmodel"].path, path)
    ex.batch = built["savedmodel"].batch
  elif fmt == "stablehlo":
    ex.batch = export_stablehlo(apply, variables, source.image_shape, path)
  else:
    try:
      export_onnx(built["tflite"].path, path)
    except ImportError as e:
      return Exported(fmt, skipped=True, note=f"skipped: {e.name or 'tf2onnx'} is not installed "
                      "(pip install tf2onnx onnxruntime)")
    except Exception as e:  # pylint: disable=broad-except
      _remove(path)
      return Exported(fmt, skipped=True, note="skipped: tf2onnx cannot convert this model "
                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    ex.batch = built["tflite"].batch
  ex.size = file_size(path)
  return ex


def check(ex: Exported, images: np.ndarray, reference: np.ndarray) -> None:
  """Sets ex.max_diff: the largest |logit - JAX logit| of the file run by its own runtime (or
  ex.note when that runtime is not installed)."""
  try:
    out = RUNNERS[ex.fmt](ex.path, images, ex.batch)
  except ImportError as e:
    ex.note = f"not checked: {e.name} is not installed"
    return
  ex.max_diff = float(np.max(np.abs(out - reference)))


def export(workdir: str, formats=FORMATS, out: str = "", stage: str = "",
           printer: Callable[[str], None] = print) -> list:
  """Exports `stage` (default: the student) of the finished run in `workdir` to each of
  `formats` in `out` (default WORKDIR/export), each file with its JSON; prints one line per
  file. Returns the Exported of each asked format."""
  source = locate(workdir, stage)
  formats = tuple(formats)
  out = paths.resolve(out) if out else paths.join(paths.resolve(workdir), "export")
  model = build_model(source)
  variables = restore_variables(source)
  apply = logits_fn(model)
  images, checked_on = check_images(source)
  reference = np.asarray(jax.jit(apply)(variables, images))
  printer(f"export: {source.role} {source.model} of {source.directory} (step {source.step}), "
          f"input (N, {', '.join(map(str, source.image_shape))}) float32 -> "
          f"{source.num_classes} float32 logits; checked on {checked_on}")
  norm, classes = normalisation(source), class_names(source)
  built: dict = {}
  # Every file is made and checked in a local temporary directory (where the formats that
  # convert from it find it), then copied to `out` (local or remote) beside its JSON.
  with tempfile.TemporaryDirectory(prefix="datafree_jax_export_") as tmp:
    for fmt in to_build(formats):
      built[fmt] = write_format(fmt, os.path.join(tmp, source.role + FILE_SUFFIX[fmt]), apply,
                                variables, source, built)
    result = []
    for fmt in formats:
      ex = dataclasses.replace(built[fmt])
      if not ex.skipped:
        check(ex, images, reference)
        ex.path = paths.join(out, os.path.basename(built[fmt].path))
        ex.json_path = ex.path + ".json"
        paths.copy_tree(built[fmt].path, ex.path)
        paths.write_text(ex.json_path, json.dumps(
            metadata(source, ex, classes, norm, checked_on), indent=1))
      printer(describe(ex))
      result.append(ex)
  return result


def describe(ex: Exported) -> str:
  """The printed line of one format: file, size, batch, difference to JAX (or why not)."""
  if ex.skipped:
    return f"{ex.fmt:<10}  {ex.note}"
  diff = f"max |logit - JAX| {ex.max_diff:.2e}" if ex.max_diff is not None else ex.note
  batch = "" if ex.batch is None else f", fixed batch {ex.batch}"
  return (f"{ex.fmt:<10}  {ex.path}  {_human(ex.size)}{batch}  {diff}  "
          f"(+ {os.path.basename(ex.json_path)})")


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB"):
    if n < 1024 or unit == "MiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return f"{n:.1f} GiB"
