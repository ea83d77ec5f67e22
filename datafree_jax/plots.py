"""Figures of a run, drawn from its TensorBoard scalars and sample grids (matplotlib, PNG).

`write_plots(workdir)` writes, into <workdir>/plots/ (pipeline.train_and_evaluate calls it at the
end of every run; a failure is a warning, never a failed run):

  accuracy.png           test accuracy vs step of every stage that evaluates a classifier
                         (teacher, distill_*, dafl), one curve each
  generator_losses.png   the loss terms of the generator stages vs step (generators: ce, mm, tv,
                         l2, loss; dafl: l_oh, l_a, l_ie, loss_g), one panel per term
  samples_over_time.png  one generator's row of samples at each evaluation, top to bottom, cut
                         from the sample grids <workdir>/samples/<stage>_stepNNNNNN.png (the
                         first row of each grid: generator G0, or DAFL's first 10 fixed latents)

The scalars are read from the event files in <workdir>/tensorboard (for a remote workdir,
copied to a local temporary directory through datafree_jax.paths first). loop.run tags them
`<stage>/eval/<metric>` and `<stage>/train/<metric>`; tags without a stage (event files of
older versions) are skipped. A step written twice (a stage resumed from a checkpoint) counts
with its latest value.

matplotlib is imported on first use, with the Agg canvas (no pyplot, no display).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import struct
import tempfile
from typing import Mapping, Optional, Sequence

import jax
import numpy as np

from datafree_jax import log
from datafree_jax import methods  # pylint: disable=unused-import (registers the built-ins)
from datafree_jax import paths
from datafree_jax import registry

PLOTS_DIR = "plots"
# The train metrics of image stages that are no loss term.
_NOT_GENERATOR_LOSSES = ("agreement", "accuracy", "steps_per_sec", "loss_kd")
_TAG = re.compile(r"^(?P<stage>[^/]+)/(?P<kind>eval|train)/(?P<metric>.+)$")
_GRID = re.compile(r"^(?P<stage>.+)_step(?P<step>\d+)\.png$")
MAX_STRIP_ROWS = 12     # evaluations shown in samples_over_time.png (evenly spaced, last kept)
_GREY = 128             # visualize.BACKGROUND: the padding between the cells of a grid
_PAD = 2                # visualize.PAD


# ---------------------------------------------------------------------------------------------
# Reading


def _event_files(directory: str) -> list:
  """The local event files under `directory` (recursively)."""
  found = []
  for root, _, files in os.walk(directory):
    found.extend(os.path.join(root, f) for f in files if "tfevents" in f)
  return sorted(found)


def _copy_remote_events(logdir: str, dst: str) -> None:
  """Copies the event files under remote `logdir` into local directory `dst`."""
  for entry in paths.listdir(logdir):
    src = paths.join(logdir, entry)
    if paths.isdir(src):
      sub = os.path.join(dst, entry)
      os.makedirs(sub, exist_ok=True)
      _copy_remote_events(src, sub)
    elif "tfevents" in entry:
      with open(os.path.join(dst, entry), "wb") as f:
        f.write(paths.read_bytes(src))


def _events(path: str):
  """The Event protos of event file `path`: its TFRecords read here (tensorboard's own loader
  imports TensorFlow, seconds in a process that has not), each record's length checked against
  its CRC. A record cut short at the end (a file still being written) ends the file; a length
  whose CRC does not match raises ValueError."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c  # pylint: disable=g-import-not-at-top
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos + 12 <= len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    if masked_crc32c(header) != crc:
      raise ValueError(f"{path}: not an event file, or corrupt at byte {pos}")
    end = pos + 12 + length
    if end + 4 > len(data):
      return
    yield event_pb2.Event.FromString(data[pos + 12:end])
    pos = end + 4


