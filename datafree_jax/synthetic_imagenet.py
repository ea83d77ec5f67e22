"""An ImageNet-shaped tfds dataset of JPEGs, built locally without downloads.

    python -m datafree_jax.main make-jpeg-dataset --data_dir=DIR [--train_examples=N] ...

`build` writes tfds dataset 'synthetic_imagenet' (datasets.SYNTHETIC_IMAGENET) into a data dir
with tfds's own builder (a `tfds.core.GeneratorBasedBuilder`): 'train' and 'validation' splits
of JPEG images of varied sizes (each side drawn from [min_side, max_side], 200..500 px by
default) with an 'image' feature (`tfds.features.Image(encoding_format='jpeg')`) and a
'label' feature (`tfds.features.ClassLabel`), in tfds's record files with its dataset_info.json
and features.json: the layout of a prepared imagenet2012, read the same way
(`tfds_pipeline.prepared_builder`, `streaming`). tfds reads it from its files
(`tfds.builder(name, data_dir=...)` finds no builder code of that name), so reading needs
nothing from this module.

Images depend on their class, so a classifier can learn them: each class has its own shape
(disc, square, triangle, ring, cross, diamond), shape colour, background colour and background
stripes (angle and period); each image draws the shape's position, size and brightness and the
stripes' phase, and adds Gaussian pixel noise. Labels cycle through the classes (every class
has the same number of examples, +-1), and tfds stores the examples in its own shuffled
order. Everything is a pure function of (seed, split, example index), so two builds with the
same arguments hold the same images.

A data dir that already holds this dataset built with the same arguments is reused; one built
with other arguments is an error (build into another data dir). TensorFlow and
tensorflow_datasets are imported when `build` is called, not by importing this module.
"""
from __future__ import annotations

import colorsys
import concurrent.futures
import contextlib
import dataclasses
import io
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Callable, Optional

import numpy as np

from datafree_jax import datasets
from datafree_jax import tfds_pipeline
from datafree_jax.errors import DatasetBuildError

NAME = datasets.SYNTHETIC_IMAGENET
VERSION = "1.0.0"
SPLITS = ("train", "validation")
SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond")
STRIPE_ANGLES = 8
STRIPE_PERIODS = (12.0, 20.0, 30.0, 44.0)
_GOLDEN = 0.6180339887498949  # hue steps that keep consecutive classes' colours apart
_CHUNK = 64                   # images made at a time by the worker threads


@dataclasses.dataclass(frozen=True)
class Settings:
  """What a build writes; recorded in the dataset's metadata (metadata.json)."""
  classes: int = datasets.DATASETS[NAME]["num_classes"]
  train_examples: int = 4000
  validation_examples: int = 1000
  min_side: int = 200
  max_side: int = 500
  noise: float = 24.0     # std of the pixel noise, in 0..255 units
  quality: int = 90       # JPEG quality
  seed: int = 0

  def examples(self, split: str) -> int:
    return self.train_examples if split == "train" else self.validation_examples

  def check(self, name: str = NAME):
    """Raises DatasetBuildError (one line) for settings that cannot be built or used."""
    def positive(field, value):
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise DatasetBuildError(f"{field} must be a positive integer, got {value!r}")
    for field in ("classes", "train_examples", "validation_examples", "min_side", "max_side"):
      positive(field, getattr(self, field))
    if self.min_side > self.max_side:
      raise DatasetBuildError(f"min_side ({self.min_side}) is larger than max_side "
                              f"({self.max_side})")
    if self.max_side > 4096:
      raise DatasetBuildError(f"max_side must be at most 4096, got {self.max_side}")
    if not 1 <= self.quality <= 100:
      raise DatasetBuildError(f"quality must be in 1..100, got {self.quality}")
    if not 0.0 <= self.noise <= 255.0:
      raise DatasetBuildError(f"noise must be in 0..255, got {self.noise}")
    if not name or not name.replace("_", "").isalnum() or not name[0].isalpha() or (
        name != name.lower()):
      raise DatasetBuildError(f"name must be a tfds name (lower case letters, digits and _, "
                              f"starting with a letter), got {name!r}")
    known = datasets.DATASETS.get(name)
    if known is not None and name not in datasets.STREAMED:
      raise DatasetBuildError(f"name {name!r} is a dataset held in memory; choose another name")
    if known is not None and known["num_classes"] != self.classes:
      raise DatasetBuildError(
          f"dataset {name!r} is registered with {known['num_classes']} classes "
          f"(datafree_jax/datasets.py), not {self.classes}: build {self.classes} classes under "
          f"another name (--name=...) and register that name with "
          f"datasets.register_streamed_dataset(name, image_size=..., "
          f"num_classes={self.classes})")

  def metadata(self) -> dict:
    return {k: (float(v) if isinstance(v, float) else int(v))
            for k, v in dataclasses.asdict(self).items()}


