#!/usr/bin/env bash
# Runs a datafree_jax job on one host with all its GPUs.
#
#   launch/gpu_host.sh --config=configs/imagenet.py --workdir=/data/runs/imagenet \
#       --data-dir=/data/tfds --venv=.venv
#
# Steps, each printed as it runs (`+ command`; --dry-run prints them and runs nothing):
#   1. check that --python (default python3) is Python >= 3.11 (jax>=0.7 and flax>=0.11 need it),
#      else stop with one line and exit code 2 before installing anything; with --venv=DIR
#      --provision, get Python 3.11 with uv instead (python3 -m pip install --user uv,
#      uv python install 3.11) and create DIR with it;
#   2. (--venv=DIR) create the virtual environment DIR from --python if it does not exist, and
#      activate it (an existing DIR is checked instead: its python must be >= 3.11);
#   3. pip install -e '.[cuda]' (jax[cuda12]) into it (without --venv: into --python);
#   4. launch/run_resumable.sh --config=... --workdir=... FLAGS (the restart loop) with
#      DATAFREE_PYTHON=that python and TFDS_DATA_DIR=--data-dir. One process uses every GPU it
#      sees (CUDA_VISIBLE_DEVICES limits them); it is not a multi-process run.
# Rerun the same command to resume: every stage resumes from its checkpoint in the workdir.
# The job runs in the foreground: start it inside tmux/screen, or
#   nohup launch/gpu_host.sh ... > run.log 2>&1 &
set -euo pipefail

prog=gpu_host.sh
usage() {
  cat <<'EOF'
usage: launch/gpu_host.sh --config=SPEC --workdir=DIR [--data-dir=DIR] [--python=PY] [--venv=DIR [--provision]] [--no-install] [--dry-run] [-- FLAGS...]

Installs this checkout with jax[cuda12] and runs launch/run_resumable.sh --config=SPEC
--workdir=DIR FLAGS... on this host, one process on all its GPUs, restarted after preemption.

  --config=SPEC     the job's --config (e.g. configs/imagenet.py:student=resnet18)
  --workdir=DIR     the job's --workdir (a local path or gs://...)
  --data-dir=DIR    TFDS_DATA_DIR for the job (prepared tfds datasets)
  --python=PY       the Python (a name on PATH or a path) that creates --venv, or without
                    --venv the one installed into and running the job; it must be
                    Python >= 3.11 (default: python3)
  --venv=DIR        create (if missing, from --python) and use the virtual environment DIR
                    (default: none, install into --python)
  --provision       with --venv: create DIR with Python 3.11 from uv (PY -m pip install --user
                    uv; PY -m uv python install 3.11), for a host whose Python is older
  --no-install      skip the pip install (already installed)
  --dry-run         print every command, one per line ('+ ' first), run nothing
  -h, --help        this text
  -- FLAGS...       passed on to python -m datafree_jax.main (e.g. --config.seed=1)
EOF
}
die_usage() {  # a bad command line: one line on stderr, exit code 2
  echo "$prog: $1 (see --help)" >&2
  exit 2
}

