"""ECA fused with the NF block's residual tail and the next block's pre-activation.

Forward, for an activation ``y`` (N, C, H, W) and a conv1d kernel ``w`` of odd length K::

    gate[n, c] = coef * sigmoid(sum_j w[j] * mean_hw(y)[n, c + j - (K-1)/2])   (zero padding)
    x = y * gate (+ shortcut)                 coef = gain (ops.eca) or alpha * attn_gain
    a = silu(x) * beta_next                   (optional, written in the same pass)

in two launches and no grid-wide sync:

1. pool: fp32 channel sums. A program owns a tile column (32 pixels x 128 channels for
   channels_last, 32 (n, c) rows x 128 pixels for NCHW) and walks ``per`` tiles of it, keeping a
   tile-shaped fp32 accumulator so loads are not serialised behind reductions. When there are
   too few columns to fill the GPU (large H*W, small batch), the pixels are split S ways and each
   split writes its own partial sums to ``part[n, s, c]``: no atomics, so the result is
   deterministic and needs no zeroing launch.
2. apply: each program first computes the gate of its channels inline from the partial sums
   (K * S fp32 loads from L2, once per program) and then streams its pixels: y and shortcut are
   read once, x and a written once.

The partial sums are saved for the backward, which recomputes the gate instead of saving it:

1. reduce: gx = dL/dx (+ dL/da * beta * silu'(x), with x recomputed from y, shortcut and the gate,
   then written out as the shortcut's gradient), and fp32 partial sums of gx * y per (n, c);
2. gate: per (n, c), dL/dlogit from those sums, the gate itself, and per-program partial sums of
   the conv1d weight gradient (reduced over programs by the caller: again no atomics);
3. apply: dy = gx * gate + (1/HW) * sum_j w[j] * dL/dlogit[n, c - j + (K-1)/2].

With ``want_bias_sums`` the reduce pass also sums gx per (n, c), and the apply pass turns those sums into
the pixel sums of dy (gate * sum(gx) + HW * dmean) and of gx: the gradients of the biases that conv3 and
the downsample conv added last to y and to the shortcut, without a pass of their own over either
gradient (nfnet_fast.nn.NormFreeBlock.bias_grads_in_eca).

Activation volumes moved from/to HBM (one volume = N*C*H*W elements): forward 5 with the next
pre-activation (pool: y in; apply: y and shortcut in, x and a out), 4 without it, 3 for ops.eca;
backward 7 with a gradient for a (reduce: dx, da, y, shortcut in, dshortcut out; dy pass:
dshortcut in, dy out), 4 without (reduce: dx, y in; dy pass: dx in, dy out). The pooling read of
y is the one read beyond "each activation once": with ``sums`` from y's producer (conv3's fused
epilogue, docs/design.md section 5) it is skipped, the apply kernels reading them as (N, 1, C)
partial sums: 4 volumes with the next pre-activation, 3 without.

Memory formats: NCHW (pixels contiguous) and channels_last (channels contiguous) have their own
kernels, so the contiguous axis is always the vectorised one; the caller makes other strides
contiguous. Math is fp32, storage is ``y``'s dtype.
"""
from __future__ import annotations

import functools
import types
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import AotSpec, cdiv, device_guard, launch

# channels_last tile: 32 pixels x 128 channels. 128 channels are 256 contiguous bytes in bf16 (512
# in fp32): whole 128-byte lines and 16-byte vectors along C; 4096 elements at 8 warps = 16 a thread.
BLOCK_P = 32
BLOCK_C = 128
# NCHW tile: 32 (n, c) rows x 128 pixels, the same 4096 elements; the pixels of a row are contiguous.
ROWS = 32
BLOCK_HW = 128
NUM_WARPS = 8
# gate backward: one program per (image, 128 channels), tiny work.
GATE_BLOCK = 128
GATE_WARPS = 4
# Enough programs to fill 132 SMs (8 resident CTAs of 256 threads each) about twice: splits are
# only added while a layer has fewer tile columns than this (large H*W at a small batch).
TARGET_PROGRAMS = 2048
# Every apply program reads K * S partial sums per channel to build its gate; capping S at 8
# keeps that below a few percent of the bytes it streams.
MAX_POOL_SPLITS = 8
# Under the interpreter (CPU tensors) programs run one after another at milliseconds of Python
# each, so CPU launches use 8x taller tiles and never split; the math is the same code. The
# launchers' gpu_config=True runs the GPU configuration (splits included) there too (tests).
CPU_BLOCK_P = 256
CPU_ROWS = 256


# ---------------------------------------------------------------------------------------------
# shared pieces