def _points(event_dir: str) -> dict:
  """{(stage, 'eval/<metric>' or 'train/<metric>'): [(wall_time, order, step, value)]} of the
  scalar events under local directory `event_dir`, `order` counting them as written."""
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(event_dir):
    raise NotADirectoryError(f"no event directory {event_dir}")
  points: dict = {}
  order = 0
  for path in _event_files(event_dir):
    for event in _events(path):
      if not event.HasField("summary"):
        continue
      for value in event.summary.value:
        m = _TAG.match(value.tag)
        if not m:
          continue
        if value.HasField("tensor"):
          arr = tensor_util.make_ndarray(value.tensor)
          if arr.size != 1 or arr.dtype.kind not in "fiub":
            continue
          x = float(arr.reshape(()))
        elif value.HasField("simple_value"):
          x = float(value.simple_value)
        else:
          continue
        order += 1
        key = (m["stage"], f"{m['kind']}/{m['metric']}")
        points.setdefault(key, []).append((event.wall_time, order, int(event.step), x))
  return points


def read_scalars(event_dir: str) -> dict:
  """The scalars of the event files under local directory `event_dir`.

  Returns {stage: {'eval/<metric>' or 'train/<metric>': (steps, values)}}, each curve sorted by
  step as int64 / float64 arrays. clu's SummaryWriter writes scalars as 0-d tensors (no
  `simple_value`); both forms are read. Raises OSError when `event_dir` is no directory,
  ValueError for a corrupt event file.
  """
  out: dict = {}
  for (stage, key), pts in _points(event_dir).items():
    by_step = {}
    for _, _, step, x in sorted(pts):   # in writing order: a rewritten step keeps its last value
      by_step[step] = x
    steps = np.array(sorted(by_step), np.int64)
    out.setdefault(stage, {})[key] = (steps, np.array([by_step[s] for s in steps], np.float64))
  return out


def scalar_events(event_dir: str, key: str = "eval/accuracy") -> dict:
  """{stage: [(wall_time, step, value)]}: every event of scalar `key` ('eval/<metric>' or
  'train/<metric>') under local directory `event_dir`, in the order written, with the Unix time
  at which it was written (what read_scalars leaves out; a resumed stage's rewritten steps are
  all kept). Raises as read_scalars."""
  out: dict = {}
  for (stage, k), pts in _points(event_dir).items():
    if k == key:
      out[stage] = [(t, step, x) for t, _, step, x in sorted(pts)]
  return out


