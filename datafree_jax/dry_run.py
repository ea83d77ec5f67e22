"""Sizing dry run: every device program of every stage a config runs, lowered and compiled from
abstract inputs, for the platform the run is meant for.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m datafree_jax.main --config=configs/imagenet.py:dry_run=True,target=gpu

With `config.dry_run` the pipeline builds every model and the mesh over all devices, and each
stage that would run hands over its programs with `jax.ShapeDtypeStruct` inputs
(Stage.programs): the train step, the evaluation and sampling programs, and the checkpoint
restore. No data is read, no parameter is materialised, nothing is trained or written.

The target platform (`config.dry_run_target`; 'auto': the devices' own platform, or 'tpu' on a
CPU) decides the formulation (platforms.py): on a CPU sizing 'tpu' or 'gpu', the programs are
built in the accelerator's form (XLA's convolutions, vmapped generator members), then
  - lowered for the target (`lowering_platforms`): the program the accelerator would compile
    (a program that does not lower fails here);
  - compiled by the CPU compiler in that same form, for the per-device figures: FLOPs of the
    partitioned program (XLA counts a loop body once; Program.trips multiplies it back) and
    memory, arguments + outputs - donated (aliased) buffers + temporaries. Buffer assignment
    differs per backend, so memory is an estimate of the accelerator's figure, labelled so.
On the target itself everything comes from the exact compilation.

Each program is judged against the memory a process can use on each device kind of the target:
a GPU process gets XLA_PYTHON_CLIENT_MEM_FRACTION of the memory (JAX preallocates 75% unless the
variable says otherwise; the launchers leave JAX's default), a TPU process the chip's HBM. A
program that does not fit is named with its largest values. Hours come from a measured
throughput (`config.dry_run_measured`: the JSON a measuring dry run wrote on that device kind)
or else from the stated utilisation `config.dry_run_mfu` of the chip's peak bfloat16 FLOP/s.

Each stage's checkpoints are sized from the abstract state and final items (the periodic one:
the train state; the final one: its items, checkpoints.py), with the time one host needs to
write them at the bandwidths SAVE_BANDWIDTH assumes (local NVMe, GCS), against the preemption
budget `config.checkpoint_preemption_secs`.

`config.dry_run_measure` also runs every program a few times on the devices present, on zero
inputs, and prints seconds per call, achieved TFLOP/s and the measured peak memory
(`device.memory_stats()`, where the backend reports it) beside the prediction;
`config.dry_run_out` writes the rows as JSON (benchmarks/accelerator.sh does both on a device).
With `config.dry_run_hbm_gib` > 0 a program whose peak exceeds it fails the run (exit code 3).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from datafree_jax import checkpoints as ckpt_lib
from datafree_jax import paths
from datafree_jax import platforms
from datafree_jax import stage as stage_lib

# Device kinds per target platform: (name, peak dense bfloat16 FLOP/s, memory GiB per chip,
# substring of jax's device_kind). Sources: cloud.google.com/tpu/docs/v4, /v5e, /v5p (system
# architecture tables); NVIDIA A100, H100 (SXM5: 989 TFLOP/s dense BF16, 80 GB) and H200
# (141 GB) datasheets.
DEVICES = {
    "tpu": (("TPU v4", 275e12, 32.0, "v4"), ("TPU v5e", 197e12, 16.0, "v5 lite"),
            ("TPU v5p", 459e12, 95.0, "v5p")),
    "gpu": (("A100 80GB", 312e12, 80e9 / 2**30, "A100"), ("H100 SXM", 989e12, 80e9 / 2**30, "H100"),
            ("H200", 989e12, 141e9 / 2**30, "H200")),
    "cpu": (),
}
# The write bandwidths the checkpoint save times assume, per host writing its share (orbax
# writes each process's shards in parallel; a single host writes all): a local NVMe SSD's
# sustained sequential write, and a host's throughput to a Cloud Storage bucket with many
# parallel uploads (tensorstore's), bounded by the VM's network egress. Assumptions, not
# measurements (benchmarks/save_speed.py measures this machine).
SAVE_BANDWIDTH = (("local NVMe", 2.0e9), ("GCS", 1.0e9))   # bytes/s per host
MEM_FRACTION_VAR = "XLA_PYTHON_CLIENT_MEM_FRACTION"
JAX_GPU_MEM_FRACTION = 0.75   # JAX's default preallocation (without MEM_FRACTION_VAR)


class DoesNotFitError(RuntimeError):
  """A program needs more device memory than config.dry_run_hbm_gib."""


@dataclasses.dataclass
class Row:
  stage: str
  label: str
  kind: str
  devices: int
  state_gib: float
  peak_gib: float
  tflop_per_step: float      # per device and call
  compile_s: float
  steps: int
  note: str
  largest: list = dataclasses.field(default_factory=list)   # [(GiB, 'name dtype[dims]')]
  checkpoint: dict = dataclasses.field(default_factory=dict)  # restore: {'periodic'|'final':
                                                              # {item: bytes}}, all processes
  measured_s: Optional[float] = None          # dry_run_measure: seconds per call
  measured_peak_gib: Optional[float] = None   # ... and the device's peak memory


def target_of(config) -> str:
  """config.dry_run_target resolved: 'auto' -> the devices' platform, 'tpu' on a CPU."""
  t = config.get("dry_run_target", "auto")
  if t != "auto":
    return t
  present = platforms.of_devices()
  return "tpu" if platforms.is_cpu(present) else present


