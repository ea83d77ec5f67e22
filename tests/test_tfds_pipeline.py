"""Tests of the tfds loader: fast, clear failure when a dataset is not prepared; under
`tfds.testing.mock_data`, correctly shaped, typed and normalised arrays through load_dataset.

mock_data ignores the data_dir it is given by the code under test and reads metadata from its
own `data_dir`; with no metadata there, builders are not "prepared" and the loader (rightly)
refuses. So the fixture writes each dataset's real metadata (dataset_info.json, features.json,
from the installed tfds' builder code) into a temporary dir, which is what mock_data documents
for its USE_FILES policy; the examples then come from mock_data's random generator.
"""
import os
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest

from conftest import prepare_tiny_mnist

from datafree_jax import datasets
from datafree_jax import input_pipeline
from datafree_jax import tfds_pipeline

tfds = pytest.importorskip("tensorflow_datasets")

NAMES = ("mnist", "cifar10", "cifar100")
NUM_EXAMPLES = 24


def test_import_does_not_import_tensorflow():
  code = ("import sys; import datafree_jax.tfds_pipeline; "
          "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=60,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_resolve_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
  assert tfds_pipeline.resolve_data_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")
  assert tfds_pipeline.resolve_data_dir(None) == str(tmp_path / "env")
  monkeypatch.delenv("TFDS_DATA_DIR")
  assert tfds_pipeline.resolve_data_dir(None) == os.path.expanduser("~/tensorflow_datasets")


@pytest.mark.parametrize("name", ["cifar10", "mnist"])
def test_unprepared_dataset_fails_fast_with_clear_message(name, tmp_path):
  start = time.monotonic()
  with pytest.raises(tfds_pipeline.DatasetNotPreparedError) as err:
    input_pipeline.load_dataset(name, "train", data_dir=str(tmp_path))
  elapsed = time.monotonic() - start
  # The check reads the data dir and gives up; a download attempt hangs here for minutes. The
  # bound leaves room for a slow, busy machine importing tfds for the first time.
  assert elapsed < 60, f"took {elapsed:.1f} s"
  msg = str(err.value)
  assert repr(name) in msg and str(tmp_path) in msg
  assert f"tfds build {name} --data_dir={tmp_path}" in msg
  assert "TFDS_DATA_DIR" in msg
  assert not any(tmp_path.iterdir()), "the check must not create anything in the data dir"


def test_unprepared_message_names_other_versions(tmp_path, monkeypatch):
  (tmp_path / "cifar10" / "1.0.0").mkdir(parents=True)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
  with pytest.raises(tfds_pipeline.DatasetNotPreparedError, match=r"1\.0\.0.*reads version"):
    tfds_pipeline.load_tfds_arrays("cifar10", "test")


def test_bad_split():
  with pytest.raises(ValueError, match="split"):
    tfds_pipeline.load_tfds_arrays("cifar10", "validation", "/nonexistent")


@pytest.fixture(scope="module")
def metadata_dir(tmp_path_factory):
  """A data dir holding only each dataset's metadata: 'prepared' as far as tfds can tell."""
  root = tmp_path_factory.mktemp("tfds_metadata")
  for name in NAMES:
    builder = tfds.builder(name, data_dir=str(root))
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)
  return str(root)


def _raw_mock_arrays(name):
  """The mocked uint8 images and labels, read straight from tfds (not through our code)."""
  ds = tfds.builder(name).as_dataset(split="train", shuffle_files=False)
  examples = list(tfds.as_numpy(ds))
  return (np.stack([ex["image"] for ex in examples]),
          np.array([ex["label"] for ex in examples]))


