#!/usr/bin/env bash
# One command for a GPU machine with no network, sized for one device call (a GPU session has 15
# device-minutes, machine start included; one command at most 10): the eager contenders, per-op
# GB/s, the training step and the kernel-time profiles first, on a quiet GPU; then the project's GPU
# tests in the background while torch.compile fills its caches; then the compiled contenders. Writes
# bench/results/<date>-<gpu>.md and .json, whose first line says how long each step took.
#
#   bash bench/gpu_report.sh [--quick] [--dry-run] [--out DIR] [--max-autotune | --train-compiled | --train] [--sanitize]
#
#   --quick           fewer timed rounds
#   --dry-run         on a machine without a GPU: every step on the CPU at small sizes (CI runs this)
#   --out DIR         where the report goes (default bench/results)
#   --max-autotune    ONLY timm under torch.compile(mode="max-autotune"): 408 s of compiling on an H200,
#                     so a call of its own (BUDGET_S defaults to 560 then)
#   --train-compiled  ONLY the training step of torch.compile(timm), forward and backward compiled: over
#                     100 s of compiling on an H200 beside the GPU tests, more than the 5-minute run has
#                     room for, so a call of its own (BUDGET_S defaults to 400 then), with timm eager's
#                     training step as its baseline in the same run
#   --train           ONLY the training issue's checks (BUDGET_S defaults to 560 then): the GPU tests in
#                     the background beside bench/peak_memory.py --dtype bf16 (a memory figure, which
#                     they do not disturb), then the training-step rows on a quiet GPU, with the time
#                     left reserved for them, then, as time allows, the step's kernel-time profile and
#                     its host time (bench/host_overhead.py)
#   --sanitize        ALSO compute-sanitizer memcheck, then racecheck, over the CUDA ops' GPU tests (slow)
# PYTHON selects the interpreter (default python3). BUDGET_S (default 300) bounds the whole run:
# every step gets at most the time left, and the script always ends with a report of what finished.
# A prebuilt extension (nfnet_fast/_C.so, or the file named by NFNET_FAST_PREBUILT, built for this
# machine's torch) is used as it is; otherwise the extension is built here first.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
QUICK=0 DRY=0 OUT=bench/results AUTOTUNE=0 TRAIN_COMPILED=0 TRAIN=0 SANITIZE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --dry-run) DRY=1 ;;
    --out) OUT=$2; shift ;;
    --max-autotune) AUTOTUNE=1 ;;
    --train-compiled) TRAIN_COMPILED=1 ;;
    --train) TRAIN=1 ;;
    --sanitize) SANITIZE=1 ;;
    *) echo "usage: $0 [--quick] [--dry-run] [--out DIR] [--max-autotune | --train-compiled | --train] [--sanitize]" >&2; exit 2 ;;
  esac
  shift
done
if [ $((AUTOTUNE + TRAIN_COMPILED + TRAIN)) -gt 1 ]; then
  echo "--max-autotune, --train-compiled and --train are runs of their own: pick one" >&2; exit 2
fi
BUDGET_S=${BUDGET_S:-$( ([ "$AUTOTUNE" = 1 ] && echo 560) || ([ "$TRAIN_COMPILED" = 1 ] && echo 400) \
  || ([ "$TRAIN" = 1 ] && echo 560) || echo 300)}
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
step() { echo "== [$(elapsed)s] $*"; }
work=${KEEP_WORK:-$(mktemp -d)}; mkdir -p "$work"  # KEEP_WORK=DIR keeps the logs and raw JSON there
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
[ "$AUTOTUNE" = 1 ] && slug="$slug-max-autotune"
[ "$TRAIN_COMPILED" = 1 ] && slug="$slug-train-compiled"
[ "$TRAIN" = 1 ] && slug="$slug-train"
name="$OUT/$(date -u +%Y-%m-%d-%H%M)-$slug"

