#!/usr/bin/env bash
# nin_jax on a GPU or TPU machine, measured in one run of at most 8 minutes on one H100.
#
# It needs JAX for the accelerator, this project checked out, and Fashion-MNIST as an .npz (the
# machine needs neither TensorFlow nor tfds). Write the .npz where tfds is installed, copy it over,
# then run the script with a results folder:
#
#   python -m nin_jax.export_arrays --manual_dir ../shared/data/fashion_mnist --out .data/fashion_mnist.npz
#   bash benchmarks/accelerator.sh results/h100
#
# In this order, each part under its own time limit, clipped to what is left of the whole:
#   environment.json  JAX version, devices, nvidia-smi where there is one
#   (log only)        tests/test_accelerator.py: one step, bf16, an epoch against the CPU's
#   (log only)        benchmarks/loop_ceiling.py: the training loop's own cost, with free steps
#   steps.json        train and eval images/s at 224, fp32 and bf16, batch 128, 256 and 512 (jit)
#   plan_<dtype>.json python -m nin_jax.plan --target local at 224, batch 128: planned memory, kernels, roofline
#   plan_check.json   measured train images/s beside the roofline, measured peak memory beside the plan
#   pmap.json         the same step under --parallel pmap, batch 128
#   deterministic.json  the jit step with XLA's deterministic GPU kernels (train.py --deterministic), batch 128
#   levers.json       --max_pool slices/reduce_window x --conv1x1 dot/conv, batch 128 (nin_jax/kernels.py)
#   pytorch_<dtype>.json  the book's PyTorch step on the same device, where torch can use it
#   reference.jsonl   the 10-epoch reference recipe at 224 in fp32, evaluation included
#   strong.jsonl      the strong recipe in bf16, if time is left
#   parts.jsonl       one line per part: status, exit code, seconds (the recipes' from process start)
#   log.txt           everything printed
# It exits 1 if a part failed or ran out of time, after running the others.
#
# The environment variables below shrink it, for a test on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
if (( $# != 1 )); then
  echo "usage: bash benchmarks/accelerator.sh RESULTS_FOLDER" >&2
  exit 2
fi
RESULTS="$1"
RESIZE="${RESIZE:-224}"
BATCH_SIZES="${BATCH_SIZES:-128 256 512}"
DTYPES="${DTYPES:-float32 bfloat16}"
EPOCHS="${EPOCHS:-10}"
TRAIN_EXAMPLES="${TRAIN_EXAMPLES:-0}"
DATA="${DATA:-.data/fashion_mnist.npz}"
PYTHON="${PYTHON:-python3}"
STEP_FLAGS="${STEP_FLAGS:---steps 5 --repeats 5 --warmup 2}"
LOOP_BATCH_SIZE="${LOOP_BATCH_SIZE:-128}"
BUDGET_S="${BUDGET_S:-460}"      # the whole run: 8 minutes, less a margin for the last kill
LIMIT_SCALE="${LIMIT_SCALE:-1}"  # multiplies every part's limit (a slow CPU needs more)
MIN_PART_S=10                    # a part with less time left than this is skipped
if [[ ! -f "$DATA" ]]; then
  echo "benchmarks/accelerator.sh: no data at $DATA; write it with python -m nin_jax.export_arrays --out $DATA" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
: > "$RESULTS/parts.jsonl"
exec > >(tee "$RESULTS/log.txt") 2>&1
DEADLINE=$(( $(date +%s) + BUDGET_S ))
FIRST_BATCH_SIZE="${BATCH_SIZES%% *}"
FAILED=0
LAST_STATUS="" LAST_SECONDS=0  # of the latest part

record() {  # record PART STATUS EXIT_CODE SECONDS LIMIT_S: one line of parts.jsonl
  printf '{"part": "%s", "status": "%s", "exit_code": %d, "seconds": %s, "limit_s": %d}\n' "$@" >> "$RESULTS/parts.jsonl"
}

part() {  # part NAME LIMIT_S COMMAND...: runs COMMAND under its limit, clipped to what is left; records it
  local name="$1" limit=$(( $2 * LIMIT_SCALE )) code=0 status=ok start seconds left
  shift 2
  left=$(( DEADLINE - $(date +%s) ))
  if (( left < MIN_PART_S )); then
    skip "$name" "${left}s left"
    return
  fi
  (( limit > left )) && limit=$left
  echo "== $name (at most ${limit}s)"
  start=$(date +%s.%N)
  timeout -k 10 "$limit" "$@" || code=$?
  seconds=$(awk "BEGIN { printf \"%.1f\", $(date +%s.%N) - $start }")
  if (( code == 124 || code == 137 )); then status="timed out"; elif (( code )); then status=failed; fi
  [[ "$status" == ok ]] || FAILED=1
  echo "== $name: $status in ${seconds}s"
  record "$name" "$status" "$code" "$seconds" "$limit"
  LAST_STATUS="$status" LAST_SECONDS="$seconds"
}

skip() {  # skip NAME REASON
  echo "== $1: skipped, $2"
  record "$1" "skipped: $2" 0 0 0
  LAST_STATUS="skipped" LAST_SECONDS=0
}

recipe() {  # recipe NAME DTYPE LIMIT_S: the recipe from process start to end, evaluation included
  local workdir
  workdir="$(mktemp -d)"
  part "$1 recipe" "$3" "$PYTHON" train.py --recipe "$1" --dtype "$2" --data_arrays "$DATA" --resize "$RESIZE" \
    --num_epochs "$EPOCHS" --train_examples "$TRAIN_EXAMPLES" --workdir "$workdir"
  [[ -f "$workdir/metrics.jsonl" ]] && cp "$workdir/metrics.jsonl" "$RESULTS/$1.jsonl"
  [[ "$LAST_STATUS" == ok ]] && echo "$1 recipe: $EPOCHS epochs at $RESIZE px in $2, evaluation included, in" \
    "$LAST_SECONDS s, process start to end"
  rm -rf "$workdir"
}

ENVIRONMENT='
import json, subprocess, sys, jax
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True) if sys.argv[1] else None
info = {"jax": jax.__version__, "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind, "nvidia_smi": smi.stdout.strip() if smi else None}
print(json.dumps(info, indent=2))
json.dump(info, open(sys.argv[2], "w"), indent=2)
'
part environment 30 "$PYTHON" -c "$ENVIRONMENT" "$(command -v nvidia-smi)" "$RESULTS/environment.json"
BACKEND="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["backend"])' "$RESULTS/environment.json" \
  2> /dev/null || echo unknown)"

if "$PYTHON" -c "import pytest" 2> /dev/null; then
  part "accelerator tests" 90 "$PYTHON" -m pytest -q -rs tests/test_accelerator.py
else
  skip "accelerator tests" "pytest is not installed"
fi

part "loop ceiling" 30 "$PYTHON" benchmarks/loop_ceiling.py --batch_size "$LOOP_BATCH_SIZE"

# shellcheck disable=SC2086  # BATCH_SIZES, DTYPES and STEP_FLAGS are lists
part "step grid" 60 "$PYTHON" benchmarks/step_throughput.py --resize "$RESIZE" --batch_size $BATCH_SIZES \
  --dtype $DTYPES --parallel jit $STEP_FLAGS --out "$RESULTS/steps.json"
if [[ "$BACKEND" == cpu || "$BACKEND" == unknown ]]; then
  skip "plan" "no accelerator to plan for"
else
  for dtype in $DTYPES; do
    part "plan $dtype" 60 "$PYTHON" -m nin_jax.plan --target local --resize "$RESIZE" --batch_size "$FIRST_BATCH_SIZE" \
      --dtype "$dtype" --no-largest_batch --json "$RESULTS/plan_$dtype.json"
  done
  part "plan check" 20 "$PYTHON" benchmarks/plan_check.py "$RESULTS"
fi
# shellcheck disable=SC2086
part "pmap step" 40 "$PYTHON" benchmarks/step_throughput.py --resize "$RESIZE" --batch_size "$FIRST_BATCH_SIZE" \
  --dtype $DTYPES --parallel pmap $STEP_FLAGS --out "$RESULTS/pmap.json"
# shellcheck disable=SC2086
part "deterministic step" 40 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" "$PYTHON" \
  benchmarks/step_throughput.py --resize "$RESIZE" --batch_size "$FIRST_BATCH_SIZE" --dtype $DTYPES --parallel jit \
  $STEP_FLAGS --out "$RESULTS/deterministic.json"
# shellcheck disable=SC2086
part levers 60 "$PYTHON" benchmarks/step_throughput.py --resize "$RESIZE" --batch_size "$FIRST_BATCH_SIZE" \
  --dtype $DTYPES --max_pool slices reduce_window --conv1x1 dot conv --parallel jit $STEP_FLAGS \
  --out "$RESULTS/levers.json"

if ! "$PYTHON" -c "import torch" 2> /dev/null; then
  skip "pytorch step" "torch is not installed"
elif [[ "$BACKEND" != cpu && "$BACKEND" != gpu ]]; then
  skip "pytorch step" "torch does not run on $BACKEND here"
else
  for dtype in $DTYPES; do
    part "pytorch step $dtype" 30 "$PYTHON" benchmarks/compare_pytorch.py --device "$BACKEND" --dtype "$dtype" \
      --resize "$RESIZE" --batch_size "$FIRST_BATCH_SIZE" --out "$RESULTS/pytorch_$dtype.json"
  done
fi

recipe reference float32 75
REFERENCE_SECONDS="${LAST_SECONDS%.*}"
if [[ "$LAST_STATUS" == ok ]] && (( DEADLINE - $(date +%s) >= REFERENCE_SECONDS * 6 / 5 + MIN_PART_S )); then
  recipe strong bfloat16 "$BUDGET_S"  # whatever is left
else
  skip "strong recipe" "not enough time left after the reference recipe"
fi

echo "== parts"
cat "$RESULTS/parts.jsonl"
exit "$FAILED"
