#!/usr/bin/env bash
# nin_jax on a lent accelerator (an H100 or H200 through this workplace's `device` tool), meant for
# one call (at most 10 minutes; not yet run on one). That machine has JAX (CUDA), flax, optax, chex, orbax, numpy and pillow,
# but neither TensorFlow nor tfds, so the data travels as an .npz exported here first:
#
#   python -m nin_jax.export_arrays --manual_dir ../shared/data/fashion_mnist --out .data/fashion_mnist.npz
#   device run: command "bash benchmarks/gpu.sh", carry [".data"]
#
# It writes under $OUT (or ./gpu_out): steps.json (train- and eval-step images/s at 224 for fp32 and
# bf16 at batch 128, 256 and 512, on in-memory data), reference.jsonl (the 10-epoch reference recipe
# at 224, evaluation included, one line per epoch), strong.jsonl (the strong recipe, the same way),
# and log.txt. The settings below are environment variables so that a test can run it small on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
RESIZE="${RESIZE:-224}"
BATCH_SIZES="${BATCH_SIZES:-128 256 512}"
EPOCHS="${EPOCHS:-10}"
TRAIN_EXAMPLES="${TRAIN_EXAMPLES:-0}"
DATA="${DATA:-.data/fashion_mnist.npz}"
RECIPES="${RECIPES:-reference strong}"
PYTHON="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1

"$PYTHON" -c 'import jax; print("jax", jax.__version__, jax.devices())'
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

# shellcheck disable=SC2086  # BATCH_SIZES is a list
"$PYTHON" benchmarks/step_throughput.py --resize "$RESIZE" --batch_size $BATCH_SIZES --dtype float32 bfloat16 \
  --parallel jit --out "$OUT/steps.json"

for recipe in $RECIPES; do
  workdir="$(mktemp -d)"
  start=$(date +%s.%N)
  "$PYTHON" train.py --recipe "$recipe" --data_arrays "$DATA" --resize "$RESIZE" --num_epochs "$EPOCHS" \
    --train_examples "$TRAIN_EXAMPLES" --workdir "$workdir"
  end=$(date +%s.%N)
  cp "$workdir/metrics.jsonl" "$OUT/$recipe.jsonl"
  echo "$recipe recipe: $EPOCHS epochs at $RESIZE px, evaluation included, in $("$PYTHON" -c "print(round($end - $start, 1))") s, process start to end"
done
