# Two commands for a fresh machine (see README):
#   make bench   set up .venv, build nfnet_fast, run the parity-and-throughput report on this machine
#   make test    set up .venv, build nfnet_fast, run the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.nfnet_fast-installed
# torch 2.14.1 is the CUDA 13.0 build (found on local disk on the project's machines); triton comes with it.
DEPS   := "torch==2.14.1" "timm>=1.0" tqdm pytest pytest-benchmark ninja "setuptools>=64" wheel

.PHONY: setup test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile $(wildcard csrc/*)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(DEPS)
	$(BIN)/python -m pip install -q --no-build-isolation --no-deps -e .
	@touch $@

test: setup
	$(BIN)/python -m pytest tests -q -ra $(PYTEST_ARGS)

bench: setup
	$(BIN)/nfnet-fast bench $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info nfnet_fast/_C*.so
