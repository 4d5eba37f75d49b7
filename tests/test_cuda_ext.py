"""Tests of the compiled extension (csrc/, backend="cuda"): its CPU twins everywhere, its CUDA
kernels where a GPU is present (marked ``gpu``), its torch.library registration (opcheck), its
work plan, and its kernels' register/spill report.

Every expected value comes from nfnet_fast._reference (plain PyTorch) or from timm, never from
the code under test; inputs and parameters are random.
"""
from __future__ import annotations

import copy
import os
import shutil
import sys

import pytest
import torch

import nfnet_fast
from nfnet_fast import _reference as ref
from nfnet_fast import ops

from conftest import assert_rel_close, random_like, randomize_

pytestmark = pytest.mark.skipif(not nfnet_fast.backends()["cuda"].available,
                                reason=f"nfnet_fast._C not available: {nfnet_fast.backends()['cuda'].reason}")

HAS_CUDA_KERNELS = torch.cuda.is_available() and nfnet_fast.backends()["cuda"].devices == ("cpu", "cuda")


def _gpu(fn):
    """GPU-only: marked ``gpu`` and skipped cleanly without a CUDA device (or CUDA kernels)."""
    fn = pytest.mark.skipif(not HAS_CUDA_KERNELS, reason="needs a CUDA device and the CUDA kernels")(fn)
    return pytest.mark.gpu(fn)


if nfnet_fast.backends()["cuda"].available:
    from nfnet_fast import _cuda
    from nfnet_fast import _C
    OPS = torch.ops.nfnet_fast

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (N, C, H, W): H*W = 1, batch 1, C not a multiple of any vector width, H*W odd / even, k > C.
SHAPES = [(1, 5, 1, 1), (2, 13, 7, 5), (1, 3, 4, 4), (3, 24, 9, 9), (2, 40, 6, 8), (1, 33, 1, 17)]
LAYOUTS = ["nchw", "channels_last", "strided"]


