"""The one training loop every stage runs: resume, periodic checkpoints, preemption, the
non-finite guard, evaluation, TensorBoard scalars and a console line with steps/s and ETA.

Checkpoints (checkpoints.py): periodic saves (every `checkpoint_every` steps) are asynchronous
when `async_saves`: the loop is held only while the state is copied off the devices, and the
next steps run while the checkpoint is written; the final save completes before the loop
returns, and then replaces the stage's earlier checkpoints. On SIGTERM (a preemption) the loop
saves the reached step within a time budget (`preemption_save_secs`,
config.checkpoint_preemption_secs): a periodic save still being written is waited for first (it
is the preemption checkpoint when it is of the reached step), then the reached step is written.
It logs the items written, their size and the time taken, or, when the budget runs out first,
which complete checkpoint a resume will start from; the write goes on while the process lives,
and the loop raises Preempted either way. In a multi-process run every process reaches the same
step (JAX's preemption service), and the reached step is saved by all of them or by none.

A stage hands the loop its initial state (a pytree of placed jax arrays, used as the restore
target), a jitted `step_fn(state, batch) -> (state, metrics)`, a `batch_fn(step)` that returns the
host batch of that step (or None) and an `eval_fn(state) -> metrics`. Randomness inside a step is
derived from the step number, and `batch_fn` is a pure function of the step, so a run resumed
from a checkpoint continues exactly as the uninterrupted run would have.
"""
from __future__ import annotations

import dataclasses
import math
import signal
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import log
from datafree_jax.errors import NonFiniteError


class Preempted(Exception):
  """SIGTERM was received at `step`; `saved`: its checkpoint is complete. Otherwise the
  preemption save outlasted its budget and a resume starts from `resume_step` (None: from the
  start) unless the write completes before the process ends."""

  def __init__(self, stage: str, step: int, directory: str, saved: bool = True,
               resume_step: Optional[int] = None, budget: float = 0.0):
    if saved:
      text = (f"{stage}: preempted (SIGTERM) at step {step}; checkpoint saved in {directory}. "
              "Run the same command again to resume.")
    else:
      text = (f"{stage}: preempted (SIGTERM) at step {step}; its checkpoint was not complete "
              f"after the preemption budget of {budget:g} s (checkpoint_preemption_secs) and is "
              "still being written: if the process is killed first, a resume starts from "
              + (f"step {resume_step}" if resume_step is not None else "the beginning") +
              f" (in {directory}). Run the same command again to resume.")
    super().__init__(text)
    self.step = step
    self.saved = saved
    self.resume_step = step if saved else resume_step


class _SigtermFlag:
  """Records SIGTERM while installed (main thread only); restores the old handler on exit.
  `reached(step)`: whether this step is the one to save at and stop (called every step)."""

  def __init__(self):
    self.received = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not the main thread: preemption is then the caller's business.
      self._old = None
    return self

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self.received = True

  def reached(self, step: int) -> bool:  # pylint: disable=unused-argument
    return self.received

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class _PreemptionSync:
  """The multi-process form of _SigtermFlag: JAX's preemption service (started by
  jax.distributed.initialize) catches SIGTERM on any process and tells all of them; every
  process then reaches the same sync step, so all save the same step and stop."""

  def __enter__(self):
    return self

  def reached(self, step: int) -> bool:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return multihost_utils.reached_preemption_sync_point(step)

  def __exit__(self, *exc):
    pass


def _on_every_process(flag: bool) -> bool:
  """Whether `flag` holds on every process (a save is started by all processes or by none)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag, np.int32))))


def _preemption_watch():
  """The SIGTERM watch of this run: one process, or JAX's preemption service across all."""
  if (jax.process_count() > 1 and jax.distributed.is_initialized()
      and jax.config.jax_enable_preemption_service):
    return _PreemptionSync()
  return _SigtermFlag()


