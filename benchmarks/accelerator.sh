#!/usr/bin/env bash
# Step speed (this project's JAX steps beside their PyTorch references), the ImageNet sizing
# dry run and every method's measured CIFAR-10 dry run (and, given the data, a time-limited run
# of each) on a GPU or TPU host, into one results file.
#
#   bash benchmarks/accelerator.sh [OUT_FILE]     # default benchmarks/accelerator_results.md
#   STEP_SPEED_ARGS="--rounds=1 --reps=1" bash benchmarks/accelerator.sh /tmp/quick.md
#   ACCELERATOR_STEPS="1 3" bash benchmarks/accelerator.sh        # some of the steps only
#
# Run from the repository root, with the package installed for the accelerator (jax[cuda12] or
# jax[tpu]); PyTorch is optional: where it is installed, the step_speed tables have its
# columns beside the project's (on the GPU when PyTorch sees one). Nothing is downloaded or
# installed. Appends to OUT_FILE (created if missing): the date, the devices (`nvidia-smi -L`
# where present, and jax.devices()), then for each step a heading with its command, what the
# step writes there itself (step_speed's --out: its header line and markdown table) and the
# step's whole stdout + stderr (also shown here as it runs) in a collapsed block:
#   1. DAFL steps: mnist5k, the paper's MNIST setting and CIFAR-10 at batch 1024 (ResNet-34 ->
#      ResNet-18), project and PyTorch:
#        python -m benchmarks.step_speed --settings=mnist5k,paper_mnist,cifar10 \
#          --cifar_batch=1024 --rounds=3 --reps=5 --out=OUT_FILE
#   2. one step of 10 and of 100 CIFAR-10 generators (configs/cifar10.py:method=ensemble,
#      ResNet-34 teacher), lowering 'vmap', with the single-generator step's compile time:
#        python -m benchmarks.step_speed --settings=cifar_ensemble10,cifar_ensemble100 \
#          --lowering=vmap --rounds=3 --reps=5 --out=OUT_FILE
#   3. the ImageNet sizing dry run (configs/imagenet.py:dry_run=True; compiles every program of
#      every stage exactly for these devices from abstract inputs, trains and writes nothing):
#        python -m datafree_jax.main --config=configs/imagenet.py:dry_run=True --workdir=TMP
#   4. the dry run's predictions against the device: the same programs at one 8-GPU host's
#      per-device sizes (batch 128, 8 generators 2 at a time) run on zero inputs, each program's
#      seconds per call, achieved TFLOP/s and measured peak memory (device.memory_stats()) beside
#      the predicted peak, with the ratio; the rows as JSON in benchmarks/accelerator_dry_run.json
#      (DRY_RUN_JSON), which --config.dry_run_measured=FILE turns into measured hours:
#        python -m datafree_jax.main --config=configs/imagenet.py:dry_run=True \
#          --config.dry_run_measure=True --config.dry_run_out=JSON --config.teacher.batch_size=128 \
#          --config.student.batch_size=128 --config.ensemble.num_generators=8 --workdir=TMP
#   5. every method on CIFAR-10 ResNet-34 -> ResNet-18 (configs/cifar10.py, its published
#      settings per method; CIFAR10_METHODS, default "dafl ensemble deepinversion cmi fast
#      kd_data kd_noise"):
#      a. per method the measuring dry run on these devices (no data, no teacher; the JSON in
#         benchmarks/accelerator_cifar10_METHOD.json, CIFAR10_DRY_RUN_JSON with {method}):
#           python -m datafree_jax.main --config=configs/cifar10.py:method=METHOD \
#             --config.dry_run=True --config.dry_run_measure=True --config.dry_run_out=JSON \
#             --workdir=TMP
#         then one table, "method | programs | measured s / call | hours for the published
#         schedule" (calls x measured seconds), and the teacher's hours once:
#           python -m benchmarks.accelerator_methods --methods=M1,M2,.. --dry_runs=JSON --out=OUT_FILE
#      b. with CIFAR10_DATA_DIR (a tfds data_dir holding cifar10) only: the teacher once
#         (trained, at most TEACHER_BUDGET_S s, default 7200; or read from CIFAR10_TEACHER, a
#         teacher file for --config.teacher.init_from) and copied into each method's workdir,
#         then each method for at most METHOD_BUDGET_S s (default 1800), each run's last
#         student test accuracy and wall time in a table (the workdirs in CIFAR10_RUNS_DIR,
#         default a temporary directory removed at the end; each method's is started anew):
#           python -m datafree_jax.main --config=configs/cifar10.py:stage=teacher \
#             --config.data_dir=DIR [--config.teacher.init_from=FILE] --workdir=RUNS/teacher_run
#           timeout METHOD_BUDGET_S python -m datafree_jax.main \
#             --config=configs/cifar10.py:method=METHOD --config.data_dir=DIR --workdir=RUNS/METHOD
#           python -m benchmarks.accelerator_methods --methods=M1,M2,.. --runs=RUNS/runs.tsv --out=OUT_FILE
#      A method that fails (or whose run fails; reaching the time limit is no failure) is
#      recorded and the others run; step 5 then fails.
# STEP_SPEED_ARGS (words) are appended to the step_speed command lines (a later option wins:
# STEP_SPEED_ARGS="--rounds=1 --reps=1" for a quick pass). ACCELERATOR_STEPS picks the steps
# (default "1 2 3 4 5"). PYTHON is the interpreter (default: python). On an NVIDIA host steps 1 and
# 2 see one GPU (CUDA_VISIBLE_DEVICES, default 0), PyTorch's: both implementations on one
# device. A failed step is recorded ("step N failed, rc=..") and the next one runs; the exit
# status is 1 when any failed.
set -euo pipefail

