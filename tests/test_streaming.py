"""Tests of the streamed input pipeline (datafree_jax.streaming), offline.

Most tests run under `tfds.testing.mock_data`, for imagenet2012 and cifar10. mock_data reads
the dataset's metadata from its own `data_dir` (it ignores the data_dir the code under test
passes); the fixture writes there each dataset's real metadata (from the installed tfds'
builder code: imagenet2012 needs no manual download for that) with every split holding
NUM_EXAMPLES examples, which is what mock_data then yields for any split. So the metadata's
example counts match the mocked examples, as they match the records of a prepared dataset.

mock_data yields the same examples for every split and ignores sub-splits, so the shards of
several processes are tested on a really prepared (tfrecord) tiny MNIST instead, built
offline with its download replaced by local files (as tests/test_tfds_pipeline.py does).
"""
import dataclasses
import json
import os
import subprocess
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import prepare_tiny_mnist, serialized_tfds_mock

from datafree_jax import config_lib
from datafree_jax import datasets
from datafree_jax import input_pipeline
from datafree_jax import pipeline
from datafree_jax import streaming
from datafree_jax import tfds_pipeline

# The slow set (conftest.py; the streamed ImageNet input pipeline): CI runs it as a step of its own.
pytestmark = pytest.mark.slow

tfds = pytest.importorskip("tensorflow_datasets")

HERE = os.path.dirname(os.path.abspath(__file__))
NUM_EXAMPLES = 40      # mocked examples of every split
SIZE = 32              # image size the tests preprocess to (imagenet2012: 224)
SPLITS = {"imagenet2012": ("train", "validation", "test"), "cifar10": ("train", "test")}


def small_info(name):
  return dataclasses.replace(datasets.dataset_info(name), image_size=SIZE)


def write_metadata(root):
  """Writes each dataset's metadata into root, with NUM_EXAMPLES examples in every split."""
  for name, splits in SPLITS.items():
    builder = tfds.builder(name, data_dir=root)
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(
            name=split, shard_lengths=[NUM_EXAMPLES], num_bytes=0,
            filename_template=tfds.core.ShardedFileTemplate(
                data_dir=builder.data_path, dataset_name=name, split=split,
                filetype_suffix="tfrecord"))
        for split in splits]))
    builder.info.write_to_directory(builder.data_path)


@pytest.fixture(scope="module")
def metadata_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("tfds_metadata"))
  write_metadata(root)
  return root


@pytest.fixture
def mocked(metadata_dir):
  with serialized_tfds_mock(), tfds.testing.mock_data(num_examples=NUM_EXAMPLES,
                                                      data_dir=metadata_dir):
    yield


def raw_labels(name, split="train"):
  """The mocked labels, in stored order, read straight from tfds (not through our code)."""
  ds = tfds.builder(name).as_dataset(split=split, shuffle_files=False)
  return np.array([ex["label"] for ex in tfds.as_numpy(ds)])


def test_import_does_not_import_tensorflow():
  code = ("import sys; import datafree_jax.streaming; "
          "assert 'tensorflow' not in sys.modules and 'tensorflow_datasets' not in sys.modules")
  subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=os.path.dirname(HERE))


def test_unprepared_dataset_fails_fast_with_clear_message(tmp_path):
  info = small_info("imagenet2012")
  data_dir = str(tmp_path)
  calls = [lambda: streaming.train_batches("imagenet2012", info, 8, 0, data_dir),
           lambda: streaming.eval_batches("imagenet2012", info, 8, data_dir),
           lambda: streaming.class_batches("imagenet2012", info, 8, 2, data_dir),
           lambda: streaming.num_examples("imagenet2012", "train", data_dir)]
  start = time.monotonic()
  for call in calls:
    with pytest.raises(tfds_pipeline.DatasetNotPreparedError,
                       match="'imagenet2012' is not prepared.*tfds build imagenet2012"):
      call()
  assert time.monotonic() - start < 60
  assert not any(tmp_path.iterdir()), "the check must not create anything in the data dir"


def test_metadata_helpers(mocked):
  assert streaming.num_examples("imagenet2012", "validation") == NUM_EXAMPLES
  # imagenet2012's test split has no labels: it evaluates on 'validation'.
  assert streaming.eval_split("imagenet2012") == "validation"
  assert streaming.eval_split("cifar10") == "test"
  assert streaming.eval_resize_size(224) == 256 and streaming.eval_resize_size(SIZE) == 37
  with pytest.raises(ValueError, match="classes"):
    streaming.train_batches("cifar10", small_info("imagenet2012"), 8, 0)
  with pytest.raises(ValueError, match="Unknown split"):
    streaming.eval_batches("cifar10", small_info("cifar10"), 8, split="validation")


