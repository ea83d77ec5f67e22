"""The ImageNet sizing dry runs: configs/imagenet.py for each student and device count.

    python -m benchmarks.imagenet_sizing --devices=8,16,64 --students=resnet18,resnet50,mobilenet_v2
    python -m benchmarks.imagenet_sizing --devices=8 --students=resnet18 --target=gpu

Each run is `python -m datafree_jax.main
--config=configs/imagenet.py:student=S,dry_run=True,target=T` in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=D: D host CPU devices
stand for D accelerator chips (8: an 8-GPU host; 16: a TPU v4-32, 16 chips; 64: a v5e-64).
Prints each run's table (dry_run.py) and its wall time; nothing is trained or written.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from benchmarks import REPO


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--devices", default="8")
  p.add_argument("--students", default="resnet18,resnet50,mobilenet_v2")
  p.add_argument("--target", default="auto", help="the platform sized: auto (tpu on a CPU), "
                 "tpu, gpu")
  p.add_argument("--set", action="append", default=[], help="--config.KEY=VALUE overrides")
  args = p.parse_args()
  for d in [int(x) for x in args.devices.split(",")]:
    for student in args.students.split(","):
      cmd = [sys.executable, "-m", "datafree_jax.main",
             f"--config=configs/imagenet.py:student={student},dry_run=True,"
             f"target={args.target}"]
      cmd += [f"--config.{kv}" for kv in args.set]
      env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}",
                 TF_CPP_MIN_LOG_LEVEL="3")
      t = time.perf_counter()
      proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
      seconds = time.perf_counter() - t
      print(f"\n### {d} devices, student {student}: exit code {proc.returncode}, "
            f"{seconds:.0f} s wall\n", flush=True)
      print("\n".join(line for line in proc.stdout.splitlines()
                      if not line.startswith(("  compiling", "  reading"))), flush=True)
      if proc.returncode:
        print(proc.stderr[-3000:], flush=True)


if __name__ == "__main__":
  main()
