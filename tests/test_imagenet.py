"""configs/imagenet.py: the smoke run (every stage, mock ImageNet) and the sizing dry run."""
import os
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT

from datafree_jax import config_lib
from datafree_jax import datasets
from datafree_jax import pipeline

tfds = pytest.importorskip("tensorflow_datasets")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_streaming import write_metadata  # pylint: disable=g-import-not-at-top,wrong-import-position

IMAGENET = os.path.join(REPO_ROOT, "configs", "imagenet.py")


@pytest.fixture
def no_host_prefetch(monkeypatch):
  """tfds.testing.mock_data patches tfds' file functions process-wide for the length of each
  as_dataset call, which is not thread-safe: the streamed training batches' background thread
  building an epoch's dataset while the main thread builds another can leave the patch
  behind. Under the mock, batches are read in the main thread."""
  from datafree_jax import streaming  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(streaming, "HOST_PREFETCH", 0)


@pytest.mark.slow
def test_smoke_runs_every_stage_on_mock_imagenet(tmp_path, no_host_prefetch):  # pylint: disable=unused-argument,redefined-outer-name
  """imagenet.py:smoke=True under tfds.testing.mock_data: the streamed teacher training,
  its streamed class-conditional BN statistics, the generators and the distillation, in
  bfloat16, end to end."""
  metadata = str(tmp_path / "metadata")
  write_metadata(metadata)
  config = config_lib.load_config_file(IMAGENET, "smoke=True")
  assert config.dtype == "bfloat16" and config.dataset == "imagenet2012"
  workdir = tmp_path / "w"
  with tfds.testing.mock_data(num_examples=40, data_dir=metadata):
    summary = pipeline.train_and_evaluate(config, str(workdir))
  assert summary["teacher"]["model"] == "resnet50_imagenet"
  assert summary["generators"]["num_generators"] == 4 and summary["generators"]["steps"] == 3
  assert summary["student"]["model"] == "resnet18_imagenet" and summary["student"]["steps"] == 4
  assert 0.0 <= summary["student"]["test_accuracy"] <= 1.0
  from datafree_jax.stages import teacher as teacher_stage  # pylint: disable=g-import-not-at-top
  teacher = teacher_stage.load(config, str(workdir), datasets.config_info(config))
  counts = np.asarray(teacher["bn_stats"]["class_counts"])
  # The streamed pass saw every mocked training example once (<= 4 per class).
  assert counts.shape == (1000,) and 0 < counts.sum() <= 40 and counts.max() <= 4
  leaves = jax.tree.leaves(teacher["bn_stats"]["class"])
  assert len(leaves) == 2 * 53  # mean and var of ResNet-50's 53 BatchNorms
  assert all(x.shape[0] == 1000 and np.all(np.isfinite(np.asarray(x))) for x in leaves)


def test_any_tfds_dataset_can_be_streamed_by_name(tmp_path, monkeypatch, no_host_prefetch):  # pylint: disable=unused-argument,redefined-outer-name
  """datasets.register_streamed_dataset: a tfds image-classification dataset by name
  (here the mocked imagenet2012 under another size) goes through the streamed splits."""
  from datafree_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(datasets, "DATASETS", dict(datasets.DATASETS))
  monkeypatch.setattr(datasets, "STREAMED", set(datasets.STREAMED))
  del datasets.DATASETS["imagenet2012"]
  datasets.STREAMED.discard("imagenet2012")
  datasets.register_streamed_dataset("imagenet2012", image_size=48, num_classes=1000)
  with pytest.raises(ValueError, match="held in memory"):
    datasets.register_streamed_dataset("cifar10", image_size=32, num_classes=10)
  metadata = str(tmp_path / "metadata")
  write_metadata(metadata)
  config = config_lib.load_config_file(IMAGENET, "smoke=True")
  config.image_size = 0
  with tfds.testing.mock_data(num_examples=40, data_dir=metadata):
    splits = pipeline.load_data(config)
    assert isinstance(splits["train"], input_pipeline.StreamedSplit)
    images, labels = splits["train"].train_batches(8, seed=0)(0)
    x, y, mask = next(iter(splits["test"].eval_batches(8)))
  assert images.shape == (8, 48, 48, 3) and x.shape == (8, 48, 48, 3) and mask.sum() == 8
  assert labels.dtype == np.int32 and y.max() < 1000
