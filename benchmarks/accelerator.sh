#!/usr/bin/env bash
# nin_jax on a GPU or TPU machine, measured in one run that ends within its budget (8 minutes on one
# H200, less a margin) and says, target by target, whether nin_jax meets it.
#
#   bash benchmarks/accelerator.sh [--platform gpu|tpu|cpu] [--budget_s SECONDS] RESULTS_FOLDER
#
#   --platform P   the accelerator to measure (default gpu). JAX_PLATFORMS is set to it (cuda, tpu or cpu), so that
#                  JAX stops rather than fall back to the CPU; a JAX_PLATFORMS of the environment that names another
#                  is refused, and so is a JAX whose default backend is not P (one line, nothing written).
#                  cpu lets the CPU stand in for an accelerator, for tests.
#   --budget_s S   the whole run's wall time, the summary and the archive included (default 470)
#
# It needs JAX for the accelerator, this project checked out, and Fashion-MNIST as an .npz (the
# machine needs neither TensorFlow nor tfds). Write the .npz where tfds is installed, copy it over,
# then run the script with a results folder:
#
#   python -m nin_jax.export_arrays --manual_dir ../shared/data/fashion_mnist --out .data/fashion_mnist.npz
#   bash benchmarks/accelerator.sh results/h200
#
# First, environment.json: the versions, the devices, nvidia-smi, once JAX is known to compute on the
# platform asked for (benchmarks/accelerator_environment.py). Then the parts, in the order of what they
# are worth, each with a share of the budget in seconds, sized from the first H200 run. A part may run
# to the end of its share and of the shares before it that went unused, never into the shares of the
# parts after it, and never into the last RESERVE_S of the budget, kept for the summary and the archive.
# One stopped at its deadline is marked clipped and keeps what it wrote; one with less than MIN_PART_S
# left is skipped. The shares add up to 445 s; with the first step (about 8 s) and the reserve the
# whole fits in 470 s.
#   share  part                 what it leaves in RESULTS_FOLDER
#     55   recipe_strong_cold   the strong recipe in bf16, 10 epochs at 224 px, from process start with an empty
#                               compile cache of its own (recipe_strong_cold.jsonl: metrics.jsonl; .phases.json:
#                               where its wall time went, by benchmarks/recipe_phases.py)
#     35   recipe_strong_warm   the same again in a new process, the cache filled by the cold run
#    225   steps                one process (benchmarks/accelerator_steps.py): the train step's images/s, nin_jax
#                               taking turns with PyTorch's book, tuned and torch.compile steps at batch 128 and 512
#                               in bf16, the profile of the bf16 step at 128 (profile/, profile.txt, profile.json),
#                               the other forms of the step, the plain Flax NiN, fp32, pmap (steps.jsonl)
#     50   recipe_reference     the book's recipe in fp32, 10 epochs at 224 px, a cold run (as the strong one)
#     30   deterministic        the bf16 step at 128 with XLA's deterministic GPU kernels (deterministic.json)
#     20   plan                 python -m nin_jax.plan --target local in bf16 (plan_bfloat16.json; plan_check.json)
#     30   accelerator tests    tests/test_accelerator.py (in log.txt)
# and at the end summary.md (which opens with the verdict on each target), summary.json
# (benchmarks/accelerator_summary.py), parts.jsonl (one line per part: status, exit code, seconds,
# limit), log.txt (everything printed), and the folder packed into one file beside it
# (results/h200.tar.gz).
#
# Exit status: 0 when every part ran to its end, or was skipped for what the machine lacks (pytest,
# an accelerator to plan for); 1 when a part failed, was clipped or was skipped for lack of time (the
# summary and the archive are written all the same); 2 for a wrong flag, missing data, or a JAX that
# does not compute on the platform asked for (nothing is written).
#
# For a test on a CPU the environment shrinks it (defaults in brackets): RESIZE (224), BATCH_SIZES
# ("128 512": the first is the recipes', the profile's and the other forms'), EPOCHS (10),
# TRAIN_EXAMPLES (0: all), DATA (.data/fashion_mnist.npz), PYTHON (python3), WINDOW_STEPS (100),
# WINDOWS (5) and WARMUP (10) of every step timing, PROFILE_STEPS (10), MIN_GROUP_S (15: a group of
# the steps part is not started with less left), LIMIT_SCALE (1: multiplies every share, for a
# slower machine).
set -uo pipefail
cd "$(dirname "$0")/.."
USAGE="usage: bash benchmarks/accelerator.sh [--platform gpu|tpu|cpu] [--budget_s SECONDS] RESULTS_FOLDER"
usage() {  # usage [WHY]: the usage line, with what was wrong, and exit 2
  echo "$USAGE${1:+ ($1)}" >&2
  exit 2
}
PLATFORM=gpu BUDGET_S=470 RESULTS=""
while (( $# )); do
  case "$1" in
    --platform|--budget_s) (( $# >= 2 )) || usage "$1 needs a value"; [[ "$1" == --platform ]] && PLATFORM="$2" || BUDGET_S="$2"; shift 2 ;;
    --platform=*) PLATFORM="${1#*=}"; shift ;;
    --budget_s=*) BUDGET_S="${1#*=}"; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) usage "no flag $1" ;;
    *) [[ -z "$RESULTS" ]] || usage "one results folder, not $RESULTS and $1"; RESULTS="$1"; shift ;;
  esac
