"""Per-op throughput on every backend, against the reference and torch.compile of the reference.

Shapes are eca_nfnet_l0's at batch 256, 288 px (CUDA, bf16, channels_last) or tiny ones on a CPU.
extra_info.gb_per_s counts the bytes the op must move (each input read once, each output written
once: the bound the kernels are held to); test_copy measures a device-to-device copy of each shape
in the same run, and bench/report.py divides by it: the fraction of the bandwidth a copy reaches."""
import pytest
import torch

from conftest import CUDA, DEVICE, cached
from nfnet_fast import _reference, ops
from nfnet_fast.benchmark import backends_for

DTYPE = torch.bfloat16 if CUDA else torch.float32
ACT_SHAPES = ([(256, 256, 72, 72), (256, 512, 36, 36), (256, 1536, 18, 18), (256, 1536, 9, 9)] if CUDA
              else [(2, 256, 8, 8), (2, 1536, 3, 3)])
WEIGHT_SHAPES = [(1536, 384, 1, 1), (384, 64, 3, 3), (2304, 1536, 1, 1)] if CUDA else [(384, 64, 3, 3)]
def _impls(op):
    return backends_for(DEVICE, (op,)) + ["reference-compiled"]


def _fn(op, impl):
    if impl == "reference-compiled":
        return cached(("compiled", op), lambda: torch.compile(getattr(_reference, op)))
    fn = getattr(ops, op)
    return lambda *a: fn(*a, backend=impl)


def _act(shape, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(shape, device=DEVICE, generator=g).to(DTYPE).contiguous(memory_format=torch.channels_last)


def _record(benchmark, run_timed, call, nbytes, **info):
    call()  # compile / autotune outside the timing
    median = run_timed(call)
    benchmark.extra_info.update(gb_per_s=nbytes / median / 1e9, bytes=nbytes, **info)


@pytest.mark.parametrize("impl", _impls("eca_residual"))
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_eca_residual(benchmark, run_timed, impl, shape):
    y, shortcut = _act(shape, 0), _act(shape, 1)
    w = torch.randn(1, 1, 5, device=DEVICE)
    fn = _fn("eca_residual", impl)
    with torch.inference_mode():
        # reads y and shortcut, writes x_next and a_next (the pooling read of y is extra)
        _record(benchmark, run_timed, lambda: fn(y, w, shortcut, 0.2, 2.0, 0.98), 4 * y.numel() * y.element_size(),
                op="eca_residual", impl=impl, shape=list(shape), dtype=str(DTYPE))


@pytest.mark.parametrize("impl", _impls("silu_scale"))
@pytest.mark.parametrize("shape", ACT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_silu_scale(benchmark, run_timed, impl, shape):
    x = _act(shape, 2)
    fn = _fn("silu_scale", impl)
    with torch.inference_mode():
        _record(benchmark, run_timed, lambda: fn(x, 0.9), 2 * x.numel() * x.element_size(),
                op="silu_scale", impl=impl, shape=list(shape), dtype=str(DTYPE))


@pytest.mark.parametrize("impl", _impls("scaled_std_weight"))
@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_scaled_std_weight(benchmark, run_timed, impl, shape):
    w = torch.randn(shape, device=DEVICE)
    gain = torch.rand(shape[0], 1, 1, 1, device=DEVICE) + 0.5
    fn = _fn("scaled_std_weight", impl)
    with torch.inference_mode():
        _record(benchmark, run_timed, lambda: fn(w, gain, 0.05, 1e-5), 2 * w.numel() * w.element_size(),
                op="scaled_std_weight", impl=impl, shape=list(shape), dtype=str(w.dtype))


@pytest.mark.parametrize("shape", ACT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_copy(benchmark, run_timed, shape):
    """The bandwidth ceiling the ops are held to: a plain copy of the same activation (bytes read
    plus bytes written), measured in the same run on the same device."""
    x = _act(shape, 3)
    out = torch.empty_like(x)
    _record(benchmark, run_timed, lambda: out.copy_(x), 2 * x.numel() * x.element_size(),
            op="copy", impl="torch", shape=list(shape), dtype=str(DTYPE))
