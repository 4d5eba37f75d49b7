"""Every convolution shape of the model at the benchmark size (eca_nfnet_l0, batch 256, 288 px, bf16,
channels_last on CUDA; tiny on a CPU): the fused conv against F.conv2d alone (cuDNN), cuDNN plus
its separate bias/activation/pool passes (what eager timm runs), and torch.compile of the same.

extra_info holds the cost model of each launch (FLOPs, the fewest bytes it must move) and the two
ceilings measured in the same run (a large bf16 GEMM's FLOP/s and a device-to-device copy's bytes/s),
so a GPU session reads prediction and measurement side by side (bench/report.py's conv table)."""
import collections

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import COMPILE, CUDA, DEVICE, MODEL, cached
from nfnet_fast import ops
from nfnet_fast.nn import ops_act

DTYPE = torch.bfloat16 if CUDA else torch.float32
BATCH, SIZE = (256, 288) if CUDA else (2, 64)


def _conv_shapes():
    """(Cin, H, W, Cout, k, stride, groups, act, pool, sums) of every conv the model runs, with how
    often it runs: traced on the meta device (no memory, no compute). H, W are the fused op's input
    size (a downsample conv's is its pool's input)."""
    model = timm.create_model(MODEL).eval().to("meta")
    seen = collections.Counter()

    def record(conv, act, pool, sums):
        def hook(m, args, out):
            c, h, w = args[0].shape[1:]
            seen[(c, h, w, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.groups, act, pool, sums)] += 1
        return hook

    for name, m in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if type(m).__name__ == "DownsampleAvg":  # the pool's input, then the 1x1 conv
            m.register_forward_hook(record(m.conv, None, not isinstance(m.pool, torch.nn.Identity), False))
        elif type(m).__name__.startswith("ScaledStdConv2d") and not name.endswith("downsample.conv"):
            act = "silu" if last in ("conv1", "conv2", "conv2b", "final_conv") or (
                name.startswith("stem.") and last != "conv4") else None
            sums = last == "final_conv" or (last == "conv3" and not name.startswith("stem."))  # ECA, head pool
            m.register_forward_hook(record(m, act, False, sums))
    with torch.no_grad():
        model(torch.empty(1, 3, SIZE, SIZE, device="meta"))
    return sorted(seen.items(), key=lambda kv: -kv[0][0] * kv[0][3])


SHAPES = _conv_shapes()
IMPLS = ["fused", "conv alone", "conv + separate passes"] + (["torch.compile"] if COMPILE else [])
# The 1x1 convs that read a block's pre-activation silu(x) * beta (conv1 and the downsample: no
# sums) also run with it made as they load x (pre_act): against "fused" plus the write of that
# pre-activation it saves (extra_info saves_bytes; bench/report.py's SiLU-prologue table).
PROLOGUE = "fused, silu prologue"


def _reads_block_input(shape) -> bool:
    c, h, w, cout, k, s, g, act, pool, sums = shape[0]
    return k == 1 and not sums


def _conv_params():
    return [pytest.param(shape, impl, id=f"{_id(shape)}-{impl}") for shape in SHAPES
            for impl in IMPLS + [PROLOGUE] * _reads_block_input(shape)]


def _id(shape):
    c, h, w, cout, k, s, g, act, pool, sums = shape[0]
    return (f"{c}x{h}x{w}-{cout}-k{k}s{s}g{g}" + (f"-{act}" if act else "") + ("-pool" if pool else "")
            + ("-sums" if sums else "") + f"-x{shape[1]}")


