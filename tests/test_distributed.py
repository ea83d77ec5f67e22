"""distributed.settings: when a run is one process of several, for every mode and every way a
multi-process run is described (flags, JAX_* variables, SLURM, a GKE TPU slice); the command
line's one-line errors. (Real multi-process runs: test_multiprocess.py.)"""
import subprocess
import sys

import pytest

from datafree_jax import distributed

EXPLICIT = {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}
JAX_ENV = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
           "JAX_PROCESS_ID": "1"}
SLURM = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}
GKE_TPU = {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}

# (mode, flags, environment) -> settings; every mode with every kind of description.
CASES = [
    ("auto", {}, {}, None),
    ("auto", EXPLICIT, {}, EXPLICIT),
    ("auto", {}, JAX_ENV, EXPLICIT),
    ("auto", {"process_id": 0}, JAX_ENV, dict(EXPLICIT, process_id=0)),  # flags win
    ("auto", {"num_processes": 1}, {}, None),
    ("auto", {}, SLURM, {}),
    ("auto", {}, dict(SLURM, SLURM_NTASKS="1"), None),
    ("auto", {}, dict(SLURM, SLURM_STEP_NUM_TASKS="1"), None),  # the step's count wins
    ("auto", {}, GKE_TPU, {}),
    ("auto", {}, {"TPU_WORKER_HOSTNAMES": "w0"}, None),
    ("on", {}, {}, {}),
    ("on", EXPLICIT, {}, EXPLICIT),
    ("on", {}, SLURM, {}),
    ("off", EXPLICIT, dict(SLURM, **GKE_TPU, **JAX_ENV), None),
]


@pytest.mark.parametrize("mode,flags,env,expected", CASES)
def test_settings(mode, flags, env, expected):
  assert distributed.settings(mode, environ=env, **flags) == expected


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
  for args, expected in [
      (["--distributed=maybe"], "error: --distributed='maybe': one of auto, on, off"),
      (["--num_processes=2"], "error: a multi-process run needs --coordinator_address"),
  ]:
    r = subprocess.run([sys.executable, "-m", "datafree_jax.main", *args,
                        f"--workdir={tmp_path}/w"], capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1].startswith(expected), r.stderr
    assert not (tmp_path / "w").exists()
