"""Multi-process runs: `jax.distributed.initialize()` when this run is one process of several.

A run is one process per host (a Cloud TPU pod slice's workers, the nodes of a SLURM job, the
pods of a Kubernetes Job, or processes started by hand); every process runs the same command,
and the stages see one global mesh over all devices of all processes. Whether to initialise,
`mode`:

    auto  (default) initialise when this process is one of several: explicit settings
          (--coordinator_address/--num_processes/--process_id, or JAX_COORDINATOR_ADDRESS,
          JAX_NUM_PROCESSES, JAX_PROCESS_ID) of more than one process, or a cluster that JAX
          detects (below) of more than one process, or of a size only JAX's service query
          knows
    on    always call jax.distributed.initialize() (with what this module adds)
    off   never (one process)

Which cluster: JAX's own detection. jax.distributed.initialize() finds the coordinator, the
number of processes and this process's id itself in the environments of its registry
(jax._src.clusters: ClusterEnv subclasses, tried in their order, the first present wins):
Open MPI (mpirun), SLURM (srun), a GKE TPU slice, a Cloud TPU VM slice on GCE, and a Kubernetes
Job. `detect` asks the same registry, in the same order, which of them this process runs in,
and `plan` passes jax.distributed.initialize only what JAX cannot find itself:

- nothing, where JAX finds everything (SLURM, Open MPI, TPU slices, a Kubernetes Indexed Job
  with the `kubernetes` package installed);
- explicit settings as given: any of the three that JAX then lacks it finds in the detected
  environment; when all three are known, cluster_detection_method='deactivate' (JAX then probes
  no environment: no metadata server or Kubernetes API query, and no one-GPU-per-process
  restriction from SLURM_LOCALID or OMPI_COMM_WORLD_LOCAL_RANK);
- on Kubernetes without the `kubernetes` package (JAX's detector then finds nothing): the
  process id from the Indexed Job's JOB_COMPLETION_INDEX, with the coordinator and the number
  of processes from the settings (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES in the Job's env).

JAX's detectors are not all free of side effects, so `detect` asks each of them what it can
answer without any, from the environment variables (the same ones JAX reads; tests check that
the answers agree with JAX's own is_env_present where that has none):

    ompi    OMPI_MCA_orte_hnp_uri; size OMPI_COMM_WORLD_SIZE (JAX's check, env only)
    slurm   SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID all
            set (JAX's check; a batch script outside srun has no SLURM_STEP_NODELIST and is one
            process); size SLURM_STEP_NUM_TASKS, else SLURM_NTASKS
    gketpu  on a Cloud TPU VM (as jax found it when imported: libtpu and TPU chips) with
            TPU_PROCESS_ADDRESSES or TPU_WORKER_HOSTNAMES (JAX's check); size: the hosts times
            MEGASCALE_NUM_SLICES (1 if unset)
    gcetpu  JAX's check asks the GCE metadata server. Here: on a Cloud TPU VM with
            TPU_SKIP_MDS_QUERY unset; its size is known only to the metadata server, so `auto`
            initialises and JAX asks it (a one-host TPU VM then runs as the one process of a
            distributed runtime; --distributed=off skips that)
    k8s     JAX's check imports the `kubernetes` package and loads the in-cluster configuration,
            and JAX reads the Job's size and coordinator from the Kubernetes API. Here:
            KUBERNETES_SERVICE_HOST set; an Indexed Job (JOB_COMPLETION_INDEX) is a
            multi-process candidate, any other pod one process. With the package installed
            (found, not imported) `auto` initialises and JAX asks the API (a one-pod Indexed
            Job then runs as the one process of a distributed runtime); without it the Job
            must name JAX_NUM_PROCESSES (its parallelism) and JAX_COORDINATOR_ADDRESS (pod 0
            through the Job's headless service), else a one-line error says so
    mpi4py  opt-in in JAX (cluster_detection_method='mpi4py'); not tried, as JAX does not

A ClusterEnv this module does not know (a newer JAX) is not tried by `auto`; `--distributed=on`
lets JAX find it. On GPUs under SLURM or Open MPI, JAX gives each process only the GPU of its
local rank unless JAX_LOCAL_DEVICE_IDS lists them (launch/slurm.sbatch sets it to all of a
host's GPUs for its one process per host).

On CPU the processes' collectives go through gloo. Must run before anything touches a JAX
backend (importing jax does not).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Callable, Mapping, Optional

import jax
from jax._src import clusters as jax_clusters
from jax._src.clusters import cloud_tpu_cluster

from datafree_jax.errors import DistributedError

MODES = ("auto", "on", "off")
_KEYS = ("coordinator_address", "num_processes", "process_id")


@dataclasses.dataclass(frozen=True)
class Cluster:
  """The cluster environment JAX would detect for this process.

  name: 'ompi', 'slurm', 'gketpu', 'gcetpu', 'k8s', or None (none detected).
  num_processes, process_id: what the environment's variables say; None where they do not
    say (only a service knows: the GCE metadata server, the Kubernetes API).
  jax_finds: whether jax.distributed.initialize() finds the coordinator, the number of
    processes and the process id itself here.
  """
  name: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  jax_finds: bool = False


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `initialize` does: kwargs None for one process, else the keyword arguments of
  jax.distributed.initialize; cluster: the environment detected."""
  cluster: Cluster
  kwargs: Optional[dict]


