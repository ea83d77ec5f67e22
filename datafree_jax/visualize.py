"""Image grids of synthetic samples, labelled with the teacher's predicted class.

numpy + PIL only (no jax), so it runs on host arrays after `jax.device_get`.

Layout of `sample_grid` (all sizes in pixels; h, w: the image size; N images, ncols columns):
  cols   = min(ncols, N);  rows = ceil(N / cols)
  cell   = (h * scale + LABEL_H) high, w * scale wide: the upscaled image over a white strip of
           height LABEL_H holding the label in black
  margin = 0 without row titles, else ceil(max title text width) + 2 * PAD (white, titles black)
  H' = rows * (h * scale + LABEL_H) + (rows + 1) * PAD
  W' = margin + cols * w * scale + (cols + 1) * PAD
PAD pixels of grey background separate the cells and surround the grid; cells past the last
image of a partial last row stay background.
"""
from __future__ import annotations

import io
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from datafree_jax import paths

PAD = 2          # pixels between cells and around the grid
LABEL_H = 12     # height of the label strip under each cell
BACKGROUND = 128  # grey of the padding and of blank cells
_WHITE = (255, 255, 255)
_BLACK = (0, 0, 0)


def _per_channel(values, channels: int, name: str) -> np.ndarray:
  arr = np.asarray(values, np.float32).reshape(-1)
  if arr.size not in (1, channels):
    raise ValueError(f"{name} has {arr.size} values for images with {channels} channels")
  return arr


def denormalize(images, mean, std) -> np.ndarray:
  """Undoes (x - mean) / std per channel on (N, H, W, C) images; float32 clipped to [0, 1]."""
  images = np.asarray(images, np.float32)
  if images.ndim != 4:
    raise ValueError(f"expected images of shape (N, H, W, C), got {images.shape}")
  c = images.shape[-1]
  mean = _per_channel(mean, c, "mean")
  std = _per_channel(std, c, "std")
  return np.clip(images * std + mean, 0.0, 1.0)


def _to_rgb_uint8(images01: np.ndarray) -> np.ndarray:
  """[0, 1] floats (N, H, W, C) with C in {1, 3} -> uint8 (N, H, W, 3)."""
  c = images01.shape[-1]
  if c == 1:
    images01 = np.repeat(images01, 3, axis=-1)
  elif c != 3:
    raise ValueError(f"images must have 1 or 3 channels, got {c}")
  return np.round(images01 * 255.0).astype(np.uint8)


def _text_into(canvas: Image.Image, box, text: str, font) -> None:
  """Writes `text` centred in box=(x0, y0, x1, y1) of `canvas`, clipped to the box."""
  x0, y0, x1, y1 = box
  bw, bh = x1 - x0, y1 - y0
  strip = Image.new("RGB", (bw, bh), _WHITE)
  draw = ImageDraw.Draw(strip)
  left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
  x = (bw - (right - left)) // 2 - left
  y = (bh - (bottom - top)) // 2 - top
  draw.text((x, y), text, fill=_BLACK, font=font)
  canvas.paste(strip, (x0, y0))


def sample_grid(images, labels, mean, std, ncols: int = 10, scale: int = 2,
                row_titles: Optional[Sequence[str]] = None) -> np.ndarray:
  """A labelled grid of normalised images as a uint8 (H', W', 3) array (see the module doc).

  images: float (N, H, W, C), C in {1, 3}, normalised as (x - mean) / std.
  labels: N integers written under the cells (e.g. the teacher's predictions), or None for
    empty strips.
  row_titles: one string per row, written in a left margin (e.g. "G3" for generator 3).
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"expected non-empty images of shape (N, H, W, C), got {images.shape}")
  if ncols < 1 or scale < 1:
    raise ValueError(f"ncols and scale must be >= 1, got ncols={ncols}, scale={scale}")
  n, h, w, _ = images.shape
  if labels is not None:
    labels = np.asarray(labels).reshape(-1)
    if labels.shape[0] != n:
      raise ValueError(f"{labels.shape[0]} labels for {n} images")
  cols = min(ncols, n)
  rows = math.ceil(n / cols)
  if row_titles is not None and len(row_titles) != rows:
    raise ValueError(f"{len(row_titles)} row titles for {rows} rows")

  pix = _to_rgb_uint8(denormalize(images, mean, std))
  if scale > 1:
    pix = pix.repeat(scale, axis=1).repeat(scale, axis=2)
  ih, iw = h * scale, w * scale
  cell_h = ih + LABEL_H

  font = ImageFont.load_default()
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  margin = 0
  if row_titles is not None:
    widest = max((measure.textlength(str(t), font=font) for t in row_titles), default=0)
    margin = int(math.ceil(widest)) + 2 * PAD

  height = rows * cell_h + (rows + 1) * PAD
  width = margin + cols * iw + (cols + 1) * PAD
  canvas = Image.new("RGB", (width, height), (BACKGROUND,) * 3)
  if margin:
    canvas.paste(Image.new("RGB", (margin, height), _WHITE), (0, 0))
    for r, title in enumerate(row_titles):
      y0 = PAD + r * (cell_h + PAD)
      _text_into(canvas, (0, y0, margin, y0 + cell_h), str(title), font)

  for i in range(n):
    r, c = divmod(i, cols)
    x0 = margin + PAD + c * (iw + PAD)
    y0 = PAD + r * (cell_h + PAD)
    canvas.paste(Image.fromarray(pix[i]), (x0, y0))
    text = "" if labels is None else str(int(labels[i]))
    _text_into(canvas, (x0, y0 + ih, x0 + iw, y0 + cell_h), text, font)
  return np.asarray(canvas, dtype=np.uint8).copy()


def save_png(path: str, grid: np.ndarray) -> None:
  """Writes a uint8 (H, W, 3) or (H, W) array as a PNG, creating parent directories."""
  grid = np.asarray(grid)
  if grid.dtype != np.uint8:
    raise ValueError(f"expected a uint8 array, got {grid.dtype}")
  buf = io.BytesIO()
  Image.fromarray(grid).save(buf, format="PNG")
  paths.write_bytes(path, buf.getvalue())
