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
# The environment is .venv-gpu-stack, reinstalled when the pins change: 2.1 GB and about a minute.
# It shares .venv's CUDA runtime libraries (site-packages/nvidia, 3.2 GB, which torch only loads here)
# through a symlink instead of installing torch 2.11's own: a CI machine once ran out of disk installing
# them a second time. Same major versions (cu13, cuDNN 9, NCCL 2); torch 2.11 imports against them, and
# `pip check` below fails on any other requirement left out. Needs .venv (make setup) first.
#
#   bash bench/gpu_stack_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
V=${GPU_STACK_VENV:-.venv-gpu-stack}
BASE=${VENV:-.venv}
PINS='torch==2.11.0 triton==3.6.0 timm==1.0.29 torchvision==0.26.0'
# what those four need besides the CUDA libraries (torch: the first six; timm: the next three;
# torchvision: numpy, pillow), and what this script runs
REQS='filelock typing-extensions>=4.10.0 sympy>=1.13.3 networkx>=2.5.1 jinja2 fsspec>=0.8.5
      pyyaml huggingface_hub safetensors numpy pillow tqdm pytest setuptools>=64 wheel'
purelib() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
test -x "$BASE/bin/python" || { echo "gpu_stack_check: no $BASE/bin/python: run make setup first" >&2; exit 1; }
nvidia_libs="$(purelib "$BASE")/nvidia"
test -d "$nvidia_libs" || { echo "gpu_stack_check: $nvidia_libs missing: $BASE's torch is not a CUDA build" >&2; exit 1; }
marker="$PINS; CUDA libraries of $nvidia_libs"
# (and when the link no longer leads to a folder: no venv gives "/nvidia", which is none)
if [ "$(cat "$V/.installed" 2>/dev/null)" != "$marker" ] || ! test -d "$(purelib "$V" 2>/dev/null)/nvidia"; then
  echo "==> installing the GPU machine's $PINS into $V (quiet), with $BASE's CUDA libraries"
  rm -rf "$V"
  # .venv's Python (the GPU machine has 3.12; the same wheels exist for 3.11), so the shared libraries'
  # Python modules match too
  "$BASE/bin/python" -m venv "$V"
  ln -s "$(cd "$nvidia_libs" && pwd)" "$(purelib "$V")/nvidia"
  export PIP_NO_CACHE_DIR=1  # (its cache would hold a second copy of these GBs of wheels)
  # (the requirements first: pip's conflict report after an install would name the CUDA packages)
  # shellcheck disable=SC2086  # (the pins and requirements are words)
  "$V/bin/python" -m pip install -q $REQS
  # shellcheck disable=SC2086
  "$V/bin/python" -m pip install -q --no-deps $PINS
  # everything the four require is there, but the CUDA packages the symlink stands for
  if "$V/bin/python" -m pip check | grep -vE '^(torch|torchvision) [^ ]+ requires (nvidia-|cuda-)' | grep .; then
    echo "gpu_stack_check: $V lacks the requirements above (add them to REQS)" >&2; exit 1
  fi
  echo "$marker" >"$V/.installed"
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
