"""The target platform: one value, decided once per run, that picks every formulation.

A program's formulation depends on where it runs: on XLA:CPU the models use the convolution
and pooling forms of models/cpu_conv.py and the generator ensemble updates its members in a
Python loop of separate calls; on GPU and TPU they use XLA's own convolutions and vmapped
members. That choice is made from this value, never from the default backend
(`jax.default_backend`) while tracing, so that a program for an accelerator can be built,
lowered (`lowering_platform`) and inspected on a CPU (the dry run), and the platform is part of
every model and step it shapes (a field of the model, which jitted functions close over or take
as a static argument, so programs of different platforms never share a trace).

Values: 'cpu', 'gpu', 'tpu' (`PLATFORMS`). `config.platform` 'auto' means the platform of the
devices the run's mesh is built from (`of_devices`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
CHOICES = ("auto",) + PLATFORMS
# What jax.Device.platform says -> ours.
_DEVICE_PLATFORMS = {"cpu": "cpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
# Ours -> what lowering_platforms / jax.export take.
_LOWERING = {"cpu": "cpu", "gpu": "cuda", "tpu": "tpu"}


def of_devices(devices: Optional[Sequence] = None) -> str:
  """The platform of `devices` (default: every device of the process, as the mesh uses)."""
  devices = list(devices) if devices is not None else jax.devices()
  return _DEVICE_PLATFORMS.get(devices[0].platform, devices[0].platform)


def resolve(setting: str, devices: Optional[Sequence] = None) -> str:
  """config.platform resolved: 'auto' -> of_devices(devices); else the value itself."""
  if setting == "auto":
    return of_devices(devices)
  if setting not in PLATFORMS:
    raise ValueError(f"unknown platform {setting!r}; choose one of {', '.join(CHOICES)}")
  return setting


def of_config(config) -> str:
  """The run's platform: config.platform resolved against this process's devices."""
  return resolve(config.get("platform", "auto"))


def is_cpu(platform: Optional[str]) -> bool:
  """Whether `platform` gets the CPU formulations (cpu_conv paths, the 'loop' ensemble). None,
  the models' default, is XLA's own forms on any platform (what export traces)."""
  return platform == "cpu"


def lowering_platform(platform: str) -> str:
  """The name jit's lowering_platforms and jax.export use for `platform` ('gpu' -> 'cuda')."""
  return _LOWERING[platform]
