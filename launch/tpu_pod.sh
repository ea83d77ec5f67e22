#!/usr/bin/env bash
# Runs a datafree_jax job on a Cloud TPU VM slice (a pod slice of several hosts, or one host).
#
#   launch/tpu_pod.sh --config=configs/imagenet.py --workdir=gs://BUCKET/runs/imagenet \
#       --data-dir=gs://BUCKET/tfds --accelerator-type=v4-32 --zone=us-central2-b --spot
#
# Steps, each printed as it runs (`+ command`; --dry-run prints them and runs nothing):
#   1. create the slice with `gcloud compute tpus tpu-vm create` (or, with --queued,
#      `gcloud compute tpus queued-resources create`), or reuse it when it exists;
#   2. copy this checkout to every worker (a `git archive` tarball of HEAD, scp --worker=all),
#      or clone --git-url on every worker;
#   3. install it on every worker: pip install -e '.[tpu]' (jax[tpu]) into a Python >= 3.11,
#      which jax>=0.7 and flax>=0.11 need. The TPU VM images (tpu-ubuntu2204-base,
#      v2-alpha-tpuv5/-tpuv5-lite/-tpuv6e) ship Python 3.10, so by default every worker gets
#      Python 3.11 from uv (python3 -m pip install --user uv; uv python install 3.11) in the
#      virtual environment ~/datafree_jax_venv (created once, reused by reruns), whose version
#      is checked before the install. --python=PY installs into PY instead (e.g. --python=python3
#      on an image with Python >= 3.11): its version is checked first, and a worker where it is
#      older stops with one line and exit code 2 before pip runs;
#   4. run launch/run_resumable.sh (the restart loop) on every worker (--worker=all) with that
#      python (DATAFREE_PYTHON), TFDS_DATA_DIR=--data-dir and the gs:// workdir. Every worker runs
#      the same command; the program starts jax.distributed itself (--distributed=on).
# The job runs under setsid/nohup on each worker with its output appended to ~/datafree_jax.log
# (process 0 writes the progress lines), so a dropped ssh connection does not stop it; this
# script follows the log until the job ends. If the ssh command fails because the slice is gone
# (a spot slice preempted as a whole), the slice is deleted, created again and the job rerun,
# at most --max-restarts times: every stage resumes from its checkpoint in the workdir.
# Rerunning the same command after an interruption does the same by hand.
set -euo pipefail

