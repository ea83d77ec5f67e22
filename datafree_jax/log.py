"""Console output (process 0 only) and the TensorBoard writer."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import jax

from datafree_jax import paths


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
  the workdir as it was. For a remote logdir (gs://...) the event files are written to a local
  temporary directory and copied to the logdir through the path layer (datafree_jax.paths) on
  every flush and at most every SYNC_SECS seconds while scalars are written, so TensorBoard
  can follow the run from the bucket.
  """
  SYNC_SECS = 60.0

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._writer = None
    self._staging = None   # local directory mirrored to a remote logdir
    self._last_sync = 0.0

  def _get(self):
    if self._writer is None:
      target = self.logdir
      if paths.is_remote(self.logdir) and jax.process_index() == 0:
        self._staging = tempfile.mkdtemp(prefix="datafree_jax_tensorboard_")
        target = self._staging
        self._last_sync = time.time()
      self._writer = create_writer(target)
    return self._writer

  @property
  def local_dir(self):
    """The local directory holding this writer's event files: the staging directory of a
    remote logdir (None once closed, or before anything is written), else the logdir."""
    if paths.is_remote(self.logdir):
      return self._staging
    return self.logdir

  def write_scalars(self, step, scalars):
    self._get().write_scalars(step, scalars)
    if self._staging and time.time() - self._last_sync >= self.SYNC_SECS:
      self.flush()

  def write_images(self, step, images):
    self._get().write_images(step, images)

  def __getattr__(self, name):  # write_texts, write_hparams, ...
    if name.startswith("_"):
      raise AttributeError(name)
    return getattr(self._get(), name)

  def flush(self):
    if self._writer is not None:
      self._writer.flush()
      self._sync()

  def close(self):
    if self._writer is not None:
      self._writer.close()
      self._sync()
      if self._staging:
        shutil.rmtree(self._staging, ignore_errors=True)
        self._staging = None

  def _sync(self):
    """Copies the staged event files to the remote logdir."""
    if not self._staging:
      return
    for root, _, files in os.walk(self._staging):
      for f in files:
        local = os.path.join(root, f)
        rel = os.path.relpath(local, self._staging).replace(os.sep, "/")
        paths.copy(local, paths.join(self.logdir, rel))
    self._last_sync = time.time()
