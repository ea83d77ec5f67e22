"""Tests for datafree_jax.visualize: grid layout, pixel values, labels, titles and PNG output."""
import math

import numpy as np
import pytest
from PIL import Image

from datafree_jax import visualize
from datafree_jax.visualize import LABEL_H, PAD

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def expected_shape(n, h, w, ncols, scale):
  cols = min(ncols, n)
  rows = math.ceil(n / cols)
  return (rows * (h * scale + LABEL_H) + (rows + 1) * PAD,
          cols * w * scale + (cols + 1) * PAD, 3)


def cell_origin(i, h, w, ncols, scale, margin=0):
  """Top-left pixel (y, x) of image i's block (no row titles unless margin given)."""
  r, c = divmod(i, ncols)
  return PAD + r * (h * scale + LABEL_H + PAD), margin + PAD + c * (w * scale + PAD)


@pytest.mark.parametrize("n,h,w,c,ncols,scale", [
    (20, 28, 28, 1, 10, 2),   # full rows, grey
    (13, 28, 28, 1, 5, 1),    # partial last row
    (7, 32, 32, 3, 3, 2),     # RGB, partial last row
    (4, 8, 6, 3, 10, 3),      # fewer images than columns, non-square
])
def test_grid_shape_and_dtype(n, h, w, c, ncols, scale):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(n, h, w, c)).astype(np.float32)
  mean, std = (MNIST_MEAN, MNIST_STD) if c == 1 else (CIFAR_MEAN, CIFAR_STD)
  grid = visualize.sample_grid(images, np.arange(n) % 10, mean, std, ncols=ncols, scale=scale)
  assert grid.dtype == np.uint8
  assert grid.shape == expected_shape(n, h, w, ncols, scale)


def test_denormalize_inverts_normalisation_exactly():
  # Values chosen to be exact in float32: x = [[0.75, 0.0, 1.0]], mean=(0.5,0.25,0.5),
  # std=(0.25,0.5,0.125) -> normalised [[1.0, -0.5, 4.0]].
  x = np.array([0.75, 0.0, 1.0], np.float32).reshape(1, 1, 1, 3)
  mean, std = (0.5, 0.25, 0.5), (0.25, 0.5, 0.125)
  normalised = (x - np.array(mean, np.float32)) / np.array(std, np.float32)
  np.testing.assert_array_equal(normalised.reshape(-1), [1.0, -0.5, 4.0])
  out = visualize.denormalize(normalised, mean, std)
  np.testing.assert_array_equal(out, x)


def test_denormalize_clips_to_unit_interval():
  out = visualize.denormalize(np.array([-10.0, 10.0]).reshape(1, 1, 2, 1), (0.5,), (0.25,))
  np.testing.assert_array_equal(out.reshape(-1), [0.0, 1.0])


def test_denormalize_rejects_wrong_channel_count():
  with pytest.raises(ValueError):
    visualize.denormalize(np.zeros((1, 2, 2, 3)), (0.1, 0.2), (1.0, 1.0))


@pytest.mark.parametrize("c", [1, 3])
def test_cell_pixels_are_upscaled_denormalised_image(c):
  h, w, scale, ncols, n = 5, 4, 3, 2, 3
  mean, std = (MNIST_MEAN, MNIST_STD) if c == 1 else (CIFAR_MEAN, CIFAR_STD)
  images = np.zeros((n, h, w, c), np.float32)
  images[0] = (1 - np.array(mean)) / np.array(std)   # pixel value 1.0 -> 255
  images[1] = -np.array(mean) / np.array(std)        # pixel value 0.0 -> 0
  rng = np.random.default_rng(1)
  images[2] = rng.normal(size=(h, w, c))
  grid = visualize.sample_grid(images, [1, 2, 3], mean, std, ncols=ncols, scale=scale)
  hs, ws = h * scale, w * scale

  y, x = cell_origin(0, h, w, ncols, scale)
  np.testing.assert_array_equal(grid[y:y + hs, x:x + ws], 255)
  y, x = cell_origin(1, h, w, ncols, scale)
  np.testing.assert_array_equal(grid[y:y + hs, x:x + ws], 0)

  den = visualize.denormalize(images[2:3], mean, std)[0]
  want = np.round(den * 255).astype(np.uint8)
  want = np.broadcast_to(want, (h, w, 3))
  want = want.repeat(scale, axis=0).repeat(scale, axis=1)
  y, x = cell_origin(2, h, w, ncols, scale)
  np.testing.assert_array_equal(grid[y:y + hs, x:x + ws], want)


