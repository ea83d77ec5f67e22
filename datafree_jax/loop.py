"""The one training loop every stage runs: resume, periodic checkpoints, preemption, the
non-finite guard, evaluation, TensorBoard scalars and a console line with steps/s and ETA.

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

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import log
from datafree_jax.errors import NonFiniteError


class Preempted(Exception):
  """SIGTERM was received; a checkpoint at `step` was saved."""

  def __init__(self, stage: str, step: int, directory: str):
    super().__init__(f"{stage}: preempted (SIGTERM) at step {step}; checkpoint saved in "
                     f"{directory}. Run the same command again to resume.")
    self.step = step


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
        on_eval: Optional[Callable[[Any, int], None]] = None) -> LoopResult:
  """Runs `step_fn` from the latest checkpoint (or `state`) to `total_steps`.

  `final_extras(state)` returns extra items saved with the final checkpoint. `on_eval(state,
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
    state = ckpt.restore(start, "state", ckpt_lib.abstract_like(state))
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

  def save(step, done):
    m = dict(meta, stage=stage, step=step, total_steps=total_steps, done=done,
             eval=eval_metrics, train=last_metrics)
    extras = final_extras(state) if (done and final_extras) else None
    ckpt.save(step, state, m, extras)

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
        save(step, done=False)
      if preempt:  # (also while the periodic save above ran: that save is it)
        if not saved:
          save(step, done=False)
        raise Preempted(stage, step, ckpt.directory)
    evaluate(step)
    save(step, done=True)
    if writer is not None:
      writer.flush()
  return LoopResult(state, step, last_metrics, eval_metrics, resumed_from, time.time() - t_start)
