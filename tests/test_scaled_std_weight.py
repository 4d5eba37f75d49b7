"""ops.scaled_std_weight on every CPU backend here, against float64 math and timm."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from timm.layers import ScaledStdConv2d as TimmStdConv

from conftest import (DropsGradient, assert_rel_close, check_backward_against_float64, counted_work, cpu_backends,
                      dtype_tol, poison_freed_memory)
from nfnet_fast import ops

BACKENDS = cpu_backends("scaled_std_weight")


def _ref(w, gain, scale, eps):
    w = w.double()
    dims = tuple(range(1, w.dim()))
    mean = w.mean(dims, keepdim=True)
    var = w.var(dims, unbiased=False, keepdim=True)
    return (w - mean) / torch.sqrt(var + eps) * gain.double().reshape(-1, *[1] * (w.dim() - 1)) * scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (7, 5, 1, 1), (1, 3, 1, 1), (33, 64, 3, 3), (5, 1000)])
def test_forward_backward(backend, dtype, shape, rng):
    w = (torch.randn(shape, generator=rng) * 0.5 + 0.2).to(dtype).requires_grad_()
    gain = (1 + 0.3 * torch.randn(shape[0], 1, 1, 1, generator=rng)).to(dtype).requires_grad_()
    scale = 1.7881293296813965 * (w[0].numel() ** -0.5)
    eps = float(torch.empty(()).uniform_(1e-6, 1e-4, generator=rng))
    out = ops.scaled_std_weight(w, gain, scale, eps, backend=backend)
    wd, gd = w.detach().double().requires_grad_(), gain.detach().double().requires_grad_()
    ref = _ref(wd, gd, scale, eps)
    assert out.dtype == dtype and out.shape == w.shape
    assert_rel_close(out, ref, dtype_tol(dtype), f"{backend} {dtype} forward")
    check_backward_against_float64([out], [ref], [("weight", w, wd, None), ("gain", gain, gd, None)], dtype, rng,
                                   f"{backend} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_timm_formula(backend, rng):
    conv = TimmStdConv(24, 40, 3, groups=2, gamma=1.7881293296813965, eps=1e-5)
    with torch.no_grad():
        conv.weight.normal_(generator=rng)
        conv.gain.uniform_(0.5, 1.5, generator=rng)
    timm_w = F.batch_norm(conv.weight.reshape(1, 40, -1), None, None, weight=(conv.gain * conv.scale).view(-1),
                          training=True, momentum=0.0, eps=conv.eps).reshape_as(conv.weight)
    out = ops.scaled_std_weight(conv.weight, conv.gain, conv.scale, conv.eps, backend=backend)
    assert_rel_close(out, timm_w, 1e-5, backend)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not run here")
@pytest.mark.parametrize("grad_layout", ["contiguous", "channels_last"])
def test_triton_step_launches_and_copies(grad_layout, rng):
    """One launch each way, memoised tiles; the weight gradient aten's convolution backward hands
    over in channels_last is copied to the weight's layout (one weight-sized copy, as the cuda
    backend's), a contiguous one is used as it is."""
    from nfnet_fast.kernels import scaled_std_weight as std_kernels

    c_out, c_in, k = (int(torch.randint(lo, hi, (), generator=rng)) for lo, hi in ((2, 40), (2, 40), (1, 4)))
    w0 = torch.randn(c_out, c_in, k, k, generator=rng).requires_grad_()
    gain0 = (1 + 0.3 * torch.randn(c_out, 1, 1, 1, generator=rng)).requires_grad_()
    w, gain = w0.view_as(w0), gain0.view_as(gain0)  # not leaves: no gradient accumulated (or copied)
    fmt = torch.channels_last if grad_layout == "channels_last" else torch.contiguous_format
    grad = torch.randn(w.shape, generator=rng).contiguous(memory_format=fmt)
    assert std_kernels.config(c_in * k * k, torch.device("cuda")) is std_kernels.config(c_in * k * k,
                                                                                       torch.device("cuda"))
    with counted_work(std_kernels) as forward:
        out = ops.scaled_std_weight(w, gain, c_in ** -0.5, 1e-5, backend="triton")
    with counted_work(std_kernels) as backward:
        out.backward(grad)
    assert forward["launches"] == {"_std_fwd_kernel": 1} and forward["copies"] == []
    assert backward["launches"] == {"_std_bwd_kernel": 1}
    assert backward["copies"] == ([w.numel()] if k > 1 and grad_layout == "channels_last" else [])
    assert w0.grad is not None and gain0.grad is not None


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_no_backward_work_without_a_gradient(backend, rng):
    """A standardised weight no gradient reaches costs its backward nothing: no zero gradient made, no
    backward op (autograd would make zeros for it, and the op's backward would run on them)."""
    from torch.profiler import ProfilerActivity, profile

    w = torch.randn(6, 4, 3, 3, generator=rng).requires_grad_()
    gain = (1 + 0.3 * torch.randn(6, 1, 1, 1, generator=rng)).requires_grad_()
    std = ops.scaled_std_weight(w, gain, 0.3, 1e-5, backend=backend)
    out = DropsGradient.apply(std, w * 2.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.backward(torch.ones_like(out))
    names = [e.name for e in prof.events()]
    assert not [n for n in names if "scaled_std_weight_backward" in n or n in ("aten::zeros", "aten::zero_")], names
    assert torch.equal(w.grad, torch.full_like(w, 2.0)) and gain.grad is None


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(weight=torch.ones(4, 3, 3, 3, dtype=torch.int64)), TypeError, "weight must be float32"),
    (dict(weight=torch.ones(4)), ValueError, "weight must be a non-empty conv weight"),
    (dict(weight=torch.ones(0, 3, 1, 1), gain=torch.ones(0, 1, 1, 1)), ValueError, "non-empty"),
    (dict(weight=torch.ones(4, 1, 1, 1)), ValueError, "fan-in of 1"),
    (dict(gain=torch.ones(5, 1, 1, 1)), ValueError, "gain must have one value per output channel"),
    (dict(gain=torch.ones(4, 1, 1, 1, dtype=torch.float16)), TypeError, "gain has dtype"),
    (dict(gain="g"), TypeError, "gain must be a torch.Tensor"),
    (dict(scale=None), TypeError, "scale must be a Python float"),
    (dict(eps=-1.0), ValueError, "eps must be > 0"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(eps=float("nan")), ValueError, "eps must be > 0"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(kwargs, err, match, backend):
    """The same checks, the same errors, whichever backend runs (ops.py checks before dispatching)."""
    args = dict(weight=torch.ones(4, 3, 3, 3), gain=torch.ones(4, 1, 1, 1), scale=0.5, eps=1e-5, backend=backend)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        ops.scaled_std_weight(**args)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not run here")
@pytest.mark.parametrize("gpu_config", [False, True], ids=["cpu tiles", "gpu tiles"])
@pytest.mark.parametrize("shape", [(24, 16, 3, 3), (5, 460, 3, 3), (9, 7, 1, 3), (6, 3, 5, 5)],
                         ids=["3x3", "3x3 looped rows", "1x3", "5x5 cin3"])
def test_kernels_read_a_channels_last_weight_as_it_is(shape, gpu_config, rng):
    """A channels_last model's kxk weight (each row its fan-in tap-major) and its channels_last gradient,
    as cuDNN makes it for channels_last activations: standardised, packed and differentiated where they
    are, without a copy; the results in the weight's layout, and the float64 math's values within the
    fp32 contract (the row sums run in another order than a contiguous weight's). Rows of 4140 (460 x 9)
    take the looped kernels."""
    from nfnet_fast.kernels import scaled_std_weight as std_kernels

    cout, cg, kh, kw = shape
    w = (torch.randn(shape, generator=rng) * 0.5 + 0.2).contiguous(memory_format=torch.channels_last)
    gain = 1 + 0.3 * torch.randn(cout, generator=rng)
    scale, eps = float(torch.empty(()).uniform_(0.05, 0.5, generator=rng)), 1e-4
    grad = torch.randn(shape, generator=rng).contiguous(memory_format=torch.channels_last)
    assert not w.is_contiguous() and std_kernels.rows_layout(w) == torch.channels_last
    packed = torch.full((kh, kw, cg, cout), float("nan"))
    with counted_work(std_kernels) as work:
        out = std_kernels.forward(w, gain, scale, eps, gpu_config)
        std_kernels.forward(w, gain, scale, eps, gpu_config, packed=packed)
        grad_w, grad_gain = std_kernels.backward(grad, w, gain, scale, eps, gpu_config)
    assert work["launches"] == {"_std_fwd_kernel": 2, "_std_bwd_kernel": 1} and work["copies"] == [], work
    assert out.stride() == w.stride() and grad_w.stride() == w.stride()
    assert torch.equal(packed, out.permute(2, 3, 1, 0))  # (the same math: the packed write only moves it)
    wd, gd = w.double().requires_grad_(), gain.double().requires_grad_()
    ref = _ref(wd, gd, scale, eps)
    ref.backward(grad.double())
    assert_rel_close(out, ref, 1e-5, "channels_last forward")
    assert_rel_close(grad_w, wd.grad, 1e-5, "channels_last weight gradient")
    assert_rel_close(grad_gain, gd.grad, 1e-5, "channels_last gain gradient")


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not run here")
def test_kernels_refuse_rows_they_cannot_read():
    """A weight whose rows are not dense blocks, or a gradient of another shape or layout than its weight (the
    kernels pair their elements by offset), is refused with the reason rather than read wrongly."""
    from nfnet_fast.kernels import scaled_std_weight as std_kernels

    w, gain = torch.randn(8, 6, 3, 3), torch.ones(8)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="weight must be contiguous or channels_last-contiguous"):
        std_kernels.forward(w[:, ::2], gain, 0.5, 1e-5)
    with pytest.raises(ValueError, match="must be laid out like the weight"):
        std_kernels.backward(torch.randn(8, 6, 3, 3), w_cl, gain, 0.5, 1e-5)
    with pytest.raises(ValueError, match="must be laid out like the weight"):
        std_kernels.backward(torch.randn(8, 6, 3, 3).contiguous(memory_format=torch.channels_last), w, gain, 0.5, 1e-5)
    with pytest.raises(ValueError, match="must be laid out like the weight"):  # (same strides, fewer rows)
        std_kernels.backward(torch.randn(2, 3, 1, 1), torch.randn(3, 3, 1, 1), torch.ones(3), 0.5, 1e-5)
    with pytest.raises(ValueError, match="grad_out must be contiguous or channels_last-contiguous"):
        std_kernels.backward(torch.randn(8, 6, 3, 6)[..., ::2], w, gain, 0.5, 1e-5)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not run here")