def gpu_mem_fraction() -> float:
  return float(os.environ.get(MEM_FRACTION_VAR, JAX_GPU_MEM_FRACTION))


def usable_gib(target: str, memory_gib: float) -> float:
  """What one process can allocate on a device of `memory_gib`: the preallocation fraction of a
  GPU, the whole HBM of a TPU (the runtime manages it)."""
  return memory_gib * gpu_mem_fraction() if target == "gpu" else memory_gib


def bytes_per_device(tree) -> int:
  """Bytes one device holds of a pytree of ShapeDtypeStructs with shardings (the largest
  shard: a replicated leaf counts whole, a split one its share)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


_VALUE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([a-z]+[0-9]*)\[([0-9,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def largest_values(hlo_text: str, n: int = 5) -> list:
  """The n largest array values of an optimised HLO module: [(GiB, 'name dtype[dims]')], one
  per distinct shape (what to look at when a program does not fit)."""
  found = {}
  for line in hlo_text.splitlines():
    m = _VALUE.match(line)
    if not m or m.group(2) not in _ITEMSIZE:
      continue
    dims = m.group(3)
    size = _ITEMSIZE[m.group(2)] * int(np.prod([int(d) for d in dims.split(",") if d],
                                               dtype=np.int64))
    key = f"{m.group(2)}[{dims}]"
    if key not in found or found[key][0] < size:
      found[key] = (size, f"{m.group(1)} {key}")
  top = sorted(found.values(), reverse=True)[:n]
  return [(size / 2**30, what) for size, what in top]


def lower_for(program: stage_lib.Program, target: str):
  """The program lowered for `target` (platforms.py name): what that platform would compile."""
  return program.fn.trace(*program.args, **program.kwargs).lower(
      lowering_platforms=(platforms.lowering_platform(target),))


def _zeros(tree):
  def make(s):
    return jax.device_put(jnp.zeros(s.shape, s.dtype), s.sharding) if getattr(
        s, "sharding", None) else jnp.zeros(s.shape, s.dtype)
  return jax.tree.map(make, tree)


def _peak_bytes() -> Optional[int]:
  stats = [d.memory_stats() for d in jax.local_devices()]
  if not all(stats) or any("peak_bytes_in_use" not in s for s in stats):
    return None
  return max(s["peak_bytes_in_use"] for s in stats)


def _measure(compiled, program: stage_lib.Program, repeats: int = 3) -> float:
  """Seconds per call of `compiled` on zero inputs (inputs made anew for each call: train
  steps donate their state), after one warm-up call."""
  times = []
  for i in range(repeats + 1):
    args, kwargs = _zeros(program.args), _zeros(program.kwargs)
    jax.block_until_ready((args, kwargs))
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args, **kwargs))
    if i:
      times.append(time.perf_counter() - t)
  return float(np.median(times))


def analyse(stage: str, program: stage_lib.Program, target: str, measure: bool = False) -> Row:
  """Lowers and compiles one program; its Row of the table."""
  state = bytes_per_device(program.state) if program.state is not None else 0
  devices = jax.device_count()
  if program.fn is None:  # a checkpoint restore: the restored state is the program's memory
    sizes = {kind: {name: ckpt_lib.tree_bytes(tree) for name, tree in items.items()}
             for kind, items in (program.checkpoint or {}).items()}
    return Row(stage, program.label, program.kind, devices, state / 2**30, state / 2**30, 0.0,
               0.0, program.steps, program.note, checkpoint=sizes)
  t = time.perf_counter()
  traced = program.fn.trace(*program.args, **program.kwargs)
  if platforms.of_devices() != target:
    traced.lower(lowering_platforms=(platforms.lowering_platform(target),))  # it must lower
  compiled = traced.lower().compile()
  seconds = time.perf_counter() - t
  # Per device: XLA's count of the partitioned program (the target's form; the lowering above
  # counts the unpartitioned one, the whole mesh's work for a jit-sharded step).
  flops = stage_lib.cost_flops(compiled.cost_analysis())
  mem = compiled.memory_analysis()
  peak = 0.0
  if mem is not None:
    peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
            + mem.temp_size_in_bytes)
  row = Row(stage=stage, label=program.label, kind=program.kind, devices=devices,
            state_gib=state / 2**30, peak_gib=peak / 2**30,
            tflop_per_step=flops * program.trips / 1e12, compile_s=seconds,
            steps=program.steps, note=program.note,
            largest=largest_values(compiled.as_text() or ""))
  if measure:
    before = _peak_bytes()
    row.measured_s = _measure(compiled, program)
    after = _peak_bytes()
    if after is not None:
      row.measured_peak_gib = after / 2**30
      if before is not None and before > after:  # a peak counter that was reset
        row.measured_peak_gib = before / 2**30
  return row


def load_measured(path: str) -> dict:
  """{device name of DEVICES: achieved TFLOP/s per device} from a measuring dry run's JSON
  (dry_run_out of a run with dry_run_measure on that device kind): its train steps' FLOPs over
  their measured seconds, the median."""
  if not path:
    return {}
  data = json.loads(paths.read_bytes(path).decode())
  kind = data.get("device_kind", "")
  rates = [r["tflop_per_step"] / r["measured_s"] for r in data.get("rows", [])
           if r.get("kind") == "train" and r.get("measured_s") and r["tflop_per_step"] > 0]
  out = {}
  for entries in DEVICES.values():
    for name, _, _, match in entries:
      if match.lower() in kind.lower() and rates:
        out[name] = float(np.median(rates))
  return out


def table(rows: list, target: str, exact: bool, mfu: float, measured: dict,
          preemption_secs: float = 25.0) -> str:
  """The markdown tables of the rows: programs, then memory and hours per device kind."""
  where = ("compiled for these devices" if exact else
           f"the {target} program, lowered for {target}; FLOPs and memory per device from the "
           "CPU compiler's plan of that same program (buffer assignment differs per backend: "
           "the memory is an estimate)")
  head = ("| stage | program | devices | state GiB / device | peak GiB / device | TFLOP / call / "
          "device | compile s |")
  lines = [f"Programs ({where}):", "", head, "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r.stage} | {r.label} | {r.devices} | {r.state_gib:.2f} | "
                 f"{r.peak_gib:.2f} | {r.tflop_per_step:.3g} | {r.compile_s:.0f} |")
  kinds = DEVICES.get(target, ())
  if kinds:
    devices = rows[0].devices if rows else jax.device_count()
    budget = (f"a process may use {gpu_mem_fraction():.0%} of a GPU's memory "
              f"({MEM_FRACTION_VAR}{'' if MEM_FRACTION_VAR in os.environ else ', JAX default'})"
              if target == "gpu" else "a TPU process may use the chip's HBM")
    assumed = [name for name, *_ in kinds if name not in measured]
    rate = []
    if measured:
      rate.append("measured throughput for " + ", ".join(
          f"{k} ({v:.1f} TFLOP/s per device)" for k, v in measured.items()))
    if assumed:
      rate.append(f"assumed {mfu:.0%} of peak bfloat16 FLOP/s for " + ", ".join(assumed) +
                  " (dry_run_mfu; published ResNet-50 training on one H100, about 3,000 "
                  "images/s, is about 7% in this accounting)")
    lines += ["", f"Per device kind, {devices} devices each: peak against usable memory "
              f"({budget}); hours of the stage's calls at " + "; ".join(rate) + ":", "",
              "| stage | program | calls | " + " | ".join(
                  f"{name} ({usable_gib(target, mem):.0f} of {mem:.0f} GiB)"
                  for name, _, mem, _ in kinds) + " |",
              "|---|---|---|" + "---|" * len(kinds)]
    for r in rows:
      cells = []
      for name, peak, mem, _ in kinds:
        fits = "fits" if r.peak_gib <= usable_gib(target, mem) else "**does not fit**"
        if r.tflop_per_step > 0 and r.steps:
          per_s = measured.get(name, peak * mfu / 1e12)
          hours = r.steps * r.tflop_per_step / per_s / 3600
          cells.append(f"{fits}, {hours:,.2f} h")
        else:
          cells.append(fits)
      lines.append(f"| {r.stage} | {r.label} | {r.steps:,} | " + " | ".join(cells) + " |")
    over = [r for r in rows if any(r.peak_gib > usable_gib(target, m) for _, _, m, _ in kinds)]
    if over:
      lines += ["", "Largest values of the programs that do not fit everywhere:"]
      for r in over:
        lines.append(f"- {r.stage}, {r.label}: " + "; ".join(
            f"{what} {gib:.2f} GiB" for gib, what in r.largest[:3]))
  timed = [r for r in rows if r.measured_s is not None]
  if timed:
    lines += ["", "Measured on these devices (zero inputs, median of 3 calls after one):", "",
              "| stage | program | s / call | TFLOP/s / device | peak GiB predicted | "
              "peak GiB measured | measured / predicted |", "|---|---|---|---|---|---|---|"]
    for r in timed:
      meas = "n/a" if r.measured_peak_gib is None else f"{r.measured_peak_gib:.2f}"
      ratio = ("n/a" if r.measured_peak_gib is None or not r.peak_gib
               else f"{r.measured_peak_gib / r.peak_gib:.2f}")
      lines.append(f"| {r.stage} | {r.label} | {r.measured_s:.4f} | "
                   f"{r.tflop_per_step / r.measured_s:.2f} | {r.peak_gib:.2f} | {meas} | "
                   f"{ratio} |")
  lines += checkpoint_table(rows, preemption_secs)
  notes = [f"- {r.stage}: {r.note}" for r in rows if r.note]
  return "\n".join(lines + ([""] + notes if notes else []))


def save_seconds(nbytes: float, hosts: int = 1) -> dict:
  """{place: seconds} to write `nbytes` at SAVE_BANDWIDTH, `hosts` hosts writing shares."""
  return {place: nbytes / (rate * hosts) for place, rate in SAVE_BANDWIDTH}


def checkpoint_table(rows: list, budget: float) -> list:
  """Lines of the checkpoint table: each stage's periodic and final checkpoint, its items and
  bytes, and the estimated save time of one host at SAVE_BANDWIDTH, against the preemption
  budget (config.checkpoint_preemption_secs)."""
  sized = [r for r in rows if r.checkpoint]
  if not sized:
    return []
  hosts = jax.process_count()
  places = [p for p, _ in SAVE_BANDWIDTH]
  lines = ["", "Checkpoints (logical bytes; meta left out), and the time to write them at "
           + ", ".join(f"{p} {rate / 1e9:g} GB/s" for p, rate in SAVE_BANDWIDTH)
           + f" per host ({hosts} host(s) writing their own shards; assumed bandwidths, "
           "dry_run.SAVE_BANDWIDTH). Periodic saves are written in the background "
           "(checkpoint_async); a save on SIGTERM has checkpoint_preemption_secs="
           f"{budget:g} s:", "",
           "| stage | checkpoint | items | GiB | " + " | ".join(f"s to {p}" for p in places)
           + " |", "|---|---|---|---|" + "---|" * len(places)]
  for r in sized:
    for kind in ("periodic", "final"):
      items = r.checkpoint.get(kind)
      if not items:
        continue
      total = sum(items.values())
      times = save_seconds(total, hosts)
      cells = [(f"{t:.2f}" if t < 10 else f"{t:,.0f}") + (
          " (over the preemption budget)" if kind == "periodic" and t > budget else "")
               for t in times.values()]
      lines.append(f"| {r.stage} | {kind} | " + ", ".join(
          f"{n} {ckpt_lib.format_bytes(b)}" for n, b in items.items()) +
                   f" | {total / 2**30:.2f} | " + " | ".join(cells) + " |")
  return lines


def run(config, stages, info, teacher, emit: Callable[[str], None] = print) -> list:
  """Dry-runs `stages` (pipeline.stages_to_run) of `config` for its target; returns the rows.
  `teacher` is the method's teacher stage (registry.Method.teacher): when it does not run,
  its programs still make the abstract frozen teacher that the later stages read.
  Raises DoesNotFitError after printing the tables when a program exceeds
  config.dry_run_hbm_gib."""
  target = target_of(config)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.platform = target   # every formulation is the target's (platforms.py)
  exact = platforms.of_devices() == target
  measure = bool(config.get("dry_run_measure", False))
  ctx = stage_lib.Context(config=config, workdir="", data=None, info=info)
  emit(f"dry run: {config.method} on {info.name} ({info.image_size}x{info.image_size}, "
       f"{info.num_classes} classes), dtype {config.dtype}; target platform {target} "
       f"({'compiled exactly' if exact else 'lowered for it from ' + platforms.of_devices()}), "
       f"{jax.device_count()} {jax.devices()[0].platform} devices in {jax.process_count()} "
       "process(es)")
  if teacher not in stages:
    teacher.programs(ctx)  # the abstract frozen teacher the later stages use
  rows = []
  for s in stages:
    for program in s.programs(ctx):
      emit(f"  {'reading' if program.fn is None else 'compiling'} {s.name}: {program.label} ...")
      rows.append(analyse(s.name, program, target, measure))
  emit("")
  emit(table(rows, target, exact, config.dry_run_mfu, load_measured(config.get(
      "dry_run_measured", "")), config.get("checkpoint_preemption_secs", 25.0)))
  out = config.get("dry_run_out", "")
  if out and jax.process_index() == 0:
    kinds = {d.device_kind for d in jax.devices()}
    paths.write_text(out, json.dumps({
        "target": target, "exact": exact, "device_kind": ", ".join(sorted(kinds)),
        "devices": jax.device_count(), "config": config.method,
        "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))
    emit(f"rows written to {out}")
  limit = config.dry_run_hbm_gib
  over = [r for r in rows if limit and r.peak_gib > limit]
  if over:
    raise DoesNotFitError("; ".join(
        f"stage {r.stage} ({r.label}) needs {r.peak_gib:.1f} GiB per device, more than "
        f"dry_run_hbm_gib={limit:g}" + (f"; largest: {r.largest[0][1]} "
                                        f"{r.largest[0][0]:.2f} GiB" if r.largest else "")
        for r in over) + " (more devices, a smaller batch, fewer generators per device at "
        "once, or bfloat16)")
  return rows


def main(config, stages, info, teacher) -> int:
  """CLI body of a dry run: 0; 3 when a program does not fit; 2 when a stage has no dry run."""
  try:
    run(config, stages, info, teacher)
  except DoesNotFitError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 3
  except NotImplementedError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  return 0