@dataclasses.dataclass
class LoopResult:
  state: Any
  step: int
  metrics: dict          # last train metrics (host floats)
  eval_metrics: dict     # last evaluation (host floats)
  resumed_from: Optional[int]
  seconds: float


def run(*, stage: str, ckpt: ckpt_lib.StageCheckpoints, state, step_fn: Callable,
        total_steps: int, batch_fn: Optional[Callable[[int], Any]] = None,
        eval_fn: Optional[Callable[[Any], Mapping[str, float]]] = None, eval_every: int = 0,
        checkpoint_every: int = 0, writer=None, meta: Optional[Mapping] = None,
        final_extras: Optional[Callable[[Any], Mapping]] = None, log_every_secs: float = 10.0,
        scalars_every: int = 25,
        on_eval: Optional[Callable[[Any, int], None]] = None, async_saves: bool = True,
        preemption_save_secs: float = 25.0,
        final_state_item: Optional[str] = None) -> LoopResult:
  """Runs `step_fn` from the latest checkpoint (or `state`) to `total_steps`.

  `final_extras(state)` returns extra items saved with the final checkpoint; with
  `final_state_item`, the one of them that holds part of the state (keyed like the state): the
  final checkpoint then holds the rest as 'resume' instead of a whole 'state' (checkpoints.py).
  `async_saves`: periodic saves are written while the next steps run. `preemption_save_secs`:
  the time budget of the save on SIGTERM. `on_eval(state,
  step)` runs beside each evaluation (sample grids). TensorBoard scalars are tagged
  `<stage>/eval/<metric>` and `<stage>/train/<metric>`: the stages of a run share one writer
  and each counts its steps from 0, so the stage name keeps their curves apart.
  """
  meta = dict(meta or {})
  t_start = time.time()
  start = ckpt.latest_step()
  resumed_from = None
  if start is not None:
    saved_meta = ckpt.restore_meta(start)
    state = ckpt.restore_state(start, ckpt_lib.abstract_like(state), saved_meta)
    resumed_from = start
    if saved_meta.get("done") and start >= total_steps:
      log.info(f"{stage}: finished earlier at step {start}; loaded from {ckpt.directory}")
      return LoopResult(state, start, {}, saved_meta.get("eval", {}), start, 0.0)
    log.info(f"{stage}: resuming from step {start} in {ckpt.directory}")
  else:
    start = 0

  last_metrics: dict = {}
  eval_metrics: dict = {}
  t_last_log = time.time()
  t_rate, step_rate = time.time(), start
  steps_per_sec = float("nan")

  def save(step, done, wait=True):
    m = dict(meta, stage=stage, step=step, total_steps=total_steps, done=done,
             eval=eval_metrics, train=last_metrics)
    extras = final_extras(state) if (done and final_extras) else None
    return ckpt.save(step, state, m, extras, wait=wait,
                     state_item=final_state_item if (done and extras) else None)

  def preemption_save(step, started):
    """The checkpoint of `step` within the budget (`started`: a periodic save of it is in
    flight or done); raises Preempted."""
    t0 = time.monotonic()
    deadline = t0 + preemption_save_secs
    pending = ckpt.in_flight()
    if pending is not None and pending.step != step:
      log.info(f"{stage}: SIGTERM at step {step} while checkpoint {pending.step} "
               f"({pending.describe()}) is being written; waiting for it first")
    report = pending if (pending is not None and pending.step == step) else None
    if _on_every_process(ckpt.wait(max(deadline - time.monotonic(), 0.0))) and not started:
      report = save(step, done=False, wait=False)
    elif started and report is None:
      report = ckpt.last
    complete = report is not None and report.step == step and ckpt.wait(
        max(deadline - time.monotonic(), 0.0))
    took = time.monotonic() - t0
    if complete:
      log.info(f"{stage}: preemption checkpoint of step {step} written in {took:.1f} s "
               f"(budget {preemption_save_secs:g} s): {report.describe()} in {ckpt.directory}")
      raise Preempted(stage, step, ckpt.directory)
    resume = ckpt.complete_step()
    log.warn(f"{stage}: the preemption save of step {step} did not complete within "
             f"{preemption_save_secs:g} s (checkpoint_preemption_secs; {took:.1f} s so far); "
             "a resume uses " + (f"checkpoint {resume}" if resume is not None else
                                 "no checkpoint (the stage restarts)") +
             f" in {ckpt.directory} unless the write completes before the process ends")
    raise Preempted(stage, step, ckpt.directory, saved=False, resume_step=resume,
                    budget=preemption_save_secs)

  def evaluate(step):
    nonlocal eval_metrics
    if eval_fn is None:
      return
    eval_metrics = {k: float(v) for k, v in eval_fn(state).items()}
    if writer is not None:
      writer.write_scalars(step, {f"{stage}/eval/{k}": v for k, v in eval_metrics.items()})
    log.info(f"{stage} step {step}/{total_steps} eval: " +
             " ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
    if on_eval is not None:
      on_eval(state, step)

  def check(n, metrics):
    """Host side of step n - 1 (whose state is step n's): the NaN stop, scalars, progress."""
    nonlocal last_metrics, t_last_log, t_rate, step_rate, steps_per_sec
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
      raise NonFiniteError(
          f"{stage}: non-finite {', '.join(bad)} at step {n - 1} "
          f"({', '.join(f'{k}={metrics[k]}' for k in bad)}); the run stopped, the last good "
          f"checkpoint in {ckpt.directory} (step {ckpt.latest_step()}) is kept")
    last_metrics = metrics
    if writer is not None and (n % scalars_every == 0 or n == total_steps):
      writer.write_scalars(n, {f"{stage}/train/{k}": v for k, v in metrics.items()})
    now = time.time()
    if now - t_last_log >= log_every_secs or n == total_steps:
      steps_per_sec = (n - step_rate) / max(now - t_rate, 1e-9)
      t_rate, step_rate = now, n
      eta = (total_steps - n) / steps_per_sec if steps_per_sec > 0 else float("nan")
      log.info(f"{stage} step {n}/{total_steps} " +
               " ".join(f"{k} {v:.4f}" for k, v in metrics.items()) +
               f" | {steps_per_sec:.2f} steps/s | ETA {log.format_seconds(eta)}")
      if writer is not None:
        writer.write_scalars(n, {f"{stage}/train/steps_per_sec": steps_per_sec})
      t_last_log = now

  # The metrics of a step are read back (NaN stop, logging) after the next step is dispatched,
  # so that the device does not wait for the host between steps; before anything reads or saves
  # the state (evaluation, checkpoint, preemption, the end) the pending step is checked first.
  pending = None
  step = start
  with _preemption_watch() as sigterm:
    while step < total_steps:
      batch = batch_fn(step) if batch_fn is not None else None
      state, metrics = step_fn(state, batch)
      if pending is not None:
        check(*pending)
      pending = (step + 1, metrics)
      step += 1
      is_eval = bool(eval_every) and step % eval_every == 0 and step < total_steps
      saved = bool(checkpoint_every) and step % checkpoint_every == 0 and step < total_steps
      preempt = step < total_steps and sigterm.reached(step)
      if is_eval or saved or preempt or step == total_steps:
        check(*pending)
        pending = None
      if is_eval:
        evaluate(step)
      if step == total_steps:
        break
      if saved:
        save(step, done=False, wait=not async_saves)
      if preempt:  # (also while the periodic save above runs: that save is it)
        preemption_save(step, started=saved)
    evaluate(step)
    final = save(step, done=True)
    ckpt.delete_others(step)  # the final checkpoint replaces them
    log.info(f"{stage}: final checkpoint of step {step} written in {final.seconds:.1f} s: "
             f"{final.describe()}")
    if writer is not None:
      writer.flush()
  return LoopResult(state, step, last_metrics, eval_metrics, resumed_from, time.time() - t_start)
