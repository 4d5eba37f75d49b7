"""Benchmark setup shared by the suites: device, sizes, one input and one timm reference per case.

On CUDA the sizes are the docs/design.md protocol's (inference 288 px at batch 256 and 1, training 224 px at
batch 128); on a CPU the same suites run at small sizes so CI exercises them (nothing asserts a time).
NFNET_BENCH_QUICK=1 shrinks the CUDA rounds; NFNET_BENCH_ROUNDS=N sets them (1: a warm-up run that
fills torch.compile's caches for a later timed run); NFNET_BENCH_COMPILE=0 drops the torch.compile contenders
(default on with CUDA, off on a CPU where compiling takes minutes); NFNET_BENCH_MAX_AUTOTUNE=1 adds timm
under max-autotune.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CUDA = DEVICE.type == "cuda"
QUICK = os.environ.get("NFNET_BENCH_QUICK", "0") == "1"
COMPILE = os.environ.get("NFNET_BENCH_COMPILE", "1" if CUDA else "0") == "1"
MAX_AUTOTUNE = os.environ.get("NFNET_BENCH_MAX_AUTOTUNE", "0") == "1"
MODEL = os.environ.get("NFNET_BENCH_MODEL", "eca_nfnet_l0")

INFER_CASES = [(256, 288), (1, 288)] if CUDA else [(2, 64), (1, 64)]
TRAIN_CASES = [(128, 224)] if CUDA else [(2, 64)]
ROUNDS = int(os.environ.get("NFNET_BENCH_ROUNDS", (5 if QUICK else 20) if CUDA else 2))


def pytest_report_header(config):
    name = torch.cuda.get_device_name() if CUDA else "CPU"
    return f"nfnet_fast bench: {MODEL} on {name}, compile={'on' if COMPILE else 'off'}, quick={QUICK}"


_cache = {}


def cached(key, make):
    """Session-wide memo: every contender of a case shares one input and one reference model."""
    if key not in _cache:
        _cache[key] = make()
    return _cache[key]


@pytest.fixture
def run_timed(benchmark):
    """Time `step()` with pytest-benchmark (synchronised), returning the median seconds. On CUDA the
    peak memory statistic starts afresh after the untimed warm-up steps, so max_memory_allocated()
    after the run is the timed steps' peak; the warm-up's (the first call's kernel tuning and the
    optimizer's state included) goes to extra_info["warmup_peak_mb"]. (Counted together, the H100
    report of 2026-11-27 03:08 gave nfnet_fast triton's training step 9448 MiB where
    bench/peak_memory.py's second step peaked at 3726: the tuning is the likely cause, unmeasured.)
    ``reset_peak=False`` keeps the statistic the caller started (a CUDA graph's memory is allocated
    when it is captured, and its replays allocate nothing)."""
    from nfnet_fast.benchmark import synchronize

    def run(step, rounds=ROUNDS, warmup=2, reset_peak=True):
        def call():
            step()
            synchronize(DEVICE)
        warmup = min(warmup, rounds - 1)
        for _ in range(warmup):
            call()
        if CUDA and warmup and reset_peak:
            benchmark.extra_info["warmup_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        benchmark.pedantic(call, rounds=rounds, warmup_rounds=0, iterations=1)
        return benchmark.stats.stats.median
    return run


@pytest.hookimpl(hookwrapper=True)
def pytest_benchmark_generate_json(config, benchmarks):
    """Keep the rows that finished when a run is cut short (the report sends SIGINT at its budget):
    a benchmark interrupted before its first round has no data, and pytest-benchmark would fail on
    it and write no JSON at all."""
    benchmarks[:] = [b for b in benchmarks if b.stats and len(b.stats.data)]
    yield