@pytest.mark.parametrize("name", NAMES)
def test_mocked_load_dataset(name, metadata_dir, tmp_path):
  info = datasets.dataset_info(name)
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, data_dir=metadata_dir):
    # mock_data replaces the data_dir given here by its own (metadata_dir).
    ds = input_pipeline.load_dataset(name, "train", data_dir=str(tmp_path))
    raw_images, raw_labels = _raw_mock_arrays(name)

  assert ds.images.shape == (NUM_EXAMPLES, 32, 32, info.channels)
  assert ds.images.dtype == np.float32
  assert ds.labels.shape == (NUM_EXAMPLES,) and ds.labels.dtype == np.int32
  assert ds.labels.min() >= 0 and ds.labels.max() < info.num_classes
  np.testing.assert_array_equal(ds.labels, raw_labels)

  mean = np.asarray(info.mean, np.float32)
  std = np.asarray(info.std, np.float32)
  assert raw_images.dtype == np.uint8
  if raw_images.shape[1] == 32:  # CIFAR: no resize, exact normalisation of the raw values.
    np.testing.assert_allclose(ds.images, (raw_images / 255.0 - mean) / std, rtol=0, atol=1e-5)
  else:  # MNIST 28 -> 32: bilinear resize keeps values in [0, 1] and roughly the mean.
    assert raw_images.shape[1:] == (28, 28, 1)
    unit = ds.images * std + mean
    assert unit.min() >= -1e-5 and unit.max() <= 1 + 1e-5
    np.testing.assert_allclose(unit.mean(axis=(1, 2, 3)), raw_images.mean(axis=(1, 2, 3)) / 255.0,
                               atol=0.03)
  # Per-channel sanity of the normalisation range: (0 - mean) / std .. (1 - mean) / std.
  assert np.all(ds.images >= (0 - mean) / std - 1e-5)
  assert np.all(ds.images <= (1 - mean) / std + 1e-5)


def test_mocked_arrays_are_this_process_shard(metadata_dir):
  # Single process: the shard is the whole split, in tfds' order; arrays uint8 NHWC and int32.
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, data_dir=metadata_dir):
    images, labels = tfds_pipeline.load_tfds_arrays("cifar100", "test")
    examples = list(tfds.as_numpy(tfds.builder("cifar100").as_dataset(split="test",
                                                                      shuffle_files=False)))
  assert images.shape == (NUM_EXAMPLES, 32, 32, 3) and images.dtype == np.uint8
  assert labels.shape == (NUM_EXAMPLES,) and labels.dtype == np.int32
  np.testing.assert_array_equal(images, np.stack([ex["image"] for ex in examples]))
  # The 100 fine labels, not the 20 coarse ones.
  np.testing.assert_array_equal(labels, [ex["label"] for ex in examples])
  assert not np.array_equal(labels, [ex["coarse_label"] for ex in examples])


def test_mock_without_metadata_is_not_prepared():
  # mock_data's default (no metadata) leaves builders unprepared: the check still refuses.
  with tfds.testing.mock_data(num_examples=2):
    with pytest.raises(tfds_pipeline.DatasetNotPreparedError):
      tfds_pipeline.load_tfds_arrays("mnist", "train", "/nonexistent")


@pytest.fixture(scope="module")
def tiny_prepared_mnist(tmp_path_factory):
  """A really prepared (tfrecord) 'mnist' of 11 train / 5 test random digits, built offline.

  The real MNIST builder runs with its download replaced by local idx files and its example
  counts shrunk; everything downstream (tfrecords, dataset_info.json, reading) is real tfds.
  Returns (data_dir, {split: (images (N, 28, 28) uint8, labels (N,))}).
  """
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", 11), ("test", 5)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    arrays[split] = images, rng.integers(0, 10, n).astype(np.uint8)
  return prepare_tiny_mnist(tmp_path_factory, arrays), arrays


def _sorted_rows(images):
  return sorted(bytes(im) for im in images)


def test_real_prepared_dataset_and_process_shards(tiny_prepared_mnist):
  data_dir, arrays = tiny_prepared_mnist
  images, labels = tfds_pipeline.load_tfds_arrays("mnist", "train", data_dir)
  assert images.shape == (11, 28, 28, 1) and images.dtype == np.uint8
  assert labels.dtype == np.int32
  # tfds stores examples in its own (hashed) order: compare as multisets.
  assert _sorted_rows(images[..., 0]) == _sorted_rows(arrays["train"][0])
  assert sorted(labels.tolist()) == sorted(arrays["train"][1].tolist())

  # With 2 processes, process 1 reads only the second, disjoint part of the split.
  import jax  # pylint: disable=g-import-not-at-top
  with mock.patch.object(jax, "process_index", lambda: 1), \
       mock.patch.object(jax, "process_count", lambda: 2):
    shard, shard_labels = tfds_pipeline.load_tfds_arrays("mnist", "train", data_dir)
  np.testing.assert_array_equal(shard, images[6:])
  np.testing.assert_array_equal(shard_labels, labels[6:])

  ds = input_pipeline.load_dataset("mnist", "test", data_dir=data_dir)
  assert ds.images.shape == (5, 32, 32, 1) and ds.images.dtype == np.float32
  assert sorted(ds.labels.tolist()) == sorted(arrays["test"][1].tolist())
