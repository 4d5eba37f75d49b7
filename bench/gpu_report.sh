#!/usr/bin/env bash
# One command for a GPU machine with no network: install nfnet_fast, run the GPU tests, the full
# benchmark and the static kernel tables, and write bench/results/<date>-<gpu>.md and .json.
#
#   bash bench/gpu_report.sh [--quick] [--dry-run] [--out DIR]
#
#   --quick    fewer timed rounds, no max-autotune contender (about 4 minutes on an H100)
#   --dry-run  on a machine without a GPU: exercise every step on the CPU at small sizes
#   --out DIR  where the report goes (default bench/results)
# PYTHON selects the interpreter (default python3). The full run keeps within 9 minutes on an
# H100: the max-autotune contender runs last, limited to the time left.
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

step "install (pip install --no-build-isolation --no-deps -e .)"
$PY -m pip install -q --no-build-isolation --no-deps -e . >"$work/install.log" 2>&1 || { tail -30 "$work/install.log"; exit 1; }
$PY -c 'import nfnet_fast; [print(f"   {b.name}: {b.devices or b.reason}") for b in nfnet_fast.backends().values()]'

step "GPU tests (pytest -m gpu)"
$PY -m pytest tests -m gpu -q -ra -p no:cacheprovider 2>&1 | tee "$work/tests.log" | tail -25
grep -E "passed|failed|skipped|error" "$work/tests.log" | tail -1 >"$work/tests.summary"
grep -E "^(FAILED|ERROR)" "$work/tests.log" >>"$work/tests.summary"

step "static kernel tables"
for t in bench/triton_resources.py bench/cuda_resources.py; do
  [ -f "$t" ] && { $PY "$t" >"$work/$(basename "$t").log" 2>&1 || tail -5 "$work/$(basename "$t").log"; }
done

step "benchmarks (pytest-benchmark)"
NFNET_BENCH_QUICK=$QUICK $PY -m pytest bench -q -p no:cacheprovider --benchmark-json="$work/bench.json" \
  --benchmark-columns=median,iqr,rounds 2>&1 | tail -15
jsons=("$work/bench.json")

if [ "$QUICK" = 0 ]; then
  left=$(( BUDGET_S - $(elapsed) - 30 ))
  if [ "$left" -gt 60 ]; then
    step "timm under torch.compile max-autotune (at most ${left}s)"
    NFNET_BENCH_MAX_AUTOTUNE=1 timeout "$left" $PY -m pytest bench/test_bench_model.py -q -p no:cacheprovider \
      -k "max-autotune and test_inference" --benchmark-json="$work/bench_autotune.json" 2>&1 | tail -5 \
      || echo "   max-autotune did not finish in ${left}s: left out of the report"
    [ -s "$work/bench_autotune.json" ] && jsons+=("$work/bench_autotune.json")
  else
    echo "   no time left for max-autotune: left out of the report"
  fi
fi

step "report"
$PY bench/report.py "${jsons[@]}" --tests "$work/tests.summary" --out "$name" \
  --tables bench/triton_resources.md bench/cuda_resources.md \
  --title "nfnet_fast benchmark report: $slug$([ "$QUICK" = 1 ] && echo ' (quick)')"
echo "report written to $name.md and $name.json ($(elapsed)s)"