def _tol(dtype: torch.dtype) -> float:
    # Our kernels and the reference both compute in fp32 and round once to the storage dtype, so
    # they differ by about one unit in the last place of that dtype (two where the backward reads a
    # gradient it stored in that dtype); fp32 differs by summation order only.
    return {torch.float32: 2e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t's values in the given layout ("strided": a non-contiguous view, neither NCHW nor NHWC)."""
    if layout == "nchw":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    big = torch.zeros(t.shape[0], t.shape[1], t.shape[2], 2 * t.shape[3] + 1, dtype=t.dtype, device=t.device)
    view = big[:, :, :, 1::2]
    view.copy_(t)
    assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
    return view


def _rand(shape, dtype, gen, device="cpu", scale=1.0):
    return (scale * torch.randn(shape, generator=gen, dtype=torch.float32)).to(dtype=dtype, device=device)


def _eca_weight(k, gen, dtype=torch.float32, device="cpu", shape3=True):
    w = 0.5 * torch.randn(k, generator=gen)
    return (w.reshape(1, 1, k) if shape3 else w).to(dtype=dtype, device=device)


def _expect_format(out: torch.Tensor, inp: torch.Tensor) -> None:
    if inp.is_contiguous():
        assert out.is_contiguous()
    elif inp.is_contiguous(memory_format=torch.channels_last):
        assert out.is_contiguous(memory_format=torch.channels_last)
    else:
        assert out.is_contiguous() or out.is_contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------
# ECA and the fused residual tail: CPU twins against the reference, forward and backward


def _run_eca(fn_mod, variant, y, w, sc, alpha, gain, beta):
    if variant == "eca":
        return (fn_mod.eca(y, w, gain),)
    if variant == "residual":
        return (fn_mod.eca_residual(y, w, sc, alpha, gain, None),)
    return tuple(fn_mod.eca_residual(y, w, sc, alpha, gain, beta))


def _check_eca_against_reference(variant, shape, dtype, layout, k, device, gen, weight_dtype=torch.float32):
    y0 = _rand(shape, dtype, gen, device)
    sc0 = _rand(shape, dtype, gen, device)
    w0 = _eca_weight(k, gen, weight_dtype, device)
    alpha, gain, beta = 0.2 + torch.rand(1, generator=gen).item(), 2.0, 0.9 + 0.2 * torch.rand(1, generator=gen).item()
    def make_leaves():  # fresh views in the layout (clone() would make strided inputs contiguous)
        return [_layout(y0, layout).requires_grad_(), w0.clone().requires_grad_(),
                _layout(sc0, layout).requires_grad_()]

    leaves, rleaves = make_leaves(), make_leaves()
    y = leaves[0]
    outs = _run_eca(_cuda, variant, *leaves, alpha, gain, beta)
    routs = _run_eca(ref, variant, *rleaves, alpha, gain, beta)

    tol = _tol(dtype)
    for o, r in zip(outs, routs):
        assert o.dtype == dtype and o.shape == y.shape
        _expect_format(o, y)
        assert_rel_close(o.float(), r.float(), tol, what=f"{variant} forward")

    grads = [_rand(shape, dtype, gen, device) for _ in outs]
    torch.autograd.backward(outs, grads)
    torch.autograd.backward(routs, grads)
    names = ["y", "weight", "shortcut"]
    for i, (a, b) in enumerate(zip(leaves, rleaves)):
        if variant == "eca" and i == 2:
            assert a.grad is None
            continue
        assert a.grad is not None and a.grad.dtype == b.grad.dtype and a.grad.shape == b.grad.shape
        # the weight's gradient is a reduction in fp32 from fp32 terms; its error is fp32's unless
        # the weight itself is stored in low precision
        t = _tol(weight_dtype) if i == 1 else 2 * tol
        assert_rel_close(a.grad.float(), b.grad.float(), max(t, 1e-5), what=f"{variant} grad {names[i]}")


@pytest.mark.parametrize("variant", ["eca", "residual", "residual_act"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eca_cpu_twin_fp32(variant, shape, layout, rng):
    _check_eca_against_reference(variant, shape, torch.float32, layout, 5, "cpu", rng)


@pytest.mark.parametrize("variant", ["eca", "residual_act"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 13, 7, 5), (1, 24, 1, 1), (2, 40, 6, 8)])
def test_eca_cpu_twin_low_precision(variant, dtype, layout, shape, rng):
    _check_eca_against_reference(variant, shape, dtype, layout, 5, "cpu", rng)


@pytest.mark.parametrize("k", [1, 3, 7, 15])
def test_eca_cpu_twin_kernel_sizes(k, rng):
    # k = 15 is wider than C = 6: every tap of some channels falls in the zero padding
    _check_eca_against_reference("residual_act", (2, 6, 5, 3), torch.float32, "channels_last", k, "cpu", rng)


def test_eca_cpu_twin_weight_in_activation_dtype(rng):
    # model.half(): the ECA weight is fp16 too, and so is its gradient
    _check_eca_against_reference("residual_act", (2, 16, 5, 5), torch.float16, "channels_last", 5, "cpu", rng,
                                 weight_dtype=torch.float16)


def test_eca_cpu_twin_large_spatial_uses_several_ranges(rng):
    # H*W large enough that the plan splits every image into several pixel ranges
    plan = _C._eca_plan(1, 8, 64 * 64, 4, 1, 16, 0, 64)
    assert plan[4] > 1
    _check_eca_against_reference("residual_act", (1, 8, 64, 64), torch.float32, "channels_last", 5, "cpu", rng)
    _check_eca_against_reference("residual_act", (1, 8, 64, 64), torch.float32, "nchw", 5, "cpu", rng)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_eca_cpu_twin_misaligned(layout, rng):
    # storage offset of one element: no 16-byte alignment, the plan falls back to scalars
    shape = (2, 16, 4, 4)
    for dtype in DTYPES:
        y0, sc0 = _rand(shape, dtype, rng), _rand(shape, dtype, rng)
        n = y0.numel()
        buf_y = torch.empty(n + 1, dtype=dtype)
        buf_s = torch.empty(n + 1, dtype=dtype)
        y = _offset_like(buf_y, y0, layout)
        sc = _offset_like(buf_s, sc0, layout)
        assert y.data_ptr() % 16 != 0
        w = _eca_weight(5, rng)
        out, act = _cuda.eca_residual(y, w, sc, 0.2, 2.0, 1.1)
        rout, ract = ref.eca_residual(y, w, sc, 0.2, 2.0, 1.1)
        assert_rel_close(out.float(), rout.float(), _tol(dtype), "misaligned x_next")
        assert_rel_close(act.float(), ract.float(), _tol(dtype), "misaligned a_next")


def _offset_like(buf: torch.Tensor, t: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of buf from element 1 holding t's values in the layout."""
    n, c, h, w = t.shape
    if layout == "nchw":
        v = buf[1:].view(n, c, h, w)
    else:
        v = buf[1:].view(n, h, w, c).permute(0, 3, 1, 2)
        assert v.is_contiguous(memory_format=torch.channels_last)
    v.copy_(t)
    return v


def test_eca_backward_with_x_next_alone(rng):
    # only x_next is used: a_next's gradient arrives as None and must not disturb the others
    y, sc = _rand((2, 8, 3, 3), torch.float32, rng), _rand((2, 8, 3, 3), torch.float32, rng)
    w = _eca_weight(3, rng)
    leaves = [t.clone().requires_grad_() for t in (y, w, sc)]
    rleaves = [t.clone().requires_grad_() for t in (y, w, sc)]
    x_next, _ = _cuda.eca_residual(*leaves[:2], leaves[2], 0.2, 2.0, 0.7)
    rx_next, _ = ref.eca_residual(*rleaves[:2], rleaves[2], 0.2, 2.0, 0.7)
    g = _rand(x_next.shape, torch.float32, rng)
    x_next.backward(g)
    rx_next.backward(g)
    for a, b in zip(leaves, rleaves):
        assert_rel_close(a.grad, b.grad, 1e-5, "grad")


# ---------------------------------------------------------------------------------------------
# silu_scale


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5), (2, 13, 7, 5), (1, 3, 1, 1), (4, 9, 11)])
def test_silu_scale_cpu_twin(dtype, shape, rng):
    x0 = _rand(shape, dtype, rng, scale=4.0)
    beta = 0.3 + torch.rand(1, generator=rng).item()
    x = x0.clone().requires_grad_()
    rx = x0.clone().requires_grad_()
    out, rout = _cuda.silu_scale(x, beta), ref.silu_scale(rx, beta)
    assert out.dtype == dtype and out.shape == x0.shape
    assert_rel_close(out.float(), rout.float(), _tol(dtype), "silu_scale")
    g = _rand(shape, dtype, rng)
    out.backward(g)
    rout.backward(g)
    assert_rel_close(x.grad.float(), rx.grad.float(), _tol(dtype), "silu_scale grad")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_silu_scale_keeps_layout(layout, rng):
    x = _layout(_rand((2, 6, 5, 4), torch.float32, rng), layout)
    out = _cuda.silu_scale(x, 1.3)
    if layout == "strided":
        assert out.is_contiguous()  # not dense: x's suggested format
    else:
        assert out.stride() == x.stride()
    assert_rel_close(out, ref.silu_scale(x, 1.3), 2e-6, "silu_scale")
    # a gradient in another layout than x is accepted
    xr = x.detach().clone().requires_grad_()
    o = _cuda.silu_scale(xr, 1.3)
    g = _rand(x.shape, torch.float32, rng).contiguous(memory_format=torch.channels_last)
    o.backward(g)
    rx = x.detach().clone().requires_grad_()
    ref.silu_scale(rx, 1.3).backward(g)
    assert_rel_close(xr.grad, rx.grad, 2e-6, "silu_scale grad")