def _env_int(env: Mapping[str, str], key: str) -> Optional[int]:
  """An environment variable as an int; None when unset or not an integer (JAX then fails on
  it with its own message, if it reads it)."""
  try:
    return int(env[key])
  except (KeyError, TypeError, ValueError):
    return None


def _ompi(env) -> Optional[Cluster]:
  if "OMPI_MCA_orte_hnp_uri" not in env:
    return None
  return Cluster("ompi", _env_int(env, "OMPI_COMM_WORLD_SIZE"),
                 _env_int(env, "OMPI_COMM_WORLD_RANK"), jax_finds=True)


_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")


def _slurm(env) -> Optional[Cluster]:
  if not all(key in env for key in _SLURM_VARS):
    return None
  tasks = _env_int(env, "SLURM_STEP_NUM_TASKS")
  return Cluster("slurm", tasks if tasks is not None else _env_int(env, "SLURM_NTASKS"),
                 _env_int(env, "SLURM_PROCID"), jax_finds=True)


def on_cloud_tpu_vm() -> bool:
  """Whether jax, when imported, found this to be a Cloud TPU VM (what its TPU detectors read)."""
  return bool(cloud_tpu_cluster.running_in_cloud_tpu_vm)


def _gke_tpu(env) -> Optional[Cluster]:
  hosts = env.get("TPU_PROCESS_ADDRESSES", env.get("TPU_WORKER_HOSTNAMES"))
  if not on_cloud_tpu_vm() or hosts is None:
    return None
  per_slice = len(hosts.split(","))
  slices = _env_int(env, "MEGASCALE_NUM_SLICES") or 1
  worker = _env_int(env, "TPU_WORKER_ID")
  pid = None if worker is None else worker + (_env_int(env, "MEGASCALE_SLICE_ID") or 0) * per_slice
  return Cluster("gketpu", per_slice * slices, pid, jax_finds=True)


def _gce_tpu(env) -> Optional[Cluster]:
  if not on_cloud_tpu_vm() or env.get("TPU_SKIP_MDS_QUERY") is not None:
    return None
  return Cluster("gcetpu", jax_finds=True)


def _kubernetes(env) -> Optional[Cluster]:
  if "KUBERNETES_SERVICE_HOST" not in env:
    return None
  return Cluster("k8s", None, _env_int(env, "JOB_COMPLETION_INDEX"),
                 jax_finds=importlib.util.find_spec("kubernetes") is not None)


def _never(env) -> Optional[Cluster]:  # pylint: disable=unused-argument
  return None


# JAX's ClusterEnv subclasses (by class name) -> this module's side-effect-free probe.
# BaseTpuCluster is the TPU detectors' base, registered too; its check is `return False`.
PROBES: dict[str, Callable[[Mapping[str, str]], Optional[Cluster]]] = {
    "OmpiCluster": _ompi, "SlurmCluster": _slurm, "BaseTpuCluster": _never,
    "GkeTpuCluster": _gke_tpu, "GceTpuCluster": _gce_tpu, "K8sCluster": _kubernetes,
}