# The images.

def class_style(label: int):
  """(shape colour RGB 0..255, background colour RGB 0..255, shape index, stripe angle in
  radians, stripe period in px) of class `label`."""
  shape_rgb = colorsys.hsv_to_rgb((label * _GOLDEN) % 1.0, 0.85, 0.95)
  back_rgb = colorsys.hsv_to_rgb((label * _GOLDEN + 0.5) % 1.0, 0.35, 0.55)
  rest = label // len(SHAPES)
  angle = np.pi * (rest % STRIPE_ANGLES) / STRIPE_ANGLES
  period = STRIPE_PERIODS[(rest // STRIPE_ANGLES) % len(STRIPE_PERIODS)]
  return (np.asarray(shape_rgb, np.float32) * 255.0, np.asarray(back_rgb, np.float32) * 255.0,
          label % len(SHAPES), angle, period)


def _shape_mask(shape: int, y, x, cy: float, cx: float, r: float):
  dy, dx = np.abs(y - cy), np.abs(x - cx)
  name = SHAPES[shape]
  if name == "disc":
    return dy * dy + dx * dx <= r * r
  if name == "square":
    return (dy <= 0.85 * r) & (dx <= 0.85 * r)
  if name == "triangle":
    return (y - cy <= 0.8 * r) & (2.0 * dx <= y - cy + r)
  if name == "ring":
    d = dy * dy + dx * dx
    return (d <= r * r) & (d >= (0.55 * r) ** 2)
  if name == "cross":
    return ((dy <= 0.3 * r) & (dx <= r)) | ((dx <= 0.3 * r) & (dy <= r))
  return dy + dx <= r  # diamond


def noise_bank(settings: Settings) -> np.ndarray:
  """Standard normal float32 noise, (max_side + 64)^2 x 3, that images take windows of."""
  side = settings.max_side + 64
  rng = np.random.default_rng([settings.seed, 2**20])
  return rng.standard_normal((side, side, 3), dtype=np.float32)


def draw_image(settings: Settings, split_index: int, index: int, label: int,
               bank: np.ndarray) -> np.ndarray:
  """Image `index` of split SPLITS[split_index], of class `label`: uint8 (H, W, 3)."""
  rng = np.random.default_rng([settings.seed, split_index, index])
  h, w = (int(s) for s in rng.integers(settings.min_side, settings.max_side + 1, 2))
  shape_rgb, back_rgb, shape, angle, period = class_style(label)
  y = np.arange(h, dtype=np.float32)[:, None]
  x = np.arange(w, dtype=np.float32)[None, :]
  phase = rng.uniform(0.0, 2.0 * np.pi)
  stripes = 0.75 + 0.25 * np.sin((x * np.float32(np.cos(angle)) + y * np.float32(np.sin(angle)))
                                 * np.float32(2.0 * np.pi / period) + np.float32(phase))
  r = rng.uniform(0.2, 0.4) * min(h, w)
  cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
  mask = _shape_mask(shape, y, x, cy, cx, r)
  image = np.where(mask[..., None], shape_rgb * np.float32(rng.uniform(0.8, 1.0)),
                   stripes[..., None] * back_rgb)
  oy, ox = (int(o) for o in rng.integers(0, bank.shape[0] - settings.max_side + 1, 2))
  image += bank[oy:oy + h, ox:ox + w] * np.float32(settings.noise)
  return np.clip(image, 0.0, 255.0).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = io.BytesIO()
  Image.fromarray(image).save(out, format="JPEG", quality=quality)
  return out.getvalue()


def label_of(index: int, settings: Settings) -> int:
  return index % settings.classes


def _examples(settings: Settings, split: str, progress: Callable[[str, int], None]):
  """(key, example) of `split`, made by worker threads (numpy and PIL release the GIL)."""
  split_index = SPLITS.index(split)
  bank = noise_bank(settings)
  n = settings.examples(split)

  def make(i):
    label = label_of(i, settings)
    image = draw_image(settings, split_index, i, label, bank)
    return i, {"image": encode_jpeg(image, settings.quality), "label": label}

  workers = max(1, min(os.cpu_count() or 1, 8))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for start in range(0, n, _CHUNK):
      for key, example in pool.map(make, range(start, min(n, start + _CHUNK))):
        yield key, example
      progress(split, min(n, start + _CHUNK))


def _builder_class(name: str, settings: Settings, progress):
  """A GeneratorBasedBuilder of `name` writing `settings` (not registered with tfds: reading
  finds the dataset by its files)."""
  tfds = tfds_pipeline.import_tfds()
  version = VERSION

  class SyntheticImagenet(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """ImageNet-shaped synthetic JPEGs (datafree_jax.synthetic_imagenet)."""
    VERSION = tfds.core.Version(version)
    # No source files of its own (no URL checksums to look up next to them); tfds' lookup of
    # a package's files needs importlib_resources, which tfds does not require.
    code_path = None

    def _info(self):
      return self.dataset_info_from_configs(
          description=(
              "ImageNet-shaped synthetic JPEGs built by datafree_jax (python -m "
              "datafree_jax.main make-jpeg-dataset): per class a shape, colours and "
              "background stripes; per image its position, size, brightness and noise."),
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
              "label": tfds.features.ClassLabel(num_classes=settings.classes),
          }),
          supervised_keys=("image", "label"),
          metadata=tfds.core.MetadataDict(settings.metadata()),
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing is downloaded.
      return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
      return _examples(settings, split, progress)

  SyntheticImagenet.name = name
  return SyntheticImagenet


def dataset_dir(data_dir: Optional[str] = None, name: str = NAME) -> str:
  """Where `build` writes: <data_dir>/<name>/<VERSION>."""
  return os.path.join(tfds_pipeline.resolve_data_dir(data_dir), name, VERSION)


def built_settings(data_dir: Optional[str] = None, name: str = NAME) -> Optional[dict]:
  """The settings (metadata) of a finished build of `name` in data_dir, or None."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(dataset_dir(data_dir, name))
  if not ((path / "dataset_info.json").exists() and (path / "features.json").exists()):
    return None
  meta = path / "metadata.json"
  return json.loads(meta.read_text()) if meta.exists() else {}


def build(data_dir: Optional[str] = None, settings: Settings = Settings(), *,
          name: str = NAME, printer: Optional[Callable[[str], None]] = None) -> str:
  """Writes the dataset `name` with `settings` into data_dir (reusing an identical build).

  Args:
    data_dir: the tfds data dir (local or gs://...); None: $TFDS_DATA_DIR or
      ~/tensorflow_datasets.
    settings: classes, examples per split, image sides, noise, JPEG quality, seed.
    name: the tfds name; other than NAME (1000 classes), register it for config.dataset with
      datasets.register_streamed_dataset(name, image_size=..., num_classes=settings.classes).
    printer: receives progress lines (None: silent).

  Returns:
    The dataset's directory, <data_dir>/<name>/<VERSION>.

  Raises:
    DatasetBuildError: bad settings, or data_dir holds `name` built with other settings.
  """
  settings.check(name)
  stdout = sys.stdout

  def say(line):
    if printer is not None:
      with contextlib.redirect_stdout(stdout):  # (tfds' own lines are muted below)
        printer(line)
  resolved = tfds_pipeline.resolve_data_dir(data_dir)
  target = dataset_dir(resolved, name)
  existing = built_settings(resolved, name)
  if existing is not None:
    if existing == settings.metadata():
      say(f"{name}: already built with these settings in {target}")
      return target
    raise DatasetBuildError(
        f"{target} already holds {name} built with other settings ({existing}); remove it "
        f"or build into another --data_dir")
  total = settings.train_examples + settings.validation_examples
  start = time.perf_counter()
  last = {"t": 0.0}

  def progress(split, done):
    now = time.perf_counter() - start
    n = settings.examples(split)
    if done == n or now - last["t"] >= 10.0:
      last["t"] = now
      say(f"{name}: {split} {done:,}/{n:,} images ({now:.0f} s)")

  say(f"{name}: writing {total:,} JPEGs ({settings.classes} classes, sides "
      f"{settings.min_side}..{settings.max_side} px) to {target}")
  tfds = tfds_pipeline.import_tfds()
  builder = _builder_class(name, settings, progress)(data_dir=resolved)
  downloads = tempfile.mkdtemp(prefix="synthetic_imagenet_downloads_")
  try:
    # tfds prints "Downloading and preparing dataset ..." (nothing is downloaded): muted.
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(
          download_dir=downloads,
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  finally:
    shutil.rmtree(downloads, ignore_errors=True)
  size = sum(builder.info.splits[s].num_bytes for s in SPLITS)
  say(f"{name}: done in {time.perf_counter() - start:.0f} s: {total:,} images, "
      f"{size / 2**20:,.0f} MiB in {target}")
  return target
