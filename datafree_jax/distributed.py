"""Multi-process runs: `jax.distributed.initialize()` when this run is one process of several.

A run is one process per host (a Cloud TPU pod slice's workers, the nodes of a SLURM job, or
processes started by hand); every process runs the same command, and the stages see one global
mesh over all devices of all processes. Whether to initialise, `mode`:

    auto  (default) initialise when the run says it is one of several processes:
          --coordinator_address/--num_processes/--process_id (or JAX_COORDINATOR_ADDRESS,
          JAX_NUM_PROCESSES, JAX_PROCESS_ID) with more than one process; a SLURM step of more
          than one task (SLURM_NTASKS); a GKE TPU slice of more than one host
          (TPU_WORKER_HOSTNAMES)
    on    always call jax.distributed.initialize(), which finds the rest itself on a Cloud TPU
          VM slice, GKE, SLURM and Open MPI (launch/tpu_pod.sh passes it)
    off   never (one process)

On CPU the processes' collectives go through gloo. Must run before anything touches a JAX
backend.
"""
from __future__ import annotations

import os
from typing import Optional

from datafree_jax.errors import DistributedError

MODES = ("auto", "on", "off")


def _int_setting(name: str, value, environ, key: str) -> Optional[int]:
  text = value if value is not None else environ.get(key)
  if text is None or text == "":
    return None
  try:
    return int(text)
  except (TypeError, ValueError):
    raise DistributedError(f"{name} must be an integer, got {text!r}") from None


def settings(mode: str = "auto", coordinator_address: Optional[str] = None,
             num_processes=None, process_id=None, environ=None) -> Optional[dict]:
  """The keyword arguments of jax.distributed.initialize for this run, or None for a
  single-process run. Raises DistributedError for incomplete or contradictory settings."""
  env = os.environ if environ is None else environ
  if mode not in MODES:
    raise DistributedError(f"--distributed={mode!r}: one of {', '.join(MODES)}")
  if mode == "off":
    return None
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  n = _int_setting("--num_processes", num_processes, env, "JAX_NUM_PROCESSES")
  pid = _int_setting("--process_id", process_id, env, "JAX_PROCESS_ID")
  explicit = {k: v for k, v in (("coordinator_address", address), ("num_processes", n),
                                ("process_id", pid)) if v is not None}
  if n is not None and n < 1:
    raise DistributedError(f"--num_processes must be at least 1, got {n}")
  if n is not None and pid is not None and not 0 <= pid < n:
    raise DistributedError(f"--process_id={pid} is not in 0..{n - 1} (--num_processes={n})")
  if mode == "on":
    return explicit
  if explicit:
    if n == 1:
      return None
    missing = [f"--{k}" for k in ("coordinator_address", "num_processes", "process_id")
               if k not in explicit]
    if missing:
      raise DistributedError(
          f"a multi-process run needs --coordinator_address, --num_processes and --process_id "
          f"(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); missing "
          f"{', '.join(missing)}")
    return explicit
  slurm_tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
  if env.get("SLURM_JOB_ID") and slurm_tasks and slurm_tasks.isdigit() and int(slurm_tasks) > 1:
    return {}
  hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  if len(hosts) > 1:
    return {}
  return None


def initialize(mode: str = "auto", coordinator_address: Optional[str] = None,
               num_processes=None, process_id=None) -> bool:
  """Starts JAX's distributed runtime when `settings` says this is a multi-process run;
  returns whether it did. Raises DistributedError (one line) when it cannot start."""
  kwargs = settings(mode, coordinator_address, num_processes, process_id)
  if kwargs is None:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  # CPU processes exchange collectives through gloo (the default has none across processes).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError, TypeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    raise DistributedError(f"jax.distributed.initialize({args}) failed: {first}") from e
  return True
