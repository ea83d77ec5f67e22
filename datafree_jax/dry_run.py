"""Sizing dry run: lower and compile one step of every stage a config runs, from abstract inputs.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m datafree_jax.main --config=configs/imagenet.py:dry_run=True

With `config.dry_run` the pipeline builds every model and the mesh over all devices, and each
stage that would run hands over its jitted training step with `jax.ShapeDtypeStruct` inputs
(Stage.programs): no data is read, no parameter is materialised, nothing is trained and nothing
is written to the workdir. Each step is lowered and compiled for the devices present, and the
compiled executable's `memory_analysis()` and `cost_analysis()` give, per device:

  - the stage's state (parameters, optimiser state, BN statistics) per device;
  - peak memory: arguments + outputs - donated (aliased) buffers + temporaries;
  - FLOPs per step. XLA counts a loop body once, so a step that maps over chunks of generator
    members with lax.map reports one chunk: it is multiplied by the trip count (Program.trips);
  - steps per hour on the accelerators of DEVICES at `config.dry_run_mfu` of their peak
    bfloat16 FLOP/s (an estimate on paper), and hours for the stage's configured steps.

Memory is what the compiler plans for the devices it compiled for (here: host CPU devices, so
an accelerator's own layouts and fusions differ); treat it as an estimate of the same order.
With `config.dry_run_hbm_gib` > 0 a stage whose peak exceeds it fails the run (exit code 3).
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

# Accelerators for the estimate: peak dense bfloat16 FLOP/s and memory per chip (device).
# Sources: cloud.google.com/tpu/docs/v4, /v5e, /v5p (system architecture tables);
# NVIDIA H100 Tensor Core GPU datasheet (SXM5: 989 TFLOP/s dense BF16, 80 GB HBM3).
DEVICES = {
    "TPU v4": (275e12, 32.0),
    "TPU v5e": (197e12, 16.0),
    "TPU v5p": (459e12, 95.0),
    "H100 SXM": (989e12, 80e9 / 2**30),
}


class DoesNotFitError(RuntimeError):
  """A stage's compiled step needs more device memory than config.dry_run_hbm_gib."""


@dataclasses.dataclass
class Program:
  """One jitted step of a stage with abstract arguments (see Stage.programs)."""
  label: str                 # what the step is, e.g. "teacher train step"
  fn: Any                    # the jax.jit-wrapped step function the stage runs
  args: tuple                # jax.ShapeDtypeStruct pytrees (with shardings), or None
  kwargs: dict = dataclasses.field(default_factory=dict)
  state: Any = None          # the abstract state of the stage, for its bytes per device
  trips: int = 1             # how often XLA's once-counted loop body runs in one step
  steps: int = 0             # the stage's configured steps, for hours at the estimate
  note: str = ""


@dataclasses.dataclass
class Row:
  stage: str
  label: str
  devices: int
  state_gib: float
  peak_gib: float
  tflop_per_step: float      # per device
  compile_s: float
  steps: int
  note: str


def abstract_batch(batch_size: int, image_shape, sharding) -> tuple:
  """A training batch (images float32, labels int32) as ShapeDtypeStructs with `sharding`."""
  return (jax.ShapeDtypeStruct((batch_size,) + tuple(image_shape), np.float32,
                               sharding=sharding),
          jax.ShapeDtypeStruct((batch_size,), np.int32, sharding=sharding))


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (the largest
  shard: a replicated leaf counts whole, a split one its share)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def analyse(stage: str, program: Program) -> Row:
  """Lowers and compiles one program; its Row of the table."""
  t = time.perf_counter()
  compiled = program.fn.lower(*program.args, **program.kwargs).compile()
  seconds = time.perf_counter() - t
  mem = compiled.memory_analysis()
  peak = 0.0
  if mem is not None:
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
  state = bytes_per_device(program.state) if program.state is not None else 0
  return Row(stage=stage, label=program.label, devices=jax.device_count(),
             state_gib=state / 2**30, peak_gib=peak / 2**30,
             tflop_per_step=_flops(compiled) * program.trips / 1e12, compile_s=seconds,
             steps=program.steps, note=program.note)