def test_constant_mean_plus_std_image_is_white():
  # Normalised value 1 is pixel value mean + std, which is 1.0 for mean = std = 0.5.
  images = np.ones((2, 3, 3, 1), np.float32)
  images[1] = 0.0   # pixel value mean = 0.5 -> 128
  grid = visualize.sample_grid(images, [0, 1], (0.5,), (0.5,), ncols=2, scale=2)
  y, x = cell_origin(0, 3, 3, 2, 2)
  np.testing.assert_array_equal(grid[y:y + 6, x:x + 6], 255)
  y, x = cell_origin(1, 3, 3, 2, 2)
  np.testing.assert_array_equal(grid[y:y + 6, x:x + 6], 128)


def test_label_strip_has_dark_text_only_when_labelled():
  h, w, scale = 28, 28, 2
  images = np.zeros((2, h, w, 1), np.float32)
  labelled = visualize.sample_grid(images, [7, 3], MNIST_MEAN, MNIST_STD, ncols=2, scale=scale)
  unlabelled = visualize.sample_grid(images, None, MNIST_MEAN, MNIST_STD, ncols=2, scale=scale)
  for i in range(2):
    y, x = cell_origin(i, h, w, 2, scale)
    sl = np.s_[y + h * scale:y + h * scale + LABEL_H, x:x + w * scale]
    assert (labelled[sl] < 100).any(), f"no text in the label strip of cell {i}"
    np.testing.assert_array_equal(unlabelled[sl], 255)
  # Different labels give different strips.
  y0, x0 = cell_origin(0, h, w, 2, scale)
  y1, x1 = cell_origin(1, h, w, 2, scale)
  s0 = labelled[y0 + h * scale:y0 + h * scale + LABEL_H, x0:x0 + w * scale]
  s1 = labelled[y1 + h * scale:y1 + h * scale + LABEL_H, x1:x1 + w * scale]
  assert not np.array_equal(s0, s1)


def test_partial_last_row_leaves_blank_cells():
  h, w, scale, ncols = 4, 4, 1, 3
  images = np.ones((4, h, w, 1), np.float32)   # all white images
  grid = visualize.sample_grid(images, [0] * 4, MNIST_MEAN, MNIST_STD, ncols=ncols, scale=scale)
  y, x = cell_origin(4, h, w, ncols, scale)    # first empty cell of row 2
  np.testing.assert_array_equal(grid[y:y + h, x:x + w], visualize.BACKGROUND)


def test_row_titles_widen_grid_and_are_drawn():
  h, w, scale, ncols = 28, 28, 2, 4
  images = np.ones((8, h, w, 1), np.float32)
  plain = visualize.sample_grid(images, np.arange(8), MNIST_MEAN, MNIST_STD, ncols=ncols,
                                scale=scale)
  titled = visualize.sample_grid(images, np.arange(8), MNIST_MEAN, MNIST_STD, ncols=ncols,
                                 scale=scale, row_titles=["G0", "G3"])
  assert titled.shape[0] == plain.shape[0]
  margin = titled.shape[1] - plain.shape[1]
  assert margin > 2 * PAD
  assert (titled[:, :margin] < 100).any()        # title text in the margin
  np.testing.assert_array_equal(titled[:, margin:], plain)  # the rest is the plain grid


def test_row_titles_count_must_match_rows():
  images = np.zeros((8, 4, 4, 1), np.float32)
  with pytest.raises(ValueError):
    visualize.sample_grid(images, None, MNIST_MEAN, MNIST_STD, ncols=4, row_titles=["G0"])


def test_save_png_round_trip(tmp_path):
  rng = np.random.default_rng(2)
  images = rng.normal(size=(5, 8, 8, 3)).astype(np.float32)
  grid = visualize.sample_grid(images, [0, 1, 2, 3, 4], CIFAR_MEAN, CIFAR_STD, ncols=3)
  path = tmp_path / "sub" / "dir" / "grid.png"
  visualize.save_png(str(path), grid)
  with Image.open(path) as im:
    assert im.format == "PNG"
    back = np.asarray(im.convert("RGB"))
  assert back.shape == grid.shape
  np.testing.assert_array_equal(back, grid)