@pytest.mark.parametrize("gpu_config", [False, True], ids=["cpu tiles", "gpu tiles"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_many_writes_what_forward_writes(dtype, gpu_config, rng):
    """Many weights standardised at once (a training forward's convs: kernels.scaled_std_weight.forward_many)
    into their packed operands: each one the bits that ``forward(..., packed=)`` writes for it alone, from
    one launch per tile; every operand 16-byte aligned and contiguous in one buffer. Weights of every
    tile (the 27-wide stem rows, 1x1, 3x3, a channels_last kxk weight, rows of 4140 that take the looped
    kernel), random gains, scales and eps. A weight the kernel cannot read as it is (rows that are not
    dense, a bf16 weight, a strided gain) gets None, the others their operands. The plan is kept while the
    weights stay where they are, and made again when one moves."""
    from nfnet_fast.kernels import scaled_std_weight as std_kernels

    shapes = [(16, 3, 3, 3), (24, 16, 1, 1), (3, 460, 3, 3), (12, 8, 3, 3), (40, 96, 1, 1), (5, 7, 1, 1),
              (8, 32, 3, 3)]
    weights = [torch.randn(s, generator=rng) * float(torch.rand((), generator=rng)) + 0.1 for s in shapes]
    weights[3] = weights[3].contiguous(memory_format=torch.channels_last)
    gains = [1 + 0.3 * torch.randn(s[0], 1, 1, 1, generator=rng) for s in shapes]
    scales = [float(torch.empty(()).uniform_(0.02, 0.5, generator=rng)) for _ in shapes]
    epss = [float(10 ** torch.empty(()).uniform_(-6, -3, generator=rng)) for _ in shapes]
    refused = {  # (index: weight, gain)
        len(shapes): (torch.randn(6, 8, 3, 3, generator=rng)[:, ::2], torch.ones(6)),
        len(shapes) + 1: (torch.randn(6, 4, 1, 1, generator=rng).bfloat16(), torch.ones(6)),
        len(shapes) + 2: (torch.randn(6, 4, 1, 1, generator=rng), torch.ones(12)[::2]),
    }
    for w, g in refused.values():
        weights.append(w)
        gains.append(g)
        scales.append(0.1)
        epss.append(1e-5)
    tiles = {tuple(std_kernels.config(w.numel() // w.shape[0], gpu_config=gpu_config).items())
             for w in weights[:len(shapes)]}
    std_kernels._PLANS.clear()
    poison_freed_memory(1 << 20)  # (an unwritten operand would read NaN)
    with counted_work(std_kernels) as work:
        operands = std_kernels.forward_many(weights, gains, scales, epss, dtype, gpu_config)
    assert work["launches"] == {"_std_fwd_many_kernel": len(tiles)} and work["copies"] == [], work
    assert len(operands) == len(weights) and all(operands[i] is None for i in refused)
    for w, g, scale, eps, op in zip(weights[:len(shapes)], gains, scales, epss, operands):
        ref = torch.full((w.shape[2], w.shape[3], w.shape[1], w.shape[0]), float("nan"), dtype=dtype)
        std_kernels.forward(w, g, scale, eps, gpu_config, packed=ref)
        assert op.shape == ref.shape and op.dtype == dtype and op.is_contiguous() and op.data_ptr() % 16 == 0
        assert torch.equal(op, ref), (tuple(w.shape), (op.float() - ref.float()).abs().max())
    assert len({op.untyped_storage().data_ptr() for op in operands if op is not None}) == 1
    assert len(std_kernels._PLANS) == 1
    std_kernels.forward_many(weights, gains, scales, epss, dtype, gpu_config)
    assert len(std_kernels._PLANS) == 1  # (the same weights: the plan kept)
    moved = weights[1].clone() * 2  # another weight at another address: a new plan, its values
    again = std_kernels.forward_many([weights[0], moved], gains[:2], scales[:2], epss[:2], dtype, gpu_config)
    assert len(std_kernels._PLANS) == 2
    ref = torch.empty(1, 1, 16, 24, dtype=dtype)
    std_kernels.forward(moved, gains[1], scales[1], epss[1], gpu_config, packed=ref)
    assert torch.equal(again[1], ref)
    with pytest.raises(ValueError, match="as many gains, scales and eps as weights"):
        std_kernels.forward_many(weights, gains[:2], scales, epss, dtype)


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not run here")
def test_forward_many_keeps_the_tables_a_cuda_graph_reads(monkeypatch, rng):
    """During a CUDA graph capture forward_many makes no plan (its tables' host-to-device copy cannot be
    captured: the caller standardises each weight itself), and a plan a capture used is never dropped to
    bound the cache, since every replay of the graph reads its tables. (The capture is simulated: the
    kernels run on CPU tensors here.)"""
    from nfnet_fast.kernels import scaled_std_weight as std_kernels

    def weights():
        return [torch.randn(8, 4, 1, 1, generator=rng)], [torch.ones(8)], [0.5], [1e-5]
    std_kernels._PLANS.clear()
    captured = weights()
    try:
        monkeypatch.setattr(std_kernels, "_capturing", lambda device: True)
        assert std_kernels.forward_many(*captured, torch.float32) is None and not std_kernels._PLANS
        monkeypatch.setattr(std_kernels, "_capturing", lambda device: False)
        first = std_kernels.forward_many(*captured, torch.float32)  # (a warm-up step before the capture)
        monkeypatch.setattr(std_kernels, "_capturing", lambda device: True)
        in_graph = std_kernels.forward_many(*captured, torch.float32)
        assert torch.equal(in_graph[0], first[0])
        (key,) = std_kernels._PLANS
        tables = [group[1] for group in std_kernels._PLANS[key][1]]
        monkeypatch.setattr(std_kernels, "_capturing", lambda device: False)
        others = [weights() for _ in range(2 * std_kernels._PLANS_MAX)]  # (kept: each at its own address)
        for other in others:
            std_kernels.forward_many(*other, torch.float32)
        assert key in std_kernels._PLANS
        assert all(a is b for a, b in zip([group[1] for group in std_kernels._PLANS[key][1]], tables))
        assert len(std_kernels._PLANS) <= std_kernels._PLANS_MAX + 1
    finally:
        std_kernels._PLANS.clear()
        std_kernels._CAPTURED.clear()


def _row_sum_layouts(job):
    """The compiled (TTGIR) layouts of a standardisation forward kernel's fp32 loads and row sums, for
    ``job`` = (kernel, fan-in, arch, out dtype, aligned): its one-weight kernel as the launcher runs it
    (PACKED; ``aligned`` compiles it as it was before, specialised on 16-divisible pointers and fan-in), or
    ``_std_fwd_many_kernel``. Runs in a spawned worker (TRITON_INTERPRET=0: the real compiler)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nfnet_fast.kernels import scaled_std_weight as std_kernels

    name, fan_in, arch, dtype, aligned = job
    cfg = dict(std_kernels.config(fan_in, gpu_config=True))
    warps = cfg.pop("num_warps")
    if name == "one":
        kernel = std_kernels._std_fwd_kernel
        types = dict(w_ptr="*fp32", gain_ptr="*fp32", out_ptr=f"*{dtype}", C_out="i32", K="i32", TAPS="i32",
                     scale="fp32", eps="fp32")
        constants = dict(cfg, PACKED=True)
        divisible = ("w_ptr", "gain_ptr", "out_ptr", "K") if aligned else ()
    else:
        kernel = std_kernels._std_fwd_many_kernel
        types = dict(table_ptr="*i64", coef_ptr="*fp32", out_ptr=f"*{dtype}")
        constants = cfg
        divisible = ("table_ptr", "coef_ptr", "out_ptr")  # (fresh tensors)
    names = [p.name for p in kernel.params]
    signature = {n: types.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps))
    ttgir = compiled.asm["ttgir"]
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.[^\n]+)$", ttgir, re.M))
    assert layouts, ttgir[:2000]
    lines = []
    for line in ttgir.splitlines():
        if '"tt.reduce"' in line or "}) : (tensor" in line or ("tt.load" in line and "x!tt.ptr<f32>" in line):
            line = re.sub(r"%[\w#]+", "%", re.sub(r" loc\(.*?\)$", "", line.strip()))
            lines.append(re.sub(r"#\w+", lambda m: layouts.get(m.group(0), m.group(0)), line))
    return lines


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its compiler, no GPU)")
def test_one_and_many_weight_kernels_sum_rows_alike():
    """A weight standardised alone (``_std_fwd_kernel``, a conv's own launch) and among others
    (``_std_fwd_many_kernel``, a training forward's weights standardised ahead) must get the same bits on a
    GPU, where Triton's row sums run in the order their layout gives, and the layout follows what the
    compiler knows of the loads' alignment: compiled for sm_90 and sm_80, every tile, each out dtype,
    both kernels' loads and reductions have the same layouts. (The interpreter, which the other tests run,
    sums alike whatever the layout.) The one-weight kernel as it was compiled before, specialised on
    aligned pointers and a 16-divisible fan-in, gets other layouts: the comparison can fail."""
    import os

    from nfnet_fast.kernels import aot

    cases = [(fan_in, arch, dtype) for fan_in in (64, 256, 1024, 2048, 4096, 4097)  # (every tile; 4097 loops)
             for arch, dtype in ((90, "bf16"), (90, "fp32"), (80, "bf16"), (80, "fp32"), (90, "fp16"))]
    jobs = [(name, *case, False) for case in cases for name in ("one", "many")] + [("one", 256, 90, "bf16", True)]
    rows = aot.map_compiling(_row_sum_layouts, jobs, max(1, min(4, os.cpu_count() or 1)))
    for i, case in enumerate(cases):
        one, many = rows[2 * i], rows[2 * i + 1]
        assert len(one) >= 4 and sum('"tt.reduce"' in line for line in one) >= 2, (case, one)
        assert one == many, case
    assert rows[-1] != rows[2 * cases.index((256, 90, "bf16"))]