def test_silu_scale_extremes():
    x = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4])
    assert torch.equal(torch.isfinite(_cuda.silu_scale(x, 1.0)), torch.ones(7, dtype=torch.bool))
    assert_rel_close(_cuda.silu_scale(x, 0.5), ref.silu_scale(x, 0.5), 1e-6, "silu extremes")


# ---------------------------------------------------------------------------------------------
# scaled weight standardisation


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (7, 3, 1, 1), (5, 64, 3, 3), (33, 17, 1, 1), (4, 6)])
def test_scaled_std_weight_cpu_twin(dtype, shape, rng):
    w0 = _rand(shape, dtype, rng)
    gain0 = (1.0 + 0.3 * torch.randn(shape[0], 1, 1, 1, generator=rng)).reshape(shape[0], *([1] * (len(shape) - 1)))
    gain0 = gain0.to(dtype)
    fan_in = w0[0].numel()
    scale, eps = 1.7881293296813965 * fan_in ** -0.5, 1e-5
    w, g = w0.clone().requires_grad_(), gain0.clone().requires_grad_()
    rw, rg = w0.clone().requires_grad_(), gain0.clone().requires_grad_()
    out, rout = _cuda.scaled_std_weight(w, g, scale, eps), ref.scaled_std_weight(rw, rg, scale, eps)
    assert_rel_close(out.float(), rout.float(), 2 * _tol(dtype), "std weight")
    go = _rand(shape, dtype, rng)
    out.backward(go)
    rout.backward(go)
    assert_rel_close(w.grad.float(), rw.grad.float(), 4 * _tol(dtype) + 2e-6, "std weight grad w")
    assert_rel_close(g.grad.float(), rg.grad.float(), 4 * _tol(dtype) + 2e-6, "std weight grad gain")


# ---------------------------------------------------------------------------------------------
# gradcheck in float64 (CPU twins)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_gradcheck_eca(layout, rng):
    shape = (2, 7, 3, 4)
    y = _layout(_rand(shape, torch.float64, rng), layout).requires_grad_()
    sc = _layout(_rand(shape, torch.float64, rng), layout).requires_grad_()
    w = _eca_weight(5, rng, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _cuda.eca(a, b, 1.7), (y, w))
    assert torch.autograd.gradcheck(lambda a, b, c: _cuda.eca_residual(a, b, c, 0.2, 2.0, None), (y, w, sc))
    assert torch.autograd.gradcheck(lambda a, b, c: _cuda.eca_residual(a, b, c, 0.2, 2.0, 0.8), (y, w, sc))


