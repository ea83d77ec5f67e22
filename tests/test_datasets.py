"""A dataset given as arrays: registered without editing the package, at another image size,
with another number of classes, and a whole teacher -> ensemble -> distillation pipeline on it."""
import os
import shutil

import numpy as np
import pytest

from conftest import tiny_config

from datafree_jax import config_lib
from datafree_jax import datasets
from datafree_jax import input_pipeline
from datafree_jax import pipeline
from test_bad_input import assert_rejected

SIZE, CLASSES = 16, 3


def toy_arrays(n, seed):
  """uint8 16x16 images: class k is a bright 6x6 square in corner k, on noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, CLASSES, n)
  images = rng.integers(0, 60, (n, SIZE, SIZE, 1)).astype(np.uint8)
  corners = [(1, 1), (1, 9), (9, 5)]
  for i, k in enumerate(labels):
    y, x = corners[k]
    images[i, y:y + 6, x:x + 6, 0] = 230
  return images, labels


@pytest.fixture(scope="module")
def toy():
  train_arrays, test_arrays = toy_arrays(96, 0), toy_arrays(30, 1)
  datasets.register_dataset("toy16", test_arrays, train_arrays,
                                  class_names=("top-left", "top-right", "bottom"))
  datasets.register_dataset("toy16_test_only", test_arrays, mean=(0.2,), std=(0.3,))
  return train_arrays, test_arrays


def toy_config(method, dataset="toy16", **overrides):
  """MLP teacher and student (the LeNets need 32x32 images), no BN: ensemble without moment
  matching; a 16x16 generator (2 upsamplings from 4x4)."""
  return tiny_config(method, **{
      "dataset": dataset, "teacher.model": "hinton_half", "student.model": "hinton_half",
      "teacher.steps": 30, "teacher.batch_size": 32, "student.steps": 6,
      "student.batch_size": 12, "ensemble.num_generators": 0, "ensemble.steps": 3,
      "ensemble.batch_per_generator": 4, "ensemble.w_mm": 0.0, "ensemble.eval_every": 0,
      "generator.width": 4, **overrides})


def test_registered_arrays_are_a_dataset(toy):
  (train_x, train_y), (test_x, test_y) = toy
  info = datasets.dataset_info("toy16")
  assert info.image_shape == (16, 16, 1) and info.num_classes == 3
  assert info.class_names == ("top-left", "top-right", "bottom")
  ds = input_pipeline.load_dataset("toy16", "train")
  # Normalised with the training images' own mean and std.
  x01 = train_x.astype(np.float32) / 255.0
  np.testing.assert_allclose(info.mean, [x01.mean()], rtol=1e-5)
  np.testing.assert_allclose(ds.images, (x01 - x01.mean()) / x01.std(), rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(ds.labels, train_y)
  assert input_pipeline.load_dataset("toy16", "test").images.shape == (30, 16, 16, 1)
  assert "toy16" in config_lib.SCHEMA["dataset"][1].choices()  # a valid config.dataset


@pytest.mark.parametrize("args,message", [
    (("mnist5k", (np.zeros((2, 8, 8, 1), np.uint8), np.zeros(2, int))), "built-in"),
    (("bad", (np.zeros((2, 8, 6, 1), np.uint8), np.zeros(2, int))), "(N, S, S, C)"),
    (("bad", (np.full((2, 8, 8, 1), 2.0), np.zeros(2, int))), "uint8 or floats in [0, 1]"),
    (("bad", (np.zeros((2, 8, 8, 1)), np.zeros(3, int))), "labels must be (2,) integers"),
])
def test_bad_arrays_are_refused(args, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                     .replace("[", r"\[").replace("]", r"\]")):
    datasets.register_dataset(*args)


@pytest.mark.slow  # the whole pipeline: teacher, generators, distillation
def test_teacher_then_ensemble_pipeline_on_registered_arrays(toy, tmp_path, capsys):
  workdir = str(tmp_path / "w")
  summary = pipeline.train_and_evaluate(toy_config("ensemble"), workdir)
  assert summary["teacher"]["test_accuracy"] >= 0.9  # the corners are easy
  assert summary["generators"]["num_generators"] == 3
  assert summary["student"]["steps"] == 6
  assert sorted(d for d in os.listdir(workdir) if d in [s.name for s in pipeline.method_stages("ensemble")]) == [
      "distill_generators", "generators", "teacher"]
  # The data-free stages read no training split: with a dataset that has none (the same
  # test images), stage=train runs from the teacher; the teacher stage refuses, writing nothing.
  other = str(tmp_path / "test_only")
  os.makedirs(other)
  shutil.copytree(os.path.join(workdir, "teacher"), os.path.join(other, "teacher"))
  out = pipeline.train_and_evaluate(toy_config("ensemble", "toy16_test_only", stage="train"), other)
  assert out["student"]["steps"] == 6
  assert_rejected(toy_config("teacher", "toy16_test_only"), tmp_path / "new", capsys,
                  "dataset 'toy16_test_only' was registered without a train split")
  assert not (tmp_path / "new").exists()