if [[ ! -f benchmarks/step_speed.py ]]; then
  echo "accelerator.sh: run it from the repository root (bash benchmarks/accelerator.sh)" >&2
  exit 2
fi
out=${1:-benchmarks/accelerator_results.md}
python=${PYTHON:-python}
read -r -a extra <<< "${STEP_SPEED_ARGS:-}"
read -r -a steps <<< "${ACCELERATOR_STEPS:-1 2 3 4 5}"
dry_run_json=${DRY_RUN_JSON:-benchmarks/accelerator_dry_run.json}
cifar10_default="dafl ensemble deepinversion cmi fast kd_data kd_noise"
read -r -a cifar10_methods <<< "${CIFAR10_METHODS:-$cifar10_default}"
cifar10_json=${CIFAR10_DRY_RUN_JSON:-benchmarks/accelerator_cifar10_\{method\}.json}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$work/step.log"
failed=()

# wanted N: whether step N is in ACCELERATOR_STEPS.
wanted() {
  local s
  for s in "${steps[@]}"; do
    [[ $s == "$1" ]] && return 0
  done
  return 1
}

# step N TITLE CMD...: runs CMD, its stdout + stderr shown and copied into the results file;
# a failure is recorded and the script goes on.
step() {
  local n=$1 title=$2 rc
  shift 2
  if ! wanted "$n"; then
    echo "== step $n: $title: skipped (ACCELERATOR_STEPS=${steps[*]})"
    return 0
  fi
  echo "== step $n: $title"
  echo "+ $*"
  printf '\n## Step %s: %s\n\n    %s\n\n' "$n" "$title" "$*" >> "$out"
  set +e
  "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  {
    printf '<details><summary>step %s: stdout and stderr</summary>\n\n' "$n"
    printf '%s\n' '```text'
    cat "$log"
    printf '%s\n\n</details>\n' '```'
  } >> "$out"
  if ((rc != 0)); then
    echo "step $n failed, rc=$rc"
    printf '\nstep %s failed, rc=%s\n' "$n" "$rc" >> "$out"
    failed+=("$n")
  fi
}

# show CMD...: prints CMD as it runs (the '+ ' lines of the steps' output).
show() {
  echo "+ $*"
}

