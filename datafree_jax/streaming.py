"""Streamed tfds image classification (ImageNet and the like): batches read as they are needed.

The datasets of input_pipeline fit in host memory; ImageNet does not. This module reads a
prepared tfds image-classification dataset ('image' and 'label' features, e.g. imagenet2012)
with tf.data and hands out host-local numpy batches, for three uses:

  - `train_batches`: the teacher's training batches, augmented (random-resized crop and
    horizontal flip), addressed by step: `batches(step)`;
  - `eval_batches`: the evaluation split, centre-cropped, in fixed-shape masked batches;
  - `class_batches`: the training split, centre-cropped, until every class was seen
    `per_class` times (the teacher's class-conditional BatchNorm statistics).

Every process reads only its own shard of a split (`tfds.even_splits(split, process_count)`,
the same shards as `tfds.split_for_jax_process`: contiguous, sizes differing by at most one),
and every batch is this process's share of a global batch. Nothing assumes one process or a
local file system (data_dir may be gs://...). The caller puts a batch onto the devices with

    mesh = parallel.make_mesh("data")
    local_batch = parallel.check_global_batch(global_batch)  # global_batch // process_count
    batches = streaming.train_batches(name, info, local_batch, seed)
    images, labels = parallel.global_batch(batches(step), mesh)

which is `jax.make_array_from_process_local_data` per array: the global batch, split over the
devices of the mesh, each process contributing the rows of its own devices
(`parallel.PrefetchedBatches(batches, mesh)` does the same a few steps ahead).

Training batches hold uint8 pixels (a quarter of float32's bytes on the way to the devices);
the training step normalises them on the device (`input_pipeline.normalize_images`, a no-op
for the float32 batches of in-memory datasets). Evaluation and class-statistics batches are
normalised float32, as in-memory datasets' are.

The training pipeline is one tf.data pipeline per run, not one per epoch: an endless range of
epochs, each read in a tf.data function of its epoch number (file order and shuffle seeded
with (seed, epoch)); decoding, batching and prefetching run on across epochs. A run that
starts at step s (a resumed run) starts the pipeline at s's epoch and skips the epoch's
records before s undecoded: it decodes no image before s (reading, not decoding, up to one
epoch of this process's shard); `StreamBatches.decode_stats()` counts the decodes.

Image bytes are read undecoded (`tfds.decode.SkipDecoding`) and decoded only after the
records a batch does not use were skipped or dropped; JPEG images are decoded only inside
their crop window (`tf.image.decode_and_crop_jpeg`).

Nothing here downloads: a dataset that is not prepared raises tfds_pipeline's
DatasetNotPreparedError in about a second. TensorFlow and tensorflow_datasets are imported
when a function here is first called, never by importing this module.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import weakref
from typing import Iterator, Optional

import numpy as np

from datafree_jax import batching
from datafree_jax import tfds_pipeline
from datafree_jax.datasets import DatasetInfo

IMAGE_KEY = tfds_pipeline.IMAGE_KEY
LABEL_KEY = tfds_pipeline.LABEL_KEY

# The evaluation split of datasets whose 'test' split is not it (imagenet2012's test split has
# no labels: every label is -1). Other datasets: 'test' if they have one, else 'validation'.
EVAL_SPLITS = {"imagenet2012": "validation"}

# Training crops, as in the big_vision and flax ImageNet examples ("Inception crop").
CROP_AREA = (0.08, 1.0)
CROP_ASPECT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_MIN_OBJECT_COVERED = 0.1
CROP_MAX_ATTEMPTS = 10
# Evaluation: the shorter side resized to S * 256 / 224, then the centre S x S.
EVAL_RESIZE_RATIO = 256.0 / 224.0

SHUFFLE_BUFFER = 10_000  # undecoded examples (ImageNet: ~110 kB each, ~1 GB)
HOST_PREFETCH = 2        # batches a background thread keeps ready

# Tags of the seeds derived from the training seed (_derived_seed, then _epoch_seed).
_FILE_ORDER, _EXAMPLE_ORDER, _CROP, _FLIP = range(4)


def eval_resize_size(image_size: int) -> int:
  """The shorter side the evaluation resizes images to before the centre crop (224 -> 256)."""
  return int(round(image_size * EVAL_RESIZE_RATIO))


def _derived_seed(tag: int, seed: int, *words: int) -> int:
  """A 31-bit seed that is a pure function of (tag, seed, *words)."""
  entropy = [tag, seed % 2**64] + [w % 2**64 for w in words]
  return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0] >> 1)


def _process():
  """(this process's index, the number of processes)."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index(), jax.process_count()


def _builder(name: str, data_dir: Optional[str], info: Optional[DatasetInfo] = None):
  """The prepared builder of `name`, checked to be image classification (and to match info)."""
  builder = tfds_pipeline.prepared_builder(name, data_dir)
  features = builder.info.features
  if IMAGE_KEY not in features or LABEL_KEY not in features:
    raise ValueError(f"{name}: streaming reads tfds image-classification datasets with "
                     f"{IMAGE_KEY!r} and {LABEL_KEY!r} features; this one has "
                     f"{sorted(features.keys())}")
  num_classes = getattr(features[LABEL_KEY], "num_classes", None)
  if info is not None and num_classes is not None and num_classes != info.num_classes:
    raise ValueError(f"{name} has {num_classes} classes, but its DatasetInfo says "
                     f"{info.num_classes}")
  return builder


def _split_size(builder, split) -> int:
  try:
    return builder.info.splits[split].num_examples
  except (KeyError, ValueError) as e:
    raise ValueError(f"{builder.name}: cannot read split {split!r}: {e}") from e


def _process_shards(builder, split: str):
  """(this process's shard of `split`, the number of examples in every process's shard)."""
  tfds = tfds_pipeline.import_tfds()
  _split_size(builder, split)  # A clear error for an unknown split.
  index, count = _process()
  shards = tfds.even_splits(split, n=count)
  return shards[index], [_split_size(builder, s) for s in shards]


def num_examples(name: str, split: str, data_dir: Optional[str] = None) -> int:
  """The number of examples in `split` (all processes together), from the dataset's metadata."""
  return _split_size(_builder(name, data_dir), split)


def eval_split(name: str, data_dir: Optional[str] = None) -> str:
  """The split eval_batches reads by default: EVAL_SPLITS[name], else 'test', else
  'validation' (whichever the prepared dataset has)."""
  return _eval_split(_builder(name, data_dir))


def _eval_split(builder) -> str:
  splits = list(builder.info.splits.keys())
  for split in (EVAL_SPLITS.get(builder.name), "test", "validation"):
    if split is not None and split in splits:
      return split
  raise ValueError(f"{builder.name}: no evaluation split among {splits}; pass split=")


def _read(builder, split, *, shuffle_seed: Optional[int] = None):
  """This process's records of `split` as a tf.data.Dataset of (image bytes, label).

  In stored order (shuffle_seed None), or with the order of the files shuffled by shuffle_seed.
  """
  tf = tfds_pipeline.import_tf()
  tfds = tfds_pipeline.import_tfds()
  options = tf.data.Options()
  options.deterministic = True
  ds = builder.as_dataset(
      split=split,
      shuffle_files=shuffle_seed is not None,
      decoders={IMAGE_KEY: tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False,
                                  options=options),
  )
  return ds.map(lambda ex: (ex[IMAGE_KEY], ex[LABEL_KEY]))


# Preprocessing (TensorFlow, traced inside tf.data functions).

def _normalize(tf, image, info: DatasetInfo):
  """float image in [0, 255] -> (image / 255 - mean) / std, float32."""
  mean = tf.constant(info.mean, tf.float32)
  std = tf.constant(info.std, tf.float32)
  return (tf.cast(image, tf.float32) / 255.0 - mean) / std


def _centre_window(tf, height, width, image_size: int):
  """[y, x, h, w] of the centred square that evaluation keeps: side min(h, w) * S / R."""
  ratio = image_size / eval_resize_size(image_size)
  side = tf.cast(tf.round(tf.cast(tf.minimum(height, width), tf.float32) * ratio), tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def _random_window(tf, height, width, seed, image_size: int):
  """[y, x, h, w] of a random crop of area CROP_AREA and aspect ratio CROP_ASPECT_RATIO.

  As in the flax ImageNet example: when no such crop was found in CROP_MAX_ATTEMPTS draws
  (the whole image came back), the centre crop instead.
  """
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.stack([height, width, 1]),
      bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]], tf.float32),
      seed=seed,
      min_object_covered=CROP_MIN_OBJECT_COVERED,
      aspect_ratio_range=CROP_ASPECT_RATIO,
      area_range=CROP_AREA,
      max_attempts=CROP_MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  whole = tf.logical_and(tf.equal(size[0], height), tf.equal(size[1], width))
  return tf.where(whole, _centre_window(tf, height, width, image_size), window)