# REPORT_COMMIT names the commit where the tree has no git (a copy of a checkout)
commit=${REPORT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
[ -z "${REPORT_COMMIT:-}" ] && [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && commit="$commit (with uncommitted changes)"
notes="$work/notes"; : >"$notes"
timeline=()  # "step Ns" for the report's first line
jsons=()
: >"$work/tests.summary"
report() {  # the report of whatever finished; its exit status is the script's
  step "report"
  [ -s "$notes" ] && { echo "## notes"; cat "$notes"; } >>"$work/tests.summary"
  local times; times="steps: $(IFS=,; echo "${timeline[*]:-none}" | sed 's/,/, /g'); total $(elapsed)s"
  echo "$times"
  if $PY bench/report.py "${jsons[@]}" --tests "$work/tests.summary" --out "$name" --commit "$commit" \
      --steps "$times" --kernels "$work/prof/kernel_kinds.md" "$work/prof/kernel_kinds_train.md" \
      --tables bench/triton_resources.md bench/cuda_resources.md \
      --title "nfnet_fast benchmark report: $slug$([ "$QUICK" = 1 ] && echo ' (quick)')"; then
    echo "report written to $name.md and $name.json ($(elapsed)s)"
  else
    echo "bench/report.py failed: no report written" >&2; return 1
  fi
}

# Each step runs under `timeout` with what is left of the budget. SIGINT first: pytest then ends
# its session cleanly and pytest-benchmark still writes the rows that finished. A step cut short,
# skipped, or selecting no test is named in the report.
left() { echo $(( BUDGET_S - $(elapsed) - 15 )); }
run_step() {  # run_step LABEL SECONDS_CAP CMD...: run CMD under timeout min(cap, time left)
  local label=$1 cap=$2; shift 2
  local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then echo "   $label: skipped, no time left"; echo "- $label: skipped, no time left" >>"$notes"; return 0; fi
  local t0; t0=$(elapsed)
  timeout -s INT -k 20 "$t" "$@"; local rc=$?
  timeline+=("$label $(( $(elapsed) - t0 ))s")
  case $rc in
    124) echo "   $label: cut off after ${t}s"; echo "- $label: cut off after ${t}s" >>"$notes" ;;
    5) echo "   $label: SELECTED NO TEST"; echo "- $label: selected no test" >>"$notes" ;;
  esac
  return 0
}
bench() {  # bench NAME CAP PYTEST-ARGS...: one pytest-benchmark run with its own JSON
  local label=$1 cap=$2; shift 2
  step "benchmarks: $label"
  run_step "$label" "$cap" env NFNET_BENCH_QUICK=$QUICK $PY -m pytest -q -p no:cacheprovider \
    --benchmark-json="$work/bench-$label.json" --benchmark-columns=median,iqr,rounds "$@"
  [ -s "$work/bench-$label.json" ] && jsons+=("$work/bench-$label.json")
  return 0
}

# 1. the package: installed editable, the extension prebuilt where one loads, else built here.
step "install"
t0=$(elapsed)
[ -n "${NFNET_FAST_PREBUILT:-}" ] && cp "$NFNET_FAST_PREBUILT" nfnet_fast/_C.so
ext_ok() {  # the checkout's extension imports here (and, on a GPU, has its CUDA kernels)
  $PY - "$DRY" <<'EOF' 2>/dev/null
import os, sys
import nfnet_fast
info = nfnet_fast.backends()["cuda"]
here = os.path.dirname(os.path.abspath(nfnet_fast.__file__)) == os.path.abspath("nfnet_fast")
import nfnet_fast.kernels  # noqa: F401  (only an install maps kernels/ to nfnet_fast.kernels)
ok = here and info.available and (sys.argv[1] == "1" or "cuda" in info.devices)
if ok:
    for b in nfnet_fast.backends().values():
        print(f"   {b.name}: {b.devices or b.reason}")
sys.exit(0 if ok else 1)
EOF
}
if ext_ok; then
  echo "   nfnet_fast is installed from this checkout with its extension: nothing to build"
else
  skip=0
  # a prebuilt _C.so is used if it loads here, was built from this checkout's csrc/ (nfnet_fast/_sources.py) and,
  # on a GPU, has its CUDA kernels; else it is built again here (nfnet_fast would refuse a stale one, and the
  # report would lose the cuda rows). (Only the check's verdict is read: a warning on stderr goes to its log.)
  if [ -f nfnet_fast/_C.so ]; then
    why=$($PY - "$DRY" <<'EOF' 2>"$work/prebuilt.log"
import importlib.util as u
import sys
import torch  # (the extension links torch's libraries)
def load(name, path):
    spec = u.spec_from_file_location(name, path)
    module = u.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
why = load("nfnet_fast_sources", "nfnet_fast/_sources.py").mismatch(load("nfnet_fast._C", "nfnet_fast/_C.so"))
if not why and sys.argv[1] != "1" and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "nfnet_fast::scaled_std_weight", "CUDA"):
    why = "it was built without its CUDA kernels"
print(why, end="")
EOF
    )
    if [ $? = 0 ] && [ -z "$why" ]; then
      skip=1; echo "   prebuilt nfnet_fast/_C.so loads and is this checkout's: installing without building it"
    else
      echo "   prebuilt nfnet_fast/_C.so not used, building it here: ${why:-$(tail -1 "$work/prebuilt.log")}"
    fi
  fi
  if ! NFNET_FAST_SKIP_EXT=$skip NFNET_FAST_REQUIRE_CUDA=$([ $skip = 1 ] && echo 0 || echo "${NFNET_FAST_REQUIRE_CUDA:-0}") \
      $PY -m pip install -q --no-build-isolation --no-deps -e . >"$work/install.log" 2>&1 || ! ext_ok; then
    tail -30 "$work/install.log"
    { echo "- install failed:"; tail -15 "$work/install.log" | sed 's/^/    /'; } >>"$notes"
    timeline+=("install $(( $(elapsed) - t0 ))s"); report; exit 1
  fi