prog=tpu_pod.sh
usage() {
  cat <<'EOF'
usage: launch/tpu_pod.sh --config=SPEC --workdir=gs://BUCKET/DIR [options] [-- FLAGS...]

Creates (or reuses) a Cloud TPU VM slice, copies and installs this code on every worker and runs
launch/run_resumable.sh --config=SPEC --workdir=gs://... FLAGS... on all of them, recreating the
slice and rerunning when it is preempted.

  --config=SPEC             the job's --config (e.g. configs/imagenet.py:student=resnet18)
  --workdir=gs://B/DIR      the job's --workdir; must be gs:// (the workers share no disk)
  --data-dir=gs://B/tfds    TFDS_DATA_DIR on the workers (prepared tfds datasets)
  --name=NAME               the slice (default: datafree-jax)
  --zone=ZONE               (default: us-central2-b, TPU v4's zone; v5e/v5p/v6e live elsewhere)
  --project=PROJECT         (default: gcloud's configured project)
  --accelerator-type=TYPE   v4-32, v5litepod-16, v5p-16, v6e-16, ... (default: v4-32)
  --runtime-version=V       TPU VM software (default for v2-v4: tpu-ubuntu2204-base,
                            v5litepod: v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5,
                            v6e: v2-alpha-tpuv6e)
  --spot                    a spot slice (cheaper, may be preempted at any time)
  --queued                  request it with `gcloud compute tpus queued-resources create` and
                            wait until it is provisioned
  --reuse                   the slice exists already: do not create it (an error if it does not;
                            it is still recreated after a preemption)
  --git-url=URL             clone URL on every worker instead of copying this checkout
  --git-ref=REF             branch or tag to clone (default: the repository's default branch)
  --python=PY               install into and run with PY on every worker (a name on PATH or a
                            path; it must be Python >= 3.11 there, e.g. python3 on an image that
                            has it) instead of the default: Python 3.11 from uv in the virtual
                            environment ~/datafree_jax_venv on every worker (the TPU VM images'
                            python3 is 3.10)
  --max-restarts=N          recreate a preempted slice at most N times (default: 10)
  --detach                  start the job and return without following it (no recreation)
  --dry-run                 print every command, one per line ('+ ' first), run nothing
  -h, --help                this text
  -- FLAGS...               passed on to python -m datafree_jax.main (e.g. --config.seed=1)

Without --dry-run the copied code is `git archive HEAD`: uncommitted changes are not copied.
EOF
}
die_usage() {  # a bad command line: one line on stderr, exit code 2
  echo "$prog: $1 (see --help)" >&2
  exit 2
}
die() {
  echo "$prog: $1" >&2
  exit 1
}

# quote ARG: ARG as one word for a POSIX shell (what Python's shlex.quote gives).
quote() {
  if [[ -n $1 && $1 != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
# show CMD...: prints the command as one shell-quoted line prefixed with '+ '.
show() {
  printf '+ %s\n' "$(words "$@")"
}
# words ARG...: the arguments shell-quoted, separated by spaces.
words() {
  local out="" arg
  for arg in "$@"; do out+="${out:+ }$(quote "$arg")"; done
  printf '%s' "$out"
}
# run CMD...: prints the command, then runs it unless --dry-run.
run() {
  show "$@"
  if ((dry_run)); then return 0; fi
  "$@"
}

name=datafree-jax zone=us-central2-b project="" accel=v4-32 runtime="" config="" workdir=""
data_dir="" git_url="" git_ref="" py="" max_restarts=10
spot=0 queued=0 reuse=0 detach=0 dry_run=0
extra=()
set_option() {  # set_option NAME VALUE
  case $1 in
    --name) name=$2 ;;
    --zone) zone=$2 ;;
    --project) project=$2 ;;
    --accelerator-type) accel=$2 ;;
    --runtime-version) runtime=$2 ;;
    --config) config=$2 ;;
    --workdir) workdir=$2 ;;
    --data-dir) data_dir=$2 ;;
    --git-url) git_url=$2 ;;
    --git-ref) git_ref=$2 ;;
    --python) py=$2; [[ -n $py ]] || die_usage "--python must not be empty" ;;
    --max-restarts) max_restarts=$2 ;;
  esac
}
value_options='--name --zone --project --accelerator-type --runtime-version --config --workdir
  --data-dir --git-url --git-ref --python --max-restarts'
