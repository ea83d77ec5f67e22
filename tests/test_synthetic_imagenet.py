"""synthetic_imagenet: the ImageNet-shaped JPEG dataset built locally with tfds's builder, its
`make-jpeg-dataset` command, and the streaming reader on it (as on a prepared imagenet2012)."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

from datafree_jax import datasets
from datafree_jax import main
from datafree_jax import streaming
from datafree_jax import synthetic_imagenet
from datafree_jax import tfds_pipeline
from datafree_jax.errors import DatasetBuildError, DatasetNotPreparedError

tfds = pytest.importorskip("tensorflow_datasets")

TINY = synthetic_imagenet.Settings(train_examples=40, validation_examples=12, min_side=60,
                                   max_side=120)
# A few classes under a name of its own: a classifier can tell them apart.
FEW = synthetic_imagenet.Settings(classes=4, train_examples=40, validation_examples=20,
                                  min_side=48, max_side=96)
FEW_NAME = "test_shapes_four"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """A data dir with the tiny synthetic_imagenet (1,000 classes) and FEW_NAME (4 classes)."""
  path = str(tmp_path_factory.mktemp("synthetic_tfds"))
  lines = []
  synthetic_imagenet.build(path, TINY, printer=lines.append)
  synthetic_imagenet.build(path, FEW, name=FEW_NAME)
  assert lines[0].startswith("synthetic_imagenet: writing 52 JPEGs (1000 classes, sides 60..120")
  assert lines[-1].startswith("synthetic_imagenet: done in ") and "52 images" in lines[-1]
  return path


def _examples(name, split, data_dir):  # pylint: disable=redefined-outer-name
  """(encoded image bytes, decoded images, labels) of a split, in stored order."""
  builder = tfds_pipeline.prepared_builder(name, data_dir)
  tf = tfds_pipeline.import_tf()
  ds = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
  data, images, labels = [], [], []
  for ex in ds:
    data.append(ex["image"].numpy())
    images.append(tf.io.decode_jpeg(ex["image"]).numpy())
    labels.append(int(ex["label"]))
  return data, images, np.asarray(labels)


def test_a_prepared_tfds_dataset_of_jpegs_read_from_its_files(data_dir):  # pylint: disable=redefined-outer-name
  builder = tfds_pipeline.prepared_builder(datasets.SYNTHETIC_IMAGENET, data_dir)
  # No builder code is registered with tfds: it is read from its files, as a copied dataset.
  assert type(builder).__name__ == "ReadOnlyBuilder"
  features = builder.info.features
  assert features["label"].num_classes == 1000
  assert features["image"].encoding_format == "jpeg" and features["image"].shape == (None, None, 3)
  assert {s: builder.info.splits[s].num_examples for s in ("train", "validation")} == {
      "train": 40, "validation": 12}
  assert builder.info.metadata["classes"] == 1000
  data, images, labels = _examples(datasets.SYNTHETIC_IMAGENET, "train", data_dir)
  assert all(d[:2] == b"\xff\xd8" for d in data)  # JPEG files
  sides = np.asarray([im.shape[:2] for im in images])
  assert sides.min() >= 60 and sides.max() <= 120 and len(np.unique(sides)) > 10
  assert sorted(labels) == list(range(40))  # labels cycle through the classes
  assert list(labels) != list(range(40))    # stored in tfds' shuffled order


def test_classes_differ_so_that_a_classifier_learns_them(data_dir):  # pylint: disable=redefined-outer-name
  """Nearest class mean of each image's colour histogram (4 levels per channel): every
  validation image of FEW_NAME is classified right (chance: 25%)."""
  def histogram(image):
    q = (image // 64).reshape(-1, 3).astype(np.int64)
    counts = np.bincount(q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2], minlength=64)
    return counts / counts.sum()

  def colours(split):
    _, images, labels = _examples(FEW_NAME, split, data_dir)
    return np.stack([histogram(im) for im in images]), labels
  x, y = colours("train")
  means = np.stack([x[y == k].mean(0) for k in range(4)])
  vx, vy = colours("validation")
  guess = np.argmin(((vx[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert np.mean(guess == vy) == 1.0


def test_images_are_a_function_of_seed_split_and_index():
  bank = synthetic_imagenet.noise_bank(TINY)
  a = synthetic_imagenet.draw_image(TINY, 0, 5, 3, bank)
  assert np.array_equal(a, synthetic_imagenet.draw_image(TINY, 0, 5, 3, bank))
  assert not np.array_equal(a, synthetic_imagenet.draw_image(TINY, 1, 5, 3, bank))
  other = dataclasses.replace(TINY, seed=1)
  assert not np.array_equal(a, synthetic_imagenet.draw_image(
      other, 0, 5, 3, synthetic_imagenet.noise_bank(other)))
  styles = {str(synthetic_imagenet.class_style(k)) for k in range(1000)}
  assert len(styles) == 1000  # every class its own look


def test_streaming_reads_it_as_imagenet(data_dir):  # pylint: disable=redefined-outer-name
  info = dataclasses.replace(datasets.dataset_info(datasets.SYNTHETIC_IMAGENET), image_size=32)
  batches = streaming.train_batches(datasets.SYNTHETIC_IMAGENET, info, 8, seed=0,
                                    data_dir=data_dir)
  try:
    first = [batches(step) for step in range(6)]  # 5 steps per epoch: into the second epoch
    again = batches(2)
  finally:
    batches.close()
  assert batches.steps_per_epoch == 5
  for images, labels in first:
    assert images.shape == (8, 32, 32, 3) and labels.shape == (8,)
    assert np.all(np.isfinite(np.asarray(images, np.float32)))
  seen = np.concatenate([labels for _, labels in first[:5]])
  assert sorted(seen) == list(range(40))  # one epoch: every example once
  np.testing.assert_array_equal(again[0], first[2][0])
  evaluated = list(streaming.eval_batches(datasets.SYNTHETIC_IMAGENET, info, 8, data_dir))
  assert len(evaluated) == 2 and sum(float(m.sum()) for _, _, m in evaluated) == 12
  assert streaming.eval_split(datasets.SYNTHETIC_IMAGENET, data_dir) == "validation"


def test_a_tensorflow_global_seed_changes_nothing(data_dir):  # pylint: disable=redefined-outer-name
  """A TensorFlow global seed set by the caller (a notebook, a benchmark) neither breaks the
  per-epoch seeds of the training pipeline nor changes its batches: they are a function of the
  pipeline's own seed."""
  tf = tfds_pipeline.import_tf()
  info = dataclasses.replace(datasets.dataset_info(datasets.SYNTHETIC_IMAGENET), image_size=32)

  def first_steps():
    batches = streaming.train_batches(datasets.SYNTHETIC_IMAGENET, info, 8, seed=3,
                                      data_dir=data_dir, host_prefetch=0)
    try:
      return [batches(step) for step in (0, 1, 5)]
    finally:
      batches.close()

  plain = first_steps()
  tf.random.set_seed(1234)
  try:
    seeded = first_steps()
  finally:
    tf.random.set_seed(None)
  for (x0, y0), (x1, y1) in zip(plain, seeded):
    np.testing.assert_array_equal(y0, y1)
    np.testing.assert_array_equal(x0, x1)