@pytest.mark.parametrize("name", ["imagenet2012", "cifar10"])
def test_train_batches_shape_and_normalisation(name, mocked):
  info = small_info(name)
  batches = streaming.train_batches(name, info, 8, seed=0)
  try:
    assert batches.steps_per_epoch == NUM_EXAMPLES // 8
    epoch = [batches(step) for step in range(batches.steps_per_epoch)]
  finally:
    batches.close()
  for images, labels in epoch:
    # uint8 pixels, for the step to normalise on the device.
    assert images.shape == (8, SIZE, SIZE, 3) and images.dtype == np.uint8
    assert labels.shape == (8,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < info.num_classes
  pixels = np.concatenate([x for x, _ in epoch])
  # mock_data's pixels are uniform in 0..254: about 0.5 on average in [0, 1], spanning about
  # all of it.
  unit = pixels.astype(np.float32) / 255.0
  np.testing.assert_allclose(unit.mean(axis=(0, 1, 2)), 0.5, atol=0.1)
  assert unit.min() < 0.1 and unit.max() > 0.9
  # The step's normalisation (jitted, as in a step) is (x / 255 - mean) / std.
  mean, std = np.asarray(info.mean, np.float32), np.asarray(info.std, np.float32)
  normalised = jax.jit(lambda x: input_pipeline.normalize_images(x, info))(pixels)
  assert normalised.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(normalised), (unit - mean) / std, rtol=1e-5, atol=1e-5)
  # One epoch of 5 x 8 = every example once, in a shuffled order.
  labels = np.concatenate([y for _, y in epoch])
  stored = raw_labels(name)
  assert sorted(labels.tolist()) == sorted(stored.tolist())
  assert labels.tolist() != stored.tolist()


def test_train_batches_are_a_function_of_seed_and_step(mocked):
  info = small_info("imagenet2012")
  steps = 12  # 5 steps per epoch: three epochs
  first = streaming.train_batches("imagenet2012", info, 8, seed=0)
  same = streaming.train_batches("imagenet2012", info, 8, seed=0, host_prefetch=0, threads=1)
  other = streaming.train_batches("imagenet2012", info, 8, seed=1)
  try:
    sequential = [first(step) for step in range(steps)]
    for step in range(steps):
      images, labels = same(step)
      np.testing.assert_array_equal(images, sequential[step][0], err_msg=f"step {step}")
      np.testing.assert_array_equal(labels, sequential[step][1], err_msg=f"step {step}")
    # Resumes: a fresh object at step 5 (an epoch's start), then 7 (inside epoch 1), then 3
    # (backwards, inside epoch 0), then on from there.
    fresh = streaming.train_batches("imagenet2012", info, 8, seed=0)
    for step in (5, 7, 3, 4, 11):
      images, labels = fresh(step)
      np.testing.assert_array_equal(images, sequential[step][0], err_msg=f"step {step}")
      np.testing.assert_array_equal(labels, sequential[step][1], err_msg=f"step {step}")
    fresh.close()
    # Another seed: other epoch orders and other augmentation.
    x0, y0 = sequential[0]
    x1, y1 = other(0)
    assert not np.array_equal(y0, y1)
    assert not np.allclose(x0, x1)
  finally:
    for b in (first, same, other):
      b.close()
  # Each epoch has its own order and augmentation: no two epochs' first batches agree.
  assert not np.array_equal(sequential[0][1], sequential[5][1])
  assert not np.array_equal(sequential[5][1], sequential[10][1])
  # The same example in two epochs is cropped differently (labels in mock imagenet2012 are
  # nearly unique; compare the examples whose label is).
  stored = raw_labels("imagenet2012")
  unique = [k for k in set(stored.tolist()) if (stored == k).sum() == 1]
  epochs = [np.concatenate([x for x, _ in sequential[e * 5:(e + 1) * 5]]) for e in (0, 1)]
  order = [np.concatenate([y for _, y in sequential[e * 5:(e + 1) * 5]]) for e in (0, 1)]
  assert len(unique) > 20
  for k in unique:
    a = epochs[0][order[0].tolist().index(k)]
    b = epochs[1][order[1].tolist().index(k)]
    assert not np.allclose(a, b), k
  # Also at the same position: unshuffled (mock_data has one file), each epoch has the same
  # order, and other crops.
  unshuffled = streaming.train_batches("imagenet2012", info, 8, seed=0, shuffle_buffer=1,
                                       host_prefetch=0)
  (x0, y0), (x1, y1) = unshuffled(0), unshuffled(5)
  np.testing.assert_array_equal(y0, y1)
  np.testing.assert_array_equal(y0, stored[:8])
  assert all(not np.allclose(a, b) for a, b in zip(x0, x1))


