"""Fault injection for tests, from outside the package: a stage wrapped so that its step
function misbehaves at a chosen step. The production steps and losses know nothing of it.

  nan_at(stage, step)      every float array of the state is NaN from that step on, so the
                           stage's loss and gradients are NaN there (the loop must stop)
  sigterm_at(stage, step)  the process sends itself SIGTERM in that step (a preemption: the loop
                           saves that step's checkpoint and raises loop.Preempted)
  signal_at(stage, step, signum[, once_exists])  the same with any signal (SIGKILL: the
                           process dies there), sent once a path exists
  with_faulty_stage(method, wrapped)  registers a method like `method` with one stage replaced
                           by `wrapped` (same name, so the same checkpoint directory)
"""
import dataclasses
import os
import signal
import time

import jax
import jax.numpy as jnp

from datafree_jax import methods
from datafree_jax import registry
from datafree_jax import stage as stage_lib


class Wrapped(stage_lib.Stage):
  """`inner` with its plan's step function replaced by wrap_step(step)."""

  def __init__(self, inner, wrap_step):
    self.inner, self.wrap_step = inner, wrap_step
    self.name, self.selector = inner.name, inner.selector

  def check(self, config, info):
    return self.inner.check(config, info)

  def steps(self, config):
    return self.inner.steps(config)

  def identity(self, ctx):
    return self.inner.identity(ctx)

  def check_checkpoint(self, ctx, saved, directory):
    return self.inner.check_checkpoint(ctx, saved, directory)

  def resume_hint(self, key, saved):
    return self.inner.resume_hint(key, saved)

  def prepare(self, ctx, finished):
    return self.inner.prepare(ctx, finished)

  def plan(self, ctx):
    plan = self.inner.plan(ctx)
    return dataclasses.replace(plan, step=self.wrap_step(plan.step))

  def summarize(self, ctx, done):
    return self.inner.summarize(ctx, done)


def nan_at(stage, at: int):
  def wrap_step(step):
    def poisoned(state, batch):
      if int(state["step"]) >= at:
        state = jax.tree.map(
            lambda x: x * jnp.nan if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
      return step(state, batch)
    return poisoned
  return Wrapped(stage, wrap_step)


def signal_at(stage, at: int, signum, once_exists: str = ""):
  """The process sends itself `signum` in step `at` (while the state holds step at - 1); with
  `once_exists`, once that path exists (a checkpoint's step directory: periodic checkpoints are
  written in the background, and the path appears when one is complete)."""
  def wrap_step(step):
    def signalled(state, batch):
      if int(state["step"]) == at - 1:
        deadline = time.monotonic() + 300
        while once_exists and not os.path.exists(once_exists):
          assert time.monotonic() < deadline, f"{once_exists} did not appear"
          time.sleep(0.01)
        os.kill(os.getpid(), signum)
      return step(state, batch)
    return signalled
  return Wrapped(stage, wrap_step)


def sigterm_at(stage, at: int):
  return signal_at(stage, at, signal.SIGTERM)  # the loop's SIGTERM watch takes it


def with_faulty_stage(method: str, wrapped: Wrapped) -> str:
  """Registers method '<method>+<fault>' whose stage `wrapped.name` is `wrapped`; its name."""
  name = f"{method}+faulty_{wrapped.name}"
  base = registry.get(method)
  methods.register_method(name, tuple(wrapped if s.name == wrapped.name else s
                                      for s in base.stages),
                          student_stage=base.student_stage, image_stages=base.image_stages)
  assert wrapped in registry.get(name).stages, f"{method} has no stage {wrapped.name!r}"
  return name