def _decode_window(tf, data, window_fn, channels: int):
  """The encoded image `data` decoded inside window_fn(height, width) = [y, x, h, w].

  JPEG is decoded only inside the window; other formats (PNG, ...) whole, then cropped.
  """
  def jpeg():
    shape = tf.image.extract_jpeg_shape(data)
    return tf.image.decode_and_crop_jpeg(data, window_fn(shape[0], shape[1]),
                                         channels=channels)

  def other():
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    shape = tf.shape(image)
    window = window_fn(shape[0], shape[1])
    return image[window[0]:window[0] + window[2], window[1]:window[1] + window[3]]

  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def _train_example_fn(tf, info: DatasetInfo, crop_seed: int, flip_seed: int, counter=None):
  """(example index, image bytes, label) -> (uint8 S x S image, int32 label), augmented.

  The crop and the flip use stateless random ops seeded with (crop_seed or flip_seed, example
  index): an example's augmentation is a function of the seeds and its index alone. The
  resized image is rounded to uint8 (the step normalises it on the device). `counter`, when
  given, is a _DecodeCounter that every call records.
  """
  size, channels = info.image_size, info.channels

  def fn(index, data, label):
    index = tf.cast(index, tf.int64)
    crop = tf.stack([tf.constant(crop_seed, tf.int64), index])
    flip = tf.stack([tf.constant(flip_seed, tf.int64), index])
    dependencies = [] if counter is None else counter.record(tf, index)
    with tf.control_dependencies(dependencies):
      data = tf.identity(data)
    image = _decode_window(
        tf, data, lambda h, w: _random_window(tf, h, w, crop, size), channels)
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    image = tf.image.stateless_random_flip_left_right(image, flip)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    return tf.ensure_shape(image, (size, size, channels)), tf.cast(label, tf.int32)

  return fn


