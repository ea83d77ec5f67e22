"""distributed.plan: which cluster JAX would detect and what this project adds to
jax.distributed.initialize, for every mode and every environment (a TPU pod slice, a SLURM job,
Open MPI, a Kubernetes Job, explicit settings, and one process of each), set through environment
variables; the command line's one-line errors. Nothing here contacts a network address (every
test runs with the socket functions that would do so replaced by a failure). Real multi-process
runs: test_multiprocess.py and test_class_statistics.py."""
import importlib
import inspect
import json
import os
import socket
import subprocess
import sys
import warnings

import jax
from jax._src import clusters as jax_clusters
import pytest

from datafree_jax import distributed

EXPLICIT = {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
DEACTIVATED = dict(EXPLICIT, cluster_detection_method="deactivate")
JAX_ENV = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "1"}
# What srun gives each task of a 4-task step (here task 1, the first on its node).
SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_NTASKS": "4",
         "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
# An sbatch script outside srun: no step.
SLURM_BATCH = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "0",
               "SLURM_LOCALID": "0"}
OMPI = {"OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
        "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
# A pod of a Kubernetes Indexed Job (a JobSet's Jobs are Indexed Jobs too): pod 2.
K8S_POD = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443",
           "HOSTNAME": "datafree-2"}
K8S_JOB = dict(K8S_POD, JOB_COMPLETION_INDEX="2")
K8S_JOB_SIZED = dict(K8S_JOB, JAX_NUM_PROCESSES="4",
                     JAX_COORDINATOR_ADDRESS="datafree-0.datafree:8476")
GKE_TPU = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3", "TPU_WORKER_ID": "2"}

# Every variable any environment above (or JAX's detectors) reads.
_PREFIXES = ("JAX_COORDINATOR_", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS",
             "SLURM_", "OMPI_", "TPU_", "MEGASCALE_", "KUBERNETES_", "JOB_COMPLETION_INDEX")


def _clear_cluster_env(environ):
  for key in list(environ):
    if key.startswith(_PREFIXES):
      del environ[key]


def _no_network(*args, **kwargs):
  raise AssertionError(f"a network call: {args!r}")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  for name in ("getaddrinfo", "gethostbyname", "create_connection"):
    monkeypatch.setattr(socket, name, _no_network)
  monkeypatch.setattr(socket.socket, "connect", _no_network)


@pytest.fixture
def cluster_env(monkeypatch):
  """Sets os.environ to the given cluster variables only (every other one of them removed)."""
  for key in list(os.environ):
    if key.startswith(_PREFIXES):
      monkeypatch.delenv(key)

  def setenv(env):
    for key, value in env.items():
      monkeypatch.setenv(key, value)
  return setenv


@pytest.fixture
def no_kubernetes_package(monkeypatch):
  """The `kubernetes` package absent (whether installed here or not)."""
  monkeypatch.setitem(sys.modules, "kubernetes", None)


@pytest.fixture
def kubernetes_package(monkeypatch, tmp_path):
  """A `kubernetes` package that JAX's detector would find; importing it fails the test (the
  project only looks it up)."""
  (tmp_path / "kubernetes").mkdir()
  (tmp_path / "kubernetes" / "__init__.py").write_text(
      "raise AssertionError('the kubernetes package was imported')\n")
  monkeypatch.delitem(sys.modules, "kubernetes", raising=False)
  monkeypatch.syspath_prepend(str(tmp_path))
  importlib.invalidate_caches()


