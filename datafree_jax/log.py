"""Console output (process 0 only) and the TensorBoard writer."""
from __future__ import annotations

import sys

import jax


def info(msg: str):
  if jax.process_index() == 0:
    print(msg, flush=True)


def warn(msg: str):
  if jax.process_index() == 0:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def format_seconds(s: float) -> str:
  s = int(round(max(s, 0)))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m{sec:02d}s" if h else (f"{m}m{sec:02d}s" if m else f"{sec}s")


def create_writer(logdir: str):
  """TensorBoard writer on process 0 (clu metric_writers); others write nothing."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))


class LazyWriter:
  """A clu metric writer that creates its event file only when something is written.

  A run that fails before its first summary (a corrupt checkpoint found on restore) then leaves
  the workdir as it was.
  """

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._writer = None

  def _get(self):
    if self._writer is None:
      self._writer = create_writer(self.logdir)
    return self._writer

  def __getattr__(self, name):  # write_scalars, write_images, ...
    if name.startswith("_"):
      raise AttributeError(name)
    return getattr(self._get(), name)

  def flush(self):
    if self._writer is not None:
      self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