def _eval_example_fn(tf, info: DatasetInfo):
  """(image bytes, label) -> (normalised S x S image, int32 label): the shorter side resized
  to eval_resize_size(S), then the centre S x S."""
  size, channels = info.image_size, info.channels
  resize = eval_resize_size(size)

  def fn(data, label):
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = resize / tf.reduce_min(shape)
    new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), resize)
    image = tf.image.resize(image, new, method="bilinear", antialias=True)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    image = image[top:top + size, left:left + size]
    image = tf.ensure_shape(_normalize(tf, image, info), (size, size, channels))
    return image, tf.cast(label, tf.int32)

  return fn


# Training batches.

class _HostPrefetch:
  """Runs an iterator in a daemon thread, keeping up to `size` items ready in a queue.

  The thread holds no reference to the owner, so dropping the owner (or close()) stops it.
  """

  def __init__(self, iterator, size: int):
    self._queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._work, args=(iterator, self._queue, self._stop),
                                    daemon=True, name="streaming-host-prefetch")
    self._thread.start()
    self._finalizer = weakref.finalize(self, self._halt, self._stop, self._queue, self._thread)

  @staticmethod
  def _work(iterator, q, stop):
    def put(item):
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          return True
        except queue.Full:
          pass
      return False
    try:
      for item in iterator:
        if not put((True, item)):
          return
      put((False, StopIteration()))
    except BaseException as e:  # pylint: disable=broad-except
      put((False, e))

  @staticmethod
  def _halt(stop, q, thread):
    stop.set()
    try:
      while True:
        q.get_nowait()
    except queue.Empty:
      pass
    thread.join(timeout=1.0)  # (it ends by itself once its current item is made)

  def __next__(self):
    while True:
      try:
        ok, item = self._queue.get(timeout=1.0)
        break
      except queue.Empty:
        if not self._thread.is_alive():
          raise RuntimeError("the host prefetch thread ended without a result") from None
    if not ok:
      raise item
    return item

  def close(self):
    self._finalizer()


