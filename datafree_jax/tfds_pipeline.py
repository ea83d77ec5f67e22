"""Loads prepared TFDS image-classification datasets (MNIST, CIFAR-10/100) into numpy arrays.

Nothing here downloads: a dataset must already be prepared in the data dir (`tfds build`, or
`download_and_prepare()` on a machine with internet, then copied over). Whether it is prepared
is checked on the local file system first, so a missing dataset fails in about a second with
one message that says how to prepare it, instead of tfds retrying downloads for minutes.

In a multi-process run each process reads only its shard of a split
(`tfds.split_for_jax_process`: contiguous, non-overlapping, sizes differing by at most one).

TensorFlow and tensorflow_datasets are imported lazily, inside the functions, so importing this
module (and the package) stays fast.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from datafree_jax import datasets
from datafree_jax.errors import DatasetNotPreparedError

SPLITS = ("train", "test")
IMAGE_KEY = "image"
# CIFAR-100 also has 'coarse_label' (the 20 superclasses); the models use the 100 fine labels.
LABEL_KEY = "label"
_READ_BATCH = 10_000


def resolve_data_dir(data_dir: Optional[str] = None) -> str:
  """`data_dir` if given, else $TFDS_DATA_DIR, else tfds' default ~/tensorflow_datasets."""
  if not data_dir:
    data_dir = os.environ.get("TFDS_DATA_DIR") or os.path.join("~", "tensorflow_datasets")
  data_dir = os.fspath(data_dir)
  if "://" in data_dir:  # gs://... and other remote file systems: leave as is.
    return data_dir
  return os.path.abspath(os.path.expanduser(data_dir))


def import_tfds():
  """Imports tensorflow_datasets, which itself imports TensorFlow only when first needed."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Only effective before TF's first import.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tfds.disable_progress_bar()
  return tfds


def import_tf():
  """Imports TensorFlow quietened and kept off the accelerators (they are JAX's)."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel("ERROR")
  try:
    # tf.data only feeds numpy here; TF must not claim GPU memory that JAX needs.
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF's devices were already initialised.
    pass
  return tf


def _quietly(fn):
  """fn() with absl warnings muted (is_prepared() warns about every missing version folder)."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    return fn()
  finally:
    logging.set_verbosity(verbosity)


def _other_versions(dataset_dir: str, version: str):
  """Version folders other than `version` found under data_dir/name (for the error message)."""
  try:
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = epath.Path(dataset_dir)
    if not path.exists():
      return []
    return sorted(p.name for p in path.iterdir() if p.is_dir() and p.name != version)
  except Exception:  # pylint: disable=broad-except
    return []


def not_prepared_message(name: str, data_dir: str, version: str = "", other_versions=()) -> str:
  expected = os.path.join(data_dir, name, version) if version else os.path.join(data_dir, name)
  msg = (
      f"TFDS dataset {name!r} is not prepared in data dir {data_dir!r} "
      f"(no dataset_info.json + features.json in {expected!r}); this program never downloads. "
  )
  if name in datasets.LOCAL_BUILDS:
    return msg + (f"It is built locally, without downloads: "
                  f"`{datasets.LOCAL_BUILDS[name]} --data_dir={data_dir}`, then pass "
                  f"--config.data_dir={data_dir} (or set TFDS_DATA_DIR).")
  if other_versions:
    msg += (f"Found version folder(s) {', '.join(other_versions)} there, but this "
            f"tensorflow-datasets reads version {version}. ")
  msg += (
      f"To prepare it, on a machine with internet run `tfds build {name} --data_dir={data_dir}` "
      f"(or `python -c \"import tensorflow_datasets as tfds; "
      f"tfds.builder('{name}', data_dir='{data_dir}').download_and_prepare()\"`), "
      f"then copy that data dir to this machine, and pass its path as --config.data_dir=DIR "
      f"or set TFDS_DATA_DIR=DIR.")
  return msg


def prepared_builder(name: str, data_dir: Optional[str] = None):
  """The tfds builder of `name` in the resolved data dir; raises if it is not prepared.

  Only looks at the local (or given remote) file system: `tfds.builder(..., try_gcs=False)`
  then `builder.is_prepared()` (dataset_info.json and features.json in data_dir/name/version).
  Neither needs TensorFlow, which tfds imports lazily, so a missing dataset fails in a second.
  A name without builder code in tfds (a dataset built locally, such as synthetic_imagenet) is
  read from its files alone, and is not prepared when they are missing.
  """
  resolved = resolve_data_dir(data_dir)
  tfds = import_tfds()
  try:
    builder = tfds.builder(name, data_dir=resolved, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError:
    raise DatasetNotPreparedError(not_prepared_message(name, resolved)) from None
  if not _quietly(builder.is_prepared):
    version = str(builder.version)
    raise DatasetNotPreparedError(not_prepared_message(
        name, resolved, version, _other_versions(os.path.join(resolved, name), version)))
  return builder


def load_tfds_arrays(name: str, split: str, data_dir: Optional[str] = None):
  """This process's shard of `split` of a prepared tfds dataset, in memory.

  Args:
    name: a tfds image-classification dataset with 'image' and 'label' features
      ('mnist', 'cifar10', 'cifar100').
    split: 'train' or 'test'.
    data_dir: where the dataset is prepared; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.

  Returns:
    (images, labels): uint8 (N, H, W, C) and int32 (N,) numpy arrays, in the order tfds
    stored them (fixed at preparation; nothing is shuffled on reading).

  Raises:
    DatasetNotPreparedError: the dataset is not prepared in the data dir.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  builder = prepared_builder(name, data_dir)
  tfds = import_tfds()
  import_tf()
  ds = builder.as_dataset(
      split=tfds.split_for_jax_process(split),
      shuffle_files=False,
      read_config=tfds.ReadConfig(try_autocache=False),
  )
  ds = ds.map(lambda ex: (ex[IMAGE_KEY], ex[LABEL_KEY])).batch(_READ_BATCH)
  images, labels = [], []
  for x, y in tfds.as_numpy(ds):
    images.append(x)
    labels.append(y)
  if not images:
    shape = builder.info.features[IMAGE_KEY].shape
    return np.zeros((0,) + tuple(shape), np.uint8), np.zeros((0,), np.int32)
  images = np.concatenate(images).astype(np.uint8, copy=False)
  labels = np.concatenate(labels).astype(np.int32)
  if images.ndim != 4:
    raise ValueError(f"{name}: expected NHWC images, got shape {images.shape}")
  return images, labels