done
[[ -n "$RESULTS" ]] || usage
case "$PLATFORM" in gpu) JAX_PLATFORM=cuda ;; tpu) JAX_PLATFORM=tpu ;; cpu) JAX_PLATFORM=cpu ;;
  *) usage "--platform is gpu, tpu or cpu, not $PLATFORM" ;; esac
[[ "$BUDGET_S" =~ ^[0-9]+$ ]] && (( BUDGET_S > 0 )) || usage "--budget_s is a whole number of seconds, not $BUDGET_S"
if [[ -n "${JAX_PLATFORMS:-}" && "$JAX_PLATFORMS" != "$JAX_PLATFORM" ]]; then
  echo "benchmarks/accelerator.sh: JAX_PLATFORMS=$JAX_PLATFORMS would not compute on the $PLATFORM asked for" \
    "(--platform $PLATFORM needs JAX_PLATFORMS=$JAX_PLATFORM or none); nothing was measured" >&2
  exit 2
fi
RESIZE="${RESIZE:-224}"
BATCH_SIZES="${BATCH_SIZES:-128 512}"
EPOCHS="${EPOCHS:-10}"
TRAIN_EXAMPLES="${TRAIN_EXAMPLES:-0}"
DATA="${DATA:-.data/fashion_mnist.npz}"
PYTHON="${PYTHON:-python3}"
WINDOW_STEPS="${WINDOW_STEPS:-100}"
WINDOWS="${WINDOWS:-5}"
WARMUP="${WARMUP:-10}"
PROFILE_STEPS="${PROFILE_STEPS:-10}"
MIN_GROUP_S="${MIN_GROUP_S:-15}"
LIMIT_SCALE="${LIMIT_SCALE:-1}"
RESERVE_S=10     # the end of the budget, for the summary and the archive
MIN_PART_S=10    # a part with less time than this left is skipped
KILL_AFTER_S=5   # a part still running this long after its SIGTERM gets a SIGKILL
if [[ ! -f "$DATA" ]]; then
  echo "benchmarks/accelerator.sh: no data at $DATA; write it with python -m nin_jax.export_arrays --out $DATA" >&2
  exit 2
fi
START=$(date +%s)
PARTS_END=$(( START + BUDGET_S - RESERVE_S ))
COMMAND="bash benchmarks/accelerator.sh --platform $PLATFORM --budget_s $BUDGET_S $RESULTS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 JAX_PLATFORMS="$JAX_PLATFORM"
SCRATCH="$(mktemp -d)"  # workdirs and compile caches, each part's own (private to this user)
trap 'rm -rf "$SCRATCH"' EXIT
if ! timeout 120 "$PYTHON" benchmarks/accelerator_environment.py --backend "$PLATFORM" \
    --out "$SCRATCH/environment.json" --command "$COMMAND" > "$SCRATCH/environment.log" 2>&1; then
  echo "benchmarks/accelerator.sh: $(tail -n 1 "$SCRATCH/environment.log" | sed 's/^accelerator_environment.py: //');" \
    "nothing was measured" >&2
  exit 2
fi
mkdir -p "$RESULTS"
cp "$SCRATCH/environment.json" "$SCRATCH/environment.log" "$RESULTS/"
: > "$RESULTS/parts.jsonl"
exec > >(tee "$RESULTS/log.txt") 2>&1
echo "== environment: JAX computes on $PLATFORM ($(( $(date +%s) - START )) s)"
FIRST_BATCH_SIZE="${BATCH_SIZES%% *}"
FAILED=0
BOUNDARY=$(date +%s)  # the end of the shares given out so far
LIMIT=0               # the latest part's time

record() {  # record PART STATUS EXIT_CODE SECONDS LIMIT_S: one line of parts.jsonl
  printf '{"part": "%s", "status": "%s", "exit_code": %d, "seconds": %s, "limit_s": %d}\n' "$@" >> "$RESULTS/parts.jsonl"
}

share() {  # share NAME SHARE_S: LIMIT becomes the part's time, to the end of its share; 1 if too little is left
  BOUNDARY=$(( BOUNDARY + $2 * LIMIT_SCALE ))
  (( BOUNDARY > PARTS_END )) && BOUNDARY=$PARTS_END
  LIMIT=$(( BOUNDARY - $(date +%s) ))
  if (( LIMIT < MIN_PART_S )); then
    (( LIMIT < 0 )) && LIMIT=0
    echo "== $1: skipped, ${LIMIT} s left of its share"
    record "$1" "skipped: ${LIMIT} s left of its share" 0 0 "$LIMIT"
    FAILED=1
    return 1
  fi
}

