"""Helpers shared by the benchmark entries: timing, markdown tables, the machine's description,
statistics. Nothing here uses the datafree_jax package (project.py does)."""
from __future__ import annotations

import datetime
import importlib.metadata
import re
import time
from typing import Any, Callable, Optional

import jax
import numpy as np


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------

class Timed:
  """One step to time: `fn`, a no-argument callable that returns when the step is done."""

  def __init__(self, name: str, fn: Callable[[], Any]):
    self.name, self.fn = name, fn
    self.first: Optional[float] = None
    self.times: list = []
    self.round_medians: list = []

  def compile(self):
    """The first call (compilation included), timed into `first`."""
    t = time.perf_counter()
    self.fn()
    self.first = time.perf_counter() - t
    print(f"{self.name}: first call (compile) {self.first:.3g} s", flush=True)

  def run(self, reps: int):
    """`reps` timed calls: their times, and their median into `round_medians`."""
    times = []
    for _ in range(reps):
      t = time.perf_counter()
      self.fn()
      times.append(time.perf_counter() - t)
    self.times += times
    self.round_medians.append(float(np.median(times)))

  def median(self) -> float:
    return float(np.median(self.times))

  def spread(self) -> str:
    """'min - max' of the round medians, '-' before any round."""
    if not self.round_medians:
      return "-"
    return f"{min(self.round_medians):.3g} - {max(self.round_medians):.3g}"

  def release(self):
    self.fn = None


def jax_timed(name: str, step, state) -> Timed:
  """The project's step(state, None) -> (state, metrics), waited for after every call."""
  box = {"state": state}

  def one():
    box["state"], metrics = step(box["state"], None)
    jax.block_until_ready((box["state"], metrics))
  return Timed(name, one)


def time_rounds(groups, rounds: int, reps: int, pause: float = 0.0, alternate: bool = False,
                label: str = ""):
  """Times every Timed of `groups` (a list of lists) in `rounds` rounds of `reps` steps each:
  in each round the groups in turn, within a group its members in turn (in reverse order every
  other round with `alternate`), each after `pause` seconds of idle, so that a slow spell of
  the machine hits all alike. Prints each round's medians."""
  for r in range(rounds):
    for group in groups:
      for timed in group if r % 2 == 0 or not alternate else group[::-1]:
        if pause:
          time.sleep(pause)   # the other runtime's spinning worker threads settle
        timed.run(reps)
    print(f"{label}round {r + 1}/{rounds}: " + "; ".join(
        f"{t.name} {t.round_medians[-1]:.3g}" for g in groups for t in g) + " s/step",
          flush=True)


# ---------------------------------------------------------------------------------------------
# Reports.
# ---------------------------------------------------------------------------------------------

def seeds_and_methods(parser, args, known) -> tuple:
  """(seeds, methods) of args.seeds / args.methods (comma lists); parser.error on a method not
  in `known`."""
  seeds = [int(s) for s in args.seeds.split(",")]
  methods = args.methods.split(",")
  unknown = [m for m in methods if m not in known]
  if unknown:
    parser.error(f"unknown methods {unknown}; choose from {', '.join(known)}")
  return seeds, methods


def markdown_table(columns, rows) -> list:
  """The lines of a markdown table: a header of `columns`, then one line per row of cells."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def cpu_info():
  """(model name, {flag: bool}) from /proc/cpuinfo, or (None, {}) without it."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      text = f.read()
  except OSError:
    return None, {}
  model = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
  flags = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
  have = set(flags.group(1).split()) if flags else set()
  return (model.group(1).strip() if model else "unknown",
          {f: f in have for f in ("avx512f", "avx512_bf16", "avx2")})


def version(dist: str) -> str:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def machine_line(torch_desc: str = "") -> str:
  """One line: JAX's backend, device kind and count, versions (and `torch_desc`), the CPU model
  and flags, the date."""
  dev = jax.devices()[0]
  model, flags = cpu_info()
  cpu = "no /proc/cpuinfo"
  if model is not None:
    cpu = f"CPU {model} (" + ", ".join(f"{k} {'yes' if v else 'no'}"
                                       for k, v in flags.items()) + ")"
  versions = f"jax {jax.__version__}, jaxlib {version('jaxlib')}, flax {version('flax')}"
  if torch_desc:
    versions += f", {torch_desc}"
  return (f"backend {jax.default_backend()}, device kind {dev.device_kind} "
          f"({jax.device_count()} device(s)); {versions}; {cpu}; "
          f"{datetime.datetime.now().isoformat(timespec='seconds')}")


def import_torch():
  """The torch module, or None when PyTorch is not installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  except ImportError:
    return None
  return torch


def rel_diff(a, b) -> float:
  """||a - b|| / ||b|| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def welch(a, b):
  """Welch's unequal-variance t-test of mean(a) - mean(b): (t, two-sided p, degrees of freedom)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  res = stats.ttest_ind(np.asarray(a, np.float64), np.asarray(b, np.float64), equal_var=False)
  return float(res.statistic), float(res.pvalue), float(res.df)
