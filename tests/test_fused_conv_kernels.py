"""kernels/fused_conv.py at the kernel level: the launcher against its PyTorch reference (CPU tensors
through the Triton interpreter when no GPU is present), the launch configurations against the
ahead-of-time compile matrix, and that matrix compiled for sm_90 and sm_80 (no GPU needed):
no spills, shared memory inside the limit, tensor-core instructions where they belong."""
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_rel_close, counted_work, poison_freed_memory

pytest.importorskip("triton")
from nfnet_fast.kernels import fused_conv as fc  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 math stored in the activation dtype (docs/design.md section 3): a couple of units in the last place
# of the storage type, relative to the largest value. The sums stay fp32 in every dtype: only the
# order of the additions differs from the reference.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
SUMS_TOL = 1e-5
# bf16 tl.dot is wrong under the interpreter: bf16 is checked by the AOT compile here and on a GPU.
DTYPES = [torch.float32, torch.float16]


def _spec(x, w, b=None, *, stride=1, padding=0, groups=1, act=None, act_gain=1.0, pool=False, want_sums=False,
          pre_act=False, pre_beta=1.0, **_):
    """What the kernels compute, in fp32: the input's pre-activation silu(x) * pre_beta (pre_act)
    and its pool, each rounded to x's dtype as the unfused passes store them, and the weight rounded
    to x's dtype (what the kernel multiplies), conv + bias + activation * act_gain in fp32, the
    output rounded to x's dtype, the sums from the fp32 values. (The reference backend,
    nfnet_fast._reference.fused_conv, is timm's own calls; the ops-level tests compare against it.)"""
    dt = x.dtype
    xf = x.float()
    if pre_act:
        xf = (F.silu(xf) * pre_beta).to(dt).float()
    if pool:
        xf = F.avg_pool2d(xf, 2, 2, ceil_mode=True, count_include_pad=False).to(dt).float()
    pt, pb, pl, pr = fc.normalize_padding(padding)
    y = F.conv2d(F.pad(xf, (pl, pr, pt, pb)), w.detach().to(dt).float(), None, stride, 0, 1, groups)
    if b is not None:
        y = y + b.detach().float().view(1, -1, 1, 1)
    y = {None: lambda t: t, "silu": F.silu, "relu": F.relu, "gelu": F.gelu}[act](y) * act_gain
    out = y.to(dt).contiguous(memory_format=torch.channels_last)
    return (out, y.sum((2, 3))) if want_sums else out


def _case(rng, x_shape, w_shape, dtype, bias=True, channels_last=True):
    """Random x (N, Cin, H, W) in ``dtype``, weight scaled to keep outputs O(1), bias or None."""
    x = torch.randn(x_shape, generator=rng)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fan_in = w_shape[1] * w_shape[2] * w_shape[3]
    w = torch.randn(w_shape, generator=rng) * (1.5 / fan_in ** 0.5) + 0.05 * torch.randn((), generator=rng)
    b = 0.5 * torch.randn(w_shape[0], generator=rng) if bias else None
    return x.to(DEV, dtype), w.to(DEV), None if b is None else b.to(DEV)


def _check(x, w, b, what, **kw):
    if not kw.get("gpu_config") and "config" not in kw and x.device.type == "cpu":
        kw["config"] = fc.SMALL_TILE  # many row and column tiles even on small shapes
    got = fc.fused_conv(x, w, b, **kw)
    ref = _spec(x, w, b, **kw)
    out, sums = got if kw.get("want_sums") else (got, None)
    expect, expect_sums = ref if kw.get("want_sums") else (ref, None)
    assert out.dtype == x.dtype, f"{what}: dtype {out.dtype}"
    assert out.is_contiguous(memory_format=torch.channels_last), f"{what}: output not channels_last"
    assert_rel_close(out, expect, TOL[x.dtype], what)
    if sums is not None:
        assert sums.dtype == torch.float32 and sums.shape == (x.shape[0], w.shape[0]), what
        assert_rel_close(sums, expect_sums, SUMS_TOL, f"{what} sums")
    return got


# (x shape, weight shape, stride, padding, groups, act, pool, want_sums): odd channel counts, odd H
# and W, batch 1, groups 1/2/3 with odd group widths, strides 1 and 2, every activation.
CASES = {
    "1x1 silu sums": ((2, 21, 9, 11), (37, 21, 1, 1), 1, 0, 1, "silu", False, True),
    "1x1 batch1 none": ((1, 19, 7, 5), (24, 19, 1, 1), 1, 0, 1, None, False, False),
    "1x1 pool gelu sums": ((2, 19, 7, 9), (23, 19, 1, 1), 1, 0, 1, "gelu", True, True),
    "1x1 pool relu odd": ((3, 33, 5, 3), (17, 33, 1, 1), 1, 0, 1, "relu", True, False),
    "1x1 pool 1x1 image": ((2, 9, 1, 1), (11, 9, 1, 1), 1, 0, 1, "silu", True, True),
    "1x1 stride2 g2": ((2, 10, 7, 9), (14, 5, 1, 1), 2, 0, 2, "relu", False, True),
    "3x3 g1 s1 silu sums": ((2, 13, 9, 7), (22, 13, 3, 3), 1, 1, 1, "silu", False, True),
    "3x3 g2 s2 relu sums": ((1, 36, 11, 9), (26, 18, 3, 3), 2, 1, 2, "relu", False, True),
    "3x3 g3 width5 gelu": ((2, 15, 7, 9), (21, 5, 3, 3), 1, 1, 3, "gelu", False, False),
    "3x3 g3 width7 s2 sums": ((1, 21, 9, 9), (12, 7, 3, 3), 2, 1, 3, None, False, True),
    "3x3 stem cin3 s2": ((1, 3, 11, 13), (16, 3, 3, 3), 2, 1, 1, "silu", False, False),
    "3x3 same pad s2": ((2, 12, 8, 10), (16, 12, 3, 3), 2, (0, 1, 0, 1), 1, "gelu", False, True),
    "3x3 no pad": ((1, 17, 6, 5), (9, 17, 3, 3), 1, 0, 1, "silu", False, True),
    "5x5 pad2": ((1, 6, 8, 7), (10, 6, 5, 5), 1, 2, 1, "silu", False, False),
    "1x3 asym pad": ((1, 8, 5, 6), (7, 8, 1, 3), 1, (0, 0, 1, 1), 1, None, False, True),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_fused_conv_matches_reference(name, dtype, rng):
    x_shape, w_shape, stride, padding, groups, act, pool, sums = CASES[name]
    x, w, b = _case(rng, x_shape, w_shape, dtype)
    _check(x, w, b, f"{name} {dtype}", stride=stride, padding=padding, groups=groups, act=act, pool=pool,
           want_sums=sums)


def _spy_1x1_launches(monkeypatch, arg: str) -> list:
    """The list that each later launch of the 1x1 kernel appends its keyword ``arg`` to."""
    seen, kernel = [], fc._conv1x1_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs[arg])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(fc, "_conv1x1_kernel", Spy())
    return seen