@triton.jit
def _gate(stats_ptr, w_ptr, c, cmask, C, S, K, inv_hw):
    """sigmoid(conv1d(mean_hw)) at channels ``c`` (fp32). ``stats_ptr`` points at the (S, C) fp32
    partial sums of each channel's image: one pointer, or one per element of ``c``."""
    P = (K - 1) // 2
    z = tl.zeros(c.shape, tl.float32)
    for j in range(K):
        cc = c + (j - P)
        m = cmask & (cc >= 0) & (cc < C)
        p = tl.zeros(c.shape, tl.float32)
        for s in range(S):
            p += tl.load(stats_ptr + s * C + cc, mask=m, other=0.0)
        z += tl.load(w_ptr + j) * p
    return tl.sigmoid(z * inv_hw)


@triton.jit
def _dlogit_to_mean(dz_ptr, w_ptr, c, cmask, C, K, inv_hw):
    """dL/dy contribution through the pooling: (1/HW) * sum_j w[j] * dz[c - j + P] (the conv1d's
    transpose); ``dz_ptr`` points at each channel's image's C logit gradients."""
    P = (K - 1) // 2
    acc = tl.zeros(c.shape, tl.float32)
    for j in range(K):
        cc = c - (j - P)
        m = cmask & (cc >= 0) & (cc < C)
        acc += tl.load(w_ptr + j) * tl.load(dz_ptr + cc, mask=m, other=0.0)
    return acc * inv_hw


