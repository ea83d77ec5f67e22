#!/usr/bin/env bash
# Runs a datafree_jax job on one host (GPU, TPU VM or CPU) and restarts it after preemption.
#
#   launch/run_resumable.sh --config=configs/cifar10.py --workdir=/data/runs/cifar10 [flags...]
#
# Every stage resumes from its latest checkpoint in --workdir, so a restart loses at most the
# steps since the last periodic checkpoint (config.checkpoint_every). Exit code 143 means the
# run was preempted (SIGTERM) after saving a checkpoint; it is restarted up to MAX_RESTARTS
# times (default 100). Any other non-zero code (a config error, a non-finite loss) stops.
# DATAFREE_PYTHON: the python to run it with (default: the `python` on PATH); the launchers set it.
set -u
max_restarts=${MAX_RESTARTS:-100}
for ((i = 0; i <= max_restarts; i++)); do
  "${DATAFREE_PYTHON:-python}" -m datafree_jax.main "$@"
  rc=$?
  if [ "$rc" -ne 143 ]; then
    exit "$rc"
  fi
  echo "launch: preempted; restarting ($((i + 1))/$max_restarts)" >&2
done
exit 143