def test_a_build_is_reused_and_another_build_refused(data_dir):  # pylint: disable=redefined-outer-name
  lines = []
  path = synthetic_imagenet.build(data_dir, TINY, printer=lines.append)
  assert lines == [f"synthetic_imagenet: already built with these settings in {path}"]
  with pytest.raises(DatasetBuildError, match="built with other settings"):
    synthetic_imagenet.build(data_dir, dataclasses.replace(TINY, train_examples=41))


@pytest.mark.parametrize("changes, name, expected", [
    (dict(classes=10), synthetic_imagenet.NAME, "registered with 1000 classes"),
    (dict(classes=0), "x", "classes must be a positive integer"),
    (dict(train_examples=-1), "x", "train_examples must be"),
    (dict(min_side=300, max_side=200), "x", "min_side (300) is larger than max_side (200)"),
    (dict(quality=101), "x", "quality must be in 1..100"),
    ({}, "cifar10", "held in memory"),
    ({}, "Bad-Name", "must be a tfds name"),
])
def test_bad_settings_are_refused_before_anything_is_written(changes, name, expected, tmp_path):
  with pytest.raises(DatasetBuildError, match=expected.replace("(", r"\(").replace(")", r"\)")):
    synthetic_imagenet.build(str(tmp_path), dataclasses.replace(TINY, **changes), name=name)
  assert not os.listdir(tmp_path)


def test_the_command_builds_it_with_progress(tmp_path, capsys):
  code = main.main(["prog", "make-jpeg-dataset", f"--data_dir={tmp_path}", "--train_examples",
                    "6", "--validation_examples=3", "--min_side=40", "--max_side=50", "--seed=3"])
  out = capsys.readouterr().out
  assert code == 0, out
  assert "synthetic_imagenet: writing 9 JPEGs" in out and "synthetic_imagenet: done in" in out
  assert "Downloading" not in out  # tfds' own line, which would say so, is muted
  with open(os.path.join(synthetic_imagenet.dataset_dir(str(tmp_path)), "metadata.json")) as f:
    assert json.load(f) == dict(synthetic_imagenet.Settings(
        train_examples=6, validation_examples=3, min_side=40, max_side=50, seed=3).metadata())


@pytest.mark.parametrize("args, expected", [
    (["--classes=ten"], "error: flag --classes: expected an integer, got 'ten'"),
    (["--train_examples"], "error: flag --train_examples needs a value"),
    (["--nosuch=1"], "error: unknown argument '--nosuch=1' (make-jpeg-dataset takes --data_dir"),
    (["--min_side=600"], "error: min_side (600) is larger than max_side (500)"),
    (["--classes=10"], "error: dataset 'synthetic_imagenet' is registered with 1000 classes"),
])
def test_bad_arguments_are_one_line(args, expected, tmp_path, capsys):
  code = main.main(["prog", "make-jpeg-dataset", f"--data_dir={tmp_path}", *args])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith(expected) and err.count("\n") == 1, err
  assert not os.listdir(tmp_path)


def test_help_lists_the_flags(capsys):
  assert main.main(["prog", "make-jpeg-dataset", "--help"]) == 0
  out = capsys.readouterr().out
  for flag in ("--data_dir", "--classes", "--train_examples", "--validation_examples",
               "--min_side", "--max_side", "--quality", "--seed", "--name"):
    assert flag in out


def test_the_smoke_config_says_how_to_build_it_when_missing(tmp_path):
  """The ImageNet smoke run on a data dir without the dataset: one line that names the build
  command, exit code 2, in seconds."""
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  r = subprocess.run([sys.executable, "-m", "datafree_jax.main",
                      "--config=configs/imagenet.py:smoke=True",
                      f"--config.data_dir={tmp_path}", f"--workdir={tmp_path / 'w'}"],
                     cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stdout + r.stderr
  assert (f"error: TFDS dataset 'synthetic_imagenet' is not prepared in data dir '{tmp_path}'"
          in r.stderr)
  assert f"`python -m datafree_jax.main make-jpeg-dataset --data_dir={tmp_path}`" in r.stderr
  with pytest.raises(DatasetNotPreparedError, match="make-jpeg-dataset"):
    tfds_pipeline.prepared_builder(datasets.SYNTHETIC_IMAGENET, str(tmp_path))
