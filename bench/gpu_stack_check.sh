#!/usr/bin/env bash
# The GPU machine's software on this (GPU-less) machine: the device tool's KINDS.md lists torch 2.11,
# triton 3.6, timm 1.0.29 and Python 3.12 there, while .venv has torch 2.14.1 and triton 3.8. The H100
# session of 2026-11-27 lost its first call to two differences that a CPU catches (every fused conv
# failed to compile on Triton 3.6; torch 2.11's dynamo could not trace the model), so CI runs this:
#   1. every Triton kernel of nfnet_fast.kernels compiled ahead of time by Triton 3.6 for sm_90 and
#      sm_80 (bench/triton_resources.py; fails on a compile error, not on a spill: the table of the
#      Triton in .venv is the one that judges registers);
#   2. the tests that trace, export or compile the model with torch 2.11 (dynamo, export, FX, torch.func;
#      ONNX needs onnxruntime, left out), on the reference backend: Triton 3.6's interpreter fails on
#      the fused convs here ("only 0-dimensional arrays can be converted to Python scalars"), so the
#      triton backend stays out.
# The environment is .venv-gpu-stack (~1 minute to install, 4.6 GB), kept between runs.
#
#   bash bench/gpu_stack_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
V=${GPU_STACK_VENV:-.venv-gpu-stack}
PY=python3  # the GPU machine's Python 3.12 where it runs here; another 3.x takes the same wheels
python3.12 -c '' 2>/dev/null && PY=python3.12
if [ ! -f "$V/.installed" ]; then
  echo "==> installing the GPU machine's torch 2.11 / triton 3.6 / timm 1.0.29 into $V (quiet)"
  test -x "$V/bin/python" || "$PY" -m venv "$V"
  "$V/bin/python" -m pip install -q "torch==2.11.0" "triton==3.6.0" "timm==1.0.29" "torchvision==0.26.0" numpy \
    tqdm pytest "setuptools>=64" wheel
  # nfnet_fast from this checkout, without its C++ extension (the reference backend needs none)
  NFNET_FAST_SKIP_EXT=1 "$V/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
  touch "$V/.installed"
fi
"$V/bin/python" -c 'import sys, torch, triton, timm
print(f"Python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, timm {timm.__version__}")'
out=$(mktemp -d)
"$V/bin/python" bench/triton_resources.py --errors-only --out "$out/triton_resources.md"
"$V/bin/python" -m pytest -q -p no:cacheprovider tests/test_model.py tests/test_ecosystem.py \
  -k "reference and (compile or export or fx or func) and not onnx"
