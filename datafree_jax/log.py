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