def test_a_resumed_run_decodes_no_image_before_its_step(mocked):
  """A run resumed at step 23 (inside the third epoch) yields the batches of the uninterrupted
  run and decodes no image before step 23: the lowest example index the pipeline's decode
  function saw is 23 * local_batch (the uninterrupted run's is 0)."""
  info = small_info("imagenet2012")
  local_batch, resume, more = 4, 23, 8  # 10 steps an epoch
  whole = streaming.train_batches("imagenet2012", info, local_batch, seed=0, host_prefetch=0)
  resumed = streaming.train_batches("imagenet2012", info, local_batch, seed=0, host_prefetch=0)
  try:
    assert resumed.decode_stats() == {"decoded": 0, "lowest_index": None}
    uninterrupted = [whole(step) for step in range(resume + more)]
    later = [resumed(step) for step in range(resume, resume + more)]
    stats, whole_stats = resumed.decode_stats(), whole.decode_stats()
  finally:
    whole.close()
    resumed.close()
  for step, (images, labels) in zip(range(resume, resume + more), later):
    np.testing.assert_array_equal(images, uninterrupted[step][0], err_msg=f"step {step}")
    np.testing.assert_array_equal(labels, uninterrupted[step][1], err_msg=f"step {step}")
  assert whole_stats["lowest_index"] == 0
  assert whole_stats["decoded"] >= (resume + more) * local_batch
  assert stats["lowest_index"] == resume * local_batch
  assert stats["decoded"] >= more * local_batch


@pytest.mark.parametrize("threads", [0, 3])
def test_config_data_threads_size_the_training_pipeline(threads, mocked):
  """--config.data_threads=N (what the launchers set) reaches the streamed training pipeline
  as its tf.data thread pool; 0 keeps tf.data's default."""
  config = config_lib.load_config_file(
      os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "imagenet.py"))
  config.image_size, config.data_threads = SIZE, threads
  batches = pipeline.load_data(config)["train"].train_batches(8, 0)
  try:
    assert batches.threads == (threads or None)
    options = batches.dataset(0).options()
    assert options.threading.private_threadpool_size == (threads or None)
    images, labels = batches(0)
    assert images.shape == (8, SIZE, SIZE, 3) and labels.shape == (8,)
  finally:
    batches.close()


