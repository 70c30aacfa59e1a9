#!/usr/bin/env bash
# nin_jax on a GPU or TPU machine, measured in one run of at most 8 minutes on one H200.
#
# It needs JAX for the accelerator, this project checked out, and Fashion-MNIST as an .npz (the
# machine needs neither TensorFlow nor tfds). Write the .npz where tfds is installed, copy it over,
# then run the script with a results folder:
#
#   python -m nin_jax.export_arrays --manual_dir ../shared/data/fashion_mnist --out .data/fashion_mnist.npz
#   bash benchmarks/accelerator.sh results/h200
#
# Its parts, in the order of what they are worth, each under its own time limit, clipped to what is
# left of the whole; all share one compile cache, which starts empty:
#   environment.json           JAX and the other versions, the devices, nvidia-smi where there is one
#   recipe_reference.jsonl     the reference recipe, 10 epochs at 224 px in fp32, a first run (empty cache)
#   recipe_strong.jsonl        the strong recipe in bf16, a first run (no entry of its own in the cache)
#   recipe_strong_again.jsonl  the strong recipe again: a second run, its compiled steps in the cache
#   steps/*.json               train (and eval) images/s and the device's peak memory, each configuration in a
#                              process of its own: nin_jax and a plain Flax NiN (benchmarks/plain_flax.py) at
#                              224 px, bf16 and fp32, batch 128 and 512
#   plan_<dtype>.json          python -m nin_jax.plan --target local: planned memory, kernels, roofline
#   plan_check.json            the measured steps beside their plans
#   profile.txt, profile.json  where the bf16 step's time goes at batch 128, by part of the network
#   profile/                   its trace and the step's optimised program
#   steps/lever_*.json         the other max-pool forms, the 1x1 convolutions as dots and the ReLU before
#                              the pool, bf16, batch 128
#   pytorch_*.json             the book's PyTorch step and a tuned one on the same device, alternating
#   steps/pmap_*.json          the step under --parallel pmap
#   steps/deterministic_*.json the step with XLA's deterministic GPU kernels (train.py --deterministic)
#   (log only)                 tests/test_accelerator.py
#   pytorch_compiled_*.json    PyTorch under torch.compile, if time is left (its compile takes a minute)
#   parts.jsonl                one line per part: status, exit code, seconds, limit
#   summary.md, summary.json   every figure of the run in one place (benchmarks/accelerator_summary.py)
#   log.txt                    everything printed
# and packs the folder into one file beside it (results/h200.tar.gz). It exits 1 if a part failed
# or ran out of time, after running the others.
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
BATCH_SIZES="${BATCH_SIZES:-128 512}"   # the first is the recipes', the profile's and the levers'
EPOCHS="${EPOCHS:-10}"
TRAIN_EXAMPLES="${TRAIN_EXAMPLES:-0}"
DATA="${DATA:-.data/fashion_mnist.npz}"
PYTHON="${PYTHON:-python3}"
STEP_FLAGS="${STEP_FLAGS:---steps 10 --repeats 5 --warmup 3}"
TORCH_FLAGS="${TORCH_FLAGS:---steps 10 --rounds 5 --warmup 5}"
PROFILE_STEPS="${PROFILE_STEPS:-10}"
BUDGET_S="${BUDGET_S:-470}"      # the whole run: 8 minutes, less a margin for the summary and the last kill
LIMIT_SCALE="${LIMIT_SCALE:-1}"  # multiplies every part's limit (a slow CPU needs more)
MIN_PART_S=10                    # a part with less time left than this is skipped
if [[ ! -f "$DATA" ]]; then
  echo "benchmarks/accelerator.sh: no data at $DATA; write it with python -m nin_jax.export_arrays --out $DATA" >&2
  exit 2