def table(rows: list, mfu: float) -> str:
  """The markdown table of the rows, and the estimate per accelerator."""
  head = ("| stage | step | devices | state GiB / device | peak GiB / device | TFLOP / step / "
          "device | compile s |")
  lines = [head, "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r.stage} | {r.label} | {r.devices} | {r.state_gib:.2f} | "
                 f"{r.peak_gib:.2f} | {r.tflop_per_step:.3g} | {r.compile_s:.0f} |")
  devices = rows[0].devices if rows else jax.device_count()
  lines += ["", f"Estimate on paper: {devices} devices of each kind doing the per-device work "
            f"above at {mfu:.0%} of their peak bfloat16 FLOP/s; 'does not fit': the peak "
            "exceeds the device's memory:", "",
            "| stage | steps | " + " | ".join(
                f"{d} ({mem:.0f} GiB): steps/h, hours" for d, (_, mem) in DEVICES.items()) + " |",
            "|---|---|" + "---|" * len(DEVICES)]
  for r in rows:
    cells = []
    for _, (peak, mem) in DEVICES.items():
      if r.tflop_per_step <= 0:
        cells.append("n/a")
        continue
      per_hour = 3600 * peak * mfu / (r.tflop_per_step * 1e12)
      fits = "" if r.peak_gib <= mem else " (does not fit)"
      cells.append(f"{per_hour:,.0f}, {r.steps / per_hour:,.1f} h{fits}")
    lines.append(f"| {r.stage} | {r.steps:,} | " + " | ".join(cells) + " |")
  notes = [f"- {r.stage}: {r.note}" for r in rows if r.note]
  return "\n".join(lines + ([""] + notes if notes else []))


def run(config, stages, info, emit: Callable[[str], None] = print) -> list:
  """Dry-runs `stages` (train.stages_to_run) of `config`; returns the rows. Raises
  DoesNotFitError after printing the table when a stage exceeds config.dry_run_hbm_gib."""
  from datafree_jax import stage as stage_lib  # pylint: disable=g-import-not-at-top
  from datafree_jax.stages import teacher as teacher_stage  # pylint: disable=g-import-not-at-top
  ctx = stage_lib.Context(config=config, workdir="", data=None, info=info)
  emit(f"dry run: {config.method} on {info.name} ({info.image_size}x{info.image_size}, "
       f"{info.num_classes} classes), dtype {config.dtype}, {jax.device_count()} "
       f"{jax.devices()[0].platform} devices in {jax.process_count()} process(es)")
  if teacher_stage.STAGE not in stages:
    teacher_stage.STAGE.programs(ctx)  # the abstract frozen teacher the later stages use
  rows = []
  for s in stages:
    for program in s.programs(ctx):
      emit(f"  compiling {s.name}: {program.label} ...")
      rows.append(analyse(s.name, program))
  emit("")
  emit(table(rows, config.dry_run_mfu))
  limit = config.dry_run_hbm_gib
  over = [r for r in rows if limit and r.peak_gib > limit]
  if over:
    raise DoesNotFitError("; ".join(
        f"stage {r.stage} ({r.label}) needs {r.peak_gib:.1f} GiB per device, more than "
        f"dry_run_hbm_gib={limit:g}" for r in over) + " (more devices, a smaller batch, fewer "
        "generators per device at once, or bfloat16)")
  return rows


def main(config, stages, info) -> int:
  """CLI body of a dry run: 0; 3 when a stage does not fit; 2 when a stage has no dry run."""
  try:
    run(config, stages, info)
  except DoesNotFitError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 3
  except NotImplementedError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0


def teacher_like(model, variables, bn_stats, model_name: str) -> dict:
  """The abstract frozen teacher a dry run hands later stages (like teacher_stage.load's)."""
  return {"model": model, "variables": variables, "bn_stats": bn_stats,
          "meta": {"model": model_name}}
