"""One process of a multi-process run; started (N at once) by test_multiprocess.py.

    python tests/multiprocess_check.py WORKDIR --num_processes=N --process_id=I --port=P
                                       [--devices=D] [--fault=KIND@STAGE:STEP[@PROCESS]]
                                       [--teacher_from=DIR]

Runs stage=train of conftest.ensemble_config(**CONFIG) (the generators, then the distillation
from them) on the finished teacher in WORKDIR, as process I of N (a localhost coordinator on
port P, D fake CPU devices per process, CPU collectives through gloo), through the same entry
point as the command line (pipeline.main_entry). N=1 is a plain single-process run. With
--teacher_from only the teacher stage runs, from the teacher in DIR (0 steps: its evaluation
and its class-conditional BN statistics, from each process's part of the training split).

--fault injects, from outside the package (tests/faults.py), at step STEP of stage STAGE:
  kill     the process sends itself SIGKILL (every process: all hosts lost at once), once the
           stage's last periodic checkpoint before STEP is complete (written in the background)
  sigterm  the process sends itself SIGTERM (only process PROCESS: one host preempted)
Exits with main_entry's code (0 done, 143 preempted, 2 bad input); SIGKILL exits with -9.
"""
import argparse
import os
import signal
import sys

from datafree_jax import registry

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

# The tiny ensemble pipeline these runs share (conftest.ensemble_config's flat overrides).
# 16 distillation steps: a SIGTERM in step 3 reaches the other process through JAX's preemption
# service while the steps go on, and the sync point it agrees must fall before the last step
# (with 6 steps a loaded machine sometimes agreed on step 6: the runs then simply finished).
CONFIG = {"stage": "train", "ensemble.num_generators": 3, "ensemble.steps": 4,
          "ensemble.eval_every": 4, "student.steps": 16, "student.batch_size": 16,
          "checkpoint_every": 2}


def _parse():
  p = argparse.ArgumentParser()
  p.add_argument("workdir")
  p.add_argument("--num_processes", type=int, default=1)
  p.add_argument("--process_id", type=int, default=0)
  p.add_argument("--port", type=int, default=0)
  p.add_argument("--devices", type=int, default=4)
  p.add_argument("--fault", default="")
  p.add_argument("--teacher_from", default="",
                 help="run only the teacher stage, from this finished teacher (0 steps: its "
                      "evaluation and BN statistics)")
  return p.parse_args()


def _faulty_method(spec: str, process_id: int, workdir: str = ""):
  """The method name to run: 'ensemble', or one with a stage wrapped by the fault `spec`."""
  import faults  # pylint: disable=g-import-not-at-top
  if not spec:
    return "ensemble"
  kind, _, rest = spec.partition("@")
  where, _, only = rest.partition("@")
  stage_name, _, at = where.partition(":")
  at = int(at)
  if only and int(only) != process_id:
    return "ensemble"
  stage = next(s for s in registry.get("ensemble").stages if s.name == stage_name)
  if kind == "sigterm":
    return faults.with_faulty_stage("ensemble", faults.sigterm_at(stage, at))
  if kind == "kill":
    every = CONFIG["checkpoint_every"]
    saved = os.path.join(workdir, stage_name, str((at - 1) // every * every))
    return faults.with_faulty_stage("ensemble", faults.signal_at(stage, at, signal.SIGKILL,
                                                                 once_exists=saved))
  raise ValueError(f"unknown fault {spec!r}")


def main() -> int:
  args = _parse()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  from datafree_jax import distributed  # pylint: disable=g-import-not-at-top
  if args.num_processes > 1:
    distributed.initialize(coordinator_address=f"127.0.0.1:{args.port}",
                           num_processes=args.num_processes, process_id=args.process_id)
  from conftest import ensemble_config  # pylint: disable=g-import-not-at-top
  from datafree_jax import pipeline  # pylint: disable=g-import-not-at-top
  config = ensemble_config(**CONFIG)
  config.method = _faulty_method(args.fault, args.process_id, args.workdir)
  if args.teacher_from:
    config.stage = "teacher"
    config.teacher.init_from = args.teacher_from
  return pipeline.main_entry(config, args.workdir)


if __name__ == "__main__":
  sys.exit(main())