fi
COMMAND="bash benchmarks/accelerator.sh $*"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$RESULTS/steps"
: > "$RESULTS/parts.jsonl"
exec > >(tee "$RESULTS/log.txt") 2>&1
START=$(date +%s)
DEADLINE=$(( START + BUDGET_S ))
FIRST_BATCH_SIZE="${BATCH_SIZES%% *}"
LAST_BATCH_SIZE="${BATCH_SIZES##* }"
FAILED=0
LAST_STATUS="" LAST_SECONDS=0  # of the latest part
SCRATCH="$(mktemp -d)"  # workdirs, and the compile cache that every part shares (private to this user)
export JAX_COMPILATION_CACHE_DIR="$SCRATCH/compile_cache"
trap 'rm -rf "$SCRATCH"' EXIT

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

recipe() {  # recipe NAME RECIPE DTYPE LIMIT_S: a training run from process start to end, evaluation included
  local workdir="$SCRATCH/$1"
  part "$1" "$4" "$PYTHON" train.py --recipe "$2" --dtype "$3" --data_arrays "$DATA" --resize "$RESIZE" \
    --num_epochs "$EPOCHS" --train_examples "$TRAIN_EXAMPLES" --workdir "$workdir"
  [[ -f "$workdir/metrics.jsonl" ]] && cp "$workdir/metrics.jsonl" "$RESULTS/$1.jsonl"
  [[ "$LAST_STATUS" == ok ]] && echo "$1: $EPOCHS epochs at $RESIZE px in $3, evaluation included, in" \
    "$LAST_SECONDS s, process start to end"
}

step() {  # step NAME LIMIT_S DTYPE BATCH_SIZE [step_throughput.py flags...]: one configuration, one process
  local name="$1" limit="$2" dtype="$3" batch_size="$4"
  shift 4
  # shellcheck disable=SC2086  # STEP_FLAGS is a list
  part "step $name" "$limit" "$PYTHON" benchmarks/step_throughput.py --resize "$RESIZE" --batch_size "$batch_size" \
    --dtype "$dtype" --parallel jit $STEP_FLAGS "$@" --out "$RESULTS/steps/$name.json"
}

pytorch() {  # pytorch NAME LIMIT_S DTYPE BATCH_SIZE VARIANT...: compare_pytorch.py, its steps alternating
  local name="$1" limit="$2" dtype="$3" batch_size="$4"
  shift 4
  # shellcheck disable=SC2086  # TORCH_FLAGS is a list
  part "$name" "$limit" "$PYTHON" benchmarks/compare_pytorch.py --device "$BACKEND" --dtype "$dtype" \
    --resize "$RESIZE" --batch_size "$batch_size" --pytorch "$@" $TORCH_FLAGS --out "$RESULTS/$name.json"
}

ENVIRONMENT='
import importlib.metadata, json, platform, subprocess, sys, jax
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                     capture_output=True, text=True) if sys.argv[1] else None
def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
packages = ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu", "flax", "optax", "orbax-checkpoint",
            "numpy", "torch")
info = {"python": platform.python_version(), "versions": {name: version(name) for name in packages},
        "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind, "nvidia_smi": smi.stdout.strip() if smi else None,
        "command": sys.argv[3]}
print(json.dumps(info, indent=2))
json.dump(info, open(sys.argv[2], "w"), indent=2)
'
part environment 30 "$PYTHON" -c "$ENVIRONMENT" "$(command -v nvidia-smi)" "$RESULTS/environment.json" "$COMMAND"
BACKEND="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["backend"])' "$RESULTS/environment.json" \
  2> /dev/null || echo unknown)"

recipe recipe_reference reference float32 75
recipe recipe_strong strong bfloat16 75
recipe recipe_strong_again strong bfloat16 45

for batch_size in $BATCH_SIZES; do
  for dtype in bfloat16 float32; do
    step "nin_jax_${dtype}_$batch_size" 30 "$dtype" "$batch_size"
    step "plain_${dtype}_$batch_size" 30 "$dtype" "$batch_size" --model plain
  done
done

if [[ "$BACKEND" == cpu || "$BACKEND" == unknown ]]; then
  skip "plan" "no accelerator to plan for"
