#!/usr/bin/env bash
# Runs a datafree_jax job on one host (GPU, TPU VM or CPU) and restarts it after preemption.
#
#   launch/run_resumable.sh --config=configs/cifar10.py --workdir=/data/runs/cifar10 [flags...]
#
# Every stage resumes from its latest checkpoint in --workdir, so a restart loses at most the
# steps since the last periodic checkpoint (config.checkpoint_every). Exit code 143 means the
# run was preempted (SIGTERM): it saved the step it reached (within
# config.checkpoint_preemption_secs), or said which complete checkpoint a restart uses; it is
# restarted up to MAX_RESTARTS times (default 100). Any other non-zero code (a config error, a
# non-finite loss) stops.
#
# Input threads: a streamed dataset (ImageNet) is decoded by the training pipeline's own tf.data
# thread pool. Unless the flags set --config.data_threads, it is sized to the CPUs this process
# may use (nproc: the affinity and cpuset SLURM or a container gives it) less DATA_RESERVE
# (default 2, for the Python loop and the runtime's own threads). benchmarks/RESULTS.md ("Input
# speed") has the images/s one core decodes, from which the launchers size their CPU requests.
# DATAFREE_PYTHON: the python to run it with (default: the `python` on PATH); the launchers set it.
set -u
max_restarts=${MAX_RESTARTS:-100}
args=("$@")
threads_given=0
for arg in "$@"; do
  case $arg in --config.data_threads | --config.data_threads=*) threads_given=1 ;; esac
done
if ((!threads_given)); then
  cpus=$(nproc 2>/dev/null || echo 1)
  reserve=${DATA_RESERVE:-2}
  threads=$((cpus - reserve))
  if ((threads < 1)); then threads=1; fi
  args+=("--config.data_threads=$threads")
  echo "launch: $cpus CPUs: --config.data_threads=$threads (tf.data threads of a streamed dataset)" >&2
fi
for ((i = 0; i <= max_restarts; i++)); do
  "${DATAFREE_PYTHON:-python}" -m datafree_jax.main "${args[@]}"
  rc=$?
  if [ "$rc" -ne 143 ]; then
    exit "$rc"
  fi
  echo "launch: preempted; restarting ($((i + 1))/$max_restarts)" >&2
done
exit 143