@pytest.mark.parametrize("name", ["imagenet2012", "cifar10"])
def test_eval_batches_cover_the_split_once(name, mocked):
  info = small_info(name)
  batches = streaming.eval_batches(name, info, 6)
  out = list(batches)
  assert batches.num_batches == len(out) == -(-NUM_EXAMPLES // 6)
  for images, labels, mask in out:
    assert images.shape == (6, SIZE, SIZE, 3) and images.dtype == np.float32
    assert labels.shape == (6,) and labels.dtype == np.int32
    assert mask.shape == (6,) and mask.dtype == np.float32
  mask = np.concatenate([m for _, _, m in out])
  labels = np.concatenate([y for _, y, _ in out])
  images = np.concatenate([x for x, _, _ in out])
  assert mask.sum() == NUM_EXAMPLES
  np.testing.assert_array_equal(mask, np.arange(len(mask)) < NUM_EXAMPLES)
  np.testing.assert_array_equal(labels[mask > 0], raw_labels(name, streaming.eval_split(name)))
  assert np.all(images[mask == 0] == 0)
  unit = images[mask > 0] * np.asarray(info.std) + np.asarray(info.mean)
  assert unit.min() >= -1e-4 and unit.max() <= 1 + 1e-4
  # Evaluation is not augmented: a second pass gives the same batches.
  again = list(streaming.eval_batches(name, info, 6))
  np.testing.assert_array_equal(np.concatenate([x for x, _, _ in again]), images)


def test_class_batches_respect_per_class_quotas(mocked):
  info = small_info("cifar10")
  per_class = 3
  out = list(streaming.class_batches("cifar10", info, 4, per_class))
  stored = raw_labels("cifar10")
  counts = np.bincount(stored, minlength=10)
  assert counts.max() > per_class and counts.min() < per_class, counts  # both cases occur
  for images, labels, mask in out:
    assert images.shape == (4, SIZE, SIZE, 3) and labels.shape == mask.shape == (4,)
  labels = np.concatenate([y for _, y, _ in out])
  mask = np.concatenate([m for _, _, m in out])
  images = np.concatenate([x for x, _, _ in out])
  sums = np.bincount(labels, weights=mask, minlength=10)
  np.testing.assert_array_equal(sums, np.minimum(per_class, counts))
  # The first per_class examples of each class in stored order, preprocessed as for evaluation
  # (the eval pipeline's images of the same examples, bit for bit).
  seen = np.zeros(10, int)
  keep = []
  for i, k in enumerate(stored):
    if seen[k] < per_class:
      keep.append(i)
      seen[k] += 1
  np.testing.assert_array_equal(labels[mask > 0], stored[keep])
  evaluated = list(streaming.eval_batches("cifar10", info, 8, split="train"))
  eval_images = np.concatenate([x for x, _, _ in evaluated])[:NUM_EXAMPLES]
  np.testing.assert_array_equal(images[mask > 0], eval_images[keep])
  # Once every class has its quota, reading stops: 10 examples of per_class 1 (every class
  # occurs), 3 batches of 4.
  out1 = list(streaming.class_batches("cifar10", info, 4, 1))
  assert len(out1) == 3 and sum(m.sum() for _, _, m in out1) == 10


def test_class_batches_wait_for_the_other_processes(mocked, monkeypatch):
  # Another process still has examples for 2 batches after this one's shard is done: this one
  # yields batches of mask 0 until then, so all processes yield as many batches.
  info = small_info("cifar10")
  local = list(streaming.class_batches("cifar10", info, 4, 1))
  calls = []

  def any_process(flag):
    calls.append(flag)
    return flag or len(calls) <= len(local) + 2

  monkeypatch.setattr(streaming, "_any_process", any_process)
  out = list(streaming.class_batches("cifar10", info, 4, 1))
  assert len(out) == len(local) + 2
  for (x, y, m), (x0, y0, m0) in zip(out, local):
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(m, m0)
  assert all(m.sum() == 0 and not x.any() for x, _, m in out[len(local):])


# Several processes, on a really prepared tiny MNIST.

@pytest.fixture(scope="module")
def tiny_prepared_mnist(tmp_path_factory):
  """A prepared (tfrecord) 'mnist' of 10 train / 5 test random digits, built offline.

  The real MNIST builder runs with its download replaced by local idx files and its example
  counts shrunk. The 10 training labels are 0..9, each once. Returns (data_dir, {split:
  labels in stored order}).
  """
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", 10), ("test", 5)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.permutation(10) if split == "train" else rng.integers(0, 10, n)
    arrays[split] = images, labels.astype(np.uint8)
  data_dir = prepare_tiny_mnist(tmp_path_factory, arrays)
  stored = {split: np.array([ex["label"] for ex in tfds.as_numpy(
      tfds.builder("mnist", data_dir=data_dir).as_dataset(split=split, shuffle_files=False))])
            for split in ("train", "test")}
  return data_dir, stored


def _as_process(index, count):
  import jax  # pylint: disable=g-import-not-at-top
  return mock.patch.multiple(jax, process_index=lambda: index, process_count=lambda: count)


def test_process_shards_on_a_prepared_dataset(tiny_prepared_mnist):
  data_dir, stored = tiny_prepared_mnist
  info = small_info("mnist")
  whole = list(streaming.eval_batches("mnist", info, 2, data_dir))
  assert whole[0][0].shape == (2, SIZE, SIZE, 1)
  whole_labels = np.concatenate([y[m > 0] for _, y, m in whole])
  np.testing.assert_array_equal(whole_labels, stored["test"])
  # 2 processes: shards of 3 and 2 test examples; both yield 2 batches (the second process's
  # second batch is all padding), and together they are the whole split, once.
  shards = []
  for index in (0, 1):
    with _as_process(index, 2):
      out = list(streaming.eval_batches("mnist", info, 2, data_dir))
    assert len(out) == 2
    shards.append(np.concatenate([y[m > 0] for _, y, m in out]))
  assert [len(s) for s in shards] == [3, 2]
  np.testing.assert_array_equal(np.concatenate(shards), stored["test"])
  # Training shards of 5 (labels all distinct): 2 batches of 2 an epoch, each process its own
  # shard's examples only, 4 of the 5 (a different one left out in the next epoch).
  for index, part in ((0, slice(0, 5)), (1, slice(5, 10))):
    with _as_process(index, 2):
      batches = streaming.train_batches("mnist", info, 2, seed=0, data_dir=data_dir,
                                        host_prefetch=0)
      assert batches.steps_per_epoch == 2 and batches.num_local_examples == 5
      epochs = [np.concatenate([batches(step)[1] for step in range(e * 2, e * 2 + 2)])
                for e in range(3)]
    for labels in epochs:
      assert len(set(labels.tolist())) == 4
      assert set(labels.tolist()) <= set(stored["train"][part].tolist())
    assert len({tuple(sorted(labels.tolist())) for labels in epochs}) > 1


# 8 host CPU devices, in a subprocess (the device count is fixed when jax starts).

def _multidevice_main(metadata_dir):
  """Run as `python test_streaming.py METADATA_DIR` with 8 host devices: a global batch of 16
  from train_batches over a 'data' mesh; prints one JSON line of facts."""
  import jax  # pylint: disable=g-import-not-at-top
  from datafree_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh("data")
  info = small_info("imagenet2012")
  local_batch = 8 // jax.process_count()  # 5 steps an epoch
  steps = (0, 1, 2, 3, 4, 5, 6, 9, 10, 3, 4)  # on, a skip ahead, a rewind
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES, data_dir=metadata_dir):
    batches = streaming.train_batches("imagenet2012", info, 16 // jax.process_count(), seed=0,
                                      host_prefetch=0)
    local = batches(0)
    batches.close()
    # Device prefetch: the same global batches as placing each step's batch when asked.
    direct = streaming.train_batches("imagenet2012", info, local_batch, seed=0)
    ahead = parallel.PrefetchedBatches(
        streaming.train_batches("imagenet2012", info, local_batch, seed=0), mesh)
    expected = [parallel.global_batch(direct(step), mesh) for step in steps]
    placed = [ahead(step) for step in steps]
    direct.close()
    ahead.close()
  split = parallel.split_leading(mesh)
  prefetch_equal = all(
      x.sharding.is_equivalent_to(split, x.ndim) and x.dtype == e.dtype
      and np.array_equal(np.asarray(x), np.asarray(e))
      for got, want in zip(placed, expected) for x, e in zip(got, want))
  images, labels = parallel.global_batch(local, mesh)
  shards = sorted(images.addressable_shards, key=lambda s: s.index[0].start)
  print(json.dumps({
      "devices": jax.device_count(),
      "global_shape": list(images.shape), "labels_shape": list(labels.shape),
      "shard_shapes": sorted({tuple(s.data.shape) for s in shards}),
      "shard_devices": len({s.device for s in shards}),
      "shards_are_rows": all(np.array_equal(np.asarray(s.data), local[0][s.index[0]])
                             for s in shards),
      "label_shard_shapes": sorted({tuple(s.data.shape) for s in labels.addressable_shards}),
      "image_dtype": str(images.dtype),
      "prefetched_equal": prefetch_equal,
      "prefetched_distinct": len({np.asarray(x).tobytes() for x, _ in placed}),
  }))


def test_global_batch_on_8_devices(metadata_dir):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), metadata_dir], env=env,
                        capture_output=True, text=True, timeout=300, cwd=os.path.dirname(HERE))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  facts = json.loads(proc.stdout.strip().splitlines()[-1])
  assert facts["devices"] == 8
  assert facts["global_shape"] == [16, SIZE, SIZE, 3] and facts["labels_shape"] == [16]
  assert facts["shard_shapes"] == [[2, SIZE, SIZE, 3]] and facts["shard_devices"] == 8
  assert facts["label_shard_shapes"] == [[2]]
  assert facts["shards_are_rows"] and facts["image_dtype"] == "uint8"
  # parallel.PrefetchedBatches: every step's placed batch (two placed ahead) is the batch
  # placed when asked, through consecutive steps, a skip ahead and a rewind.
  assert facts["prefetched_equal"] and facts["prefetched_distinct"] == 9


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(HERE))
  _multidevice_main(sys.argv[1])