def jax_cluster_types() -> list:
  """JAX's registry of cluster environments, in the order its detection tries them."""
  return list(jax_clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access


def detect(environ: Optional[Mapping[str, str]] = None) -> Cluster:
  """The first environment of JAX's registry (in its order, opt-in ones left out as JAX leaves
  them out) whose probe finds it present in `environ` (default os.environ); Cluster() if none.
  Reads environment variables and jax's import-time TPU VM flag only: no network, no file."""
  env = os.environ if environ is None else environ
  for cls in jax_cluster_types():
    probe = PROBES.get(cls.__name__)
    if cls.opt_in_only_method or probe is None:
      continue
    found = probe(env)
    if found is not None:
      return found
  return Cluster()


def _int_setting(name: str, value, environ, key: str) -> Optional[int]:
  text = value if value is not None else environ.get(key)
  if text is None or text == "":
    return None
  try:
    return int(text)
  except (TypeError, ValueError):
    raise DistributedError(f"{name} must be an integer, got {text!r}") from None


def plan(mode: str = "auto", coordinator_address: Optional[str] = None, num_processes=None,
         process_id=None, environ: Optional[Mapping[str, str]] = None) -> Plan:
  """The detected cluster and the keyword arguments of jax.distributed.initialize for this run
  (None: a single-process run). Raises DistributedError for incomplete or contradictory
  settings."""
  env = os.environ if environ is None else environ
  if mode not in MODES:
    raise DistributedError(f"--distributed={mode!r}: one of {', '.join(MODES)}")
  if mode == "off":
    return Plan(Cluster(), None)
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None
  n = _int_setting("--num_processes", num_processes, env, "JAX_NUM_PROCESSES")
  pid = _int_setting("--process_id", process_id, env, "JAX_PROCESS_ID")
  if n is not None and n < 1:
    raise DistributedError(f"--num_processes must be at least 1, got {n}")
  cluster = detect(env)
  pid_name = "--process_id"
  # What JAX lacks: an Indexed Job's process id where JAX cannot ask Kubernetes.
  if (pid is None and cluster.name == "k8s" and not cluster.jax_finds
      and cluster.process_id is not None):
    pid, pid_name = cluster.process_id, "JOB_COMPLETION_INDEX"
  if n is not None and pid is not None and not 0 <= pid < n:
    raise DistributedError(f"{pid_name}={pid} is not in 0..{n - 1} (--num_processes={n})")
  count = n if n is not None else cluster.num_processes
  if mode == "auto" and count == 1:
    return Plan(cluster, None)
  kwargs = {k: v for k, v in zip(_KEYS, (address, n, pid)) if v is not None}
  missing = [f"--{k}" for k in _KEYS if k not in kwargs]
  if not missing:  # everything explicit: JAX probes no environment
    kwargs["cluster_detection_method"] = "deactivate"
  elif cluster.name == "k8s" and not cluster.jax_finds and cluster.process_id is not None:
    raise DistributedError(
        f"a Kubernetes Indexed Job (JOB_COMPLETION_INDEX={cluster.process_id}) without the "
        f"kubernetes package (JAX reads the Job's size and coordinator from the Kubernetes API "
        f"with it): set JAX_NUM_PROCESSES (the Job's parallelism) and JAX_COORDINATOR_ADDRESS "
        f"(pod 0's HOST:PORT) in the Job, or pip install kubernetes, or --distributed=off for "
        f"one process; missing {', '.join(missing)}")
  if mode == "on" or not missing:
    return Plan(cluster, kwargs)
  # JAX finds the rest: from the environment, or a service when the size is not in it.
  jax_completes = cluster.jax_finds and (
      cluster.name != "k8s" or pid is not None or cluster.process_id is not None)
  if jax_completes:
    return Plan(cluster, kwargs)
  if kwargs:
    raise DistributedError(
        f"a multi-process run needs --coordinator_address, --num_processes and --process_id "
        f"(or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID); missing "
        f"{', '.join(missing)}")
  return Plan(cluster, None)


def settings(mode: str = "auto", coordinator_address: Optional[str] = None,
             num_processes=None, process_id=None, environ=None) -> Optional[dict]:
  """plan(...).kwargs: the keyword arguments of jax.distributed.initialize for this run, or
  None for a single-process run."""
  return plan(mode, coordinator_address, num_processes, process_id, environ).kwargs


def initialize(mode: str = "auto", coordinator_address: Optional[str] = None,
               num_processes=None, process_id=None) -> bool:
  """Starts JAX's distributed runtime when `plan` says this is a multi-process run; returns
  whether it did. Raises DistributedError (one line) when it cannot start."""
  p = plan(mode, coordinator_address, num_processes, process_id)
  if p.kwargs is None:
    return False
  # CPU processes exchange collectives through gloo (the default has none across processes).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**p.kwargs)
  except Exception as e:  # pylint: disable=broad-except
    # ValueError/TypeError for settings, RuntimeError for a failed connection or service
    # query, and what a detector's own libraries raise (kubernetes, requests).
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    args = ", ".join(f"{k}={v!r}" for k, v in p.kwargs.items())
    where = f" (detected: {p.cluster.name})" if p.cluster.name else ""
    raise DistributedError(f"jax.distributed.initialize({args}) failed{where}: {first}") from e
  return True