def read_workdir_scalars(workdir: str, event_dir: Optional[str] = None) -> dict:
  """read_scalars of a run: `event_dir` when given (a local copy of the event files, e.g. the
  writer's staging directory), else <workdir>/tensorboard, copied to a temporary directory
  first when the workdir is remote."""
  if event_dir is not None:
    return read_scalars(event_dir)
  logdir = paths.join(workdir, "tensorboard")
  if not paths.is_remote(logdir):
    return read_scalars(logdir)
  if not paths.isdir(logdir):
    raise FileNotFoundError(f"no event directory {logdir}")
  tmp = tempfile.mkdtemp(prefix="datafree_jax_plots_")
  try:
    _copy_remote_events(logdir, tmp)
    return read_scalars(tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def accuracy_curves(scalars: Mapping) -> dict:
  """{stage: (steps, test accuracy)} of every stage of `scalars` (read_scalars) that has one."""
  return {stage: tags["eval/accuracy"] for stage, tags in scalars.items()
          if "eval/accuracy" in tags}


def generator_loss_curves(scalars: Mapping, stages: Optional[Sequence[str]] = None) -> dict:
  """{stage: {term: (steps, values)}}: the generator loss terms (train metrics other than
  accuracies, gradient norms, speed and the student's KD loss) of the image stages `stages`
  (default: those of every registered method, registry.image_stages)."""
  out = {}
  for stage in registry.image_stages() if stages is None else stages:
    terms = {key.split("/", 1)[1]: curve for key, curve in scalars.get(stage, {}).items()
             if key.startswith("train/") and not key.split("/", 1)[1].startswith("grad_norm")
             and key.split("/", 1)[1] not in _NOT_GENERATOR_LOSSES}
    # The total first (loss, loss_g), then the terms in alphabetical order.
    terms = dict(sorted(terms.items(), key=lambda kv: (not kv[0].startswith("loss"), kv[0])))
    if terms:
      out[stage] = terms
  return out


def sample_grids(workdir: str) -> dict:
  """{stage: [(step, path)] sorted by step} of the sample grids in <workdir>/samples."""
  directory = paths.join(workdir, "samples")
  if not paths.isdir(directory):
    return {}
  out: dict = {}
  for entry in paths.listdir(directory):
    m = _GRID.match(entry)
    if m:
      out.setdefault(m["stage"], []).append((int(m["step"]), paths.join(directory, entry)))
  return {k: sorted(v) for k, v in out.items()}


def first_row(grid: np.ndarray) -> np.ndarray:
  """The first row of cells (images and their label strips) of a visualize.sample_grid image,
  without its row-title margin: from the first grey column of the top padding on, the pixel
  rows from the end of the top padding to the all-grey padding row under the label strips."""
  grid = np.asarray(grid)
  if grid.ndim == 2:
    grid = np.repeat(grid[..., None], 3, axis=-1)
  grid = grid[..., :3]
  grey = np.all(grid == _GREY, axis=-1)               # (H, W)
  top = np.flatnonzero(grey[0])
  if top.size == 0:
    raise ValueError("not a sample grid: no grey padding in its first pixel row")
  x0 = int(top[0])                                     # the row-title margin is white
  sep = np.all(grey[:, x0:], axis=1)                   # all-grey pixel rows: padding
  y = 0
  while y < len(sep) and sep[y]:
    y += 1
  if y == len(sep):
    raise ValueError("not a sample grid: it is all padding")
  # The row ends at the padding under its label strips (white where the first cell's strip
  # begins: labels are centred); an all-grey line inside the images does not end it.
  x_cell = min(x0 + _PAD, grid.shape[1] - 1)
  y_end = y + 1
  while y_end < len(sep) and not (sep[y_end] and np.all(grid[y_end - 1, x_cell] == 255)):
    y_end += 1
  return grid[y:y_end, x0:]


# ---------------------------------------------------------------------------------------------
# Drawing


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", bbox_inches="tight")
  return buf.getvalue()


def _line(ax, steps, values, label=None, **kw):
  marker = "o" if len(steps) <= 30 else None
  return ax.plot(steps, values, marker=marker, markersize=3, label=label, **kw)


def accuracy_figure(curves: Mapping, title: str = "test accuracy") -> bytes:
  """PNG of accuracy (in %) vs step: `curves` maps a label to (steps, accuracy in [0, 1]) or to
  a list of such curves (seeds: thin lines, and their mean over the common steps thick)."""
  fig = _figure(7, 4.2)
  ax = fig.add_subplot()
  for i, (label, curve) in enumerate(curves.items()):
    color = f"C{i % 10}"
    runs = curve if isinstance(curve, list) else [curve]
    runs = [(np.asarray(s), np.asarray(v) * 100) for s, v in runs if len(s)]
    if not runs:
      continue
    if len(runs) == 1:
      s, v = runs[0]
      _line(ax, s, v, f"{label} (final {v[-1]:.1f}%)", color=color)
      continue
    for s, v in runs:
      ax.plot(s, v, color=color, alpha=0.3, linewidth=0.8)
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in runs)))
    if common:
      mean = np.array([np.mean([v[list(s).index(c)] for s, v in runs]) for c in common])
      _line(ax, common, mean, f"{label} (final {mean[-1]:.1f}%, mean of {len(runs)})",
            color=color, linewidth=2)
  ax.set_xlabel("step")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if ax.lines:
    ax.legend(fontsize=8, loc="best")
  return _png(fig)


def generator_losses_figure(curves: Mapping) -> bytes:
  """PNG with one panel per (stage, loss term) of generator_loss_curves, in rows per stage."""
  ncols = max(len(terms) for terms in curves.values())
  fig = _figure(2.6 * ncols, 2.2 * len(curves))
  for r, (stage, terms) in enumerate(curves.items()):
    for c, (term, (steps, values)) in enumerate(terms.items()):
      ax = fig.add_subplot(len(curves), ncols, r * ncols + c + 1)
      _line(ax, steps, values, color=f"C{c % 10}")
      ax.set_title(f"{stage}: {term}", fontsize=9)
      ax.tick_params(labelsize=7)
      ax.grid(alpha=0.3)
      if r == len(curves) - 1:
        ax.set_xlabel("step", fontsize=8)
  fig.tight_layout()
  return _png(fig)