fi
timeline+=("install $(( $(elapsed) - t0 ))s")
compiled=$($PY -c 'import sys; sys.path.insert(0, "bench"); import conftest; print(int(conftest.COMPILE))' 2>/dev/null || echo 0)

# the project's GPU tests, run in the background by the default and --train runs
xdist=$($PY -c 'import xdist' 2>/dev/null && [ "$DRY" = 0 ] && echo "-n ${GPU_TEST_WORKERS:-6}")
gpu_tests() {
  $PY -m pytest tests -m gpu -q -ra -p no:cacheprovider $xdist >"$work/tests.log" 2>&1
  echo $? >"$work/tests.rc"
}
wait_gpu_tests() {  # wait_gpu_tests RESERVE_S: wait for $tests_pid (started at $t0) until RESERVE_S of the budget is left
  local t waited=0; t=$(( $(left) - $1 ))
  while kill -0 "$tests_pid" 2>/dev/null && [ $waited -lt $(( t > 0 ? t : 0 )) ]; do sleep 1; waited=$((waited + 1)); done
  if kill -0 "$tests_pid" 2>/dev/null; then  # SIGINT: pytest still prints its summary of what ran
    pkill -INT -P "$tests_pid"; sleep 5; kill "$tests_pid" 2>/dev/null
    echo "- GPU tests: cut off at the budget" >>"$notes"
  fi
  wait "$tests_pid" 2>/dev/null
  timeline+=("gpu-tests $(( $(elapsed) - t0 ))s")
  tail -25 "$work/tests.log"
  { grep -E "(passed|failed|skipped|error|deselected).* in [0-9.]+s" "$work/tests.log" | tail -1
    grep -E "^(FAILED|ERROR)" "$work/tests.log"; } >>"$work/tests.summary" 2>/dev/null
}

train_time_split() {  # where a training step's time goes: its kernels by phase, then its host time
  step "kernel-time profile of a training step (eager): what each phase costs against the step's wall time"
  run_step "profiles-train" 90 $PY bench/profile_kernels.py --out "$work/prof" --train
  step "host time: each op's call, and a whole training step at 1/8 width by phase (tiny kernels: the host's pace)"
  # (the tile heuristic, not tuning: the 1/8-width shapes are new, and tuning would time each tile once more)
  # (--profile: which functions take the step's host time here, the C launchers and cuDNN's calls included)
  run_step "host-overhead" 150 \
    bash -c "NFNET_FAST_AUTOTUNE=0 $PY bench/host_overhead.py --profile >'$work/host_overhead.txt' 2>&1"
  [ -s "$work/host_overhead.txt" ] && { tail -90 "$work/host_overhead.txt"
    { echo "- bench/host_overhead.py --profile (host time on this machine):"; echo; echo '```'
      tail -90 "$work/host_overhead.txt"; echo '```'; echo; } >>"$notes"; }
  return 0
}

if [ "$TRAIN" = 1 ]; then  # the training issue's checks in one call
  step "GPU tests (background) + peak memory of a training step (bf16)"
  t0=$(elapsed)
  gpu_tests & tests_pid=$!
  # (a dry run: timm's smallest NF model, small sizes, the Triton kernels through the interpreter)
  peak_args=$([ "$DRY" = 1 ] && echo "--model test_nfnet --batches 1 2 --size 32 --target-batch 4 --target-size 32")
  interp=$([ "$DRY" = 1 ] && echo "TRITON_INTERPRET=1")
  run_step "peak-memory" 150 bash -c "$interp $PY bench/peak_memory.py --dtype bf16 $peak_args >'$work/peak.txt' 2>&1"
  [ -s "$work/peak.txt" ] && { tail -15 "$work/peak.txt"
    { echo "- bench/peak_memory.py --dtype bf16:"; echo; echo '```'; tail -15 "$work/peak.txt"; echo '```'; echo; } >>"$notes"; }
  wait_gpu_tests "${TRAIN_RESERVE_S:-200}"  # the rest of the budget is the training rows'
  bench train-eager 240 bench/test_bench_model.py -k "test_train_step and not compile"
  train_time_split  # (as time allows; the tuning cache is warm now)
  report; exit $?