class _DecodeCounter:
  """Diagnostics of a training pipeline: how many examples its decode function was called on,
  and the lowest example index among them (tf.Variables the function updates)."""

  def __init__(self, tf):
    self._count = tf.Variable(0, dtype=tf.int64, trainable=False)
    self._lowest = tf.Variable([_NO_INDEX], dtype=tf.int64, trainable=False)

  def record(self, tf, index):
    """The ops (inside a tf.data function) that count one decode of example `index`."""
    return [self._count.assign_add(1),
            self._lowest.scatter_min(tf.IndexedSlices(tf.reshape(index, [1]),
                                                      tf.constant([0])))]

  def read(self) -> dict:
    lowest = int(self._lowest.numpy()[0])
    return {"decoded": int(self._count.numpy()),
            "lowest_index": None if lowest == _NO_INDEX else lowest}


_NO_INDEX = 2**62  # _DecodeCounter's lowest index before any decode
_ENDLESS = 2**62   # epochs of the training dataset: no end


def _epoch_seed(tf, base: int, epoch):
  """A 31-bit seed that is a pure function of (base, epoch), epoch an int64 tensor (inside a
  tf.data function)."""
  return tf.random.stateless_uniform([], seed=tf.stack([tf.constant(base, tf.int64), epoch]),
                                     minval=0, maxval=2**31 - 1, dtype=tf.int64)


