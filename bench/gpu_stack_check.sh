#!/usr/bin/env bash
# The GPU machine's software on this (GPU-less) machine. The device tool's machine notes list torch
# 2.11, triton 3.6, timm 1.0.29 and Python 3.12 there; .venv has torch 2.14.1 and triton 3.8. The H100
# session of 2026-11-27 lost its first call to two differences that a CPU catches (every fused conv
# failed to compile on Triton 3.6; torch 2.11's dynamo could not trace the model), so CI runs this:
#   1. every Triton kernel of nfnet_fast.kernels compiled ahead of time by Triton 3.6 for sm_90, the
#      GPU machines' (bench/triton_resources.py --allow-spills: fails on a compile error or shared memory over
#      the limit; registers are judged by the table of the Triton in .venv);
#   2. the tests that trace, export or compile the model with torch 2.11 (dynamo, export, FX,
#      torch.func; ONNX needs onnxruntime, left out), on the reference backend: Triton 3.6's
#      interpreter fails on the fused convs here ("only 0-dimensional arrays can be converted to
#      Python scalars"), so the triton backend stays out;
#   3. the launch cache's tests (kernels.launch): its memo picks Triton 3.6's own binary and passes the
#      launcher Triton 3.6's own arguments.
# The environment is .venv-gpu-stack (~1 minute to install, 4.6 GB), reinstalled when the pins change.
#
#   bash bench/gpu_stack_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
V=${GPU_STACK_VENV:-.venv-gpu-stack}
PINS='torch==2.11.0 triton==3.6.0 timm==1.0.29 torchvision==0.26.0'
PY=python3  # the GPU machine's Python 3.12 where it runs here; another 3.x takes the same wheels
python3.12 -c '' 2>/dev/null && PY=python3.12
if [ "$(cat "$V/.installed" 2>/dev/null)" != "$PINS" ]; then
  echo "==> installing the GPU machine's $PINS into $V (quiet)"
  test -x "$V/bin/python" || "$PY" -m venv "$V"
  # shellcheck disable=SC2086  # (the pins are words)
  "$V/bin/python" -m pip install -q $PINS numpy tqdm pytest "setuptools>=64" wheel
  echo "$PINS" >"$V/.installed"
fi
# nfnet_fast from this checkout (every run: the venv may have served another checkout), without its C++
# extension, which the reference backend does not need (CI's NFNET_FAST_REQUIRE_CUDA would refuse that)
NFNET_FAST_REQUIRE_CUDA=0 NFNET_FAST_SKIP_EXT=1 "$V/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
"$V/bin/python" - <<'PY'
import os, sys, torch, triton, timm
import nfnet_fast, nfnet_fast.kernels
for m in (nfnet_fast, nfnet_fast.kernels):  # (an editable install maps kernels/ apart from nfnet_fast/)
    if not os.path.abspath(m.__file__).startswith(os.getcwd() + os.sep):
        sys.exit(f"{m.__name__} comes from {m.__file__}, not from this checkout ({os.getcwd()})")
print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"timm {timm.__version__}")
PY
out=$(mktemp -d)
# (sm_90 only: the GPU machines are H100s and H200s; .venv's Triton compiles sm_80 too, in .ci/run)
"$V/bin/python" bench/triton_resources.py --allow-spills --arch 90 --out "$out/triton_resources.md"
"$V/bin/python" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_ecosystem.py \
  -k "reference and (compile or export or fx or func) and not onnx"
"$V/bin/python" -m pytest -q -p no:cacheprovider tests/test_triton.py -k launch_cache