# quote ARG: ARG as one word for a POSIX shell (what Python's shlex.quote gives).
quote() {
  if [[ -n $1 && $1 != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
# words ARG...: the arguments shell-quoted, separated by spaces.
words() {
  local out="" arg
  for arg in "$@"; do out+="${out:+ }$(quote "$arg")"; done
  printf '%s' "$out"
}
show() {
  printf '+ %s\n' "$(words "$@")"
}
# run CMD...: prints the command, then runs it unless --dry-run.
run() {
  show "$@"
  if ((dry_run)); then return 0; fi
  "$@"
}

# jax>=0.7 and flax>=0.11 (setup.py) need Python >= 3.11: the version of a Python, as MAJOR.MINOR.
version_code='import sys; print("%d.%d" % sys.version_info[:2])'
# check_python PY FIX: prints the check and, unless --dry-run, stops with one line and exit
# code 2 (before anything is installed) unless PY is a Python >= 3.11. FIX: how to get one.
check_python() {
  local found
  show "$1" -c "$version_code"
  if ((dry_run)); then return 0; fi
  if ! found=$("$1" -c "$version_code" 2>/dev/null); then
    echo "$prog: $1 is not a working Python (not found?); $2" >&2
    exit 2
  fi
  if [[ ! $found =~ ^([0-9]+)\.([0-9]+)$ ]] ||
     ((BASH_REMATCH[1] < 3 || (BASH_REMATCH[1] == 3 && BASH_REMATCH[2] < 11))); then
    echo "$prog: $1 is Python $found, but datafree_jax needs Python >= 3.11 (jax>=0.7, flax>=0.11); $2" >&2
    exit 2
  fi
}
# provision_venv DIR: the virtual environment DIR with Python 3.11 from uv (installed with
# --python's pip into the user site; uv downloads the Python into ~/.local/share/uv/python).
# --seed: with pip in it.
provision_venv() {
  run "$py" -m pip install --user uv
  run "$py" -m uv python install 3.11
  run "$py" -m uv venv --seed --python 3.11 "$1"
}

config="" workdir="" data_dir="" venv="" py=python3 install=1 provision=0 dry_run=0
extra=()
while (($#)); do
  case $1 in
    --) shift; extra=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --no-install) install=0 ;;
    --provision) provision=1 ;;
    --config=* | --workdir=* | --data-dir=* | --venv=* | --python=*)
      value=${1#*=} ;;&
    --config | --workdir | --data-dir | --venv | --python)
      (($# >= 2)) || die_usage "$1 needs a value"
      value=$2
      shift ;;&
    --config | --config=*) config=$value ;;
    --workdir | --workdir=*) workdir=$value ;;
    --data-dir | --data-dir=*) data_dir=$value ;;
    --venv | --venv=*) venv=$value ;;
    --python | --python=*) py=$value ;;
    -*) die_usage "unknown option: ${1%%=*}" ;;
    *) die_usage "unexpected argument: $1 (flags for the job go after --)" ;;
  esac
  shift
done
[[ -n $config ]] || die_usage "--config is required"
[[ -n $workdir ]] || die_usage "--workdir is required"
[[ -n $py ]] || die_usage "--python must not be empty"
[[ -n $venv ]] || ((!provision)) || die_usage "--provision needs --venv=DIR (the virtual environment it creates)"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
run cd "$root"
# The Python is checked (or provisioned) before anything is created or installed.
if [[ -n $venv ]]; then
  if ((!dry_run)) && [[ -x $venv/bin/python ]]; then
    check_python "$venv/bin/python" "remove $venv (or choose another --venv) and rerun with --python=python3.11 or --provision"
  elif ((provision)); then
    provision_venv "$venv"
  else
    check_python "$py" "use --python=python3.11 (any Python >= 3.11), or --provision to get Python 3.11 with uv"
    run "$py" -m venv "$venv"
  fi
  show source "$venv/bin/activate"
  if ((!dry_run)); then
    # shellcheck source=/dev/null
    source "$venv/bin/activate"
  fi
  pip_py=python job_py=$venv/bin/python
else
  check_python "$py" "use --python=python3.11 (any Python >= 3.11), or --venv=DIR --provision to get Python 3.11 with uv"
  pip_py=$py job_py=$py
fi
if ((install)); then run "$pip_py" -m pip install -e '.[cuda]'; fi

# --distributed=off: one process, also inside a SLURM allocation of several tasks.
# DATAFREE_PYTHON: the python that run_resumable.sh runs the job with.
job_env=("DATAFREE_PYTHON=$job_py")
if [[ -n $data_dir ]]; then job_env+=("TFDS_DATA_DIR=$data_dir"); fi
job=(env "${job_env[@]}" launch/run_resumable.sh "--config=$config" "--workdir=$workdir"
     --distributed=off "${extra[@]}")
echo "TensorBoard: tensorboard --logdir $(quote "${workdir%/}/tensorboard")"
rc=0
run "${job[@]}" || rc=$?
if ((!dry_run)); then
  echo "$prog: the job exited with code $rc; rerun the same command to resume from $workdir" >&2
fi
exit "$rc"
