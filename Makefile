# Two commands for a fresh machine (see README); times measured on a fresh clone, 2 CPU cores:
#   make bench   set up .venv, build nfnet_fast, run the parity-and-throughput report on this machine (~8 min)
#   make test    set up .venv, build nfnet_fast, run the tests (~26 min: ~19-21 of them the tests, in 2 pytest-xdist
#                workers; TEST_WORKERS=1 runs them in one process: ~38 min of tests before the interpreter's
#                speed-ups of docs/design.md section 6, not timed since)
# Of either, about 4 minutes is compiling the nfnet_fast._C extension (mostly nvcc, when it is found).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.nfnet_fast-installed
# torch 2.14.1 is the CUDA 13.0 build (found on local disk on the project's machines); triton comes with it.
# onnx, onnxscript, onnxruntime: the export tests (both ONNX exporters, run in onnxruntime).
# pytest-xdist: the tests in TEST_WORKERS processes (interpreted Triton kernels are single-threaded Python).
DEPS   := "torch==2.14.1" "timm>=1.0" tqdm pytest pytest-benchmark pytest-xdist ninja "setuptools>=64" wheel \
          onnx onnxscript onnxruntime
# one worker a core, at most 4, and one per 6 GiB of memory: each holds its own torch and models (5.2 and
# 4.2 GB resident 23 minutes into the suite's 29, the two workers of a 2-core CI run)
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); m=$$(awk '/MemTotal/ {print int($$2 / 6291456)}' \
                  /proc/meminfo 2>/dev/null || echo 1); [ $$n -gt 4 ] && n=4; [ $$n -gt $$m ] && n=$$m; \
                  [ $$n -lt 1 ] && n=1; echo $$n)

.PHONY: setup test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@echo "==> installing torch, timm and the test tools into $(VENV) (quiet)"
	$(BIN)/python -m pip install -q $(DEPS)
	@echo "==> building nfnet_fast and its extension nfnet_fast._C: C++ CPU kernels, plus the CUDA kernels"
	@echo "    when nvcc is found (about 4 minutes on 2 cores, mostly nvcc); the compiler's lines follow"
	$(BIN)/python -m pip install -v --no-build-isolation --no-deps -e .
	@echo "==> nfnet_fast installed in $(VENV)"
	@touch $@

test: setup
	$(BIN)/python -m pytest tests -q -ra -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

bench: setup
	$(BIN)/nfnet-fast bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info nfnet_fast/_C*.so