else
  for dtype in bfloat16 float32; do
    part "plan $dtype" 45 "$PYTHON" -m nin_jax.plan --target local --resize "$RESIZE" --batch_size "$FIRST_BATCH_SIZE" \
      --dtype "$dtype" --no-largest_batch --json "$RESULTS/plan_$dtype.json"
  done
  part "plan check" 15 "$PYTHON" benchmarks/plan_check.py "$RESULTS"
fi

PROFILE_WORKDIR="$SCRATCH/profile"
part "profile" 45 "$PYTHON" train.py --dtype bfloat16 --data_arrays "$DATA" --resize "$RESIZE" \
  --batch_size "$FIRST_BATCH_SIZE" --num_epochs 1 --train_examples $(( FIRST_BATCH_SIZE * (PROFILE_STEPS + 5) )) \
  --eval_examples "$FIRST_BATCH_SIZE" --profile_steps "$PROFILE_STEPS" --workdir "$PROFILE_WORKDIR"
if [[ -d "$PROFILE_WORKDIR/profile" ]]; then
  cp -r "$PROFILE_WORKDIR/profile" "$RESULTS/profile"
  "$PYTHON" -m nin_jax.profile_report "$RESULTS/profile" --json "$RESULTS/profile.json" > "$RESULTS/profile.txt"
fi

step "lever_slices_conv" 30 bfloat16 "$FIRST_BATCH_SIZE" --max_pool slices --conv1x1 conv
step "lever_reduce_window_conv" 30 bfloat16 "$FIRST_BATCH_SIZE" --max_pool reduce_window --conv1x1 conv
step "lever_indexed_dot" 30 bfloat16 "$FIRST_BATCH_SIZE" --max_pool indexed --conv1x1 dot
step "lever_relu_then_pool" 30 bfloat16 "$FIRST_BATCH_SIZE" --pool_order relu_then_pool

if ! "$PYTHON" -c "import torch" 2> /dev/null; then
  skip "pytorch" "torch is not installed"
elif [[ "$BACKEND" != cpu && "$BACKEND" != gpu ]]; then
  skip "pytorch" "torch does not run on $BACKEND here"
else
  pytorch "pytorch_float32_$FIRST_BATCH_SIZE" 45 float32 "$FIRST_BATCH_SIZE" book tuned
  pytorch "pytorch_bfloat16_$FIRST_BATCH_SIZE" 45 bfloat16 "$FIRST_BATCH_SIZE" book tuned
  (( LAST_BATCH_SIZE != FIRST_BATCH_SIZE )) && pytorch "pytorch_bfloat16_$LAST_BATCH_SIZE" 45 bfloat16 "$LAST_BATCH_SIZE" tuned
fi

part "pmap step" 30 "$PYTHON" benchmarks/step_throughput.py --resize "$RESIZE" --batch_size "$FIRST_BATCH_SIZE" \
  --dtype bfloat16 --parallel pmap $STEP_FLAGS --out "$RESULTS/steps/pmap_bfloat16_$FIRST_BATCH_SIZE.json"
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" \
  step "deterministic_bfloat16_$FIRST_BATCH_SIZE" 40 bfloat16 "$FIRST_BATCH_SIZE"

if "$PYTHON" -c "import pytest" 2> /dev/null; then
  part "accelerator tests" 90 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_accelerator.py
else
  skip "accelerator tests" "pytest is not installed"
fi

if [[ "$BACKEND" == gpu ]] && "$PYTHON" -c "import torch" 2> /dev/null; then
  pytorch "pytorch_compiled_bfloat16_$LAST_BATCH_SIZE" 90 bfloat16 "$LAST_BATCH_SIZE" compiled
  pytorch "pytorch_compiled_float32_$FIRST_BATCH_SIZE" 90 float32 "$FIRST_BATCH_SIZE" compiled
fi

echo "== parts"
cat "$RESULTS/parts.jsonl"
"$PYTHON" benchmarks/accelerator_summary.py "$RESULTS" || FAILED=1
tar -czf "${RESULTS%/}.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" && echo "packed ${RESULTS%/}.tar.gz"
echo "accelerator.sh: $(( $(date +%s) - START )) s in all"
exit "$FAILED"