# cifar10_all_methods: step 5 (see the header); its tables go into the results file, a failed
# method is recorded and the next one runs; returns 1 when any failed.
cifar10_all_methods() {
  local m json rc dir start end list data budget teacher_budget runs
  local bad=() teacher_args=()
  list=$(IFS=,; echo "${cifar10_methods[*]}")
  echo "-- 5a. measured dry run of each method: ${cifar10_methods[*]}"
  for m in "${cifar10_methods[@]}"; do
    json=${cifar10_json//\{method\}/$m}
    rm -f "$json"   # a failed dry run leaves no earlier run's rows behind
    show "$python" -m datafree_jax.main "--config=configs/cifar10.py:method=$m" \
      --config.dry_run=True --config.dry_run_measure=True "--config.dry_run_out=$json" \
      "--workdir=$work/cifar10_dry_run_$m"
    rc=0
    "$python" -m datafree_jax.main "--config=configs/cifar10.py:method=$m" \
      --config.dry_run=True --config.dry_run_measure=True "--config.dry_run_out=$json" \
      "--workdir=$work/cifar10_dry_run_$m" || rc=$?
    if ((rc != 0)); then
      echo "cifar10 $m: dry run failed, rc=$rc"
      bad+=("$m dry run (rc=$rc)")
    fi
  done
  show "$python" -m benchmarks.accelerator_methods "--methods=$list" "--dry_runs=$cifar10_json" \
    "--out=$out"
  "$python" -m benchmarks.accelerator_methods "--methods=$list" "--dry_runs=$cifar10_json" \
    "--out=$out" || bad+=("the dry runs' table (rc=$?)")

  data=${CIFAR10_DATA_DIR:-}
  budget=${METHOD_BUDGET_S:-1800}
  teacher_budget=${TEACHER_BUDGET_S:-7200}
  if [[ -z $data ]]; then
    echo "-- 5b. time-limited runs: skipped; CIFAR10_DATA_DIR=DIR (a tfds data_dir with" \
      "cifar10) runs each method for METHOD_BUDGET_S=$budget s (CIFAR10_TEACHER=FILE: the" \
      "teacher read from FILE, else trained first for at most TEACHER_BUDGET_S=$teacher_budget s)" \
      | tee -a "$out"
  else
    runs=${CIFAR10_RUNS_DIR:-$work/cifar10_runs}
    mkdir -p "$runs"
    : > "$runs/runs.tsv"
    if [[ -n ${CIFAR10_TEACHER:-} ]]; then
      teacher_args=("--config.teacher.init_from=$CIFAR10_TEACHER")
    fi
    echo "-- 5b. time-limited runs, $budget s per method, in $runs"
    show timeout --kill-after=300 "$teacher_budget" "$python" -m datafree_jax.main \
      --config=configs/cifar10.py:stage=teacher "--config.data_dir=$data" \
      ${teacher_args[@]+"${teacher_args[@]}"} "--workdir=$runs/teacher_run"
    rc=0
    timeout --kill-after=300 "$teacher_budget" "$python" -m datafree_jax.main \
      --config=configs/cifar10.py:stage=teacher "--config.data_dir=$data" \
      ${teacher_args[@]+"${teacher_args[@]}"} "--workdir=$runs/teacher_run" || rc=$?
    if ((rc != 0)) || [[ ! -d $runs/teacher_run/teacher ]]; then
      echo "cifar10 teacher: failed or not finished in TEACHER_BUDGET_S=$teacher_budget s" \
        "(rc=$rc): the time-limited runs skipped" | tee -a "$out"
      bad+=("the teacher (rc=$rc)")
    else
      for m in "${cifar10_methods[@]}"; do
        dir=$runs/$m
        rm -rf "$dir"
        if ! { mkdir -p "$dir" && cp -r "$runs/teacher_run/teacher" "$dir/"; }; then
          echo "cifar10 $m: could not copy the teacher into $dir"
          bad+=("$m teacher copy")
          continue
        fi
        show timeout --kill-after=300 "$budget" "$python" -m datafree_jax.main \
          "--config=configs/cifar10.py:method=$m" "--config.data_dir=$data" "--workdir=$dir"
        start=$(date +%s)
        rc=0
        timeout --kill-after=300 "$budget" "$python" -m datafree_jax.main \
          "--config=configs/cifar10.py:method=$m" "--config.data_dir=$data" \
          "--workdir=$dir" || rc=$?
        end=$(date +%s)
        printf '%s\t%s\t%s\t%s\t%s\n' "$m" "$rc" "$start" "$end" "$dir" >> "$runs/runs.tsv"
        case $rc in
          0) echo "cifar10 $m: finished in $((end - start)) s" ;;
          124 | 137) echo "cifar10 $m: stopped at the time limit, $budget s" ;;
          *) echo "cifar10 $m: run failed, rc=$rc"; bad+=("$m run (rc=$rc)") ;;
        esac
      done
      show "$python" -m benchmarks.accelerator_methods "--methods=$list" "--runs=$runs/runs.tsv" \
        "--out=$out"
      "$python" -m benchmarks.accelerator_methods "--methods=$list" "--runs=$runs/runs.tsv" \
        "--out=$out" || bad+=("the runs' table (rc=$?)")
    fi
  fi
  if ((${#bad[@]})); then
    printf '\nstep 5: failed: %s\n' "$(IFS=';'; echo "${bad[*]}")" | tee -a "$out"
    return 1
  fi
}

echo "== writing to $out"
{
  printf '\n# Accelerator run, %s\n\n' "$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  printf 'host %s\n\n%s\n' "${HOSTNAME:-unknown}" '```text'
  if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi -L || echo "nvidia-smi -L failed"
  fi
  "$python" -c 'import jax; d = jax.devices(); print(f"jax {jax.__version__}, backend {jax.default_backend()}, {len(d)} device(s), kind {d[0].device_kind}: {d}")' 2>&1 || echo "jax.devices() failed"
  "$python" -c 'import torch; print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")' 2>/dev/null || echo "PyTorch: not installed (the project's columns only)"
  printf '%s\n' '```'
} | tee -a "$out"

one_device=()
if command -v nvidia-smi > /dev/null 2>&1; then
  one_device=(env "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}")
fi

step 1 "DAFL steps: mnist5k, paper MNIST, CIFAR-10 at batch 1024" \
  ${one_device[@]+"${one_device[@]}"} "$python" -m benchmarks.step_speed \
  --settings=mnist5k,paper_mnist,cifar10 --cifar_batch=1024 --rounds=3 --reps=5 \
  "--out=$out" ${extra[@]+"${extra[@]}"}
step 2 "one step of 10 and of 100 CIFAR-10 generators, lowering vmap" \
  ${one_device[@]+"${one_device[@]}"} "$python" -m benchmarks.step_speed \
  --settings=cifar_ensemble10,cifar_ensemble100 --lowering=vmap --rounds=3 --reps=5 \
  "--out=$out" ${extra[@]+"${extra[@]}"}
step 3 "ImageNet sizing dry run" \
  "$python" -m datafree_jax.main --config=configs/imagenet.py:dry_run=True \
  "--workdir=$work/imagenet_dry_run"
step 4 "dry run predictions against the device (measured programs)" \
  "$python" -m datafree_jax.main --config=configs/imagenet.py:dry_run=True \
  --config.dry_run_measure=True "--config.dry_run_out=$dry_run_json" \
  --config.teacher.batch_size=128 --config.student.batch_size=128 \
  --config.ensemble.num_generators=8 "--workdir=$work/imagenet_measure"
step 5 "every method on CIFAR-10 (ResNet-34 -> ResNet-18): measured dry runs, time-limited runs" \
  cifar10_all_methods

if ((${#failed[@]})); then
  printf '\nstep(s) %s failed\n' "${failed[*]}" >> "$out"
  echo "accelerator.sh: step(s) ${failed[*]} failed; results in $out" >&2
  exit 1
fi
echo "accelerator.sh: done; results in $out"