while (($#)); do
  case $1 in
    --) shift; extra=("$@"); break ;;
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --spot) spot=1 ;;
    --queued) queued=1 ;;
    --reuse) reuse=1 ;;
    --detach) detach=1 ;;
    --*=*)
      opt=${1%%=*}
      [[ " ${value_options//$'\n'/ } " == *" $opt "* ]] || die_usage "unknown option: $opt"
      set_option "$opt" "${1#*=}" ;;
    --*)
      [[ " ${value_options//$'\n'/ } " == *" $1 "* ]] || die_usage "unknown option: $1"
      (($# >= 2)) || die_usage "$1 needs a value"
      set_option "$1" "$2"
      shift ;;
    *) die_usage "unexpected argument: $1 (flags for the job go after --)" ;;
  esac
  shift
done

[[ -n $config ]] || die_usage "--config is required"
[[ -n $workdir ]] || die_usage "--workdir is required"
[[ $workdir == gs://?* ]] || die_usage "--workdir must be a gs:// path (the workers share no disk), got: $workdir"
[[ -z $data_dir || $data_dir == gs://?* ]] || die_usage "--data-dir must be a gs:// path, got: $data_dir"
[[ $name =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die_usage "--name must be lowercase letters, digits and hyphens, got: $name"
[[ $accel =~ ^v[0-9][a-z0-9]*-[0-9]+$ ]] || die_usage "--accelerator-type looks like v4-32 or v5litepod-16, got: $accel"
[[ $max_restarts =~ ^[0-9]+$ ]] || die_usage "--max-restarts must be a whole number, got: $max_restarts"
[[ -z $git_ref || -n $git_url ]] || die_usage "--git-ref needs --git-url"
[[ -n $zone ]] || die_usage "--zone must not be empty"
if [[ -z $runtime ]]; then
  case $accel in
    v5litepod-* | v5e-*) runtime='v2-alpha-tpuv5-lite' ;;
    v5p-*) runtime='v2-alpha-tpuv5' ;;
    v6e-*) runtime='v2-alpha-tpuv6e' ;;
    *) runtime='tpu-ubuntu2204-base' ;;
  esac
fi

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
loc=(--zone="$zone")
if [[ -n $project ]]; then loc+=(--project="$project"); fi
tpu=(gcloud compute tpus tpu-vm)
qr=(gcloud compute tpus queued-resources)
# Paths on the workers, expanded there (in the home directory of the ssh user).
# shellcheck disable=SC2088
remote_dir='~/datafree_jax' log='~/datafree_jax.log' pidfile='~/datafree_jax.pid'
tarball="${TMPDIR:-/tmp}/datafree_jax-$name.tar.gz"

# --- what runs on the workers --------------------------------------------------------------
# Refuses to replace the code under a job that is still running on this worker.
guard="if [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; then echo \"datafree_jax: a job is already running on \$(hostname) (pid \$(cat $pidfile)); follow it: tail -f $log; stop it: kill -TERM -- -\$(cat $pidfile)\" >&2; exit 3; fi"
if [[ -n $git_url ]]; then
  clone=(git clone --depth=1)
  if [[ -n $git_ref ]]; then clone+=(--branch="$git_ref"); fi
  clone+=("$git_url")
  fetch_code="$guard; rm -rf $remote_dir && $(words "${clone[@]}") $remote_dir"
else
  fetch_code="$guard; rm -rf $remote_dir && tar -xzf ~/datafree_jax.tar.gz -C ~ && rm -f ~/datafree_jax.tar.gz"
fi
# jax>=0.7 and flax>=0.11 need Python >= 3.11. remote_check PY FIX: shell code for a worker
# that stops with one line and exit code 2 unless PY (a shell word) is a Python >= 3.11.
version_code='import sys; print("%d.%d" % sys.version_info[:2])'
remote_check() {
  printf '%s' "{ v=\$($1 -c $(quote "$version_code") 2>/dev/null) || { echo \"datafree_jax: $1 is not a working Python on \$(hostname) (not found?); $2\" >&2; exit 2; }; case \$v in [0-2].* | 3.[0-9] | 3.10) echo \"datafree_jax: $1 on \$(hostname) is Python \$v, but datafree_jax needs Python >= 3.11 (jax>=0.7, flax>=0.11); $2\" >&2; exit 2 ;; esac; }"
}
if [[ -z $py ]]; then
  # Python 3.11 from uv (installed with the image's python3 into ~/.local; uv puts the Python in
  # ~/.local/share/uv/python) in a virtual environment with pip (--seed), created once.
  # shellcheck disable=SC2088
  venv_dir='~/datafree_jax_venv'  # expanded on the workers
  job_py=$venv_dir/bin/python
  install="cd $remote_dir && python3 -m pip install --user uv && python3 -m uv python install 3.11 && { [ -x $job_py ] || python3 -m uv venv --seed --python 3.11 $venv_dir; } && $(remote_check "$job_py" "remove $venv_dir on the workers and rerun") && $job_py -m pip install -U pip && $job_py -m pip install -e '.[tpu]'"
  job_py_env="\"\$HOME/datafree_jax_venv/bin/python\""
else
  # pip installs for PY (into ~/.local when its site is not writable).
  job_py=$(quote "$py")
  install="cd $remote_dir && $(remote_check "$job_py" "use --python=python3.11 (any Python >= 3.11 on the workers), or leave out --python to get Python 3.11 with uv") && $job_py -m pip install -U pip && $job_py -m pip install -e '.[tpu]'"
  job_py_env=$job_py
fi

job="launch/run_resumable.sh $(quote "--config=$config") $(quote "--workdir=$workdir") --distributed=on"
for arg in "${extra[@]}"; do job+=" $(quote "$arg")"; done
# DATAFREE_PYTHON: the python that run_resumable.sh runs the job with.
env_setup="export PATH=\"\$HOME/.local/bin:\$PATH\"; export DATAFREE_PYTHON=$job_py_env;"
if [[ -n $data_dir ]]; then env_setup+=" export TFDS_DATA_DIR=$(quote "$data_dir");"; fi
# The job gets its own session (setsid: no SIGHUP from ssh, one process group to stop it by),
# appends to the log and writes its pid; in the foreground mode the ssh session follows the log
# from where this run starts and ends with the job's exit code.
launch_job="cd $remote_dir || exit 1; $env_setup log=$log; : >> \"\$log\"; start=\$(stat -c %s \"\$log\"); setsid -w nohup $job >> \"\$log\" 2>&1 < /dev/null & pid=\$!; echo \"\$pid\" > $pidfile"
if ((detach)); then
  remote_run="$launch_job; echo \"datafree_jax: started pid \$pid on \$(hostname); log: $log\""
else
  remote_run="$launch_job; tail -c +\$((start + 1)) --pid=\"\$pid\" -f \"\$log\"; wait \"\$pid\""
fi

# --- the slice -----------------------------------------------------------------------------
create_slice() {
  if ((queued)); then
    local cmd=("${qr[@]}" create "$name" --node-id="$name" "${loc[@]}" --accelerator-type="$accel"
               --runtime-version="$runtime")
    if ((spot)); then cmd+=(--spot); fi
    run "${cmd[@]}"
  else
    local cmd=("${tpu[@]}" create "$name" "${loc[@]}" --accelerator-type="$accel" --version="$runtime")
    if ((spot)); then cmd+=(--spot); fi
    run "${cmd[@]}"
  fi
}
delete_slice() {
  if ((queued)); then
    run "${qr[@]}" delete "$name" "${loc[@]}" --force --quiet
  else
    run "${tpu[@]}" delete "$name" "${loc[@]}" --quiet
  fi
}
node_state() {  # READY, CREATING, PREEMPTED, ... or MISSING
  local state
  if state=$("${tpu[@]}" describe "$name" "${loc[@]}" --format='value(state)' 2>/dev/null); then
    echo "${state:-UNKNOWN}"
  else
    echo MISSING
  fi
}
queued_state() {  # ACCEPTED, WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, SUSPENDED, ... or MISSING
  local state
  if state=$("${qr[@]}" describe "$name" "${loc[@]}" --format='value(state.state)' 2>/dev/null); then
    echo "${state:-UNKNOWN}"
  else
    echo MISSING
  fi
}
# Returns when the slice is READY: reuses it, creates it, or deletes and recreates a preempted one.
ensure_slice() {  # ensure_slice MAY_CREATE
  local may_create=$1 state last=""
  while :; do
    state=$(node_state)
    if [[ $state == MISSING ]] && ((queued)); then state="QUEUED_$(queued_state)"; fi
    if [[ $state != "$last" ]]; then echo "$prog: slice $name: $state" >&2; last=$state; fi
    case $state in
      READY) return 0 ;;
      MISSING | QUEUED_MISSING)
        ((may_create)) || die "slice $name not found in zone $zone (--reuse); leave out --reuse to create it"
        create_slice ;;
      PREEMPTED | TERMINATED | QUEUED_FAILED | QUEUED_SUSPENDED)
        ((may_create)) || die "slice $name is $state (--reuse)"
        delete_slice
        create_slice ;;
      STOPPED) die "slice $name is STOPPED: start it (gcloud compute tpus tpu-vm start) or delete it" ;;
      *) sleep 30 ;;  # CREATING, STARTING, REPAIRING, DELETING, queued and provisioning, ...
    esac
  done
}

