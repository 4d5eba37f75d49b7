#!/usr/bin/env bash
# One command for a GPU machine with no network: install nfnet_fast, run the GPU tests, the full
# benchmark and the static kernel tables, and write bench/results/<date>-<gpu>.md and .json.
#
#   bash bench/gpu_report.sh [--quick] [--dry-run] [--out DIR]
#
#   --quick    fewer timed rounds, no max-autotune contender
#   --dry-run  on a machine without a GPU: exercise every step on the CPU at small sizes
#   --out DIR  where the report goes (default bench/results)
# PYTHON selects the interpreter (default python3); BUDGET_S (default 540) bounds the whole run:
# every step gets at most the time left, and max-autotune (the slowest to compile) runs last.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
QUICK=0 DRY=0 OUT=bench/results BUDGET_S=${BUDGET_S:-540}
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    *) echo "usage: $0 [--quick] [--dry-run] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
step() { echo "== [$(elapsed)s] $*"; }
work=$(mktemp -d)
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  slug=cpu-dryrun
else
  if ! $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no CUDA device visible: run with --dry-run on a machine without a GPU" >&2; exit 1
  fi
  slug=$($PY -c 'import torch, re; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name()).strip("-").lower())')
  export NFNET_FAST_REQUIRE_CUDA=1  # the GPU report must measure the CUDA kernels, not silently skip them
fi
name="$OUT/$(date -u +%Y-%m-%d)-$slug"

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && commit="$commit (with uncommitted changes)"
notes="$work/notes"; : >"$notes"
report() {  # the report of whatever finished; its exit status is the script's
  step "report"
  [ -s "$notes" ] && { echo "## notes"; cat "$notes"; } >>"$work/tests.summary"
  if $PY bench/report.py "${jsons[@]}" --tests "$work/tests.summary" --out "$name" --commit "$commit" \
      --tables bench/triton_resources.md bench/cuda_resources.md \
      --title "nfnet_fast benchmark report: $slug$([ "$QUICK" = 1 ] && echo ' (quick)')"; then
    echo "report written to $name.md and $name.json ($(elapsed)s)"
  else
    echo "bench/report.py failed: no report written" >&2; return 1
  fi
}
jsons=()
: >"$work/tests.summary"

step "install (pip install --no-build-isolation --no-deps -e .)"
if ! $PY -m pip install -q --no-build-isolation --no-deps -e . >"$work/install.log" 2>&1; then
  tail -30 "$work/install.log"
  { echo "- install failed:"; tail -15 "$work/install.log" | sed 's/^/    /'; } >>"$notes"
  report; exit 1
fi
$PY -c 'import nfnet_fast; [print(f"   {b.name}: {b.devices or b.reason}") for b in nfnet_fast.backends().values()]'

# Each step runs under `timeout` with what is left of the budget, so the script always ends with a
# report (of what finished) inside BUDGET_S. SIGINT first: pytest then ends its session cleanly and
# pytest-benchmark still writes the rows that finished. A step cut short is named in the report.
left() { echo $(( BUDGET_S - $(elapsed) - 20 )); }
run_step() {  # run_step LABEL SECONDS_CAP CMD...: run CMD under timeout min(cap, time left)
  local label=$1 cap=$2; shift 2
  local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 30 ]; then echo "   $label: skipped, no time left"; echo "- $label: skipped, no time left" >>"$notes"; return 0; fi
  timeout -s INT -k 30 "$t" "$@"; local rc=$?
  [ $rc = 124 ] && { echo "   $label: cut off after ${t}s"; echo "- $label: cut off after ${t}s" >>"$notes"; }
  return 0
}
bench() {  # bench NAME CAP PYTEST-ARGS...: one pytest-benchmark run with its own JSON
  local name=$1 cap=$2; shift 2
  step "benchmarks: $name"
  run_step "benchmarks: $name" "$cap" env NFNET_BENCH_QUICK=$QUICK $PY -m pytest -q -p no:cacheprovider \
    --benchmark-json="$work/bench-$name.json" --benchmark-columns=median,iqr,rounds "$@"
  [ -s "$work/bench-$name.json" ] && jsons+=("$work/bench-$name.json")
  return 0
}

step "GPU tests (pytest -m gpu)"
run_step "GPU tests" 180 bash -c "$PY -m pytest tests -m gpu -q -ra -p no:cacheprovider 2>&1 | tee '$work/tests.log' | tail -25"
{ grep -E "passed|failed|skipped|error" "$work/tests.log" | tail -1; grep -E "^(FAILED|ERROR)" "$work/tests.log"; } \
  >>"$work/tests.summary" 2>/dev/null

# eager contenders first (seconds), then the compiled ones (minutes of compiling): a cut-off
# compile step loses only its own unfinished rows
bench inference-eager 90 bench/test_bench_model.py -k "test_inference and not compile"
bench ops 60 bench/test_bench_ops.py
bench train-eager 60 bench/test_bench_model.py -k "test_train_step and not compile"
bench inference-compiled 180 bench/test_bench_model.py -k "test_inference and compile"
bench train-compiled 120 bench/test_bench_model.py -k "test_train_step and compile"

# The static tables need no GPU (they are committed); they are refreshed here with this machine's
# triton and nvcc when time is left.
step "static kernel tables"
for t in bench/triton_resources.py bench/cuda_resources.py; do
  [ -f "$t" ] && run_step "$t" 90 bash -c "$PY $t >'$work/$(basename "$t").log' 2>&1 || tail -5 '$work/$(basename "$t").log'"
done

if [ "$QUICK" = 0 ]; then
  export NFNET_BENCH_MAX_AUTOTUNE=1
  bench max-autotune 400 bench/test_bench_model.py -k "max-autotune and test_inference"
fi

report