run() {  # run NAME COMMAND...: COMMAND until a second before LIMIT, its SIGKILL included; recorded
  local name="$1" code=0 status=ok start seconds
  shift
  echo "== $name (at most ${LIMIT} s)"
  start=$(date +%s.%N)
  # the second kept back covers the whole seconds that LIMIT counts in and the reaping after a SIGKILL
  timeout -k "$KILL_AFTER_S" "$(( LIMIT - KILL_AFTER_S - 1 ))" "$@" || code=$?
  seconds=$(awk "BEGIN { printf \"%.2f\", $(date +%s.%N) - $start }")
  if (( code == 124 || code == 137 )); then status="clipped: stopped at its deadline"; elif (( code )); then status=failed; fi
  [[ "$status" == ok ]] || FAILED=1
  echo "== $name: $status in ${seconds} s"
  record "$name" "$status" "$code" "$seconds" "$LIMIT"
}

part() {  # part NAME SHARE_S COMMAND...
  share "$1" "$2" && run "$1" "${@:3}"
}

skip() {  # skip NAME REASON: a part for which the machine lacks something
  echo "== $1: skipped, $2"
  record "$1" "skipped: $2" 0 0 0
}

recipe() {  # recipe NAME RECIPE DTYPE SHARE_S CACHE: a run from its launch to its exit, phase by phase
  local workdir="$SCRATCH/$1"
  part "$1" "$4" env JAX_COMPILATION_CACHE_DIR="$5" "$PYTHON" benchmarks/recipe_phases.py \
    --out "$RESULTS/$1.phases.json" --launched_at "$(date +%s.%N)" -- train.py --recipe "$2" --dtype "$3" \
    --data_arrays "$DATA" --resize "$RESIZE" --num_epochs "$EPOCHS" --train_examples "$TRAIN_EXAMPLES" --workdir "$workdir"
  [[ -f "$workdir/metrics.jsonl" ]] && cp "$workdir/metrics.jsonl" "$RESULTS/$1.jsonl"
}

recipe recipe_strong_cold strong bfloat16 55 "$SCRATCH/cache_strong"
recipe recipe_strong_warm strong bfloat16 35 "$SCRATCH/cache_strong"

if [[ "$PLATFORM" == gpu ]]; then PYTORCH_STEPS="book tuned compiled"; elif [[ "$PLATFORM" == cpu ]]; then
  PYTORCH_STEPS="book tuned"; else PYTORCH_STEPS=""; fi  # torch does not run on TPUs here
# shellcheck disable=SC2086  # BATCH_SIZES and PYTORCH_STEPS are lists
share steps 225 && run steps env JAX_COMPILATION_CACHE_DIR="$SCRATCH/cache_steps" "$PYTHON" benchmarks/accelerator_steps.py \
  --out "$RESULTS/steps.jsonl" --profile_dir "$RESULTS/profile" --resize "$RESIZE" --batch_sizes $BATCH_SIZES \
  --pytorch $PYTORCH_STEPS --steps_per_window "$WINDOW_STEPS" --windows "$WINDOWS" --warmup "$WARMUP" \
  --profile_steps "$PROFILE_STEPS" --min_group_s "$MIN_GROUP_S" --seconds $(( LIMIT - KILL_AFTER_S - 4 ))

recipe recipe_reference reference float32 50 "$SCRATCH/cache_reference"

part deterministic 30 env JAX_COMPILATION_CACHE_DIR="$SCRATCH/cache_deterministic" \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" "$PYTHON" benchmarks/step_throughput.py \
  --resize "$RESIZE" --batch_size "$FIRST_BATCH_SIZE" --dtype bfloat16 --parallel jit --steps "$WINDOW_STEPS" \
  --repeats "$WINDOWS" --warmup "$WARMUP" --out "$RESULTS/deterministic.json"

if [[ "$PLATFORM" == cpu ]]; then
  skip plan "no accelerator to plan for"
else
  part plan 20 env JAX_COMPILATION_CACHE_DIR="$SCRATCH/cache_plan" "$PYTHON" -m nin_jax.plan --target local \
    --resize "$RESIZE" --batch_size "$FIRST_BATCH_SIZE" --dtype bfloat16 --no-largest_batch --json "$RESULTS/plan_bfloat16.json"
fi

if "$PYTHON" -c "import pytest" 2> /dev/null; then
  part "accelerator tests" 30 env JAX_COMPILATION_CACHE_DIR="$SCRATCH/cache_tests" "$PYTHON" -m pytest -q -rs \
    -p no:cacheprovider tests/test_accelerator.py
else
  skip "accelerator tests" "pytest is not installed"
fi

echo "== summary"
[[ -f "$RESULTS/plan_bfloat16.json" ]] && timeout 5 "$PYTHON" benchmarks/plan_check.py "$RESULTS"
# shellcheck disable=SC2086  # BATCH_SIZES is a list
timeout 5 "$PYTHON" benchmarks/accelerator_summary.py "$RESULTS" --batch_sizes $BATCH_SIZES || FAILED=1
tar -czf "${RESULTS%/}.tar.gz" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" && echo "packed ${RESULTS%/}.tar.gz"
echo "accelerator.sh: $(( $(date +%s) - START )) s of a budget of $BUDGET_S s; exit status $FAILED"
exit "$FAILED"