# (mode, flags, environment) -> (detected environment, kwargs of jax.distributed.initialize).
CASES = [
    # One process: nothing detected.
    ("auto", {}, {}, None, None),
    # Explicit coordinator: flags or JAX_* variables; all three known, JAX probes nothing.
    ("auto", EXPLICIT, {}, None, DEACTIVATED),
    ("auto", {}, JAX_ENV, None, DEACTIVATED),
    ("auto", {"process_id": 0}, JAX_ENV, None, dict(DEACTIVATED, process_id=0)),  # flags win
    ("auto", {"num_processes": 1}, {}, None, None),
    # A SLURM step of 4 tasks: JAX finds everything; of 1 task (the step's count wins): one.
    ("auto", {}, SLURM, "slurm", {}),
    ("auto", {}, dict(SLURM, SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1"), "slurm", None),
    ("auto", {}, dict(SLURM, SLURM_STEP_NUM_TASKS="1"), "slurm", None),
    ("auto", {}, SLURM_BATCH, None, None),  # the batch script itself, outside srun
    ("auto", {"coordinator_address": "node001:8476"}, SLURM, "slurm",
     {"coordinator_address": "node001:8476"}),  # JAX finds the other two
    ("auto", EXPLICIT, SLURM, "slurm", DEACTIVATED),
    # Open MPI (mpirun).
    ("auto", {}, OMPI, "ompi", {}),
    ("auto", {}, dict(OMPI, OMPI_COMM_WORLD_SIZE="1"), "ompi", None),
    # Kubernetes without the kubernetes package: an Indexed Job's process id is added, the
    # size and coordinator come from the Job's env; a pod of no Indexed Job is one process.
    ("auto", {}, K8S_JOB_SIZED, "k8s", {"coordinator_address": "datafree-0.datafree:8476",
                                        "num_processes": 4, "process_id": 2,
                                        "cluster_detection_method": "deactivate"}),
    ("auto", {}, dict(K8S_JOB_SIZED, JAX_NUM_PROCESSES="1", JOB_COMPLETION_INDEX="0"), "k8s",
     None),
    ("auto", {}, dict(K8S_JOB, JAX_NUM_PROCESSES="1", JOB_COMPLETION_INDEX="0"), "k8s", None),
    ("auto", {}, K8S_POD, "k8s", None),
    ("auto", EXPLICIT, K8S_POD, "k8s", DEACTIVATED),
    # TPU worker variables on a machine that is no Cloud TPU VM: JAX detects no TPU slice.
    ("auto", {}, GKE_TPU, None, None),
    # on: always initialise, with what JAX lacks added.
    ("on", {}, {}, None, {}),
    ("on", EXPLICIT, {}, None, DEACTIVATED),
    ("on", {}, SLURM, "slurm", {}),
    ("on", {}, dict(SLURM, SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1"), "slurm", {}),
    ("off", EXPLICIT, dict(SLURM, **GKE_TPU, **JAX_ENV), None, None),
]


@pytest.mark.usefixtures("no_kubernetes_package")
@pytest.mark.parametrize("mode,flags,env,cluster,expected", CASES)
def test_plan(mode, flags, env, cluster, expected, cluster_env):
  p = distributed.plan(mode, environ=env, **flags)
  assert (p.cluster.name, p.kwargs) == (cluster, expected)
  # The same from os.environ (what the command line reads).
  cluster_env(env)
  assert distributed.plan(mode, **flags) == p
  assert distributed.settings(mode, **flags) == expected


def test_plan_passes_what_jax_initialize_takes():
  params = inspect.signature(jax.distributed.initialize).parameters
  for *_, expected in CASES:
    assert set(expected or {}) <= set(params)


def test_every_jax_cluster_environment_is_known():
  """Every environment JAX's detection tries has a probe here (a newer JAX with another one
  fails this test); mpi4py is opt-in in JAX and not tried."""
  for cls in distributed.jax_cluster_types():
    assert cls.__name__ in distributed.PROBES or cls.opt_in_only_method, cls
  assert set(distributed.PROBES) <= {c.__name__ for c in distributed.jax_cluster_types()}


def _jax_present(names):
  """Which of JAX's detectors named `names` (those whose check has no side effects) say present."""
  return {c.__name__: c.is_env_present() for c in distributed.jax_cluster_types()
          if c.__name__ in names}


@pytest.mark.usefixtures("no_kubernetes_package")
@pytest.mark.parametrize("env,name", [({}, None), (SLURM, "slurm"), (SLURM_BATCH, None),
                                      (OMPI, "ompi"), (GKE_TPU, None)])
def test_detection_agrees_with_jax(env, name, cluster_env):
  """JAX's own checks of the environments whose checks read environment variables only."""
  cluster_env(env)
  present = _jax_present({"OmpiCluster", "SlurmCluster", "GkeTpuCluster"})
  assert distributed.detect().name == name
  assert present == {"OmpiCluster": name == "ompi", "SlurmCluster": name == "slurm",
                     "GkeTpuCluster": False}


@pytest.mark.usefixtures("no_kubernetes_package")
@pytest.mark.parametrize("env,expected", [
    (SLURM, ("node001:61447", 4, 1, [0])),   # port 65535 - 2**12 + 1 + SLURM_JOB_ID % 2**12
    (OMPI, ("10.96.0.1:62624", 2, 1, [0])),
])
def test_jax_completes_a_multi_task_job(env, expected, cluster_env):
  """With what `plan` passes (nothing), JAX's own detection finds every value, from the
  environment alone; its number of processes is the one `plan` decided from."""
  cluster_env(env)
  p = distributed.plan()
  assert p.kwargs == {}
  found = jax_clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, None, 0)
  assert found == expected
  assert found[1:3] == (p.cluster.num_processes, p.cluster.process_id)


def test_kubernetes_job_without_the_package(cluster_env, no_kubernetes_package):
  """JAX's Kubernetes detector finds nothing without the kubernetes package; the project adds
  the Indexed Job's process id, and stops with one line when the Job names no size."""
  cluster_env(K8S_JOB)
  with pytest.warns(UserWarning, match="kubernetes"):
    assert not jax_clusters.K8sCluster.is_env_present()
  with pytest.raises(distributed.DistributedError) as e:
    distributed.plan()
  assert str(e.value) == (
      "a Kubernetes Indexed Job (JOB_COMPLETION_INDEX=2) without the kubernetes package (JAX "
      "reads the Job's size and coordinator from the Kubernetes API with it): set "
      "JAX_NUM_PROCESSES (the Job's parallelism) and JAX_COORDINATOR_ADDRESS (pod 0's "
      "HOST:PORT) in the Job, or pip install kubernetes, or --distributed=off for one "
      "process; missing --coordinator_address, --num_processes")
  with pytest.raises(distributed.DistributedError, match="JOB_COMPLETION_INDEX=2 is not in 0..1"):
    distributed.plan(num_processes=2, coordinator_address="datafree-0.datafree:8476")
  assert distributed.plan("off").kwargs is None


def test_kubernetes_job_with_the_package(cluster_env, kubernetes_package, monkeypatch):
  """With the kubernetes package JAX reads the Job's size and coordinator from the Kubernetes
  API itself: an Indexed Job initialises with nothing added (the package is found, not
  imported); a pod of no Indexed Job stays one process."""
  cluster_env(K8S_JOB)
  p = distributed.plan()
  assert p == distributed.Plan(distributed.Cluster("k8s", None, 2, jax_finds=True), {})
  assert distributed.settings(num_processes=4) == {"num_processes": 4}
  cluster_env({"JOB_COMPLETION_INDEX": "0", "JAX_NUM_PROCESSES": "1"})
  assert distributed.settings() is None
  monkeypatch.delenv("JOB_COMPLETION_INDEX")
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  assert distributed.plan() == distributed.Plan(distributed.Cluster("k8s", jax_finds=True), None)


# A Cloud TPU VM, as jax sees one: JAX_FORCE_TPU_INIT=1 makes `import jax` take this machine for
# one (without TPU chips it also sets TPU_SKIP_MDS_QUERY=1, which turns off the GCE metadata
# server query; the GCE cases below unset it again), in a subprocess of its own.
TPU_CASES = [
    # A GKE TPU slice of 4 hosts (the GKE TPU webhook's variables): JAX finds everything.
    ("auto", {}, dict(GKE_TPU, TPU_SKIP_MDS_QUERY="1"), "gketpu", {}),
    # 2 slices of 4 hosts (multislice): process 1 * 4 + 2 of 8.
    ("auto", {}, dict(GKE_TPU, TPU_SKIP_MDS_QUERY="1", MEGASCALE_NUM_SLICES="2",
                      MEGASCALE_SLICE_ID="1"), "gketpu", {}),
    # A one-host GKE TPU slice: one process.
    ("auto", {}, {"TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0",
                  "TPU_SKIP_MDS_QUERY": "1"}, "gketpu", None),
    # A Cloud TPU VM on GCE: only the metadata server knows its hosts; JAX asks it.
    ("auto", {}, {}, "gcetpu", {}),
    ("auto", EXPLICIT, {}, "gcetpu", DEACTIVATED),
    ("off", {}, {}, None, None),
    # A TPU VM that says not to ask the metadata server: nothing detected, one process.
    ("auto", {}, {"TPU_SKIP_MDS_QUERY": "1"}, None, None),
]


def _tpu_main():
  """Run as `python test_distributed.py tpu` with JAX_FORCE_TPU_INIT=1: prints, as one JSON
  line, each TPU_CASES case's plan (from os.environ set to the case), the numbers JAX's GKE TPU
  detector reads, and JAX's own GKE check."""
  socket.getaddrinfo = socket.gethostbyname = socket.create_connection = _no_network
  socket.socket.connect = _no_network
  out = []
  for mode, flags, env, _, _ in TPU_CASES:
    _clear_cluster_env(os.environ)
    os.environ.update(env)
    p = distributed.plan(mode, **flags)
    gke = jax_clusters.GkeTpuCluster
    row = {"vm": distributed.on_cloud_tpu_vm(), "cluster": p.cluster.name, "kwargs": p.kwargs,
           "n": p.cluster.num_processes, "id": p.cluster.process_id,
           "jax_gke": gke.is_env_present()}
    if "MEGASCALE_NUM_SLICES" in env:  # JAX reads them from here (else from the metadata)
      row["jax_n"], row["jax_id"] = gke.get_process_count(), gke.get_process_id()
    out.append(row)
  print(json.dumps(out))


def test_tpu_pod_slice():
  env = {k: v for k, v in os.environ.items() if not k.startswith(_PREFIXES)}
  env.update(JAX_FORCE_TPU_INIT="1", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, os.path.abspath(__file__), "tpu"], env=env,
                     capture_output=True, text=True, timeout=120, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = json.loads(r.stdout.strip().splitlines()[-1])
  assert all(row["vm"] for row in rows)
  for row, (_, _, _, cluster, expected) in zip(rows, TPU_CASES):
    assert (row["cluster"], row["kwargs"]) == (cluster, expected), row
    assert row["jax_gke"] == (cluster == "gketpu"), row
  assert [(r["n"], r["id"]) for r in rows[:3]] == [(4, 2), (8, 6), (1, 0)]
  assert (rows[1]["jax_n"], rows[1]["jax_id"]) == (8, 6)


@pytest.mark.parametrize("mode,flags,env,expected", [
    ("auto", {"num_processes": 2}, {}, "a multi-process run needs --coordinator_address, "
     "--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
     "JAX_PROCESS_ID); missing --coordinator_address, --process_id"),
    ("auto", {}, {"JAX_NUM_PROCESSES": "two"}, "--num_processes must be an integer, got 'two'"),
    ("auto", EXPLICIT, {}, None),
    ("on", {"num_processes": 2, "process_id": 2}, {}, "--process_id=2 is not in 0..1"),
    ("on", {"num_processes": 0}, {}, "--num_processes must be at least 1, got 0"),
    ("maybe", {}, {}, "--distributed='maybe': one of auto, on, off"),
])
def test_settings_refuses(mode, flags, env, expected):
  if expected is None:  # the control: the same call without the fault is accepted
    assert distributed.settings(mode, environ=env, **flags)
    return
  with pytest.raises(distributed.DistributedError) as e:
    distributed.settings(mode, environ=env, **flags)
  assert str(e.value).startswith(expected), str(e.value)


def test_command_line_errors_are_one_line_and_exit_2(tmp_path):
  env = {k: v for k, v in os.environ.items() if not k.startswith(_PREFIXES)}
  for args, expected in [
      (["--distributed=maybe"], "error: --distributed='maybe': one of auto, on, off"),
      (["--num_processes=2"], "error: a multi-process run needs --coordinator_address"),
  ]:
    r = subprocess.run([sys.executable, "-m", "datafree_jax.main", *args,
                        f"--workdir={tmp_path}/w"], capture_output=True, text=True, timeout=120,
                       env=env, check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(expected), r.stderr
    assert not (tmp_path / "w").exists()


if __name__ == "__main__" and sys.argv[1:] == ["tpu"]:
  warnings.simplefilter("ignore")
  _tpu_main()