class StreamBatches:
  """Training batches of a streamed dataset, addressed by step: `batches(step)`.

  `batches(step)` is (images uint8 (local_batch, S, S, C), labels int32 (local_batch,)): this
  process's share of the global batch of `step`. The images are the pixels (0-255) of the
  augmented crop; the training step normalises them on the device
  (input_pipeline.normalize_images, with info.mean/std).

  Epochs: each process's shard is read in an order that is a function of (seed, epoch) (the
  files in a seeded order, then a seeded shuffle buffer of SHUFFLE_BUFFER examples), of which
  the first steps_per_epoch * local_batch examples make the epoch's batches. steps_per_epoch
  is the smallest shard's size // local_batch, the same on every process; the examples left
  over (at most local_batch - 1, plus a shard's one extra) differ from epoch to epoch.
  Augmentation (random-resized crop, flip) uses stateless random ops seeded with (seed,
  process, the example's index in this process's stream: epoch * examples_per_epoch +
  position). So the batch of a step is a pure function of (seed, step, local_batch, process
  index and count, data), whatever was asked before.

  One tf.data pipeline serves every epoch: its epochs are elements of an endless range, each
  read, shuffled and cut in a tf.data function of its epoch number (flat_map), so decoding,
  batching and prefetching run on across epochs; only the shuffle buffer fills anew at an
  epoch's start. Asking for the step
  after the last one reads on; any other step (a resumed run, a rewind) starts a new pipeline
  at that step's epoch, skipping the records of the epoch before the step undecoded: no image
  before the step is decoded (decode_stats() counts the decodes). With host_prefetch > 0 a
  background thread keeps that many batches ready; close() stops it (as does dropping the
  object).
  """

  def __init__(self, name: str, info: DatasetInfo, local_batch: int, seed: int,
               data_dir: Optional[str] = None, split: str = "train", *,
               shuffle_buffer: int = SHUFFLE_BUFFER, host_prefetch: Optional[int] = None,
               threads: Optional[int] = None):
    if local_batch <= 0:
      raise ValueError(f"local batch size must be positive, got {local_batch}")
    if threads is not None and threads <= 0:
      raise ValueError(f"threads must be positive (or None: tf.data's default), got {threads}")
    self.name, self.info, self.local_batch, self.seed = name, info, int(local_batch), int(seed)
    if host_prefetch is None:
      host_prefetch = HOST_PREFETCH
    self.split, self.shuffle_buffer, self.host_prefetch = split, shuffle_buffer, host_prefetch
    self.threads = threads
    self._builder = _builder(name, data_dir, info)
    self._shard, sizes = _process_shards(self._builder, split)
    self.process_index, self.process_count = _process()
    self.num_local_examples = sizes[self.process_index]
    self.steps_per_epoch = min(sizes) // self.local_batch
    if self.steps_per_epoch == 0:
      raise ValueError(
          f"{name} {split}: the smallest process shard has {min(sizes)} examples, fewer than "
          f"one local batch of {local_batch}")
    self._source = None
    self._next_step = None
    self._counter = None

  @property
  def examples_per_epoch(self) -> int:
    """Examples of this process's shard used per epoch."""
    return self.steps_per_epoch * self.local_batch

  def decode_stats(self) -> dict:
    """Diagnostics: {'decoded': images decoded by this object's pipelines so far,
    'lowest_index': the lowest example index (step * local_batch + row) among them, None
    before any}. Decoding runs ahead of the batches asked for (tf.data's and the host
    prefetch's buffers)."""
    if self._counter is None:
      return {"decoded": 0, "lowest_index": None}
    return self._counter.read()

  def dataset(self, step: int):
    """The tf.data pipeline of batches step, step + 1, ... (endless)."""
    tf = tfds_pipeline.import_tf()
    if self._counter is None:
      self._counter = _DecodeCounter(tf)
    first_epoch, index = divmod(int(step), self.steps_per_epoch)
    per_epoch = self.examples_per_epoch
    start = index * self.local_batch
    file_seed = _derived_seed(_FILE_ORDER, self.seed)
    example_seed = _derived_seed(_EXAMPLE_ORDER, self.seed)
    shuffle = min(self.shuffle_buffer, self.num_local_examples)

    @tf.autograph.experimental.do_not_convert
    def epoch_records(epoch):
      """(example index, image bytes, label) of `epoch`, from `start` in the first one."""
      # The shuffles' seeds are tensors (of the epoch). Under a TensorFlow global seed that a
      # caller set, TF would pair it with them (failing in tfds' file shuffle, changing the
      # order elsewhere): the traced function's graph is given none, so the order is a
      # function of this pipeline's seed alone.
      tf.compat.v1.get_default_graph().seed = None
      ds = _read(self._builder, self._shard, shuffle_seed=_epoch_seed(tf, file_seed, epoch))
      if shuffle > 1:
        ds = ds.shuffle(shuffle, seed=_epoch_seed(tf, example_seed, epoch),
                        reshuffle_each_iteration=False)
      ds = ds.take(per_epoch).apply(tf.data.experimental.assert_cardinality(per_epoch))
      ds = tf.data.Dataset.zip(tf.data.Dataset.range(per_epoch), ds)
      # Records before the step are skipped here, undecoded.
      ds = ds.skip(tf.where(tf.equal(epoch, first_epoch), tf.constant(start, tf.int64), 0))
      return ds.map(lambda position, ex: (epoch * per_epoch + position, ex[0], ex[1]))

    # One epoch open at a time (a parallel interleave of epochs would open several ahead,
    # each with a shuffle buffer of its own).
    ds = tf.data.Dataset.range(first_epoch, _ENDLESS).flat_map(epoch_records)
    fn = _train_example_fn(tf, self.info, _derived_seed(_CROP, self.seed, self.process_index),
                           _derived_seed(_FLIP, self.seed, self.process_index), self._counter)
    ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(self.local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    if self.threads is not None:
      options.threading.private_threadpool_size = self.threads
    return ds.with_options(options)

  def _batches(self, ds) -> Iterator:
    """The numpy batches of `ds`; a shard shorter than its metadata says is an error."""
    tf = tfds_pipeline.import_tf()
    try:
      yield from ds.as_numpy_iterator()
    except tf.errors.FailedPreconditionError as e:
      raise RuntimeError(
          f"{self.name} {self.split}: an epoch gave fewer than {self.examples_per_epoch} "
          f"examples: the shard has fewer examples than its metadata says "
          f"({self.num_local_examples}): {str(e).splitlines()[0]}") from e
    raise RuntimeError(f"{self.name} {self.split}: the training stream ended")

  def _restart(self, step: int):
    self.close()
    source = self._batches(self.dataset(step))  # built here: tfds is called in this thread
    self._source = _HostPrefetch(source, self.host_prefetch) if self.host_prefetch > 0 else source
    self._next_step = step

  def __call__(self, step: int):
    step = int(step)
    if step < 0:
      raise ValueError(f"step must be non-negative, got {step}")
    if self._source is None or step != self._next_step:
      self._restart(step)
    try:
      batch = next(self._source)
    except BaseException:
      self.close()
      raise
    self._next_step = step + 1
    return batch

  def close(self):
    """Stops the host prefetch thread, if any; a later call starts afresh."""
    if isinstance(self._source, _HostPrefetch):
      self._source.close()
    self._source, self._next_step = None, None


def train_batches(name: str, info: DatasetInfo, local_batch: int, seed: int,
                  data_dir: Optional[str] = None, split: str = "train", *,
                  shuffle_buffer: int = SHUFFLE_BUFFER,
                  host_prefetch: Optional[int] = None,
                  threads: Optional[int] = None) -> StreamBatches:
  """Augmented training batches of this process's shard of `split`, by step (StreamBatches).

  Args:
    name: a tfds image-classification dataset with 'image' and 'label' features.
    info: the dataset's constants (image_size S, channels, num_classes, mean, std).
    local_batch: this process's share of the global batch (global // process_count).
    seed: the data seed: epoch orders and augmentation are functions of it.
    data_dir: where the dataset is prepared (may be remote); None: $TFDS_DATA_DIR or
      ~/tensorflow_datasets.
    split: the split to train on.
    shuffle_buffer: examples (undecoded) in the shuffle buffer; <= 1: no shuffle buffer (the
      files are still read in a seeded order).
    host_prefetch: batches a background thread keeps ready (0: none; None: HOST_PREFETCH).
    threads: the size of the pipeline's own tf.data thread pool (decoding, reading); None:
      tf.data's default (a pool shared by the process's pipelines, one thread per core).

  Returns:
    A StreamBatches: `batches(step) -> (uint8 images, int32 labels)`.

  Raises:
    DatasetNotPreparedError: the dataset is not prepared in the data dir.
  """
  return StreamBatches(name, info, local_batch, seed, data_dir, split,
                       shuffle_buffer=shuffle_buffer, host_prefetch=host_prefetch,
                       threads=threads)


# Evaluation and class-statistics batches: (images, labels, mask) of fixed shape.

@dataclasses.dataclass
class MaskedBatches:
  """An iterator of (images, labels, mask) batches; num_batches of them (None: not known)."""
  iterator: Iterator
  num_batches: Optional[int] = None

  def __iter__(self):
    return self

  def __next__(self):
    return next(self.iterator)


def eval_batches(name: str, info: DatasetInfo, local_batch: int, data_dir: Optional[str] = None,
                 split: Optional[str] = None) -> MaskedBatches:
  """This process's shard of the evaluation split, preprocessed for evaluation.

  Yields (images float32 (local_batch, S, S, C), labels int32 (local_batch,), mask float32
  (local_batch,)): the shard in stored order, the last batch padded with mask 0, then batches
  of mask 0 only, so that every process yields the same number of batches (the most any
  process needs, computed from the split's metadata: no communication). Each example is
  preprocessed by resizing its shorter side to eval_resize_size(S) and taking the centre
  S x S.

  Args:
    name: a tfds image-classification dataset with 'image' and 'label' features.
    info: the dataset's constants (image_size S, channels, num_classes, mean, std).
    local_batch: this process's share of the global batch.
    data_dir: where the dataset is prepared; None: $TFDS_DATA_DIR or ~/tensorflow_datasets.
    split: None: eval_split(name) ('validation' for imagenet2012, else 'test' if there is one).

  Returns:
    A MaskedBatches iterator; its num_batches is the same on every process.

  Raises:
    DatasetNotPreparedError: the dataset is not prepared in the data dir.
  """
  if local_batch <= 0:
    raise ValueError(f"local batch size must be positive, got {local_batch}")
  builder = _builder(name, data_dir, info)
  split = split or _eval_split(builder)
  shard, sizes = _process_shards(builder, split)
  num_batches = max(-(-size // local_batch) for size in sizes)
  tf = tfds_pipeline.import_tf()
  ds = _read(builder, shard).map(_eval_example_fn(tf, info), num_parallel_calls=tf.data.AUTOTUNE,
                                 deterministic=True)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)

  def batches():
    count = 0
    for images, labels in ds.as_numpy_iterator():
      if count == num_batches:
        raise RuntimeError(f"{name} {split}: the shard has more examples than its metadata "
                           f"says ({sizes[_process()[0]]})")
      count += 1
      yield batching.pad_batch(images, labels, local_batch)
    empty = batching.pad_batch(np.zeros((0,) + info.image_shape, np.float32),
                               np.zeros((0,), np.int32), local_batch)
    for _ in range(count, num_batches):
      yield empty

  return MaskedBatches(batches(), num_batches)


def _any_process(flag: bool) -> bool:
  """Whether `flag` is true on any process (every process must call this at the same time)."""
  _, count = _process()
  if count == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def class_batches(name: str, info: DatasetInfo, local_batch: int, per_class: int,
                  data_dir: Optional[str] = None, split: str = "train") -> MaskedBatches:
  """Up to `per_class` examples of each class from this process's shard, eval-preprocessed.

  For the teacher's class-conditional BatchNorm statistics. The shard is read in stored
  order, labels first: an example whose class already has `per_class` examples is dropped
  before its image is decoded, and reading stops once every class has `per_class` (or at the
  end of the shard). Yields (images, labels, mask) as eval_batches does; every example with
  mask 1 counts towards its class, so per class the mask sums to min(per_class, the count of
  that class in the shard). No per-class arrays of images are kept.

  With several processes, each batch is preceded by a check (an all-gather of one flag)
  whether any process has examples left: a process whose shard is done yields batches of mask
  0 until all are, so every process yields the same number of batches. Every process must
  therefore draw batches in lockstep (as a global computation on them does anyway).

  Args:
    name, info, local_batch, data_dir: as for eval_batches.
    per_class: examples wanted of each class.
    split: the split to read (stored order, no augmentation).

  Returns:
    A MaskedBatches iterator (num_batches None: it depends on the labels read).

  Raises:
    DatasetNotPreparedError: the dataset is not prepared in the data dir.
  """
  if local_batch <= 0 or per_class <= 0:
    raise ValueError(f"local_batch and per_class must be positive, got {local_batch}, "
                     f"{per_class}")
  builder = _builder(name, data_dir, info)
  shard, _ = _process_shards(builder, split)
  tf = tfds_pipeline.import_tf()
  num_classes = info.num_classes

  def count(counts, example):
    data, label = example
    label = tf.cast(label, tf.int32)
    valid = tf.debugging.assert_less(
        label, num_classes, message=f"{name} {split}: a label >= {num_classes}")
    non_negative = tf.debugging.assert_non_negative(
        label, message=f"{name} {split}: a negative label (an unlabelled split?)")
    with tf.control_dependencies([valid, non_negative]):
      label = tf.identity(label)
    done_before = tf.reduce_all(counts >= per_class)
    keep = counts[label] < per_class
    counts = tf.tensor_scatter_nd_add(counts, [[label]], [tf.cast(keep, tf.int64)])
    return counts, (data, label, keep, done_before)

  ds = _read(builder, shard).scan(tf.zeros([num_classes], tf.int64), count)
  ds = ds.take_while(lambda data, label, keep, done_before: tf.logical_not(done_before))
  ds = ds.filter(lambda data, label, keep, done_before: keep)
  ds = ds.map(lambda data, label, keep, done_before: (data, label))
  ds = ds.map(_eval_example_fn(tf, info), num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(local_batch).prefetch(tf.data.AUTOTUNE)

  def batches():
    it = ds.as_numpy_iterator()
    pending = next(it, None)
    empty = None
    while _any_process(pending is not None):
      if pending is None:
        if empty is None:
          empty = batching.pad_batch(np.zeros((0,) + info.image_shape, np.float32),
                                     np.zeros((0,), np.int32), local_batch)
        yield empty
        continue
      yield batching.pad_batch(*pending, local_batch)
      pending = next(it, None)

  return MaskedBatches(batches())