def test_gradcheck_eca_weight_1d_and_k3(rng):
    y = _rand((1, 4, 2, 3), torch.float64, rng).requires_grad_()
    sc = _rand((1, 4, 2, 3), torch.float64, rng).requires_grad_()
    w = _eca_weight(3, rng, torch.float64, shape3=False).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: _cuda.eca_residual(a, b, c, 0.5, 1.0, 1.2), (y, w, sc))


def test_gradcheck_silu_scale(rng):
    x = _rand((3, 4, 5), torch.float64, rng, scale=3.0).requires_grad_()
    assert torch.autograd.gradcheck(lambda a: _cuda.silu_scale(a, 0.7), (x,))


def test_gradcheck_scaled_std_weight(rng):
    w = _rand((4, 3, 3, 3), torch.float64, rng).requires_grad_()
    g = (1 + 0.3 * torch.randn(4, 1, 1, 1, generator=rng, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: _cuda.scaled_std_weight(a, b, 0.3, 1e-5), (w, g))


# ---------------------------------------------------------------------------------------------
# torch.library registration: opcheck (schema, autograd registration, fake tensor, AOT dispatch)


def _opcheck_cases(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    cases = []
    for layout in ("nchw", "channels_last"):
        y = _layout(_rand((2, 12, 5, 3), dtype, gen, device), layout)
        sc = _layout(_rand((2, 12, 5, 3), dtype, gen, device), layout)
        w = _eca_weight(5, gen, torch.float32, device)
        cases += [
            (OPS.eca_residual, (y, w, None, 1.5, None)),
            (OPS.eca_residual, (y, w, sc, 0.4, None)),
            (OPS.eca_residual, (y, w, sc, 0.4, 0.9)),
            (OPS.eca_residual, (y.requires_grad_(), w.requires_grad_(), sc.requires_grad_(), 0.4, 0.9)),
        ]
        y, w, sc = y.detach(), w.detach(), sc.detach()
        _, _, mean = OPS.eca_residual(y, w, sc, 0.4, 0.9)
        g1, g2 = _layout(_rand(y.shape, dtype, gen, device), layout), _rand(y.shape, dtype, gen, device)
        cases += [
            (OPS._eca_residual_backward, (g1, None, y, w, None, mean, 1.5, None)),
            (OPS._eca_residual_backward, (g1, g2, y, w, sc, mean, 0.4, 0.9)),
            (OPS._eca_residual_backward, (g1, None, y, w, None, mean, 1.5, None, True)),  # (+ the bias sums)
            (OPS._eca_residual_backward, (g1, g2, y, w, sc, mean, 0.4, 0.9, True)),
            (OPS.silu_scale, (y, 0.8)),
            (OPS.silu_scale, (y.clone().requires_grad_(), 0.8)),
            (OPS._silu_scale_backward, (g2, y, 0.8)),
        ]
    wt = _rand((8, 3, 3, 3), dtype, gen, device)
    gain = (1 + 0.3 * torch.randn(8, 1, 1, 1, generator=gen)).to(dtype=dtype, device=device)
    cases += [
        (OPS.scaled_std_weight, (wt, gain, 0.3, 1e-5)),
        (OPS.scaled_std_weight, (wt.clone().requires_grad_(), gain.clone().requires_grad_(), 0.3, 1e-5)),
        (OPS._scaled_std_weight_backward, (_rand(wt.shape, dtype, gen, device), wt, gain, 0.3, 1e-5)),
    ]
    return cases


def _opcheck_all(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)  # every test util: raises on the first failure


def test_opcheck_cpu():
    _opcheck_all("cpu")


def test_torch_compile_fullgraph_cpu(rng):
    y, sc = _rand((2, 12, 5, 3), torch.float32, rng), _rand((2, 12, 5, 3), torch.float32, rng)
    w = _eca_weight(5, rng)

    def f(y, w, sc):
        x, a = ops.eca_residual(y, w, sc, 0.2, 2.0, 0.9, backend="cuda")
        return ops.silu_scale(x, 1.1, backend="cuda") + a

    eager = f(y, w, sc)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(y, w, sc)
    assert_rel_close(out, eager, 1e-6, "compiled")


# ---------------------------------------------------------------------------------------------
# the work plan (what the CUDA launcher decides: vector width, scalar fallback, ranges)


@pytest.mark.parametrize("n,c,hw", [(256, 256, 72 * 72), (256, 512, 36 * 36), (256, 1536, 18 * 18),
                                    (256, 1536, 81), (1, 256, 5184), (2, 13, 35), (1, 5, 1), (3, 520, 49)])
@pytest.mark.parametrize("elem", [2, 4])
@pytest.mark.parametrize("cl", [0, 1])
def test_eca_plan(n, c, hw, elem, cl):
    target = 132 * 32
    vec, tile, ctiles, ct, splits, split_len = _C._eca_plan(n, c, hw, elem, cl, 16, 1, target)
    inner = c if cl else hw
    assert vec in (1, 8 // elem, 16 // elem) and inner % vec == 0
    if vec > 1:
        assert 16 // elem == vec or inner % (16 // elem) != 0  # the widest width that divides
    # ranges tile H*W exactly, in vector-aligned steps for NCHW
    assert splits * split_len >= hw > (splits - 1) * split_len
    if not cl:
        assert split_len % vec == 0 and tile == 8
    else:
        assert tile == ct * vec and ct & (ct - 1) == 0 and ct <= 32 and (ct == 32 or ct * vec >= c)
    assert ctiles * tile >= c > (ctiles - 1) * tile
    assert 1 <= splits <= 16


def test_eca_plan_network_shapes_fill_an_h100():
    # channels_last bf16 at batch 256 / 288 px: at least two waves of 8 resident blocks on 132 SMs,
    # full 16-byte vectors along C
    for c, hw in [(256, 72 * 72), (512, 36 * 36), (1536, 18 * 18), (1536, 81)]:
        vec, tile, ctiles, ct, splits, split_len = _C._eca_plan(256, c, hw, 2, 1, 16, 1, 132 * 32)
        assert vec == 8 and ct == 32
        assert 256 * ctiles * splits >= 2 * 8 * 132


@pytest.mark.parametrize("align,expect", [(16, 8), (8, 4), (4, 1), (2, 1)])
def test_eca_plan_alignment_fallback(align, expect):
    assert _C._eca_plan(2, 64, 49, 2, 1, align, 1, 100)[0] == expect


def test_eca_plan_c_not_multiple_of_vector():
    assert _C._eca_plan(2, 12, 49, 2, 1, 16, 1, 100)[0] == 4   # 8-byte vectors
    assert _C._eca_plan(2, 13, 49, 2, 1, 16, 1, 100)[0] == 1   # scalars
    assert _C._eca_plan(2, 13, 48, 4, 0, 16, 1, 100)[0] == 4   # NCHW: H*W decides


# ---------------------------------------------------------------------------------------------
# bad inputs: clear errors naming the argument (the C++ checks, called directly)


def test_bad_inputs_name_the_argument(rng):
    y = _rand((2, 8, 3, 3), torch.float32, rng)
    w = _eca_weight(5, rng)
    with pytest.raises(RuntimeError, match="y must be 4-D"):
        OPS.eca_residual(y[0], w, None, 1.0, None)
    with pytest.raises(RuntimeError, match="weight must be the ECA conv1d kernel"):
        OPS.eca_residual(y, torch.randn(4), None, 1.0, None)
    with pytest.raises(RuntimeError, match="shortcut shape"):
        OPS.eca_residual(y, w, y[:, :4], 1.0, None)
    with pytest.raises(RuntimeError, match="shortcut dtype"):
        OPS.eca_residual(y, w, y.half(), 1.0, None)
    with pytest.raises(RuntimeError, match="beta_next needs a shortcut"):
        OPS.eca_residual(y, w, None, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="y must be float32"):
        OPS.eca_residual(y.long(), w, None, 1.0, None)
    with pytest.raises(RuntimeError, match="y must be non-empty"):
        OPS.eca_residual(y[:0], w, None, 1.0, None)
    _, _, stats = OPS.eca_residual(y, w, y, 1.0, None)
    with pytest.raises(RuntimeError, match="stats must be"):
        OPS._eca_residual_backward(y, None, y, w, None, stats[:1], 1.0, None)
    with pytest.raises(RuntimeError, match="grad_x_next shape"):
        OPS._eca_residual_backward(y[:1], None, y, w, None, stats, 1.0, None)
    with pytest.raises(RuntimeError, match="grad_a_next shape"):
        OPS._eca_residual_backward(y, y[:1], y, w, y, stats, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="needs grad_x_next or grad_a_next"):
        OPS._eca_residual_backward(None, None, y, w, y, stats, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="x must be float32"):
        OPS.silu_scale(torch.arange(4), 1.0)
    with pytest.raises(RuntimeError, match="grad_out shape"):
        OPS._silu_scale_backward(torch.randn(3), torch.randn(4), 1.0)
    with pytest.raises(RuntimeError, match="gain must have one value per output channel"):
        OPS.scaled_std_weight(torch.randn(4, 3, 3, 3), torch.randn(3), 1.0, 1e-5)
    # the public layer names the argument too, before any kernel runs
    with pytest.raises(ValueError, match="shortcut shape"):
        ops.eca_residual(y, w, y[:, :4], 0.2, 2.0, backend="cuda")


# ---------------------------------------------------------------------------------------------
# the whole model on the CPU twins against timm


def _model_pair(seed=0, **kwargs):
    timm = pytest.importorskip("timm")
    base = randomize_(timm.create_model("eca_nfnet_l0", **kwargs), seed=seed).eval()
    fast = nfnet_fast.convert(copy.deepcopy(base), backend="cuda")
    return base, fast


def _compare_models(base, fast, x, what):
    xb, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_out, out = base(xb), fast(xf)
    assert_rel_close(out, ref_out, what=f"{what} logits")
    g = random_like(out, 3)
    ref_out.backward(g)
    out.backward(g)
    assert_rel_close(xf.grad, xb.grad, what=f"{what} input grad")
    for (name, pb), (_, pf) in zip(base.named_parameters(), fast.named_parameters()):
        assert_rel_close(pf.grad, pb.grad, what=f"{what} grad {name}")


def test_model_cpu_twins_against_timm(rng):
    base, fast = _model_pair(num_classes=10)
    x = torch.randn(2, 3, 64, 48, generator=rng)
    _compare_models(base, fast, x, "cpu nchw")
    base.zero_grad(), fast.zero_grad()
    _compare_models(base, fast, x.contiguous(memory_format=torch.channels_last), "cpu channels_last")


# ---------------------------------------------------------------------------------------------
# the kernels' resource report: no spills on sm_90 or sm_80


def test_no_register_spills():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernels cannot be compiled here")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    try:
        import cuda_resources
    finally:
        sys.path.pop(0)
    if cuda_resources.cuobjdump_path() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's) to read the kernels' resources")
    kernels = cuda_resources.collect(("90", "80"), jobs=2)
    assert kernels, "no kernels found in csrc/*.cu"
    spilled = [f"sm_{k.arch} {k.name}: stack {k.stack} local {k.local} spill {k.spill_stores}/{k.spill_loads}"
               for k in kernels if k.spills]
    assert not spilled, "kernels spill registers:\n" + "\n".join(spilled)


# ---------------------------------------------------------------------------------------------
# CUDA kernels (GPU only)


@_gpu
@pytest.mark.parametrize("variant", ["eca", "residual", "residual_act"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES + [(2, 256, 18, 18), (2, 512, 9, 9), (1, 1536, 9, 9), (3, 72, 40, 40)])
def test_eca_cuda_against_reference(variant, dtype, layout, shape, rng):
    _check_eca_against_reference(variant, shape, dtype, layout, 5, "cuda", rng)


@_gpu
@pytest.mark.parametrize("k", [1, 3, 9])
def test_eca_cuda_kernel_sizes(k, rng):
    _check_eca_against_reference("residual_act", (2, 40, 7, 7), torch.bfloat16, "channels_last", k, "cuda", rng)


@_gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset_elems", [1, 2])
def test_eca_cuda_misaligned(layout, dtype, offset_elems, rng):
    # offset by 1 element: scalar path; by 2 elements of fp16/bf16 (4 bytes) or fp32 (8 bytes):
    # 8-byte vectors for fp32, scalars for 16-bit types
    shape = (2, 64, 6, 6)
    y0, sc0 = _rand(shape, dtype, rng, "cuda"), _rand(shape, dtype, rng, "cuda")
    n = y0.numel()
    y = _offset_view(torch.empty(n + offset_elems, dtype=dtype, device="cuda"), y0, layout, offset_elems)
    sc = _offset_view(torch.empty(n + offset_elems, dtype=dtype, device="cuda"), sc0, layout, offset_elems)
    assert y.data_ptr() % 16 != 0 and sc.data_ptr() % 16 != 0
    w = _eca_weight(5, rng, device="cuda")
    leaves = [y.requires_grad_(), w.requires_grad_(), sc.requires_grad_()]  # y, sc stay misaligned
    out, act = _cuda.eca_residual(leaves[0], leaves[1], leaves[2], 0.2, 2.0, 1.1)
    rl = [t.detach().clone().requires_grad_() for t in (y, w, sc)]
    rout, ract = ref.eca_residual(rl[0], rl[1], rl[2], 0.2, 2.0, 1.1)
    assert_rel_close(out.float(), rout.float(), _tol(dtype), "misaligned x_next")
    assert_rel_close(act.float(), ract.float(), _tol(dtype), "misaligned a_next")
    g1, g2 = _rand(shape, dtype, rng, "cuda"), _rand(shape, dtype, rng, "cuda")
    torch.autograd.backward((out, act), (g1, g2))
    torch.autograd.backward((rout, ract), (g1, g2))
    for a, b, name in zip(leaves, rl, ("y", "weight", "shortcut")):
        assert_rel_close(a.grad.float(), b.grad.float(), max(2 * _tol(dtype), 1e-5), f"misaligned grad {name}")


def _offset_view(buf, t, layout, off):
    n, c, h, w = t.shape
    v = buf[off:].view(n, c, h, w) if layout == "nchw" else buf[off:].view(n, h, w, c).permute(0, 3, 1, 2)
    v.copy_(t)
    return v


@_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (5,), (7, 3), (2, 13, 7, 5), (4, 256, 9, 9)])
@pytest.mark.parametrize("offset", [0, 1])
def test_silu_scale_cuda(dtype, shape, offset, rng):
    x0 = _rand(shape, dtype, rng, "cuda", scale=4.0)
    buf = torch.empty(x0.numel() + offset, dtype=dtype, device="cuda")
    x = buf[offset:].view(shape).copy_(x0).requires_grad_()  # misaligned storage when offset = 1
    rx = x0.clone().requires_grad_()
    out, rout = _cuda.silu_scale(x, 0.9), ref.silu_scale(rx, 0.9)
    assert_rel_close(out.float(), rout.float(), _tol(dtype), "silu_scale cuda")
    g = _rand(shape, dtype, rng, "cuda")
    out.backward(g)
    rout.backward(g)
    assert_rel_close(x.grad.float(), rx.grad.float(), _tol(dtype), "silu_scale cuda grad")


@_gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_std_weight_cuda(dtype, rng):
    for shape in [(16, 3, 3, 3), (384, 64, 3, 3), (2304, 1536, 1, 1), (7, 3, 1, 1)]:
        w0 = _rand(shape, dtype, rng, "cuda")
        g0 = (1 + 0.3 * torch.randn(shape[0], 1, 1, 1, generator=rng)).to(dtype=dtype, device="cuda")
        scale = 1.7881293296813965 * w0[0].numel() ** -0.5
        w, g = w0.clone().requires_grad_(), g0.clone().requires_grad_()
        rw, rg = w0.clone().requires_grad_(), g0.clone().requires_grad_()
        out, rout = _cuda.scaled_std_weight(w, g, scale, 1e-5), ref.scaled_std_weight(rw, rg, scale, 1e-5)
        assert_rel_close(out.float(), rout.float(), 2 * _tol(dtype), "std weight cuda")
        go = _rand(shape, dtype, rng, "cuda")
        out.backward(go)
        rout.backward(go)
        assert_rel_close(w.grad.float(), rw.grad.float(), 4 * _tol(dtype) + 1e-5, "std weight cuda grad w")
        assert_rel_close(g.grad.float(), rg.grad.float(), 4 * _tol(dtype) + 1e-5, "std weight cuda grad gain")


@_gpu
def test_opcheck_cuda():
    _opcheck_all("cuda")
    for dtype in (torch.float16, torch.bfloat16):
        for op, args in _opcheck_cases("cuda", dtype):
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


@_gpu
def test_cuda_rejects_float64(rng):
    y = _rand((2, 8, 3, 3), torch.float64, rng, "cuda")
    with pytest.raises(RuntimeError, match="y is float64"):  # (eca_residual's input is y)
        OPS.eca_residual(y, _eca_weight(3, rng, device="cuda"), None, 1.0, None)
    with pytest.raises(RuntimeError, match="x is float64"):
        OPS.silu_scale(y, 1.0)


@_gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grads", ["x_next", "a_next", "x_next+a_next"])
@pytest.mark.parametrize("vectors", [False, True])
def test_eca_cuda_backward_bias_sums(layout, dtype, grads, vectors, rng):
    """The CUDA backward's ``bias_sums`` (want_bias_sums: made by its kernels from the reduce pass's sums of the
    shortcut's gradient, not by two aten sums as the CPU twin does), with the pixels split across blocks and the
    channels odd or a multiple of 8 (scalar and vector paths): y's and the shortcut's gradients summed over (N, H,
    W) in float64, to the fp32 contract in fp32 (in bf16 the kernels sum the unrounded gradients: within bf16's
    rounding), and every other output the same bits as without them."""
    # (vectors: C and H * W multiples of 8, 16-byte vectors in either layout; else both odd, scalars)
    channels = 8 * int(torch.randint(13, 25, (), generator=rng)) + (0 if vectors else 3)
    shape = (2, channels, 44, 52) if vectors else (2, channels, 45, 51)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    y, shortcut, grad_x, grad_a = (_rand(shape, dtype, rng, "cuda").contiguous(memory_format=fmt) for _ in range(4))
    weight = _eca_weight(5, rng, device="cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    plan = _C._eca_plan(shape[0], shape[1], shape[2] * shape[3], y.element_size(), int(layout == "channels_last"), 16, 1,
                        sms * 32)
    assert plan[4] > 1, plan  # (splits: the pixels of an image are split across blocks)
    has_a = "a_next" in grads
    beta = 0.8 if has_a else None
    stats = OPS.eca_residual(y, weight, shortcut, 0.35, beta)[2]
    args = (grad_x if grads != "a_next" else None, grad_a if has_a else None, y, weight, shortcut if has_a else None,
            stats, 0.35, beta)
    grad_y, grad_weight, grad_shortcut, bias_sums = OPS._eca_residual_backward(*args, want_bias_sums=True)
    plain = OPS._eca_residual_backward(*args)
    assert plain[3].numel() == 0
    for a, b in zip((grad_y, grad_weight, grad_shortcut), plain[:3]):
        assert torch.equal(a, b)
    shortcut_grad = grad_shortcut if has_a else grad_x
    tol = 1e-6 if dtype == torch.float32 else _tol(dtype)
    assert bias_sums.shape == (2, shape[1]) and bias_sums.dtype == torch.float32
    assert_rel_close(bias_sums[0], grad_y.double().sum((0, 2, 3)), tol, f"{layout} {dtype} {grads}: grad_y's sums")
    assert_rel_close(bias_sums[1], shortcut_grad.double().sum((0, 2, 3)), tol, f"{layout} {dtype} {grads}: shortcut's")


@_gpu
def test_eca_cuda_network_size_channels_last(rng):
    # the largest ECA of the network at batch 256 / 288 px, channels_last bf16, forward and backward
    shape = (256, 256, 72, 72)
    y = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    sc = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w = _eca_weight(5, rng, device="cuda")
    out, act = _cuda.eca_residual(y, w, sc, 0.2, 2.0, 0.95)
    rout, ract = ref.eca_residual(y, w, sc, 0.2, 2.0, 0.95)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(out.float(), rout.float(), _tol(torch.bfloat16), "big x_next")
    assert_rel_close(act.float(), ract.float(), _tol(torch.bfloat16), "big a_next")
    del rout, ract
    g = torch.randn(shape, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    mean = OPS.eca_residual(y, w, sc, 0.4, 0.95)[2]
    dy, dw, dsc, _ = OPS._eca_residual_backward(g, g, y, w, sc, mean, 0.4, 0.95)
    yr = y.detach().clone().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    scr = sc.detach().clone().requires_grad_()
    torch.autograd.backward(ref.eca_residual(yr, wr, scr, 0.2, 2.0, 0.95), (g, g))
    assert_rel_close(dy.float(), yr.grad.float(), 2 * _tol(torch.bfloat16), "big grad y")
    assert_rel_close(dsc.float(), scr.grad.float(), 2 * _tol(torch.bfloat16), "big grad shortcut")
    assert_rel_close(dw.float(), wr.grad.float(), 1e-4, "big grad weight")


@_gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_model_cuda_against_timm(channels_last):
    base, fast = _model_pair(seed=1, num_classes=100)
    base, fast = base.cuda(), fast.cuda()
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(5)).cuda()
    if channels_last:
        base = base.to(memory_format=torch.channels_last)
        fast = fast.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.backends.cudnn.flags(deterministic=True, allow_tf32=False):
        _compare_models(base, fast, x, f"cuda channels_last={channels_last}")


@pytest.mark.parametrize("op", ["silu_scale", "eca", "eca_residual", "scaled_std_weight"])
def test_double_backward_is_refused_not_silently_zero(op, rng):
    """A gradient of a gradient (a gradient penalty) through the C++ ops: their backward ops have no
    derivative, so asking for one is an error, as on the triton backend. (PyTorch's default fallback
    for an op without an autograd kernel only warned and treated the backward as constant: the
    penalty's second-order terms were dropped, a silently wrong gradient.) The first-order gradients,
    with create_graph=True, are still the reference's."""
    x = torch.randn(2, 6, 4, 5, generator=rng)
    taps, shortcut = torch.randn(3, generator=rng), torch.randn(2, 6, 4, 5, generator=rng)
    w, gain = torch.randn(4, 3, 3, 3, generator=rng), 1 + 0.2 * torch.randn(4, generator=rng)
    calls = {"silu_scale": lambda t, b: ops.silu_scale(t, 1.3, backend=b),
             "eca": lambda t, b: ops.eca(t, taps, 1.0, backend=b),
             "eca_residual": lambda t, b: ops.eca_residual(t, taps, shortcut, 0.2, 2.0, None, backend=b),
             "scaled_std_weight": lambda t, b: ops.scaled_std_weight(t, gain, 0.5, 1e-4, backend=b)}
    leaf = w if op == "scaled_std_weight" else x
    weights = torch.randn(leaf.shape, generator=rng)
    first = []
    for backend in ("cuda", "reference"):
        t = leaf.clone().requires_grad_()
        (g,) = torch.autograd.grad((calls[op](t, backend) * weights).square().sum(), t, create_graph=True)
        first.append(g.detach())
        if backend == "cuda":
            with pytest.raises(RuntimeError, match="not implemented"):
                (g.square().sum() + t.sum()).backward()
    assert_rel_close(first[0], first[1], 1e-5, op)