# The SiLU prologue (pre_act): the 1x1 kernel with and without the pool (clipped ceil-mode windows,
# a 1x1 image), small tiles and each GPU tile; and the launches it is not compiled for, which take a
# silu_scale pass first: a 3x3 conv, a 1x1 that also wants the sums.
# (x shape, weight shape, act, pool, want_sums, GPU tile or None, the prologue kernel runs)
PRE_ACT_CASES = {
    "1x1 silu": ((2, 21, 9, 11), (37, 21, 1, 1), "silu", False, False, None, True),
    "1x1 pool odd": ((3, 19, 7, 9), (23, 19, 1, 1), None, True, False, None, True),
    "1x1 pool 1x1 image": ((2, 9, 1, 1), (11, 9, 1, 1), "silu", True, False, None, True),
    "1x1 narrow tile": ((2, 64, 13, 11), (48, 64, 1, 1), "silu", False, False, "GEMM_NARROW", True),
    "1x1 wide tile": ((1, 32, 9, 15), (144, 32, 1, 1), "gelu", False, False, "GEMM_WIDE", True),
    "1x1 generic tile": ((2, 40, 13, 11), (50, 40, 1, 1), "silu", False, False, "GEMM_GENERIC", True),
    "1x1 pool narrow tile": ((3, 32, 19, 21), (48, 32, 1, 1), None, True, False, "GEMM_POOL_NARROW", True),
    "1x1 pool wide tile": ((2, 16, 11, 13), (160, 16, 1, 1), "relu", True, False, "GEMM_POOL_WIDE", True),
    "1x1 pool generic tile": ((3, 40, 19, 21), (24, 40, 1, 1), None, True, False, "GEMM_POOL_GENERIC", True),
    "1x1 pool sums (silu_scale first)": ((2, 19, 7, 9), (23, 19, 1, 1), "silu", True, True, None, False),
    "3x3 g2 (silu_scale first)": ((2, 10, 7, 9), (14, 5, 3, 3), "silu", False, False, None, False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(PRE_ACT_CASES))
def test_pre_act_prologue(name, dtype, rng, monkeypatch):
    """conv(silu(x) * beta) with the pre-activation made as the kernel loads x (PRE_ACT, where the
    kernel has it): the same numbers as silu_scale's pass followed by the conv (exactly, under the
    interpreter: the same fp32 math, rounded where the pass would store it)."""
    x_shape, w_shape, act, pool, sums, tile, prologue = PRE_ACT_CASES[name]
    launched = _spy_1x1_launches(monkeypatch, "PRE_ACT")
    x, w, b = _case(rng, x_shape, w_shape, dtype)
    beta = float(torch.empty(()).uniform_(0.5, 1.5, generator=rng))
    padding = 1 if w_shape[2] == 3 else 0
    groups = x_shape[1] // w_shape[1]
    kw = dict(padding=padding, groups=groups, act=act, pool=pool, want_sums=sums)
    if tile is not None:
        kw["gpu_config"] = True
        assert fc.config_for(x, w, groups, 1, padding, pool, gpu_config=True) == getattr(fc, tile)
    got = _check(x, w, b, f"{name} {dtype}", pre_act=True, pre_beta=beta, **kw)
    assert launched == ([True] if prologue else [False] * (w_shape[2] == 1)), launched
    if tile is None:
        kw["config"] = fc.SMALL_TILE
    unfused = fc.fused_conv(fc._silu.forward(x, beta), w, b, **kw)
    got, unfused = (got, unfused) if sums else ((got,), (unfused,))
    if x.device.type == "cpu":  # (a GPU compile may contract the SiLU's multiplies differently)
        assert torch.equal(got[0], unfused[0]), f"{name}: the prologue differs from silu_scale + conv"
    assert_rel_close(got[0], unfused[0], TOL[dtype], name)
    if sums:
        assert_rel_close(got[1], unfused[1], SUMS_TOL, f"{name} sums")


def test_no_bias_nchw_input_packed_weight(rng):
    """bias None, an NCHW input (converted by the launcher), a weight packed ahead of time."""
    x, w, _ = _case(rng, (2, 10, 5, 7), (12, 5, 3, 3), torch.float32, bias=False, channels_last=False)
    kw = dict(stride=1, padding=1, groups=2, act="silu", want_sums=True)
    out, sums = fc.fused_conv(x, w, None, packed_weight=fc.pack_weight(w, x.dtype), **kw)
    expect, expect_sums = _spec(x, w, None, **kw)
    assert_rel_close(out, expect, TOL[torch.float32], "no bias")
    assert_rel_close(sums, expect_sums, SUMS_TOL, "no bias sums")


# The GPU tiles (128-row tiles, BLOCK_K 32/64, fp32 K steps of 16 or 8, the generic 64-row tiles)
# on CPU tensors: images that span several row tiles and tiles that span several images (the
# sums' slots), partial column tiles, each K walk, and the tile the launcher picks for each.
GPU_CASES = {
    "1x1 narrow, 143-pixel images": ((2, 64, 13, 11), (48, 64, 1, 1), 1, 0, 1, "silu", False, "GEMM_NARROW"),
    "1x1 wide": ((1, 32, 9, 15), (144, 32, 1, 1), 1, 0, 1, "gelu", False, "GEMM_WIDE"),
    "1x1 pool narrow, 110-pixel images": ((3, 32, 19, 21), (48, 32, 1, 1), 1, 0, 1, None, True, "GEMM_POOL_NARROW"),
    "1x1 pool wide": ((2, 16, 11, 13), (160, 16, 1, 1), 1, 0, 1, "relu", True, "GEMM_POOL_WIDE"),
    "1x1 generic": ((2, 70, 13, 11), (50, 70, 1, 1), 1, 0, 1, "silu", False, "GEMM_GENERIC"),
    "1x1 pool generic": ((3, 40, 19, 21), (24, 40, 1, 1), 1, 0, 1, None, True, "GEMM_POOL_GENERIC"),
    "3x3 g2 width 64": ((2, 128, 9, 9), (128, 64, 3, 3), 1, 1, 2, "silu", False, "CONV_K64_N64"),
    "3x3 128 wide s2": ((1, 64, 9, 11), (128, 64, 3, 3), 2, 1, 1, "relu", False, "CONV_K64_N128"),
    "3x3 width 32 s2": ((1, 32, 17, 19), (64, 32, 3, 3), 2, 1, 1, "gelu", False, "CONV_K32_N64"),
    "3x3 stem flat": ((2, 3, 15, 17), (16, 3, 3, 3), 2, 1, 1, "silu", False, "CONV_FLAT"),
    "3x3 flat width 16": ((1, 16, 16, 17), (40, 16, 3, 3), 1, 1, 1, None, False, "CONV_FLAT"),
    "3x3 generic g2 width 40": ((1, 80, 9, 9), (36, 40, 3, 3), 1, 1, 2, "silu", False, "CONV_GENERIC"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_config_on_cpu(name, dtype, rng):
    x_shape, w_shape, stride, padding, groups, act, pool, tile = GPU_CASES[name]
    x, w, b = _case(rng, x_shape, w_shape, dtype)
    assert fc.config_for(x, w, groups, stride, padding, pool, gpu_config=True) == getattr(fc, tile)
    _check(x, w, b, f"{name} {dtype} {tile}", stride=stride, padding=padding, groups=groups, act=act, pool=pool,
           want_sums=True, gpu_config=True)


def test_aligned_only_where_checked(rng, monkeypatch):
    """ALIGNED (compiler hints) is dropped when the tensors do not have it, even if a config asks
    for it: a channels_last x starting 2 bytes into its storage runs without hints, correctly."""
    seen = _spy_1x1_launches(monkeypatch, "ALIGNED")
    n, c, h, w = 1, 32, 5, 7
    buf = torch.randn(1 + n * h * w * c, generator=rng).to(DEV, torch.float16)
    x = buf[1:].view(n, h, w, c).permute(0, 3, 1, 2)  # channels_last-contiguous, 2 bytes off
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 == 2
    _, wt, b = _case(rng, (1, 32, 1, 1), (16, 32, 1, 1), torch.float16)
    out = fc.fused_conv(x, wt, b, config=fc.GEMM_NARROW)
    assert_rel_close(out, _spec(x, wt, b), TOL[torch.float16], "unaligned x")
    fc.fused_conv(x.contiguous(), wt, b, config=fc.GEMM_NARROW)  # a fresh copy is aligned
    assert seen == [False, True]


@pytest.mark.parametrize("flat", [False, True])
def test_both_k_walks_on_one_shape(flat, rng):
    """The tap-major and the flat K walk give the same numbers (group width 20: one full and one
    partial 16-channel block per tap in the tap-major walk)."""
    x, w, b = _case(rng, (1, 40, 7, 6), (18, 20, 3, 3), torch.float32)
    cfg = dict(fc.SMALL_TILE, FLAT_K=flat)
    _check(x, w, b, f"flat={flat}", stride=1, padding=1, groups=2, act="silu", want_sums=True, config=cfg)


def test_sums_are_deterministic(rng):
    """No atomics: the sums are the same bits from run to run."""
    x, w, b = _case(rng, (3, 24, 9, 9), (20, 24, 1, 1), torch.float32)
    first = fc.fused_conv(x, w, b, want_sums=True)[1]
    assert torch.equal(first, fc.fused_conv(x, w, b, want_sums=True)[1])


@pytest.mark.parametrize("shape", ["1x1", "3x3 g2 s2", "1x1 pool"])
def test_sums_only_writes_no_output(shape, rng, monkeypatch):
    """want_out=False: the same sums, to the bit, as with the output (the same tiles, the store
    skipped), and no output-sized tensor is allocated (the final conv's training step never holds
    it). In the vendor path too."""
    x_shape, w_shape, kw = {"1x1": ((2, 24, 7, 9), (40, 24, 1, 1), {}),
                            "3x3 g2 s2": ((2, 16, 9, 7), (24, 8, 3, 3), dict(stride=2, padding=1, groups=2)),
                            "1x1 pool": ((3, 24, 7, 9), (32, 24, 1, 1), dict(pool=True))}[shape]
    x, w, b = _case(rng, x_shape, w_shape, torch.float32)
    kw.update(act="silu", act_gain=1.3, want_sums=True)
    out, sums = fc.fused_conv(x, w, b, **kw)
    sizes = []

    def counted(alloc):
        def allocate(*args, **kwargs):
            t = alloc(*args, **kwargs)
            sizes.append(t.numel())
            return t
        return allocate
    with monkeypatch.context() as patch:  # (the allocations the launcher makes: the partial rows at least)
        for alloc in ("empty", "zeros"):
            patch.setattr(torch, alloc, counted(getattr(torch, alloc)))
        got = fc.fused_conv(x, w, b, want_out=False, **kw)
    assert torch.equal(got, sums), shape
    assert sizes and max(sizes) < out.numel(), (sizes, out.numel())
    vendor_args = (x, w, b, kw.get("stride", 1), fc.normalize_padding(kw.get("padding", 0)), kw.get("groups", 1),
                   fc._act_index("silu"), 1.3, kw.get("pool", False), True)
    _, vendor_sums = fc._vendor_conv(*vendor_args)
    vendor_only = fc._vendor_conv(*vendor_args, want_out=False)
    assert torch.equal(vendor_only, vendor_sums)
    assert_rel_close(vendor_sums, sums, SUMS_TOL, f"{shape} vendor sums")


@pytest.mark.parametrize("kwargs", [dict(), dict(want_sums=True, backward=True, grad_sums=torch.ones(2, 8))])
def test_sums_only_needs_sums_and_a_forward(kwargs):
    x, w = torch.ones(2, 4, 5, 5), torch.ones(8, 4, 1, 1)
    with pytest.raises(ValueError, match="want_out=False needs want_sums=True"):
        fc.fused_conv(x, w, want_out=False, **kwargs)


def test_sum_slots_cover_every_image():
    """S is the most row tiles an image touches, and no image needs more."""
    for hw in (1, 7, 81, 127, 128, 129, 324, 1296):
        for tile_m in (16, 32, 128):
            s = fc._sum_slots(hw, tile_m)
            worst = max(((n + 1) * hw - 1) // tile_m - (n * hw) // tile_m + 1 for n in range(3 * tile_m))
            assert worst <= s <= worst + 1, (hw, tile_m, s, worst)


def test_argument_errors(rng):
    x, w, b = _case(rng, (1, 6, 5, 5), (4, 6, 3, 3), torch.float32)
    with pytest.raises(ValueError, match="pool=True"):
        fc.fused_conv(x, w, b, padding=1, pool=True)
    with pytest.raises(ValueError, match="act"):
        fc.fused_conv(x, w, b, act="tanh")
    with pytest.raises(ValueError, match="groups"):
        fc.fused_conv(x, w, b, groups=4)
    with pytest.raises(ValueError, match="padding"):
        fc.fused_conv(x, w, b, padding=(1, 2, 3))
    with pytest.raises(ValueError, match="too small"):
        fc.fused_conv(x[:, :, :1, :1], w, b)
    with pytest.raises(ValueError, match="pre_act=True is a forward prologue"):
        fc.fused_conv(x, w, b, padding=1, act="silu", pre_act=True, backward=True)


def test_cost_model():
    c = fc.cost(256, 384, 18, 18, 384, 3, stride=1, groups=6, dtype_bytes=2)
    assert c["flops"] == 2 * 256 * 18 * 18 * 384 * 64 * 9
    assert c["bytes"] == 2 * (256 * 384 * 18 * 18 * 2) + 2 * 384 * 64 * 9 + 4 * 384
    p = fc.cost(256, 512, 18, 18, 1536, 1, pool=True, dtype_bytes=2, want_sums=True)
    assert p["flops"] == 2 * 256 * 9 * 9 * 512 * 1536
    assert p["bytes"] == 2 * (256 * 512 * 324 + 256 * 1536 * 81 + 512 * 1536) + 4 * 1536 + 4 * 256 * 1536


# ---------------------------------------------------------------------------------------------
# launch configurations and the AOT matrix

# eca_nfnet_l0's convolutions (docs/design.md section 2): (Cin, Cout, k, stride, groups, pool, want_sums).
L0_CONVS = [
    (3, 16, 3, 2, 1, False, False), (16, 32, 3, 1, 1, False, False), (32, 64, 3, 1, 1, False, False),
    (64, 128, 3, 2, 1, False, False),                                       # stem
    (128, 256, 1, 1, 1, False, False), (256, 512, 1, 1, 1, True, False),    # downsample shortcuts
    (512, 1536, 1, 1, 1, True, False), (1536, 1536, 1, 1, 1, True, False),
    (128, 64, 1, 1, 1, False, False), (256, 64, 1, 1, 1, False, False),     # conv1
    (256, 128, 1, 1, 1, False, False), (512, 128, 1, 1, 1, False, False),
    (512, 384, 1, 1, 1, False, False), (1536, 384, 1, 1, 1, False, False),
    (64, 64, 3, 1, 1, False, False), (128, 128, 3, 2, 2, False, False),     # conv2 / conv2b
    (128, 128, 3, 1, 2, False, False), (384, 384, 3, 2, 6, False, False), (384, 384, 3, 1, 6, False, False),
    (64, 256, 1, 1, 1, False, True), (128, 512, 1, 1, 1, False, True),      # conv3 (+ ECA sums)
    (384, 1536, 1, 1, 1, False, True),
    (1536, 2304, 1, 1, 1, False, True),                                     # final_conv (+ pool sums)
]


@pytest.mark.parametrize("conv", L0_CONVS, ids=lambda c: "{}-{}-k{}s{}g{}{}{}".format(
    *c[:5], "-pool" if c[5] else "", "-sums" if c[6] else ""))
def test_l0_launches_are_in_the_aot_matrix(conv):
    """Every launch eca_nfnet_l0 makes on a GPU is a configuration the AOT matrix compiles: the
    forward's (the 1x1s without sums also with the SiLU prologue; each also storing its pre-activation,
    HAS_Z, in z_tile's tile), and (convs without the pool) the backward's recompute, which always sums."""
    cin, cout, k, stride, groups, pool, sums = conv
    x = torch.empty(1, cin, 8, 8)
    w = torch.empty(cout, cin // groups, k, k)
    cfg = fc.config_for(x, w, groups, stride, k // 2, pool, gpu_config=True)
    spec = fc.AOT[0] if k == 1 else fc.AOT[1]
    for pre_act in ((False, True) if k == 1 and not sums else (False,) if k == 1 else (None,)):
        for has_z in (False, True):  # (with z_out: a training conv keeping its pre-activation)
            want = dict(fc.z_tile(cfg) if has_z else cfg, SUMS=sums, BWD=False, HAS_Z=has_z,
                        **(dict(POOL=pool, PRE_ACT=pre_act) if k == 1 else dict(KH=k, KW=k)))
            assert any(c == want for c in spec.configs), want
    if not pool:
        want = dict(fc.bwd_tile(cfg), SUMS=True, BWD=True, HAS_Z=False,
                    **(dict(POOL=False, PRE_ACT=False) if k == 1 else dict(KH=k, KW=k)))
        assert any(c == want for c in spec.configs), want


def test_aot_matrix_covers_every_kernel():
    kernels = {name for name, obj in vars(fc).items() if name.endswith("_kernel") and hasattr(obj, "arg_names")}
    assert kernels == {s.kernel.__name__ for s in fc.AOT}


def _aot_row(job):
    """One AOT job through kernels/aot.py (registers, spills, shared memory), plus which matrix
    instructions its PTX holds (the same compile again: a hit in Triton's cache)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nfnet_fast.kernels import aot

    row = aot.compile_one(job)
    if "error" in row:
        return row
    spec = fc.AOT[job["spec_index"]]
    config = dict(spec.configs[job["config_index"]])
    num_warps = config.pop("num_warps")
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(spec.kernel.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = config[p.name]
            continue
        signature[p.name] = aot._arg_type(spec, p.name).replace("*T", "*" + job["dtype"])
        if job["aligned"] and p.name in spec.aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(spec.kernel, signature, constexprs, attrs),
                       target=GPUTarget("cuda", job["arch"], 32), options=dict(num_warps=num_warps))
    ptx = k.asm["ptx"]
    row.update(wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx, cp_async="cp.async" in ptx)
    return row


def _aot_subset():
    """Every configuration of the matrix, each compiled four ways: bf16 for sm_90 and sm_80 with
    the 16-divisibility a typical launch sees (the tensor-core paths), and fp32 for sm_90 and sm_80
    with no divisibility (the FMA path at its worst register pressure: sm_80's spilled where sm_90's
    did not). The whole matrix (three dtypes, aligned or not) is ``python bench/triton_resources.py``,
    its table bench/triton_resources.md."""
    from nfnet_fast.kernels import aot

    picked = {("bf16", 90, True), ("bf16", 80, True), ("fp32", 90, False), ("fp32", 80, False)}
    return [j for j in aot.jobs(ops=("fused_conv",)) if (j["dtype"], j["arch"], j["aligned"]) in picked]


@pytest.fixture(scope="module")
def aot_rows():
    from nfnet_fast.kernels import aot

    return aot.map_compiling(_aot_row, _aot_subset(), max(1, min(4, os.cpu_count() or 1)))


def test_aot_compiles_without_spills_within_shared_memory(aot_rows):
    from nfnet_fast.kernels import aot

    assert len(aot_rows) == sum(len(s.configs) for s in fc.AOT) * 4
    assert aot.problems(aot_rows) == []


def test_aot_tensor_cores(aot_rows):
    """16-bit GEMMs run on wgmma (sm_90) / mma.sync (sm_80), pipelined with cp.async; fp32 runs IEEE
    FMAs: no tensor-core instruction at all (so no TF32), nor does the kept z's elementwise gradient pass."""
    for r in aot_rows:
        what = f"{r['kernel']} [{r['config']}] {r['dtype']} sm_{r['arch']}"
        if r["dtype"] == "fp32" or r["kernel"] == "_z_grad_kernel":  # (fp32, or an elementwise pass)
            assert not (r["wgmma"] or r["mma_sync"]), what
        elif r["arch"] == 90:
            assert r["wgmma"] and r["cp_async"], what
        else:
            assert r["mma_sync"] and r["cp_async"], what


# ---------------------------------------------------------------------------------------------
# GPU only: bf16 (wrong under the interpreter), the tiles eca_nfnet_l0 launches, at sizes where
# every row/column tile and the pipeline run in earnest.

GPU_TOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", [
    ((8, 1536, 18, 18), (384, 1536, 1, 1), 1, 0, 1, "silu", False),   # conv1, GEMM_WIDE
    ((8, 384, 18, 18), (1536, 384, 1, 1), 1, 0, 1, None, False),      # conv3 (+ sums)
    ((8, 128, 36, 36), (64, 128, 1, 1), 1, 0, 1, "silu", False),      # GEMM_NARROW
    ((8, 512, 36, 36), (1536, 512, 1, 1), 1, 0, 1, None, True),       # downsample, GEMM_POOL_WIDE
    ((8, 384, 18, 18), (384, 64, 3, 3), 1, 1, 6, "silu", False),      # conv2b g6, CONV_K64_N64
    ((8, 384, 36, 36), (384, 64, 3, 3), 2, 1, 6, "silu", False),      # conv2 s2 g6
    ((4, 64, 72, 72), (128, 64, 3, 3), 2, 1, 1, None, False),         # stem s2, CONV_K64_N128
    ((4, 32, 72, 72), (64, 32, 3, 3), 1, 1, 1, "silu", False),        # stem, CONV_K32_N64
    ((4, 3, 96, 96), (16, 3, 3, 3), 2, 1, 1, "silu", False),          # stem, CONV_FLAT
    ((4, 70, 17, 19), (50, 70, 3, 3), 1, 1, 1, "gelu", False),        # CONV_GENERIC
], ids=lambda c: f"{c[0]}-{c[1]}-s{c[2]}-g{c[4]}{'-pool' if c[6] else ''}")
@pytest.mark.parametrize("vendor", [False, None], ids=["triton", "tuned"])
def test_gpu_fused_conv(case, dtype, vendor, rng):
    """vendor=False: the Triton tiles alone, whose sums are of the fp32 values (1e-4). None (the
    default): 16-bit tuning may pick the vendor candidate, aten's ops as timm eager runs them under
    autocast (the bias rounded to the dtype, the sums of the rounded output), so the sums are
    within the output's tolerance; the H100 picked it for two of these shapes (2026-11-27)."""
    x_shape, w_shape, stride, padding, groups, act, pool = case
    x, w, b = _case(rng, x_shape, w_shape, dtype)
    kw = dict(stride=stride, padding=padding, groups=groups, act=act, pool=pool, want_sums=True, vendor=vendor)
    out, sums = fc.fused_conv(x, w, b, **kw)
    expect, expect_sums = _spec(x, w, b, **kw)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert_rel_close(out, expect, GPU_TOL[dtype], f"{case} {dtype}")
    assert_rel_close(sums, expect_sums, 1e-4 if vendor is False else max(1e-4, GPU_TOL[dtype]), f"{case} {dtype} sums")
    assert torch.equal(sums, fc.fused_conv(x, w, b, **kw)[1]), "sums not deterministic"
    if vendor is None and dtype != torch.float32:  # the vendor candidate itself, whichever the tuning took
        v_out, v_sums = fc._vendor_conv(x, w, b, stride, fc.normalize_padding(padding), groups, fc._act_index(act),
                                        1.0, pool, True)
        assert_rel_close(v_out, expect, GPU_TOL[dtype], f"{case} {dtype} vendor")
        assert_rel_close(v_sums, expect_sums, GPU_TOL[dtype], f"{case} {dtype} vendor sums")


@pytest.mark.parametrize("act", ["gelu", "relu", "silu"])
def test_act_gain(act, rng):
    """The activation times a gain in the epilogue (timm's GammaAct of the dm_ models)."""
    x, w, b = _case(rng, (2, 16, 7, 5), (24, 8, 3, 3), torch.float32)
    _check(x, w, b, f"act_gain {act}", stride=1, padding=(1, 1, 0, 2), groups=2, act=act, act_gain=1.7015043497085571,
           want_sums=True)


# --- autotuning: among the verified tiles, timed once per shape, cached in a file -----------------

def _candidate_grid():
    """Every (kind, group width, outputs per group, pool, aligned) class the launcher meets."""
    for aligned in (True, False):
        for cout in (64, 128, 2304):
            yield "1x1", 256, cout, False, aligned
            yield "1x1", 256, cout, True, aligned
            for width in (3, 16, 32, 64, 128):
                yield "conv", width, cout, False, aligned


@pytest.mark.parametrize("args", list(_candidate_grid()), ids=str)
def test_autotune_candidates_are_in_the_aot_matrix(args):
    """Tuning may change speed, never correctness or resources: every tile it can pick for a launch
    is one the AOT matrix compiles (no spills, shared memory inside the limit) for that kernel."""
    kind, width, cout, pool, aligned = args
    names = fc.candidates(kind, width, cout, pool, aligned)
    assert names[0] == fc.tile_name(fc.config(kind, width, cout, torch.device("cuda"), pool, aligned))
    assert len(set(names)) == len(names)
    spec = fc.AOT[0] if kind == "1x1" else fc.AOT[1]
    for name in names:
        want = dict(fc.TILES[name], SUMS=True, BWD=False, HAS_Z=False,
                    **(dict(POOL=pool, PRE_ACT=False) if kind == "1x1" else dict(KH=3, KW=3)))
        assert any(c == want for c in spec.configs), (name, want)
        if kind == "1x1":  # the SiLU prologue (compiled without the sums)
            assert any(c == dict(want, SUMS=False, PRE_ACT=True) for c in spec.configs), (name, want)
        # a forward keeping its pre-activation (z_out) runs the tile's z_tile
        with_z = dict(want, **fc.z_tile(fc.TILES[name]), HAS_Z=True)
        assert any(c == with_z for c in spec.configs), (name, with_z)
        if not pool:  # the backward's recompute tunes among the same tiles, narrowed
            assert any(c == dict(fc.bwd_tile(want), BWD=True) for c in spec.configs), (name, want)


# (x shape, weight shape, groups): a 1x1 with two candidate tiles, a grouped 3x3 with three
TUNE_CASES = {"1x1": ((2, 32, 5, 7), (128, 32, 1, 1), 1), "3x3 g2": ((1, 128, 5, 5), (256, 64, 3, 3), 2)}


@pytest.fixture
def tile_cache(tmp_path, monkeypatch):
    """An empty cache folder and in-memory table; ``calls`` lists the tiles timed."""
    monkeypatch.setenv(fc.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(fc.AUTOTUNE_ENV, raising=False)
    monkeypatch.setattr(fc, "_TABLES", {})
    monkeypatch.setattr(fc, "_PICKS", {})
    calls = []
    return tmp_path, calls


def _fake_bench(calls, fastest):
    def bench(fn):
        fn()  # the launch runs (and must work), its time is made up: `fastest` wins
        calls.append(len(calls))
        return 1.0 if len(calls) - 1 == fastest else 2.0
    return bench


def test_tuning_without_the_vendor_keeps_its_own_pick(tile_cache, monkeypatch, rng):
    """A 16-bit tuning with ``vendor=False`` picks among the Triton tiles under a key of its own: it
    neither takes nor overwrites the pick of the tuning that timed the vendor path too. (It did both:
    the GPU test of the tiles alone, run first, left its tile where the default's tuning then found
    it, and the default never timed cuDNN.)"""
    path, calls = tile_cache
    xs, ws, groups = next(iter(TUNE_CASES.values()))
    x, w, b = _case(rng, xs, ws, torch.float16)
    kind = "1x1" if ws[2] == 1 else "conv"
    tiles = fc.candidates(kind, ws[1], ws[0] // groups, False, True)
    kw = dict(padding=ws[2] // 2, groups=groups, act="silu", want_sums=True, gpu_config=True, autotune=True)
    vendor_result = fc._vendor_conv(x, w, b, 1, fc.normalize_padding(kw["padding"]), groups, 1, 1.0, False, True)
    monkeypatch.setattr(fc, "_bench", _fake_bench(calls, len(tiles)))  # the vendor path fastest
    assert all(torch.equal(g, e) for g, e in zip(fc.fused_conv(x, w, b, vendor=True, **kw), vendor_result))
    assert len(calls) == len(tiles) + 1
    calls.clear()
    monkeypatch.setattr(fc, "_bench", _fake_bench(calls, len(tiles) - 1))  # the last tile fastest
    _check(x, w, b, "tiles alone", vendor=False, **kw)
    assert len(calls) == len(tiles)

    def no_bench(fn):
        raise AssertionError("timed again")
    monkeypatch.setattr(fc, "_bench", no_bench)
    for new_process in (False, True):
        if new_process:  # the file answers
            monkeypatch.setattr(fc, "_TABLES", {})
            monkeypatch.setattr(fc, "_PICKS", {})
        assert all(torch.equal(g, e) for g, e in zip(fc.fused_conv(x, w, b, vendor=True, **kw), vendor_result))
        assert torch.equal(fc.fused_conv(x, w, b, vendor=False, **kw)[0],
                           fc.fused_conv(x, w, b, config=fc.TILES[tiles[-1]], **kw)[0])
    import json
    (table,) = [json.loads(f.read_text()) for f in path.glob("fused_conv-*.json")]
    assert sorted(table.values()) == sorted([fc.VENDOR, tiles[-1]]), table


@pytest.mark.parametrize("vendor", [False, True], ids=["triton tiles", "vendor fastest"])
@pytest.mark.parametrize("name", list(TUNE_CASES))
def test_autotune_times_every_candidate_once_and_caches_the_fastest(name, vendor, tile_cache, monkeypatch, rng):
    """Every candidate is timed once (the made-up timer makes the last one fastest: a Triton tile
    the heuristic did not pick, or the vendor path of aten ops), the pick is written to the cache
    file, and later calls (same process, or a new one reading the file) time nothing."""
    path, calls = tile_cache
    xs, ws, groups = TUNE_CASES[name]
    dtype = torch.float16 if vendor else torch.float32
    x, w, b = _case(rng, xs, ws, dtype)
    kind = "1x1" if ws[2] == 1 else "conv"
    names = fc.candidates(kind, ws[1], ws[0] // groups, False, True) + [fc.VENDOR] * vendor
    assert len(names) >= 2
    fastest = len(names) - 1  # not the heuristic's choice
    monkeypatch.setattr(fc, "_bench", _fake_bench(calls, fastest))
    kw = dict(padding=ws[2] // 2, groups=groups, act="silu", want_sums=True, gpu_config=True, autotune=True,
              vendor=vendor)

    def check(what):
        if not vendor:
            return _check(x, w, b, what, **kw)
        got = fc.fused_conv(x, w, b, **kw)  # the vendor path itself, bit for bit
        expect = fc._vendor_conv(x, w, b, 1, fc.normalize_padding(kw["padding"]), groups, 1, 1.0, False, True)
        assert all(torch.equal(g, e) for g, e in zip(got, expect)), what

    check(f"{name} tuned")
    assert len(calls) == len(names)
    files = list(path.glob("fused_conv-*.json"))
    assert len(files) == 1 and f"triton{fc.triton.__version__}" in files[0].name
    import json
    table = json.loads(files[0].read_text())
    assert list(table.values()) == [names[fastest]]

    def no_bench(fn):
        raise AssertionError("timed again")
    monkeypatch.setattr(fc, "_bench", no_bench)
    check(f"{name} from memory")
    monkeypatch.setattr(fc, "_TABLES", {})  # a new process: the file answers
    monkeypatch.setattr(fc, "_PICKS", {})
    check(f"{name} from the file")
    # every Triton candidate computes the same thing (the launch after timing used the chosen tile)
    for n in names:
        if n != fc.VENDOR:
            _check(x, w, b, f"{name} tile {n}", config=fc.TILES[n],
                   **{k: v for k, v in kw.items() if k not in ("autotune", "vendor")})


def test_autotune_off_or_corrupt_cache(tile_cache, monkeypatch, rng):
    path, calls = tile_cache
    xs, ws, groups = TUNE_CASES["1x1"]
    x, w, b = _case(rng, xs, ws, torch.float32)
    monkeypatch.setattr(fc, "_bench", _fake_bench(calls, 1))
    kw = dict(act="relu", gpu_config=True, autotune=True)
    monkeypatch.setenv(fc.AUTOTUNE_ENV, "0")
    _check(x, w, b, "autotune off", **kw)
    assert calls == [] and not list(path.iterdir())
    monkeypatch.delenv(fc.AUTOTUNE_ENV)
    cache = path / fc.cache_path(torch.device("cpu")).rsplit(os.sep, 1)[1]
    cache.write_text("{ half a file")
    with pytest.warns(RuntimeWarning, match="ignoring the fused_conv tile cache"):
        _check(x, w, b, "corrupt cache", **kw)
    assert len(calls) == 2
    import json
    assert len(json.loads(cache.read_text())) == 1  # rewritten whole


def test_autotune_never_on_cpu_by_default(monkeypatch, rng):
    def no_bench(fn):
        raise AssertionError("timed on the CPU")
    monkeypatch.setattr(fc, "_bench", no_bench)
    x, w, b = _case(rng, (1, 32, 3, 3), (128, 32, 1, 1), torch.float32)
    _check(x, w, b, "cpu default", gpu_config=True)


# ---------------------------------------------------------------------------------------------
# backward: the BWD epilogue (z recomputed, its gradient made in the epilogue) and cuDNN's data and
# weight gradients from it, against autograd through the fp32 specification


def _backward_check(x, w, b, what, grads=("out", "sums"), gpu_config=False, z=None, **kw):
    act, act_gain = kw.get("act"), kw.get("act_gain", 1.0)
    leaves = [x.detach().float().requires_grad_(), w.detach().to(x.dtype).float().requires_grad_(),
              b.detach().float().requires_grad_()]
    xf, wf, bf = leaves
    if kw.get("pool"):
        xf = F.avg_pool2d(xf, 2, 2, ceil_mode=True, count_include_pad=False)
    pt, pb, pl, pr = fc.normalize_padding(kw.get("padding", 0))
    out = F.conv2d(F.pad(xf, (pl, pr, pt, pb)), wf, bf, kw.get("stride", 1), 0, 1, kw.get("groups", 1))
    out = {None: lambda t: t, "silu": F.silu, "relu": F.relu, "gelu": F.gelu}[act](out) * act_gain
    sums = out.sum((2, 3))
    gen = torch.Generator().manual_seed(len(what))
    grad_out = torch.randn(out.shape, generator=gen).to(x.device, x.dtype) if "out" in grads else None
    grad_sums = torch.randn(sums.shape, generator=gen).to(x.device) if "sums" in grads else None
    torch.autograd.backward([t for t, g in ((out, grad_out), (sums, grad_sums)) if g is not None],
                            [g.float() for g in (grad_out, grad_sums) if g is not None])
    conv = {k: kw[k] for k in ("stride", "padding", "groups", "pool") if k in kw}
    got = fc.backward(grad_out, grad_sums, x, w.to(x.dtype), b, act=act, act_gain=act_gain, gpu_config=gpu_config,
                      z=z, **conv)
    assert got[3] is None  # (no gain)
    for g, leaf, name in zip(got, leaves, ("x", "weight", "bias")):
        assert g.shape == leaf.shape, (what, name)
        # (fp16: z's gradient is rounded to fp16 before cuDNN's data and weight gradients, which
        # are stored in fp16: still within the forward's contract)
        assert_rel_close(g, leaf.grad, TOL[x.dtype], f"{what} {name} grad")
    assert got[0].is_contiguous(memory_format=torch.channels_last) == x.is_contiguous(
        memory_format=torch.channels_last), what


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(CASES))
def test_backward_matches_autograd(name, dtype, rng):
    x_shape, w_shape, stride, padding, groups, act, pool, sums = CASES[name]
    x, w, b = _case(rng, x_shape, w_shape, dtype)
    grads = ("out", "sums") if sums else ("out",)
    _backward_check(x, w, b, f"{name} {dtype}", grads, stride=stride, padding=padding, groups=groups, act=act,
                    pool=pool, act_gain=1.7)
    if sums:  # only the sums have a gradient (the final conv feeding the head's pool)
        _backward_check(x, w, b, f"{name} {dtype} sums only", ("sums",), stride=stride, padding=padding,
                        groups=groups, act=act, pool=pool)


@pytest.mark.parametrize("name", [n for n, case in GPU_CASES.items() if not case[6]])
def test_backward_gpu_config_on_cpu(name, rng):
    """The BWD epilogue in the GPU tiles (several row and column tiles, images across tiles)."""
    x_shape, w_shape, stride, padding, groups, act, pool, tile = GPU_CASES[name]
    x, w, b = _case(rng, x_shape, w_shape, torch.float32)
    _backward_check(x, w, b, f"{name} {tile}", gpu_config=True, stride=stride, padding=padding, groups=groups,
                    act=act or "silu")


# (a case of CASES or GPU_CASES, gpu_config): every activation, 1x1 and kxk, pooled, strided, grouped, and the
# GPU tiles' rows across images
KEEP_Z_CASES = [("1x1 silu sums", False), ("1x1 pool gelu sums", False), ("3x3 g2 s2 relu sums", False),
                ("3x3 same pad s2", False), ("1x1 narrow, 143-pixel images", True), ("3x3 g2 width 64", True)]


def _conv_case(name, rng, dtype):
    x_shape, w_shape, stride, padding, groups, act, pool, *_ = CASES.get(name) or GPU_CASES[name]
    x, w, b = _case(rng, x_shape, w_shape, dtype)
    return x, w, b, dict(stride=stride, padding=padding, groups=groups, pool=pool)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("name, gpu_config", KEEP_Z_CASES)
def test_kept_pre_activation(name, gpu_config, dtype, rng):
    """z_out: the forward's epilogue also stores z = conv + bias (rounded as the output is) and the output is
    the same bits; a backward given that z (one _z_grad_kernel launch, no GEMM) matches autograd through
    the specification and, in fp32, where the stored z is the GEMM's own z, is the recomputing backward's
    bits (the bias gradient's too where both sum in the same row tiles: the CPU's); both gradients, either
    alone."""
    x, w, b, conv = _conv_case(name, rng, dtype)
    act = ("silu", "relu", "gelu")[int(torch.randint(3, (), generator=rng))]
    act_gain = float(torch.empty(()).uniform_(0.5, 2.0, generator=rng))
    kw = dict(conv, act=act, act_gain=act_gain, gpu_config=gpu_config, want_sums=True)
    if not gpu_config:
        kw["config"] = fc.SMALL_TILE
    expect = fc.fused_conv(x, w, b, **kw)
    z = torch.full_like(expect[0], float("nan"))
    got = fc.fused_conv(x, w, b, z_out=z, **kw)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1]), name
    pre = _spec(x, w, b, **dict(conv, act=None))
    assert_rel_close(z, pre, TOL[dtype], f"{name} z")
    if conv["pool"]:  # (the backward convolves the pooled input it makes itself)
        x, conv = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False), dict(conv, pool=False)
    for grads in (("out", "sums"), ("out",), ("sums",)):
        what = f"{name} {act} {'+'.join(grads)}"
        with counted_work(fc) as work:
            _backward_check(x, w, b, what, grads, gpu_config=gpu_config, z=z, act=act, act_gain=act_gain, **conv)
        assert work["launches"] == {"_z_grad_kernel": 1}, (what, work["launches"])
    # the bits: z stored by the forward's own tile (the one the backward's GEMM would recompute it with)
    z = torch.full_like(z, float("nan"))
    fc.fused_conv(x, w, b, z_out=z, act=act, act_gain=act_gain, gpu_config=gpu_config, **conv)
    gen = torch.Generator().manual_seed(3)
    grad_out, grad_sums = torch.randn(z.shape, generator=gen).to(dtype), torch.randn(z.shape[:2], generator=gen)
    kept = fc.backward(grad_out, grad_sums, x, w.to(dtype), b, act=act, act_gain=act_gain, gpu_config=gpu_config,
                       z=z, **conv)
    again = fc.backward(grad_out, grad_sums, x, w.to(dtype), b, act=act, act_gain=act_gain, gpu_config=gpu_config,
                        **conv)
    for k, a, what in zip(kept, again, ("x", "weight", "bias")):
        if dtype == torch.float32 and (what != "bias" or not gpu_config):
            assert torch.equal(k, a), f"{name} {what}"
        elif dtype == torch.float32:  # (the same z's gradient summed in the pass's own row tiles: 64 rows, not 128)
            assert_rel_close(k, a, 1e-6, f"{name} {what}")
        else:  # (z rounded to fp16, as timm's own conv output is, against the GEMM's fp32 z)
            assert_rel_close(k, a, TOL[dtype], f"{name} {what}")


def test_kept_pre_activation_checks_and_vendor(rng):
    """z_out of another shape, dtype or layout, or with a backward, is refused, as is a z for z_grad that is not
    channels_last; a backward given z in another layout (what a saved-tensor hook may return) lays it out itself;
    an fp16 z past fp16's range is stored at its largest finite value (its gradient then the recompute's: 0, not
    NaN); the vendor candidate stores the same z (cuDNN's conv with its bias, before the activation)."""
    x, w, b, conv = _conv_case("1x1 silu sums", rng, torch.float32)
    out = fc.fused_conv(x, w, b, act="silu")
    for bad in (out[:, 1:].contiguous(memory_format=torch.channels_last), out.half(), out.contiguous()):
        with pytest.raises(ValueError, match="z_out must be"):
            fc.fused_conv(x, w, b, act="silu", z_out=torch.empty_like(bad))
    with pytest.raises(ValueError, match="z_out must be"):
        fc.fused_conv(x, w, b, act="silu", backward=True, grad_out=out, z_out=torch.empty_like(out))
    with pytest.raises(ValueError, match="z must be a channels_last"):
        fc.z_grad(out.contiguous(), out, None, act="silu")
    # a z that a saved-tensor hook handed back contiguous (save_on_cpu(pin_memory=True) does): the same gradients
    z = torch.empty_like(out)
    fc.fused_conv(x, w, b, act="silu", z_out=z)
    grad = torch.randn(out.shape, generator=rng).contiguous(memory_format=torch.channels_last)
    expect = fc.backward(grad, None, x, w, b, act="silu", z=z)
    got = fc.backward(grad, None, x, w, b, act="silu", z=torch.empty(z.shape).copy_(z))
    assert all(torch.equal(g, e) for g, e in zip(got[:3], expect[:3]))
    # an fp16 pre-activation past fp16's range is kept at its largest finite value: act'(-inf) would be 0 * inf
    xh, wh = x.half(), w.half()
    far = torch.full_like(b, -7e4)
    zh = torch.empty(out.shape, dtype=torch.float16).contiguous(memory_format=torch.channels_last)
    fc.fused_conv(xh, wh, far, act="silu", z_out=zh)
    assert zh.isfinite().all() and (zh == -65504).all()
    kept = fc.backward(grad.half(), None, xh, wh, far, act="silu", z=zh)
    again = fc.backward(grad.half(), None, xh, wh, far, act="silu")
    for k, a in zip(kept[:3], again[:3]):
        assert k.isfinite().all() and torch.equal(k, a)
    z = torch.empty_like(out)
    y = fc._vendor_conv(x, w, b, 1, (0, 0, 0, 0), 1, 1, 1.5, False, False, True, z)
    pre = F.conv2d(x, w, b)
    assert torch.equal(z, pre.contiguous(memory_format=torch.channels_last))
    assert torch.equal(y, F.silu(pre) * 1.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", ["1x1 silu sums", "3x3 g2 s2 relu sums", "3x3 same pad s2", "1x1 batch1 none"])
def test_backward_takes_the_forwards_standardised_weight(name, dtype, rng):
    """A raw weight and gain: the forward standardises into ``std_out``, and a backward given it as
    ``std_weight`` returns the same bits as one that standardises again (the same kernel, the same
    inputs), with one standardisation launch less; the GEMM and cuDNN's data gradient read the
    std_weight given (another gain's gives that gain's x and bias gradients); a std_weight of another
    shape or dtype is refused, as is a std_out without a gain."""
    x_shape, w_shape, stride, padding, groups, act, _, _ = CASES[name]
    x, w, b = _case(rng, x_shape, w_shape, dtype)
    w = w.float()
    gain = torch.rand(w.shape[0], 1, 1, 1, generator=rng) + 0.5
    std = dict(gain=gain, std_scale=float(torch.empty(()).uniform_(0.05, 0.5, generator=rng)), std_eps=1e-4)
    conv = dict(stride=stride, padding=padding, groups=groups, act=act or "silu")
    cout, cg, kh, kw = w.shape
    std_out = torch.full((kh, kw, cg, cout), float("nan"), dtype=dtype)
    out = fc.fused_conv(x, w, b, std_out=std_out, **conv, **std)
    assert torch.equal(out, fc.fused_conv(x, w, b, **conv, **std))
    assert torch.equal(std_out, fc._std.forward(w.contiguous(), gain.reshape(-1), std["std_scale"], std["std_eps"],
                                                packed=torch.empty_like(std_out)))
    grad_out = torch.randn(out.shape, generator=rng).to(dtype)
    with counted_work(fc._std) as again:
        expect = fc.backward(grad_out, None, x, w, b, **conv, **std)
    with counted_work(fc._std) as saved:
        got = fc.backward(grad_out, None, x, w, b, **conv, **std, std_weight=std_out)
    assert again["launches"] == {"_std_fwd_kernel": 1, "_std_bwd_kernel": 1}, again
    assert saved["launches"] == {"_std_bwd_kernel": 1}, saved
    for g, e, what in zip(got, expect, ("x", "weight", "bias", "gain")):
        assert torch.equal(g, e), what
    other = dict(std, gain=gain * (1.5 + torch.rand(gain.shape, generator=rng)))
    other_std = fc._std.forward(w.contiguous(), other["gain"].reshape(-1), std["std_scale"], std["std_eps"],
                                packed=torch.empty_like(std_out))
    with_other = fc.backward(grad_out, None, x, w, b, **conv, **std, std_weight=other_std)
    other_expect = fc.backward(grad_out, None, x, w, b, **conv, **other)
    assert torch.equal(with_other[0], other_expect[0]) and torch.equal(with_other[2], other_expect[2])
    assert not torch.equal(with_other[0], expect[0])
    with pytest.raises(ValueError, match="needs gain"):
        fc.fused_conv(x, w.to(dtype), b, std_out=std_out, **conv)
    for bad in (std_out.transpose(2, 3), std_out.double(), std_out[..., 1:]):
        with pytest.raises(ValueError, match="std_weight must be contiguous"):
            fc.backward(grad_out, None, x, w, b, **conv, **std, std_weight=bad)
        with pytest.raises(ValueError, match="std_out must be contiguous"):
            fc.fused_conv(x, w, b, std_out=bad, **conv, **std)


@pytest.mark.parametrize("name, gpu_config", [("1x1 silu sums", False), ("3x3 g2 s2 relu sums", False),
                                              ("1x1 narrow, 143-pixel images", True), ("3x3 g2 width 64", True),
                                              ("3x3 width 32 s2", True)])
def test_sums_are_one_aten_reduction_of_zero_filled_partial_rows(name, gpu_config, rng):
    """The channel sums come from the GEMM's partial rows (zero-filled: in these shapes tiles straddle
    images, so some (image, slot) rows are never written) by one aten reduction, with no Triton
    launch but the GEMM's: per image, or with ``sum_images`` over the images as well (a backward
    launch's bias gradient): grad_z's bits either way, the sums those of the per-image sums added up
    (to fp32 rounding: another order). ``fc.backward`` takes its bias gradient so
    (test_backward_matches_autograd checks it against autograd; test_fused_conv_matches_reference
    the per-image sums)."""
    x_shape, w_shape, stride, padding, groups, act = (GPU_CASES if gpu_config else CASES)[name][:6]
    x, w, b = _case(rng, (x_shape[0] + 1, *x_shape[1:]), w_shape, torch.float32)
    nb, cout = x.shape[0], w.shape[0]
    grad_out = torch.randn(fc.fused_conv(x, w, b, stride=stride, padding=padding, groups=groups).shape,
                           generator=rng).contiguous(memory_format=torch.channels_last)
    grad_sums = torch.randn(nb, cout, generator=rng)
    kw = dict(stride=stride, padding=padding, groups=groups, act=act or "silu", act_gain=1.3, want_sums=True,
              backward=True, grad_out=grad_out, grad_sums=grad_sums, gpu_config=gpu_config)
    poison_freed_memory(nb * 64 * cout)  # (an unfilled partial row would read NaN)
    with counted_work(fc) as work:
        per_image_z, per_image = fc.fused_conv(x, w, b, **kw)
    assert sum(work["launches"].values()) == 1, work["launches"]
    assert_rel_close(per_image, per_image_z.double().sum((2, 3)).float(), 1e-5, f"{name} per-image sums")
    poison_freed_memory(nb * 64 * cout)  # (an unfilled partial row would read NaN)
    with counted_work(fc) as work:
        grad_z, total = fc.fused_conv(x, w, b, sum_images=True, **kw)
    assert sum(work["launches"].values()) == 1, work["launches"]
    assert torch.equal(grad_z, per_image_z)
    assert total.shape == (cout,) and total.dtype == torch.float32
    assert_rel_close(total, per_image.sum(0), 1e-6, f"{name} summed over images")
    with counted_work(fc) as work:
        got = fc.backward(grad_out, grad_sums, x, w, b, stride=stride, padding=padding, groups=groups,
                          act=act or "silu", act_gain=1.3, gpu_config=gpu_config)
    assert sum(work["launches"].values()) == 1, work["launches"]
    assert torch.equal(got[2], total)
    # an empty batch: zero sums, nothing launched
    empty = fc.fused_conv(x[:0], w, b, sum_images=True, **dict(kw, grad_out=grad_out[:0], grad_sums=grad_sums[:0]))
    assert empty[0].shape[0] == 0 and torch.equal(empty[1], torch.zeros(cout))


def test_backward_epilogue_needs_no_pool():
    x, w, b = _case(torch.Generator().manual_seed(0), (1, 8, 4, 4), (8, 8, 1, 1), torch.float32)
    with pytest.raises(ValueError, match="no backward"):
        fc.fused_conv(x, w, b, pool=True, act="silu", backward=True)


def test_launch_choice_is_made_once_per_signature(tile_cache, monkeypatch, rng):
    """The tile (heuristic or tuned) is chosen once per launch signature and process: later calls
    skip the tile lists and the tuning table's lookup (host time); another shape, dtype, flag or
    autotune setting chooses again, and each choice computes what a fresh one would."""
    path, calls = tile_cache
    monkeypatch.setattr(fc, "_bench", _fake_bench(calls, 0))
    chosen = []
    real = fc._choose
    monkeypatch.setattr(fc, "_choose", lambda *a: chosen.append(a[0].shape) or real(*a))
    x, w, b = _case(rng, (2, 32, 5, 7), (128, 32, 1, 1), torch.float32)
    for _ in range(3):
        _check(x, w, b, "same signature", act="silu", gpu_config=True, autotune=True)
    assert len(chosen) == 1
    _check(x, w, b, "with sums", act="silu", want_sums=True, gpu_config=True, autotune=True)
    x2, _, _ = _case(rng, (1, 32, 5, 7), (128, 32, 1, 1), torch.float32)
    _check(x2, w, b, "another batch", act="silu", gpu_config=True, autotune=True)
    monkeypatch.setenv(fc.AUTOTUNE_ENV, "0")
    _check(x, w, b, "autotune turned off", act="silu", gpu_config=True, autotune=True)
    assert len(chosen) == 4
    monkeypatch.delenv(fc.AUTOTUNE_ENV)
    z = torch.empty((2, 128, 5, 7)).contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        fc.fused_conv(x, w, b, act="silu", gpu_config=True, autotune=True, z_out=z)
    assert len(chosen) == 5  # (a launch storing z: one choice of its own)


def test_launch_storing_z_tunes_on_its_own(tile_cache, monkeypatch, rng):
    """A forward launch that also stores its pre-activation (z_out) runs a heavier epilogue, so it is timed
    as it runs, under a key of its own: it neither takes the plain launch's pick nor overwrites it. Its
    pick computes the plain launch's output bits and stores z."""
    path, calls = tile_cache
    xs, ws, groups = TUNE_CASES["1x1"]
    x, w, b = _case(rng, xs, ws, torch.float32)
    names = fc.candidates("1x1", ws[1], ws[0], False, True)
    kw = dict(act="gelu", gpu_config=True, autotune=True, vendor=False)
    monkeypatch.setattr(fc, "_bench", _fake_bench(calls, 0))  # plain: the heuristic's tile fastest
    plain = fc.fused_conv(x, w, b, **kw)
    assert len(calls) == len(names)
    calls.clear()
    timed_with_z = []
    real_launch = fc.launch
    monkeypatch.setattr(fc, "launch", lambda kernel, grid, *a, **k: timed_with_z.append(k["HAS_Z"])
                        or real_launch(kernel, grid, *a, **k))
    monkeypatch.setattr(fc, "_bench", _fake_bench(calls, len(names) - 1))  # with z: the last tile fastest
    z = torch.full(plain.shape, float("nan")).contiguous(memory_format=torch.channels_last)
    got = fc.fused_conv(x, w, b, z_out=z, **kw)
    assert len(calls) == len(names) and all(timed_with_z), timed_with_z
    assert torch.equal(got, plain)
    assert_rel_close(z, _spec(x, w, b), TOL[torch.float32], "z")
    assert fc.tuned_choice(x, ws) == names[0] and fc.tuned_choice(x, ws, has_z=True) == names[-1]
    import json
    (table,) = [json.loads(f.read_text()) for f in path.glob("fused_conv-*.json")]
    assert sorted(table.values()) == sorted([names[0], names[-1]]), table


@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("with_sums", [False, True], ids=["grad_out", "grad_out+grad_sums, gain"])
def test_backward_vendor_candidate(act, with_sums, tile_cache, monkeypatch, rng):
    """The backward recompute's vendor candidate (cuDNN's conv, then aten's activation backward) is
    timed beside the tiles; made the fastest, it is what runs, and it computes what the Triton
    BWD epilogue computes (within fp16's contract: it rounds z and, with only grad_out, works in
    fp16 as eager timm's backward does)."""
    path, calls = tile_cache
    x, w, b = _case(rng, (2, 32, 5, 7), (128, 32, 1, 1), torch.float16)
    names = fc.candidates("1x1", 32, 128, False, True) + [fc.VENDOR]
    monkeypatch.setattr(fc, "_bench", _fake_bench(calls, len(names) - 1))
    grad_out = torch.randn(2, 128, 5, 7, generator=rng).to(DEV, torch.float16).contiguous(
        memory_format=torch.channels_last)  # (the layout the launcher hands the candidates)
    grad_sums = torch.randn(2, 128, generator=rng).to(DEV) if with_sums else None
    gain = 1.3 if with_sums else 1.0
    kw = dict(act=act, act_gain=gain, want_sums=True, backward=True, grad_out=grad_out, grad_sums=grad_sums,
              gpu_config=True)
    got, got_sums = fc.fused_conv(x, w, b, autotune=True, vendor=True, **kw)
    assert len(calls) == len(names)
    packed = fc.pack_weight(w, x.dtype).permute(3, 2, 0, 1)  # (the weight view the launcher passes)
    vendor, vendor_sums = fc._vendor_conv_backward(x, packed, b, 1, (0, 0, 0, 0), 1, fc.ACTS.index(act), gain, True,
                                                   grad_out, grad_sums)
    assert torch.equal(got, vendor) and torch.equal(got_sums, vendor_sums)
    _, got_total = fc.fused_conv(x, w, b, autotune=True, vendor=True, sum_images=True, **kw)  # (picked already)
    assert len(calls) == len(names) and torch.equal(got_total, vendor_sums.sum(0))
    triton_tile, triton_sums = fc.fused_conv(x, w, b, autotune=False, **kw)
    if act == "relu":  # (where z is within rounding of 0 the two accumulations may take either side)
        z = F.conv2d(x.float(), w.to(x.dtype).float(), b.float())
        keep = (z.abs() > 1e-2).to(got.dtype)
        got, triton_tile = got * keep, triton_tile * keep
    else:
        assert_rel_close(got_sums, triton_sums, TOL[torch.float16], f"vendor {act} sums")
    assert_rel_close(got, triton_tile, TOL[torch.float16], f"vendor {act} grad_z")