def _ceilings():
    """Measured once per run: bf16 GEMM FLOP/s (8192^3 on CUDA) and copy bytes/s (1 GiB on CUDA)."""
    from nfnet_fast.benchmark import measure

    n = 8192 if CUDA else 256
    a, b = (torch.randn(n, n, device=DEVICE, dtype=DTYPE) for _ in range(2))
    gemm_s = min(measure(lambda _: a @ b, None, 10, 3, DEVICE))
    src = torch.randn((1 << 29) if CUDA else (1 << 20), device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    copy_s = min(measure(lambda _: dst.copy_(src), None, 10, 3, DEVICE))
    return dict(gemm_flops=2 * n ** 3 / gemm_s, copy_bytes=2 * src.numel() * src.element_size() / copy_s)


def _case(shape):
    (c, h, w, cout, k, s, g, act, pool, sums), count = shape

    def make():
        gen = torch.Generator(device=DEVICE).manual_seed(c * 7 + cout)
        x = torch.randn(BATCH, c, h, w, device=DEVICE, generator=gen).to(DTYPE)
        x = x.contiguous(memory_format=torch.channels_last)
        wt = (torch.randn(cout, c // g, k, k, device=DEVICE, generator=gen) * (c // g * k * k) ** -0.5).to(DTYPE)
        bias = 0.1 * torch.randn(cout, device=DEVICE, generator=gen).to(DTYPE)
        return x, wt, bias
    return cached(("conv", shape[0]), make)


def _unfused(x, wt, bias, k, s, g, act, pool, sums):
    if pool:
        x = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
    out = F.conv2d(x, wt, bias, s, k // 2, 1, g)
    if act is not None:
        out = ops_act(act)(out)
    return (out, out.float().sum((2, 3))) if sums else out


@pytest.mark.parametrize("shape, impl", _conv_params())
def test_conv(benchmark, run_timed, shape, impl):
    (c, h, w, cout, k, s, g, act, pool, sums), count = shape
    x, wt, bias = _case(shape)
    if impl in ("fused", PROLOGUE):
        pre = dict(pre_act=True, pre_beta=0.9) if impl == PROLOGUE else {}
        fn = lambda: ops.fused_conv(x, wt, bias, stride=s, padding=k // 2, groups=g, act=act, pool=pool,  # noqa: E731
                                    want_sums=sums, **pre)
    elif impl == "conv alone":
        xin = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False) if pool else x
        fn = lambda: F.conv2d(xin, wt, None, s, k // 2, 1, g)  # noqa: E731
    elif impl == "conv + separate passes":
        fn = lambda: _unfused(x, wt, bias, k, s, g, act, pool, sums)  # noqa: E731
    else:
        compiled = cached(("conv-compiled", shape[0]), lambda: torch.compile(_unfused))
        fn = lambda: compiled(x, wt, bias, k, s, g, act, pool, sums)  # noqa: E731
    from nfnet_fast.kernels.fused_conv import cost  # (pure Python: needs no GPU)

    model = cost(BATCH, c, h, w, cout, k, stride=s, groups=g, pool=pool, dtype_bytes=x.element_size(),
                 want_sums=sums)
    ceilings = cached(("ceilings",), _ceilings)
    with torch.inference_mode():
        fn()  # compile / autotune outside the timing
        median = run_timed(fn)
    predicted = max(model["flops"] / ceilings["gemm_flops"], model["bytes"] / ceilings["copy_bytes"])
    if impl in ("fused", PROLOGUE):  # which candidate the autotuning picked (a Triton tile, or "aten": cuDNN + passes)
        from nfnet_fast.kernels.fused_conv import tuned_choice
        benchmark.extra_info["pick"] = tuned_choice(x, wt.shape, s, k // 2, g, pool, sums,
                                                    pre_act=impl == PROLOGUE) or "heuristic"
    if impl == PROLOGUE:  # the pre-activation write the prologue saves (eca_residual's a_next)
        benchmark.extra_info["saves_bytes"] = x.numel() * x.element_size()
    benchmark.extra_info.update(conv=_id(shape), impl=impl, runs_per_forward=count, flops=model["flops"],
                                bytes=model["bytes"], tflops=model["flops"] / median / 1e12,
                                gemm_tflops=ceilings["gemm_flops"] / 1e12, copy_gbps=ceilings["copy_bytes"] / 1e9,
                                predicted_s=predicted, dtype=str(DTYPE), batch=BATCH)


BACKWARD_IMPLS = ["fused", "conv + separate passes"]


@pytest.mark.parametrize("impl", BACKWARD_IMPLS)
@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0][7] is not None], ids=_id)
def test_conv_backward(benchmark, run_timed, shape, impl):
    """The backward of each conv that carries an activation, as a training step runs it: the fused
    op's (one op: the conv recomputed with the activation's derivative and the bias gradient in its
    epilogue, then cuDNN's data and weight gradients) against autograd through F.conv2d and the
    activation (cuDNN's three gradients, aten's activation backward: eager timm's). The cost model:
    the fused backward does the forward's FLOPs three times (recompute, data, weight gradient)."""
    (c, h, w, cout, k, s, g, act, pool, sums), count = shape
    leaves = [t.detach().requires_grad_() for t in _case(shape)]
    if impl == "fused":
        out = ops.fused_conv(*leaves, stride=s, padding=k // 2, groups=g, act=act, pool=pool, want_sums=sums)
    else:
        out = _unfused(*leaves, k, s, g, act, pool, sums)
    out = out[0] if sums else out
    grad = torch.randn_like(out)

    def step():
        torch.autograd.grad(out, leaves, grad, retain_graph=True)
    step()  # autotune the recompute outside the timing
    median = run_timed(step)
    from nfnet_fast.kernels.fused_conv import cost

    model = cost(BATCH, c, h, w, cout, k, stride=s, groups=g, pool=pool, dtype_bytes=out.element_size())
    benchmark.extra_info.update(conv_backward=_id(shape), impl=impl, runs_per_forward=count,
                                flops=3 * model["flops"], tflops=3 * model["flops"] / median / 1e12,
                                dtype=str(DTYPE), batch=BATCH)