# --- one attempt: copy, install, run ---------------------------------------------------------
ssh_all() {  # ssh_all COMMAND [SSH FLAGS...]: COMMAND on every worker
  local command=$1
  shift
  run "${tpu[@]}" ssh "$name" "${loc[@]}" --worker=all "$@" --command="$command"
}
deploy_and_run() {
  if [[ -n $git_url ]]; then
    ssh_all "$fetch_code" || return
  else
    if ((!dry_run)) && [[ -n $(git -C "$root" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
      echo "$prog: warning: uncommitted changes in $root are not copied (git archive HEAD)" >&2
    fi
    run git -C "$root" archive --format=tar.gz --prefix=datafree_jax/ -o "$tarball" HEAD || return
    run "${tpu[@]}" scp "$tarball" "$name:datafree_jax.tar.gz" "${loc[@]}" --worker=all || return
    if ((!dry_run)); then rm -f "$tarball"; fi
    ssh_all "$fetch_code" || return
  fi
  ssh_all "$install" || return
  if ((!detach && !dry_run)); then follow_hint; fi
  ssh_all "$remote_run" --ssh-flag=-oServerAliveInterval=60 --ssh-flag=-oServerAliveCountMax=5
}

ssh0="$(words "${tpu[@]}" ssh "$name" "${loc[@]}")"
follow_hint() {
  echo "Follow the job from another terminal (worker 0 prints the progress):"
  echo "  $ssh0 --worker=0 --command=$(quote "tail -n 100 -f $log")"
  echo "  tensorboard --logdir $(quote "${workdir%/}/tensorboard")"
}
summary() {
  follow_hint
  echo "Stop the job on every worker (it saves a checkpoint and exits; rerun this command to resume):"
  echo "  $ssh0 --worker=all --command=$(quote "kill -TERM -- -\$(cat $pidfile)")"
  echo "Delete the slice when done (it is billed until then):"
  if ((queued)); then
    echo "  $(words "${qr[@]}" delete "$name" "${loc[@]}" --force --quiet)"
  else
    echo "  $(words "${tpu[@]}" delete "$name" "${loc[@]}" --quiet)"
  fi
}

if ((dry_run)); then
  # The plan, assuming the slice does not exist (or exists, with --reuse).
  if ((!reuse)); then
    create_slice
    if ((queued)); then
      echo "# then wait until the slice is READY:"
      show "${tpu[@]}" describe "$name" "${loc[@]}" --format='value(state)'
    fi
  fi
  deploy_and_run
  echo "# if the slice is then gone (preempted): delete it, then the lines from the create again (at most $max_restarts times)"
  summary
  exit 0
fi

restarts=0 may_create=$((!reuse))
while :; do
  ensure_slice "$may_create"
  may_create=1
  rc=0
  deploy_and_run || rc=$?
  if ((rc == 0)); then break; fi
  state=$(node_state)
  # An ssh connection dropped by a preemption can fail before the slice reports it.
  check=0
  while ((rc == 255 && check < 3)) && [[ $state == READY ]]; do
    sleep 60
    state=$(node_state)
    check=$((check + 1))
  done
  if [[ $state == READY ]]; then
    echo "$prog: exit code $rc with the slice up: not restarting (the job failed, or ssh lost the connection while the job goes on)" >&2
    summary
    exit "$rc"
  fi
  if ((restarts >= max_restarts)); then
    echo "$prog: slice $name is $state and --max-restarts=$max_restarts are used up" >&2
    summary
    exit "$rc"
  fi
  restarts=$((restarts + 1))
  echo "$prog: slice $name is $state (preempted?) after exit code $rc: recreating it ($restarts/$max_restarts)" >&2
done
if ((detach)); then
  echo "The job runs on every worker of $name."
else
  echo "The job finished on every worker of $name."
fi
summary