fi
if [ "$AUTOTUNE" = 1 ]; then  # a run of its own: nothing else fits beside 400 s of autotuning
  export NFNET_BENCH_MAX_AUTOTUNE=1
  bench max-autotune 540 bench/test_bench_model.py -k "max-autotune and test_inference"
  report; exit $?
fi
if [ "$TRAIN_COMPILED" = 1 ]; then  # likewise: timm eager's step as the baseline, then the compiled one
  if [ "$compiled" != 1 ]; then
    echo "- train-compiled: the compiled contenders are off here (NFNET_BENCH_COMPILE=0, the default without CUDA)" >>"$notes"
  else
    bench train-timm-eager 60 bench/test_bench_model.py -k "test_train_step and timm and eager"
    bench train-compiled 330 bench/test_bench_model.py -k "test_train_step and compile"
  fi
  report; exit $?
fi

# 2. on a quiet GPU: the eager contenders, per-op GB/s, the training step, kernel-time profiles.
# (its first nfnet_fast call JIT-compiles the conv tiles and autotunes every conv shape: ~30 s more;
# the silu-prologue contenders compile and tune their 1x1 launches again with the prologue: cap +30 s)
bench inference-eager 150 bench/test_bench_model.py -k "test_inference and not compile"
# (the ops' compiled-reference rows wait for the compile warm-up where compiled contenders are on)
bench ops 60 bench/test_bench_ops.py $([ "$compiled" = 1 ] && echo '-k not compiled')
# (its first fused-conv training step compiles the backward's BWD tiles and tunes each conv's
# recompute: tens of seconds more than before the fused backward)
# (the cudagraph rows, last, each capture a forward and a backward after 3 warm-up steps: +60 s)
bench train-eager 160 bench/test_bench_model.py -k "test_train_step and not compile"
bench agc 30 bench/test_bench_agc.py
bench conv 60 bench/test_bench_conv.py -k "not compile and not backward"
step "kernel-time profiles (eager)"
run_step "profiles-eager" 60 $PY bench/profile_kernels.py --out "$work/prof" --no-compile
train_time_split

# 3. the GPU tests in the background while torch.compile fills its caches with the compiled
#    inference contenders' graphs (one untimed round each). On an H200 the tests took 57-61 s with
#    6 workers; compiling timm and nfnet_fast for inference about as long beside them, while the
#    compiled training step alone ran past 100 s there (hence --train-compiled).
step "GPU tests (background) + compile warm-up"
t0=$(elapsed)
gpu_tests & tests_pid=$!
if [ "$compiled" = 1 ]; then
  run_step "compile-warmup" 120 env NFNET_BENCH_ROUNDS=1 $PY -m pytest -q -p no:cacheprovider \
    bench/test_bench_model.py bench/test_bench_ops.py bench/test_bench_conv.py -k "compile and not test_train_step" \
    >"$work/warmup.log" 2>&1
  tail -3 "$work/warmup.log"
else
  echo "   compile warm-up: skipped, the compiled contenders are off here (NFNET_BENCH_COMPILE=0; default on a CPU)"
  echo "- compiled contenders: off (NFNET_BENCH_COMPILE=0, the default without CUDA)" >>"$notes"
fi
wait_gpu_tests 0

# 4. the compiled contenders, timed from warm caches, and the compiled profile.
if [ "$compiled" = 1 ]; then
  bench inference-compiled 120 bench/test_bench_model.py -k "test_inference and compile"
  bench ops-compiled 40 bench/test_bench_ops.py -k "compiled"
  bench conv-compiled 40 bench/test_bench_conv.py -k "compile"
  step "kernel-time profile (timm compiled)"
  run_step "profiles-compiled" 60 $PY bench/profile_kernels.py --out "$work/prof" --only-compiled
else
  echo "   compiled contenders: skipped (off here, see above)"
fi

# the convs' backward, fused against cuDNN + aten (after the anchors: what is left of the budget)
bench conv-backward 60 bench/test_bench_conv.py -k "backward"

# 5. opt-in: compute-sanitizer over the CUDA ops' GPU tests (the whole-model tests would take minutes).
if [ "$SANITIZE" = 1 ]; then
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool"
    if ! command -v compute-sanitizer >/dev/null; then echo "- compute-sanitizer: not on PATH" >>"$notes"; break; fi
    run_step "sanitizer-$tool" 240 bash -c "compute-sanitizer --tool $tool --error-exitcode 3 $PY -m pytest \
      tests/test_cuda_ext.py -m gpu -k 'not model' -q -p no:cacheprovider -x >'$work/san-$tool.log' 2>&1; \
      echo \"- compute-sanitizer $tool: exit \$? (\$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' '$work/san-$tool.log' | tail -1); \
      \$(grep -E ' in [0-9.]+s' '$work/san-$tool.log' | tail -1))\" >>'$notes'"
  done
fi

report