def samples_strip_figure(rows: Sequence, title: str) -> bytes:
  """PNG of sample rows [(step, uint8 (h, w, 3) image)] stacked top to bottom, step on the left."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  width = max(img.shape[1] for _, img in rows)
  height = max(img.shape[0] for _, img in rows)
  gap = 4
  canvas = np.full((len(rows) * (height + gap) - gap, width, 3), 255, np.uint8)
  centers = []
  for i, (_, img) in enumerate(rows):
    if img.shape[:2] != (height, width):  # (grids of another size: scaled to the first's)
      img = np.asarray(Image.fromarray(img).resize((width, height), Image.NEAREST))
    y0 = i * (height + gap)
    canvas[y0:y0 + height] = img
    centers.append(y0 + height / 2)
  fig = _figure(max(4.0, width / 80), max(1.5, canvas.shape[0] / 80 + 0.6))
  ax = fig.add_subplot()
  ax.imshow(canvas, interpolation="nearest")
  ax.set_yticks(centers)
  ax.set_yticklabels([f"step {s}" for s, _ in rows], fontsize=8)
  ax.set_xticks([])
  ax.tick_params(left=False)
  for side in ("top", "right", "bottom", "left"):
    ax.spines[side].set_visible(False)
  ax.set_title(title, fontsize=10)
  return _png(fig)


# ---------------------------------------------------------------------------------------------
# The run's plots


def _strip_rows(grids: Sequence, max_rows: int = MAX_STRIP_ROWS) -> list:
  """[(step, first row)] of up to max_rows grids [(step, path)], evenly spaced, last kept."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if len(grids) > max_rows:
    idx = np.unique(np.round(np.linspace(0, len(grids) - 1, max_rows)).astype(int))
    grids = [grids[i] for i in idx]
  rows = []
  for step, path in grids:
    img = np.asarray(Image.open(io.BytesIO(paths.read_bytes(path))).convert("RGB"))
    rows.append((step, first_row(img)))
  return rows


def write_plots(workdir: str, event_dir: Optional[str] = None,
                image_stages: Optional[Sequence[str]] = None) -> list:
  """Draws the run's figures into <workdir>/plots/ (see the module doc); returns the paths
  written. Process 0 only (others return []). Never raises: what cannot be drawn (no event
  files, unreadable ones, no sample grids) is a warning, or skipped when the run has no such
  stage; the other figures are still written. `image_stages`: the stages whose generator losses
  and samples are drawn (the run's method's, registry.Method.image_stages; default: those of
  every registered method)."""
  if jax.process_index() != 0:
    return []
  image_stages = registry.image_stages() if image_stages is None else tuple(image_stages)
  written = []
  out_dir = paths.join(workdir, PLOTS_DIR)

  def attempt(name, draw):
    try:
      data = draw()
    except Exception as e:  # pylint: disable=broad-except
      log.warn(f"plots: could not draw {name}: {type(e).__name__}: {e}")
      return
    if data is not None:
      try:
        path = paths.join(out_dir, name)
        paths.write_bytes(path, data)
        written.append(path)
      except Exception as e:  # pylint: disable=broad-except
        log.warn(f"plots: could not write {name}: {type(e).__name__}: {e}")

  scalars = None
  logdir = paths.join(workdir, "tensorboard")
  try:
    # No event directory at all (nothing was ever written): nothing to draw, no warning.
    if event_dir is not None or paths.isdir(logdir):
      scalars = read_workdir_scalars(workdir, event_dir)
      if not scalars:
        log.warn(f"plots: no stage scalars (<stage>/eval|train/<metric>) in "
                 f"{event_dir or logdir}; no accuracy or loss plots")
  except Exception as e:  # pylint: disable=broad-except
    log.warn(f"plots: could not read the TensorBoard scalars of {workdir}: "
             f"{type(e).__name__}: {e}")
  if scalars:
    acc = accuracy_curves(scalars)
    if acc:
      attempt("accuracy.png", lambda: accuracy_figure(acc))
    losses = generator_loss_curves(scalars, image_stages)
    if losses:
      attempt("generator_losses.png", lambda: generator_losses_figure(losses))

  def strip():
    grids = sample_grids(workdir)
    stage = next((s for s in image_stages if grids.get(s)), None) or next(iter(grids), None)
    if stage is None:
      return None
    what = "generator G0" if stage == "generators" else "the first fixed latents"
    return samples_strip_figure(_strip_rows(grids[stage]),
                                f"{stage}: samples of {what} over training")
  attempt("samples_over_time.png", strip)
  return written
