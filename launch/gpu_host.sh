#!/usr/bin/env bash
# Runs a datafree_jax job on one host with all its GPUs.
#
#   launch/gpu_host.sh --config=configs/imagenet.py --workdir=/data/runs/imagenet \
#       --data-dir=/data/tfds --venv=.venv
#
# Steps, each printed as it runs (`+ command`; --dry-run prints them and runs nothing):
#   1. (--venv=DIR) create the virtual environment DIR if it does not exist, and activate it;
#   2. pip install -e '.[cuda]' (jax[cuda12]) into it (or the `python` on PATH);
#   3. launch/run_resumable.sh --config=... --workdir=... FLAGS (the restart loop) with
#      TFDS_DATA_DIR=--data-dir. One process uses every GPU it sees (CUDA_VISIBLE_DEVICES
#      limits them); it is not a multi-process run, so nothing else is needed.
# Rerun the same command to resume: every stage resumes from its checkpoint in the workdir.
# The job runs in the foreground: start it inside tmux/screen, or
#   nohup launch/gpu_host.sh ... > run.log 2>&1 &
set -euo pipefail

prog=gpu_host.sh
usage() {
  cat <<'EOF'
usage: launch/gpu_host.sh --config=SPEC --workdir=DIR [--data-dir=DIR] [--venv=DIR] [--no-install] [--dry-run] [-- FLAGS...]

Installs this checkout with jax[cuda12] and runs launch/run_resumable.sh --config=SPEC
--workdir=DIR FLAGS... on this host, one process on all its GPUs, restarted after preemption.

  --config=SPEC     the job's --config (e.g. configs/imagenet.py:student=resnet18)
  --workdir=DIR     the job's --workdir (a local path or gs://...)
  --data-dir=DIR    TFDS_DATA_DIR for the job (prepared tfds datasets)
  --venv=DIR        create (if missing) and use the virtual environment DIR
                    (default: the `python` on PATH)
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

config="" workdir="" data_dir="" venv="" install=1 dry_run=0
extra=()
while (($#)); do
  case $1 in
    --) shift; extra=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --no-install) install=0 ;;
    --config=* | --workdir=* | --data-dir=* | --venv=*)
      value=${1#*=} ;;&
    --config | --workdir | --data-dir | --venv)
      (($# >= 2)) || die_usage "$1 needs a value"
      value=$2
      shift ;;&
    --config | --config=*) config=$value ;;
    --workdir | --workdir=*) workdir=$value ;;
    --data-dir | --data-dir=*) data_dir=$value ;;
    --venv | --venv=*) venv=$value ;;
    -*) die_usage "unknown option: ${1%%=*}" ;;
    *) die_usage "unexpected argument: $1 (flags for the job go after --)" ;;
  esac
  shift
done
[[ -n $config ]] || die_usage "--config is required"
[[ -n $workdir ]] || die_usage "--workdir is required"

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
run cd "$root"
if [[ -n $venv ]]; then
  if ((dry_run)) || [[ ! -x $venv/bin/python ]]; then run python3 -m venv "$venv"; fi
  show source "$venv/bin/activate"
  if ((!dry_run)); then
    # shellcheck source=/dev/null
    source "$venv/bin/activate"
  fi
elif ((!dry_run)) && ! command -v python >/dev/null; then
  echo "$prog: no \`python\` on PATH (run_resumable.sh runs python -m datafree_jax.main): use --venv=DIR" >&2
  exit 1
fi
if ((install)); then run python -m pip install -e '.[cuda]'; fi

# --distributed=off: one process, also inside a SLURM allocation of several tasks.
job=(launch/run_resumable.sh "--config=$config" "--workdir=$workdir" --distributed=off "${extra[@]}")
if [[ -n $data_dir ]]; then job=(env "TFDS_DATA_DIR=$data_dir" "${job[@]}"); fi
echo "TensorBoard: tensorboard --logdir $(quote "${workdir%/}/tensorboard")"
rc=0
run "${job[@]}" || rc=$?
if ((!dry_run)); then
  echo "$prog: the job exited with code $rc; rerun the same command to resume from $workdir" >&2
fi
exit "$rc"