@triton.jit
def _apply_tile(y_ptr, shortcut_ptr, x_next_ptr, a_next_ptr, offs, m, g, beta, HAS_RES: tl.constexpr, HAS_NEXT: tl.constexpr):
    out = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32) * g
    if HAS_RES:
        out += tl.load(shortcut_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(x_next_ptr + offs, out.to(x_next_ptr.dtype.element_ty), mask=m)
    if HAS_NEXT:  # a = silu(x) * beta from the fp32 x, before x is rounded to the storage dtype
        tl.store(a_next_ptr + offs, (out * tl.sigmoid(out) * beta).to(a_next_ptr.dtype.element_ty), mask=m)


@triton.jit
def _reduce_tile(grad_x_next_ptr, grad_a_next_ptr, y_ptr, shortcut_ptr, grad_shortcut_ptr, offs, m, g, beta,
                 HAS_GX: tl.constexpr, HAS_GA: tl.constexpr):
    """(gx * y, gx) for one tile, gx = dL/dx (through x and, when HAS_GA, through a = silu(x) * beta);
    with HAS_GA gx is also the shortcut's gradient and is stored."""
    y = tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_GX:
        gx = tl.load(grad_x_next_ptr + offs, mask=m, other=0.0).to(tl.float32)
    else:
        gx = tl.zeros_like(y)
    if HAS_GA:
        x = y * g + tl.load(shortcut_ptr + offs, mask=m, other=0.0).to(tl.float32)
        s = tl.sigmoid(x)
        gx += tl.load(grad_a_next_ptr + offs, mask=m, other=0.0).to(tl.float32) * beta * s * (1.0 + x * (1.0 - s))
        tl.store(grad_shortcut_ptr + offs, gx.to(grad_shortcut_ptr.dtype.element_ty), mask=m)
    return gx * y, gx


@triton.jit
def _dy_tile(grad_x_next_ptr, grad_y_ptr, offs, m, g, dmean):
    gx = tl.load(grad_x_next_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(grad_y_ptr + offs, (gx * g + dmean).to(grad_y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bias_parts(spart_ptr, bpart_ptr, n, c, cmask, N, C, HW, Sb, g, dmean):
    """Per (n, c), the pixel sums of dy (gx * gate + dmean, summed: gate * sum(gx) + HW * dmean) and of gx,
    from the reduce pass's partial sums of gx: ``bpart[0, n, c]`` and ``bpart[1, n, c]``, which the caller
    sums over n into the gradients of the biases that y's and the shortcut's producers added last."""
    s = tl.zeros(g.shape, tl.float32)
    for i in range(Sb):
        s += tl.load(spart_ptr + (n * Sb + i) * C + c, mask=cmask, other=0.0)
    tl.store(bpart_ptr + n * C + c, g * s + dmean * HW, mask=cmask)
    tl.store(bpart_ptr + (N + n) * C + c, s, mask=cmask)


@triton.jit
def _reversed_ids():
    """(program_id(0), program_id(1)) in reverse launch order. Apply passes run right after a pass
    over the same activation (pool, backward reduce); starting where that pass ended re-reads its
    last tiles from L2 instead of HBM (50 MB of L2 on an H100: a good part of a 9x9 activation)."""
    return tl.num_programs(0) - 1 - tl.program_id(0), tl.num_programs(1) - 1 - tl.program_id(1)


@triton.jit
def _nhwc_tile(t, c, cmask, C, HW, BLOCK_P: tl.constexpr):
    """Offsets (within an image) and mask of pixel tile ``t`` at channels ``c``, channels_last."""
    p = t * BLOCK_P + tl.arange(0, BLOCK_P)
    return p[:, None] * C + c[None, :], (p < HW)[:, None] & cmask[None, :]


@triton.jit
def _nchw_rows(rows, NC, HW, ALIGN: tl.constexpr):
    """Row start offsets and mask for NCHW rows (n * C + c). ALIGN (a power of two dividing HW)
    tells the compiler how far row starts stay aligned, so rows of 18x18 = 4 * 81 pixels still get
    (shorter) vector loads."""
    rmask = rows < NC
    return tl.multiple_of(rows.to(tl.int64) * HW, ALIGN), rmask


@triton.jit
def _nchw_tile(t, row_off, rmask, HW, BLOCK_HW: tl.constexpr, ALIGN: tl.constexpr):
    """Offsets and mask of pixel tile ``t`` of NCHW rows. HW is a multiple of ALIGN and tiles
    start at multiples of it, so the mask is constant over runs of ALIGN pixels: saying so keeps
    the masked loads vectorised when HW % 16 != 0."""
    hw = t * BLOCK_HW + tl.arange(0, BLOCK_HW)
    m = tl.max_constancy(rmask[:, None] & (hw < HW)[None, :], [1, ALIGN])
    return row_off[:, None] + hw[None, :], m


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit(do_not_specialize=["S", "per"])
def _pool_nhwc_kernel(y_ptr, stats_ptr, C, HW, S, per, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # n * S + s
    n = pid // S
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    y_img = y_ptr + n.to(tl.int64) * HW * C
    t0 = (pid % S) * per
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for t in range(t0, tl.minimum(t0 + per, tl.cdiv(HW, BLOCK_P))):
        offs, m = _nhwc_tile(t, c, cmask, C, HW, BLOCK_P)
        acc += tl.load(y_img + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(stats_ptr + pid * C + c, tl.sum(acc, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["NC", "S", "per"])
def _pool_nchw_kernel(y_ptr, stats_ptr, NC, C, HW, S, per,
                      ROWS: tl.constexpr, BLOCK_HW: tl.constexpr, ALIGN: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_off, rmask = _nchw_rows(rows, NC, HW, ALIGN)
    s = tl.program_id(1)
    t0 = s * per
    acc = tl.zeros([ROWS, BLOCK_HW], tl.float32)
    for t in range(t0, tl.minimum(t0 + per, tl.cdiv(HW, BLOCK_HW))):
        offs, m = _nchw_tile(t, row_off, rmask, HW, BLOCK_HW, ALIGN)
        acc += tl.load(y_ptr + offs, mask=m, other=0.0).to(tl.float32)
    n = rows // C
    tl.store(stats_ptr + (n * S + s) * C + (rows - n * C), tl.sum(acc, axis=1), mask=rmask)


@triton.jit(do_not_specialize=["S", "A", "per"])
def _apply_nhwc_kernel(y_ptr, shortcut_ptr, x_next_ptr, a_next_ptr, stats_ptr, w_ptr, C, HW, S, K, inv_hw, coef, beta, A, per,
                       HAS_RES: tl.constexpr, HAS_NEXT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, cb = _reversed_ids()  # pid = n * A + (pixel chunk)
    n = pid // A
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    g = coef * _gate(stats_ptr + n * S * C, w_ptr, c, cmask, C, S, K, inv_hw)
    img = n.to(tl.int64) * HW * C
    t0 = (pid % A) * per
    for t in range(t0, tl.minimum(t0 + per, tl.cdiv(HW, BLOCK_P))):
        offs, m = _nhwc_tile(t, c, cmask, C, HW, BLOCK_P)
        _apply_tile(y_ptr + img, shortcut_ptr + img, x_next_ptr + img, a_next_ptr + img, offs, m, g[None, :], beta,
                    HAS_RES, HAS_NEXT)


@triton.jit(do_not_specialize=["NC", "S", "per"])
def _apply_nchw_kernel(y_ptr, shortcut_ptr, x_next_ptr, a_next_ptr, stats_ptr, w_ptr, NC, C, HW, S, K, inv_hw, coef, beta, per,
                       HAS_RES: tl.constexpr, HAS_NEXT: tl.constexpr, ROWS: tl.constexpr, BLOCK_HW: tl.constexpr,
                       ALIGN: tl.constexpr):
    pid, split = _reversed_ids()
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_off, rmask = _nchw_rows(rows, NC, HW, ALIGN)
    n = rows // C
    g = coef * _gate(stats_ptr + n * (S * C), w_ptr, rows - n * C, rmask, C, S, K, inv_hw)
    t0 = split * per
    for t in range(t0, tl.minimum(t0 + per, tl.cdiv(HW, BLOCK_HW))):
        offs, m = _nchw_tile(t, row_off, rmask, HW, BLOCK_HW, ALIGN)
        _apply_tile(y_ptr, shortcut_ptr, x_next_ptr, a_next_ptr, offs, m, g[:, None], beta, HAS_RES, HAS_NEXT)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit(do_not_specialize=["S", "Sb", "per"])
def _reduce_nhwc_kernel(grad_x_next_ptr, grad_a_next_ptr, y_ptr, shortcut_ptr, grad_shortcut_ptr, stats_ptr, w_ptr, dpart_ptr,
                        spart_ptr, C, HW, S, Sb, K, inv_hw, coef, beta, per, HAS_GX: tl.constexpr, HAS_GA: tl.constexpr,
                        SUMS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)  # n * Sb + split
    n = pid // Sb
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    if HAS_GA:  # x = y * gate + shortcut is needed for silu'(x)
        g = coef * _gate(stats_ptr + n * S * C, w_ptr, c, cmask, C, S, K, inv_hw)
    else:
        g = tl.zeros([BLOCK_C], tl.float32)
    img = n.to(tl.int64) * HW * C
    t0 = (pid % Sb) * per
    acc = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    acc_gx = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
    for t in range(t0, tl.minimum(t0 + per, tl.cdiv(HW, BLOCK_P))):
        offs, m = _nhwc_tile(t, c, cmask, C, HW, BLOCK_P)
        gxy, gx = _reduce_tile(grad_x_next_ptr + img, grad_a_next_ptr + img, y_ptr + img, shortcut_ptr + img,
                               grad_shortcut_ptr + img, offs, m, g[None, :], beta, HAS_GX, HAS_GA)
        acc += gxy
        if SUMS:
            acc_gx += gx
    tl.store(dpart_ptr + pid * C + c, tl.sum(acc, axis=0), mask=cmask)
    if SUMS:
        tl.store(spart_ptr + pid * C + c, tl.sum(acc_gx, axis=0), mask=cmask)


@triton.jit(do_not_specialize=["NC", "S", "Sb", "per"])
def _reduce_nchw_kernel(grad_x_next_ptr, grad_a_next_ptr, y_ptr, shortcut_ptr, grad_shortcut_ptr, stats_ptr, w_ptr, dpart_ptr,
                        spart_ptr, NC, C, HW, S, Sb, K, inv_hw, coef, beta, per, HAS_GX: tl.constexpr,
                        HAS_GA: tl.constexpr, SUMS: tl.constexpr, ROWS: tl.constexpr, BLOCK_HW: tl.constexpr,
                        ALIGN: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_off, rmask = _nchw_rows(rows, NC, HW, ALIGN)
    n = rows // C
    c = rows - n * C
    if HAS_GA:
        g = coef * _gate(stats_ptr + n * (S * C), w_ptr, c, rmask, C, S, K, inv_hw)
    else:
        g = tl.zeros([ROWS], tl.float32)
    s = tl.program_id(1)
    t0 = s * per
    acc = tl.zeros([ROWS, BLOCK_HW], tl.float32)
    acc_gx = tl.zeros([ROWS, BLOCK_HW], tl.float32)
    for t in range(t0, tl.minimum(t0 + per, tl.cdiv(HW, BLOCK_HW))):
        offs, m = _nchw_tile(t, row_off, rmask, HW, BLOCK_HW, ALIGN)
        gxy, gx = _reduce_tile(grad_x_next_ptr, grad_a_next_ptr, y_ptr, shortcut_ptr, grad_shortcut_ptr, offs, m,
                               g[:, None], beta, HAS_GX, HAS_GA)
        acc += gxy
        if SUMS:
            acc_gx += gx
    tl.store(dpart_ptr + (n * Sb + s) * C + c, tl.sum(acc, axis=1), mask=rmask)
    if SUMS:
        tl.store(spart_ptr + (n * Sb + s) * C + c, tl.sum(acc_gx, axis=1), mask=rmask)


@triton.jit(do_not_specialize=["S", "Sb"])
def _gate_bwd_kernel(stats_ptr, dpart_ptr, w_ptr, gate_ptr, dz_ptr, dwp_ptr, C, S, Sb, K, inv_hw, coef,
                     BLOCK: tl.constexpr):
    n = tl.program_id(0)
    cb = tl.program_id(1)
    c = cb * BLOCK + tl.arange(0, BLOCK)
    cmask = c < C
    stats_n = stats_ptr + n * S * C
    sig = _gate(stats_n, w_ptr, c, cmask, C, S, K, inv_hw)
    dgate = tl.zeros([BLOCK], tl.float32)
    for s in range(Sb):
        dgate += tl.load(dpart_ptr + (n * Sb + s) * C + c, mask=cmask, other=0.0)
    dz = tl.where(cmask, dgate * coef * sig * (1.0 - sig), 0.0)  # dL/dlogit
    tl.store(gate_ptr + n * C + c, coef * sig, mask=cmask)
    tl.store(dz_ptr + n * C + c, dz, mask=cmask)
    # dL/dw[j] = sum_c dz[c] * mean[c + j - P]: one partial sum per (program, j), summed by the caller.
    P = (K - 1) // 2
    row = (n * tl.num_programs(1) + cb) * K
    for j in range(K):
        cc = c + (j - P)
        m = cmask & (cc >= 0) & (cc < C)
        p = tl.zeros([BLOCK], tl.float32)
        for s in range(S):
            p += tl.load(stats_n + s * C + cc, mask=m, other=0.0)
        tl.store(dwp_ptr + row + j, tl.sum(dz * p) * inv_hw)


@triton.jit(do_not_specialize=["N", "Sb", "A", "per"])
def _dy_nhwc_kernel(grad_x_next_ptr, gate_ptr, dz_ptr, w_ptr, grad_y_ptr, spart_ptr, bpart_ptr, N, C, HW, K, Sb,
                    inv_hw, A, per, SUMS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, cb = _reversed_ids()
    n = pid // A
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    g = tl.load(gate_ptr + n * C + c, mask=cmask, other=0.0)
    dmean = _dlogit_to_mean(dz_ptr + n * C, w_ptr, c, cmask, C, K, inv_hw)
    if SUMS:
        if pid % A == 0:
            _bias_parts(spart_ptr, bpart_ptr, n, c, cmask, N, C, HW, Sb, g, dmean)
    img = n.to(tl.int64) * HW * C
    t0 = (pid % A) * per
    for t in range(t0, tl.minimum(t0 + per, tl.cdiv(HW, BLOCK_P))):
        offs, m = _nhwc_tile(t, c, cmask, C, HW, BLOCK_P)
        _dy_tile(grad_x_next_ptr + img, grad_y_ptr + img, offs, m, g[None, :], dmean[None, :])


@triton.jit(do_not_specialize=["N", "NC", "Sb", "per"])
def _dy_nchw_kernel(grad_x_next_ptr, gate_ptr, dz_ptr, w_ptr, grad_y_ptr, spart_ptr, bpart_ptr, N, NC, C, HW, K, Sb,
                    inv_hw, per, SUMS: tl.constexpr, ROWS: tl.constexpr, BLOCK_HW: tl.constexpr, ALIGN: tl.constexpr):
    pid, split = _reversed_ids()
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_off, rmask = _nchw_rows(rows, NC, HW, ALIGN)
    n = rows // C
    g = tl.load(gate_ptr + rows, mask=rmask, other=0.0)
    dmean = _dlogit_to_mean(dz_ptr + n * C, w_ptr, rows - n * C, rmask, C, K, inv_hw)
    if SUMS:
        if split == 0:
            _bias_parts(spart_ptr, bpart_ptr, n, rows - n * C, rmask, N, C, HW, Sb, g, dmean)
    t0 = split * per
    for t in range(t0, tl.minimum(t0 + per, tl.cdiv(HW, BLOCK_HW))):
        offs, m = _nchw_tile(t, row_off, rmask, HW, BLOCK_HW, ALIGN)
        _dy_tile(grad_x_next_ptr, grad_y_ptr, offs, m, g[:, None], dmean[:, None])


# ---------------------------------------------------------------------------------------------
# launch configuration


class Plan(NamedTuple):
    """How one launch covers an (N, C, H, W) activation: each tile column (a program's strip of
    channels or (n, c) rows) is cut into ``splits`` pieces of ``per`` pixel tiles."""

    splits: int
    per: int
    grid: tuple
    tile: types.MappingProxyType  # the layout kernels' tile constexprs and num_warps


def plan(shape, channels_last: bool, device: torch.device, pool: bool = False, gpu_config: bool = False) -> Plan:
    """The launch of a pool/reduce (``pool=True``: splits capped, they become partial sums) or
    apply kernel for ``shape``. CPU tensors (the interpreter) get CPU_* tiles and no splits unless
    ``gpu_config``. Memoised: a training step asks for three plans per block (forward apply,
    backward reduce and dy) over a dozen shapes, and computing one took ~10 us of host time (five
    triton.cdiv calls), about what a 7x7 layer's kernel runs on an H100."""
    shape, gpu = tuple(shape), device.type == "cuda" or gpu_config
    if all(type(size) is int for size in shape):
        return _plan(shape, channels_last, gpu, pool)
    return _plan.__wrapped__(shape, channels_last, gpu, pool)  # symbolic sizes (fake tensors) do not hash


@functools.lru_cache(maxsize=4096)
def _plan(shape: tuple, channels_last: bool, gpu: bool, pool: bool) -> Plan:
    n, c, h, w = shape
    hw = h * w
    if channels_last:
        bp = BLOCK_P if gpu else CPU_BLOCK_P
        cols, tiles = n * cdiv(c, BLOCK_C), cdiv(hw, bp)
        tile = dict(BLOCK_P=bp, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
    else:
        rows = ROWS if gpu else CPU_ROWS
        cols, tiles = cdiv(n * c, rows), cdiv(hw, BLOCK_HW)
        tile = dict(ROWS=rows, BLOCK_HW=BLOCK_HW, ALIGN=_align(hw), num_warps=NUM_WARPS)
    want = min(cdiv(TARGET_PROGRAMS if gpu else 1, cols), tiles, MAX_POOL_SPLITS if pool else 65535)
    per = cdiv(tiles, want)
    splits = cdiv(tiles, per)
    # channels_last: (image x split, channel block); NCHW: (row block, split)
    grid = (n * splits, cols // n) if channels_last else (cols, splits)
    # (read-only: every caller of a memoised plan shares its tile)
    return Plan(splits, per, grid, types.MappingProxyType(tile))


def _align(hw: int) -> int:
    """ALIGN for NCHW rows of ``hw`` pixels: 16, 4 or 1, the largest that divides ``hw``. (The hint
    replaces what Triton infers, so 16-divisible sizes must say 16, not 4.)"""
    return 16 if hw % 16 == 0 else 4 if hw % 4 == 0 else 1


def pool_splits(shape, channels_last: bool, device: torch.device, gpu_config: bool = False) -> int:
    """S, the number of fp32 partial sums per (n, c) that :func:`forward` returns."""
    return plan(shape, channels_last, device, pool=True, gpu_config=gpu_config).splits


def is_channels_last(y: torch.Tensor) -> bool:
    """Which kernels serve ``y`` (NCHW- or channels_last-contiguous; NCHW when both)."""
    return not y.is_contiguous()


def _check(y: torch.Tensor) -> None:
    n, c, h, w = y.shape
    if c * h * w >= 2 ** 31:
        raise ValueError(f"one image of {c}x{h}x{w} elements is too large for 32-bit in-image offsets")


def _pool(y: torch.Tensor, cl: bool, gpu_config: bool) -> torch.Tensor:
    n, c, h, w = y.shape
    pl = plan(y.shape, cl, y.device, pool=True, gpu_config=gpu_config)
    part = torch.empty((n, pl.splits, c), device=y.device, dtype=torch.float32)
    if cl:
        launch(_pool_nhwc_kernel, pl.grid, y, part, c, h * w, pl.splits, pl.per, **pl.tile)
    else:
        launch(_pool_nchw_kernel, pl.grid, y, part, n * c, c, h * w, pl.splits, pl.per, **pl.tile)
    return part


def forward(y: torch.Tensor, weight: torch.Tensor, shortcut: Optional[torch.Tensor], coef: float,
            beta_next: Optional[float], gpu_config: bool = False, sums: Optional[torch.Tensor] = None):
    """``(x_next, a_next, stats)``: ``x_next = coef * y * gate (+ shortcut)``, ``a_next =
    silu(x_next) * beta_next`` (None without ``beta_next``) and ``stats``, the (N, S, C) fp32 partial
    channel sums the backward needs.

    ``y`` is NCHW- or channels_last-contiguous; ``shortcut`` (or None) has ``y``'s strides;
    ``weight`` holds the K conv1d taps in fp32, contiguous. Outputs have ``y``'s strides.
    ``gpu_config``: the GPU launch configuration on CPU tensors too (tests). ``sums``: y's fp32
    (N, C) channel sums from y's producer (contiguous): then no pooling launch reads y, and they are
    the stats (S = 1).
    """
    _check(y)
    n, c, h, w = y.shape
    cl = is_channels_last(y)
    x_next = torch.empty_like(y)
    a_next = torch.empty_like(y) if beta_next is not None else None
    with device_guard(y):
        stats = _pool(y, cl, gpu_config) if sums is None else sums.view(n, 1, c)
        pl = plan(y.shape, cl, y.device, gpu_config=gpu_config)
        args = (y, y if shortcut is None else shortcut, x_next, x_next if a_next is None else a_next, stats, weight)
        scal = (stats.shape[1], weight.numel(), 1.0 / (h * w), float(coef),
                0.0 if beta_next is None else float(beta_next))
        flags = dict(HAS_RES=shortcut is not None, HAS_NEXT=a_next is not None, **pl.tile)
        if cl:
            launch(_apply_nhwc_kernel, pl.grid, *args, c, h * w, *scal, pl.splits, pl.per, **flags)
        else:
            launch(_apply_nchw_kernel, pl.grid, *args, n * c, c, h * w, *scal, pl.per, **flags)
    return x_next, a_next, stats


def backward(grad_x_next: Optional[torch.Tensor], grad_a_next: Optional[torch.Tensor], y: torch.Tensor,
             weight: torch.Tensor, shortcut: Optional[torch.Tensor], stats: torch.Tensor, coef: float,
             beta_next: Optional[float], gpu_config: bool = False, want_bias_sums: bool = False):
    """``(grad_y, grad_weight, grad_shortcut, bias_sums)`` of :func:`forward`'s outputs.

    ``grad_x_next``/``grad_a_next`` are the gradients of x_next and a_next (either may be None, not
    both; ``grad_a_next`` needs ``shortcut`` and ``beta_next``), with ``y``'s strides.
    ``grad_weight`` is fp32 (K,). ``grad_shortcut`` is computed only with ``grad_a_next`` (else it is
    ``grad_x_next`` itself, and None is returned). ``bias_sums`` (``want_bias_sums``, else None): the fp32
    (2, C) sums over (N, H, W) of grad_y and of the shortcut's gradient, in fp32 before any rounding to
    y's dtype: the gradients of biases added last to y and to the shortcut, made from the reduce pass's
    sums of the shortcut's gradient at no extra read of an activation.
    """
    _check(y)
    n, c, h, w = y.shape
    hw = h * w
    k = weight.numel()
    cl = is_channels_last(y)
    has_ga = grad_a_next is not None
    grad_shortcut = torch.empty_like(y) if has_ga else None
    grad_y = torch.empty_like(y)
    with device_guard(y):
        pr = plan(y.shape, cl, y.device, pool=True, gpu_config=gpu_config)
        dpart = torch.empty((n, pr.splits, c), device=y.device, dtype=torch.float32)
        spart = torch.empty_like(dpart) if want_bias_sums else dpart  # (the shortcut's gradient's partial sums)
        ptrs = (y if grad_x_next is None else grad_x_next, grad_a_next if has_ga else y, y,
                shortcut if has_ga else y, grad_shortcut if has_ga else y, stats, weight, dpart, spart)
        scal = (stats.shape[1], pr.splits, k, 1.0 / hw, float(coef), float(beta_next) if has_ga else 0.0, pr.per)
        flags = dict(HAS_GX=grad_x_next is not None, HAS_GA=has_ga, SUMS=want_bias_sums, **pr.tile)
        if cl:
            launch(_reduce_nhwc_kernel, pr.grid, *ptrs, c, hw, *scal, **flags)
        else:
            launch(_reduce_nchw_kernel, pr.grid, *ptrs, n * c, c, hw, *scal, **flags)

        gate = torch.empty((n, c), device=y.device, dtype=torch.float32)
        dz = torch.empty_like(gate)
        cblocks = cdiv(c, GATE_BLOCK)
        dwp = torch.empty((n * cblocks, k), device=y.device, dtype=torch.float32)
        launch(_gate_bwd_kernel, (n, cblocks), stats, dpart, weight, gate, dz, dwp, c, stats.shape[1], pr.splits, k,
               1.0 / hw, float(coef), BLOCK=GATE_BLOCK, num_warps=GATE_WARPS)

        dx_total = grad_shortcut if has_ga else grad_x_next  # d(loss)/d(x_next), the act's share included
        pl = plan(y.shape, cl, y.device, gpu_config=gpu_config)
        bpart = torch.empty((2, n, c), device=y.device, dtype=torch.float32) if want_bias_sums else gate
        ptrs = (dx_total, gate, dz, weight, grad_y, spart, bpart)
        if cl:
            launch(_dy_nhwc_kernel, pl.grid, *ptrs, n, c, hw, k, pr.splits, 1.0 / hw, pl.splits, pl.per,
                   SUMS=want_bias_sums, **pl.tile)
        else:
            launch(_dy_nchw_kernel, pl.grid, *ptrs, n, n * c, c, hw, k, pr.splits, 1.0 / hw, pl.per,
                   SUMS=want_bias_sums, **pl.tile)
    return grad_y, dwp.sum(0), grad_shortcut, bpart.sum(1) if want_bias_sums else None


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile matrix: every constexpr combination the launchers above can pass

_F32 = "*fp32"
_FLOATS = dict(inv_hw="fp32", coef="fp32", beta="fp32")
_NHWC = dict(BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS)
_NCHW = [dict(ROWS=ROWS, BLOCK_HW=BLOCK_HW, ALIGN=al, num_warps=NUM_WARPS) for al in (1, 4, 16)]
_APPLY_MODES = [dict(HAS_RES=False, HAS_NEXT=False), dict(HAS_RES=True, HAS_NEXT=False),
                dict(HAS_RES=True, HAS_NEXT=True)]  # ops.eca, eca_residual, eca_residual + beta_next
_REDUCE_MODES = [dict(HAS_GX=gx, HAS_GA=ga, SUMS=sums) for gx, ga in ((True, False), (False, True), (True, True))
                 for sums in (False, True)]
AOT = [
    AotSpec(_pool_nhwc_kernel, dict(stats_ptr=_F32), [_NHWC], aligned=("y_ptr", "stats_ptr", "C")),
    AotSpec(_pool_nchw_kernel, dict(stats_ptr=_F32), _NCHW, aligned=("y_ptr", "stats_ptr", "C", "HW")),
    AotSpec(_apply_nhwc_kernel, dict(stats_ptr=_F32, w_ptr=_F32, **_FLOATS),
            [dict(**m, **_NHWC) for m in _APPLY_MODES],
            aligned=("y_ptr", "shortcut_ptr", "x_next_ptr", "a_next_ptr", "stats_ptr", "w_ptr", "C")),
    AotSpec(_apply_nchw_kernel, dict(stats_ptr=_F32, w_ptr=_F32, **_FLOATS),
            [dict(**m, **t) for m in _APPLY_MODES for t in _NCHW],
            aligned=("y_ptr", "shortcut_ptr", "x_next_ptr", "a_next_ptr", "stats_ptr", "w_ptr", "C", "HW")),
    AotSpec(_reduce_nhwc_kernel, dict(stats_ptr=_F32, w_ptr=_F32, dpart_ptr=_F32, spart_ptr=_F32, **_FLOATS),
            [dict(**m, **_NHWC) for m in _REDUCE_MODES],
            aligned=("grad_x_next_ptr", "grad_a_next_ptr", "y_ptr", "shortcut_ptr", "grad_shortcut_ptr", "stats_ptr", "w_ptr", "dpart_ptr",
                     "spart_ptr", "C")),
    AotSpec(_reduce_nchw_kernel, dict(stats_ptr=_F32, w_ptr=_F32, dpart_ptr=_F32, spart_ptr=_F32, **_FLOATS),
            [dict(**m, **t) for m in _REDUCE_MODES for t in _NCHW],
            aligned=("grad_x_next_ptr", "grad_a_next_ptr", "y_ptr", "shortcut_ptr", "grad_shortcut_ptr", "stats_ptr", "w_ptr", "dpart_ptr",
                     "spart_ptr", "C", "HW")),
    AotSpec(_gate_bwd_kernel, dict(stats_ptr=_F32, dpart_ptr=_F32, w_ptr=_F32, gate_ptr=_F32, dz_ptr=_F32,
                                   dwp_ptr=_F32, inv_hw="fp32", coef="fp32"),
            [dict(BLOCK=GATE_BLOCK, num_warps=GATE_WARPS)],
            aligned=("stats_ptr", "dpart_ptr", "w_ptr", "gate_ptr", "dz_ptr", "dwp_ptr", "C")),
    AotSpec(_dy_nhwc_kernel, dict(gate_ptr=_F32, dz_ptr=_F32, w_ptr=_F32, spart_ptr=_F32, bpart_ptr=_F32, inv_hw="fp32"),
            [dict(SUMS=sums, **_NHWC) for sums in (False, True)],
            aligned=("grad_x_next_ptr", "gate_ptr", "dz_ptr", "w_ptr", "grad_y_ptr", "spart_ptr", "bpart_ptr", "C")),
    AotSpec(_dy_nchw_kernel, dict(gate_ptr=_F32, dz_ptr=_F32, w_ptr=_F32, spart_ptr=_F32, bpart_ptr=_F32, inv_hw="fp32"),
            [dict(SUMS=sums, **t) for sums in (False, True) for t in _NCHW],
            aligned=("grad_x_next_ptr", "gate_ptr", "dz_ptr", "w_ptr", "grad_y_ptr", "spart_ptr", "bpart_ptr", "C", "HW")),
]
