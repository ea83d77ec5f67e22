"""configs/imagenet.py: the smoke run from the command line (every stage, on a locally built
synthetic_imagenet) and a streamed dataset registered by name."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT

from datafree_jax import config_lib
from datafree_jax import datasets
from datafree_jax import pipeline
from datafree_jax import synthetic_imagenet

IMAGENET = os.path.join(REPO_ROOT, "configs", "imagenet.py")
# A few dozen small JPEGs: the smoke run reads 32x32 crops of them.
TINY = synthetic_imagenet.Settings(train_examples=40, validation_examples=16, min_side=64,
                                   max_side=128)


@pytest.mark.slow
def test_smoke_runs_every_stage_from_the_command_line(tmp_path):
  """The two documented commands: make-jpeg-dataset, then imagenet.py:smoke=True on it: the
  streamed teacher training, its streamed class-conditional BN statistics, the generators and
  the distillation, in bfloat16, end to end."""
  data_dir, workdir = str(tmp_path / "tfds"), str(tmp_path / "w")
  env = dict(os.environ, PYTHONPATH=REPO_ROOT)
  cli = [sys.executable, "-m", "datafree_jax.main"]
  built = subprocess.run(cli + ["make-jpeg-dataset", f"--data_dir={data_dir}",
                                f"--train_examples={TINY.train_examples}",
                                f"--validation_examples={TINY.validation_examples}",
                                f"--min_side={TINY.min_side}", f"--max_side={TINY.max_side}"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert built.returncode == 0 and "synthetic_imagenet: done in" in built.stdout, (
      built.stdout + built.stderr)
  r = subprocess.run(cli + ["--config=configs/imagenet.py:smoke=True",
                            f"--config.data_dir={data_dir}", f"--workdir={workdir}"],
                     cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  with open(os.path.join(workdir, "results.json")) as f:
    summary = json.load(f)
  assert summary["config"]["dtype"] == "bfloat16"
  assert summary["config"]["dataset"] == datasets.SYNTHETIC_IMAGENET
  assert summary["teacher"]["model"] == "resnet50_imagenet"
  assert summary["generators"]["num_generators"] == 4 and summary["generators"]["steps"] == 3
  assert summary["student"]["model"] == "resnet18_imagenet" and summary["student"]["steps"] == 4
  assert 0.0 <= summary["student"]["test_accuracy"] <= 1.0
  config = config_lib.load_config_file(IMAGENET, "smoke=True")
  from datafree_jax.stages import teacher as teacher_stage  # pylint: disable=g-import-not-at-top
  teacher = teacher_stage.load(config, workdir, datasets.config_info(config))
  counts = np.asarray(teacher["bn_stats"]["class_counts"])
  # The streamed pass saw each of the 40 training images once (labels 0..39, one each).
  np.testing.assert_array_equal(counts, np.arange(1000) < 40)
  leaves = jax.tree.leaves(teacher["bn_stats"]["class"])
  assert len(leaves) == 2 * 53  # mean and var of ResNet-50's 53 BatchNorms
  assert all(x.shape[0] == 1000 and np.all(np.isfinite(np.asarray(x))) for x in leaves)


def test_any_tfds_dataset_can_be_streamed_by_name(tmp_path, monkeypatch):
  """datasets.register_streamed_dataset: a tfds image-classification dataset by name (here
  synthetic JPEGs of 10 classes, built under a name of their own, at 48x48) goes through the
  streamed splits."""
  from datafree_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(datasets, "DATASETS", dict(datasets.DATASETS))
  monkeypatch.setattr(datasets, "STREAMED", set(datasets.STREAMED))
  with pytest.raises(ValueError, match="held in memory"):
    datasets.register_streamed_dataset("cifar10", image_size=32, num_classes=10)
  data_dir = str(tmp_path / "tfds")
  synthetic_imagenet.build(data_dir, synthetic_imagenet.Settings(
      classes=10, train_examples=20, validation_examples=10, min_side=48, max_side=96),
      name="my_shapes")
  datasets.register_streamed_dataset("my_shapes", image_size=48, num_classes=10)
  config = config_lib.load_config_file(IMAGENET, "smoke=True")
  config.dataset, config.data_dir, config.image_size = "my_shapes", data_dir, 0
  splits = pipeline.load_data(config)
  assert isinstance(splits["train"], input_pipeline.StreamedSplit)
  batches = splits["train"].train_batches(8, seed=0)
  try:
    images, labels = batches(0)
  finally:
    batches.close()
  x, y, mask = next(iter(splits["test"].eval_batches(8)))
  assert images.shape == (8, 48, 48, 3) and x.shape == (8, 48, 48, 3) and mask.sum() == 8
  assert labels.dtype == np.int32 and 0 <= y.min() and y.max() < 10
