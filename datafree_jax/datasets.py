"""The datasets this project knows (the dataset registry): each one's image size, channels,
classes and normalisation, whether it is held in memory or streamed, and the arrays of datasets
registered from outside the package. Imports nothing of the package but its errors; where the
images come from is input_pipeline's (in memory), tfds_pipeline's and streaming's business."""
from __future__ import annotations

import dataclasses

import numpy as np

from datafree_jax.errors import UnknownDatasetError

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

# ImageNet-shaped JPEGs built locally, without downloads (synthetic_imagenet.py; `python -m
# datafree_jax.main make-jpeg-dataset`): streamed like imagenet2012, with its classes and
# normalisation. LOCAL_BUILDS: the command that prepares such a dataset (for error messages).
SYNTHETIC_IMAGENET = "synthetic_imagenet"
DATASETS[SYNTHETIC_IMAGENET] = dict(DATASETS["imagenet2012"])
STREAMED.add(SYNTHETIC_IMAGENET)
LOCAL_BUILDS = {SYNTHETIC_IMAGENET: "python -m datafree_jax.main make-jpeg-dataset"}

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


def dataset_info(name: str, image_size: int = 0) -> DatasetInfo:
  if name not in DATASETS:
    raise UnknownDatasetError(
        f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
  info = DatasetInfo(name=name, **DATASETS[name])
  return dataclasses.replace(info, image_size=image_size) if image_size else info


def config_info(config) -> DatasetInfo:
  """The DatasetInfo of config.dataset, with config.image_size (when set) as its size."""
  return dataset_info(config.dataset, config.get("image_size", 0))


# Datasets given as arrays (register_dataset): name -> {split: (images, labels)}.
REGISTERED: dict = {}


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
  if name in DATASETS and name not in REGISTERED:
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
  REGISTERED[name] = arrays
