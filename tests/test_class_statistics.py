"""The teacher's class-conditional BN statistics from a streamed split (teacher.class_statistics,
the code the teacher stage runs for them): 2 processes (jax.distributed on a localhost
coordinator, gloo collectives, one CPU device each) give the statistics of 1 process, each of
the 2 reading its share of every class from its own shard.

The data: a really prepared (tfrecord) tfds 'mnist' of 40 training digits, built offline, laid
out in stored order so that both runs select the same examples with per_class = 2: the first
shard (the first process's) holds A_0..A_9 then B_0..B_9 (image A_k of class k, ...), the second
B_0..B_9 again then C_0..C_9. One process takes the first 2 of each class: A_k and B_k. Two
processes take 1 of each class from their shards: A_k and B_k again. Were each of the 2 to read
per_class examples of each class, they would add B_k and C_k: twice the count, other values.
"""
import os
import pickle
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from conftest import free_port, prepare_tiny_mnist

from datafree_jax import common
from datafree_jax import datasets
from datafree_jax import distributed
from datafree_jax import input_pipeline
from datafree_jax import models
from datafree_jax import parallel
from datafree_jax.stages import teacher

tfds = pytest.importorskip("tensorflow_datasets")

PER_CLASS = 2
MODEL = "lenet5_half_bn"
TIMEOUT = 300


def _stored(data_dir, split="train"):
  """(images (N, 28, 28), labels (N,)) of a prepared mnist split in stored order."""
  examples = list(tfds.as_numpy(tfds.builder("mnist", data_dir=data_dir).as_dataset(
      split=split, shuffle_files=False)))
  return (np.stack([e["image"][..., 0] for e in examples]),
          np.array([e["label"] for e in examples]))


@pytest.fixture(scope="module")
def laid_out_mnist(tmp_path_factory):
  """The prepared 'mnist' of the module docstring; (data_dir, stored images, stored labels).

  tfds's writer stores the examples in an order of its own (a hash of their keys, not of their
  content), so a first build with each image marking its index finds that order, and a second
  build puts every image where that order stores it where wanted."""
  rng = np.random.default_rng(0)
  a, b, c = rng.integers(0, 256, (3, 10, 28, 28), dtype=np.uint8)
  want_images = np.concatenate([a, b, b, c])
  want_labels = np.tile(np.arange(10, dtype=np.uint8), 4)
  n = len(want_labels)
  test = (np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.uint8))
  markers = np.zeros((n, 28, 28), np.uint8)
  markers[:, 0, 0] = np.arange(n)
  order = _stored(prepare_tiny_mnist(tmp_path_factory, {
      "train": (markers, want_labels), "test": test}))[0][:, 0, 0]  # stored j <- written order[j]
  images, labels = np.empty_like(want_images), np.empty_like(want_labels)
  images[order], labels[order] = want_images, want_labels
  data_dir = prepare_tiny_mnist(tmp_path_factory, {"train": (images, labels), "test": test})
  stored_images, stored_labels = _stored(data_dir)
  np.testing.assert_array_equal(stored_images, want_images)
  np.testing.assert_array_equal(stored_labels, want_labels)
  return data_dir


def _model():
  info = datasets.dataset_info("mnist")
  return info, models.get_classifier(MODEL, info.num_classes)


def teacher_variables() -> tuple:
  """(params, batch_stats) of a fresh lenet5_half_bn teacher, as numpy arrays."""
  info, model = _model()
  return jax.device_get(common.init_model(model, jax.random.key(0), info.image_shape))


def statistics(data_dir, variables) -> dict:
  """teacher.class_statistics of the teacher of `variables` on the streamed 'train' split of
  data_dir, as {path: array}."""
  info, model = _model()
  params, batch_stats = variables
  train = input_pipeline.StreamedSplit("mnist", "train", info, data_dir)
  stats = teacher.class_statistics(model, params, batch_stats, train, PER_CLASS,
                                   info.num_classes, parallel.make_mesh("data"), seed=0)
  leaves, _ = jax.tree_util.tree_flatten_with_path(stats)
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def _process_main(data_dir, variables, out, port, process_id):
  """Run as `python test_class_statistics.py DATA_DIR VARIABLES OUT PORT ID`: process ID of 2,
  with the teacher's variables pickled in VARIABLES; writes its statistics to OUT (.npz)."""
  distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                         process_id=int(process_id))
  assert jax.process_count() == 2
  with open(variables, "rb") as f:
    np.savez(out, **statistics(data_dir, pickle.load(f)))
  jax.distributed.shutdown()  # both processes leave together
  # Without the interpreter's teardown of TensorFlow's and JAX's modules (seconds).
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)


@pytest.mark.slow  # two processes (a distributed runtime on this machine)
def test_two_processes_give_the_statistics_of_one(laid_out_mnist, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  variables = teacher_variables()  # one initialisation (one compilation) for all three runs
  with open(tmp_path / "teacher.pkl", "wb") as f:
    pickle.dump(variables, f)
  port = free_port()
  outs = [str(tmp_path / f"process{i}.npz") for i in range(2)]
  procs, logs = [], []
  for i, out in enumerate(outs):
    log = tempfile.TemporaryFile(mode="w+")
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), laid_out_mnist, str(tmp_path / "teacher.pkl"),
         out, str(port), str(i)],
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
  try:
    one = statistics(laid_out_mnist, variables)  # this process: one process, meanwhile
    for i, (p, log) in enumerate(zip(procs, logs)):
      p.wait(timeout=TIMEOUT)
      log.seek(0)
      assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{log.read()[-4000:]}"
  finally:
    for p, log in zip(procs, logs):
      if p.poll() is None:
        p.kill()
      log.close()
  counts = one["['class_counts']"]
  np.testing.assert_array_equal(counts, np.full(10, PER_CLASS))
  assert any(k.startswith("['class']") for k in one)
  for out in outs:  # both processes hold the same statistics, those of the one process
    two = dict(np.load(out))
    assert sorted(two) == sorted(one)
    for key, value in one.items():
      np.testing.assert_allclose(two[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


if __name__ == "__main__":
  _process_main(*sys.argv[1:])
