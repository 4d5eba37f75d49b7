"""Scaled weight standardisation (timm's ``ScaledStdConv2d``): Triton forward and backward kernels.

The weight is viewed as rows, one per output channel, of ``K = fan_in`` elements:
``out = (w - mean) * rstd * gain * scale`` with ``rstd = 1 / sqrt(var + eps)`` (biased variance),
in fp32. A program owns ``ROWS`` whole rows held in registers, so statistics and normalisation
take one read of the weight; rows longer than the largest tile (never in eca_nfnet_l0, whose
largest fan-in is 1536) loop over the row instead (reading it again from L2).
With ``packed`` the forward writes the result in another layout and dtype: the fused
convolution's K-major ``(kh, kw, C_in/groups, C_out)`` matrix in the activation dtype, so a
training step standardises, casts and packs each weight in one launch (see
``kernels/fused_conv.py``, "weight standardisation").
The backward is batch norm's over the fan-in:
``dw = rstd * gs * (dy - mean(dy) - xhat * mean(dy * xhat))`` and ``dgain = scale * sum(dy * xhat)``,
where ``xhat = (w - mean) * rstd`` and ``gs = gain * scale``.
"""
from __future__ import annotations

import functools
import types
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from . import AotSpec, cdiv, device_guard, launch

# A program's tile is ROWS x BLOCK_K = 4096 elements (16 a thread at 8 warps): BLOCK_K is the
# smallest of these row lengths that holds the fan-in, so short rows share a program (the 27-wide
# stem rows go 64 to a program) and long ones get a program each (1536 wide: 2304 programs for the
# final conv, plenty for 132 SMs).
TILE = 4096
BLOCK_KS = (64, 256, 1024, 2048, 4096)
NUM_WARPS = 8
# Under the interpreter (CPU tensors) each program costs milliseconds of Python whatever its size,
# so CPU launches put 16x more rows in a program (same kernel code, a larger ROWS); the launchers'
# gpu_config=True runs the GPU configuration there too (tests).
CPU_TILE = 65536


@triton.jit
def _load_rows(ptr, rows, rmask, K, k0, BLOCK_K: tl.constexpr):
    """A (ROWS, BLOCK_K) fp32 tile of rows ``rows`` at columns ``k0 + [0, BLOCK_K)``, and its mask."""
    k = k0 + tl.arange(0, BLOCK_K)
    m = rmask[:, None] & (k < K)[None, :]
    offs = rows.to(tl.int64)[:, None] * K + k[None, :]
    return tl.load(ptr + offs, mask=m, other=0.0).to(tl.float32), offs, m


@triton.jit
def _tile_stats(w, m, K, eps):
    """Centred rows ``w - mean`` (zero outside the mask) and per-row rstd of a whole-row tile."""
    mean = tl.sum(w, axis=1) / K
    d = tl.where(m, w - mean[:, None], 0.0)
    var = tl.sum(d * d, axis=1) / K
    # IEEE sqrt and division: one per row, so the exact versions cost nothing.
    return d, tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _looped_stats(w_ptr, rows, rmask, K, eps, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per-row mean and rstd of rows longer than a tile: two passes (mean, then the centred
    variance, which does not cancel the way E[w^2] - mean^2 does)."""
    acc = tl.zeros([ROWS, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w, offs, m = _load_rows(w_ptr, rows, rmask, K, k0, BLOCK_K)
        acc += w
    mean = tl.sum(acc, axis=1) / K
    acc = tl.zeros([ROWS, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w, offs, m = _load_rows(w_ptr, rows, rmask, K, k0, BLOCK_K)
        d = tl.where(m, w - mean[:, None], 0.0)
        acc += d * d
    var = tl.sum(acc, axis=1) / K
    return mean, tl.div_rn(1.0, tl.sqrt_rn(var + eps))


@triton.jit
def _out_offsets(offs, rows, k, C_out, K, TAPS, PACKED: tl.constexpr):
    """Where weight element (row, k) goes: ``offs`` (the input's own layout), or with PACKED the
    (tap, channel, row) position of the (kh, kw, C_in/groups, C_out) matrix, k = channel * TAPS + tap."""
    if PACKED:
        c = k // TAPS
        return ((k - c * TAPS) * (K // TAPS) + c).to(tl.int64)[None, :] * C_out + rows[:, None]
    return offs


@triton.jit
def _std_fwd_rows(w_ptr, gain_ptr, out_ptr, rows, C_out, K, TAPS, scale, eps,
                  ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE: tl.constexpr, PACKED: tl.constexpr):
    """Standardise weight rows ``rows`` (one program's): the forward kernels' one body, so that a
    weight standardised alone or among others (``_std_fwd_many_kernel``) gets the same bits."""
    rmask = rows < C_out
    gs = tl.load(gain_ptr + rows, mask=rmask, other=0.0).to(tl.float32) * scale
    if SINGLE:  # the row stays in registers between the statistics and the write
        w, offs, m = _load_rows(w_ptr, rows, rmask, K, 0, BLOCK_K)
        d, rstd = _tile_stats(w, m, K, eps)
        out = d * (rstd * gs)[:, None]
        dst = _out_offsets(offs, rows, tl.arange(0, BLOCK_K), C_out, K, TAPS, PACKED)
        tl.store(out_ptr + dst, out.to(out_ptr.dtype.element_ty), mask=m)
    else:
        mean, rstd = _looped_stats(w_ptr, rows, rmask, K, eps, ROWS, BLOCK_K)
        for k0 in range(0, K, BLOCK_K):
            w, offs, m = _load_rows(w_ptr, rows, rmask, K, k0, BLOCK_K)
            out = (w - mean[:, None]) * (rstd * gs)[:, None]
            dst = _out_offsets(offs, rows, k0 + tl.arange(0, BLOCK_K), C_out, K, TAPS, PACKED)
            tl.store(out_ptr + dst, out.to(out_ptr.dtype.element_ty), mask=m)


# (compiled knowing nothing of its pointers' alignment or its sizes' divisibility, as
# _std_fwd_many_kernel knows nothing of the addresses and sizes it reads from its table: the same
# layouts, so the same order of the row sums, so a weight standardised by either gets the same bits;
# tests/test_scaled_std_weight.py compares their compiled layouts. A weight is small: its loads
# need no vectors.)
@triton.jit(do_not_specialize=["C_out", "K", "TAPS"], do_not_specialize_on_alignment=["w_ptr", "gain_ptr", "out_ptr"])
def _std_fwd_kernel(w_ptr, gain_ptr, out_ptr, C_out, K, TAPS, scale, eps,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE: tl.constexpr, PACKED: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    _std_fwd_rows(w_ptr, gain_ptr, out_ptr, rows, C_out, K, TAPS, scale, eps, ROWS, BLOCK_K, SINGLE, PACKED)


# One row of ``_std_fwd_many_kernel``'s per-program table (int64): the weight's and the gain's
# addresses, the packed operand's offset in the output buffer (elements), the weight's C_out, fan-in
# and TAPS, and the program's first row; its fp32 table holds the weight's scale and eps.
TABLE_INTS = tl.constexpr(7)


@triton.jit
def _std_fwd_many_kernel(table_ptr, coef_ptr, out_ptr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr,
                         SINGLE: tl.constexpr):
    """Many fp32 weights with the same tile, each into its packed operand in one buffer: each program
    reads its weight's addresses and sizes from its table row, then runs the one-weight kernel's body."""
    row = table_ptr + tl.program_id(0) * TABLE_INTS
    w = tl.load(row).to(tl.pointer_type(tl.float32))
    gain = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    out = out_ptr + tl.load(row + 2).to(tl.int32)  # (an int32 offset: an int64 one left ptxas a stack frame)
    c_out = tl.load(row + 3).to(tl.int32)
    k = tl.load(row + 4).to(tl.int32)
    taps = tl.load(row + 5).to(tl.int32)
    rows = tl.load(row + 6).to(tl.int32) + tl.arange(0, ROWS)
    scale = tl.load(coef_ptr + tl.program_id(0) * 2)
    eps = tl.load(coef_ptr + tl.program_id(0) * 2 + 1)
    _std_fwd_rows(w, gain, out, rows, c_out, k, taps, scale, eps, ROWS, BLOCK_K, SINGLE, True)


@triton.jit(do_not_specialize=["C_out"])
def _std_bwd_kernel(dy_ptr, w_ptr, gain_ptr, dw_ptr, dgain_ptr, C_out, K, scale, eps,
                    ROWS: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < C_out
    gs = tl.load(gain_ptr + rows, mask=rmask, other=0.0).to(tl.float32) * scale
    if SINGLE:
        w, offs, m = _load_rows(w_ptr, rows, rmask, K, 0, BLOCK_K)
        dy, offs, m = _load_rows(dy_ptr, rows, rmask, K, 0, BLOCK_K)
        d, rstd = _tile_stats(w, m, K, eps)
        xhat = d * rstd[:, None]
        mean_dy = tl.sum(dy, axis=1) / K
        sum_dy_xhat = tl.sum(dy * xhat, axis=1)
        dw = (dy - mean_dy[:, None] - xhat * (sum_dy_xhat / K)[:, None]) * (rstd * gs)[:, None]
        tl.store(dw_ptr + offs, dw.to(dw_ptr.dtype.element_ty), mask=m)
    else:
        mean, rstd = _looped_stats(w_ptr, rows, rmask, K, eps, ROWS, BLOCK_K)
        acc_dy = tl.zeros([ROWS, BLOCK_K], tl.float32)
        acc_dyx = tl.zeros([ROWS, BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w, offs, m = _load_rows(w_ptr, rows, rmask, K, k0, BLOCK_K)
            dy, offs, m = _load_rows(dy_ptr, rows, rmask, K, k0, BLOCK_K)
            acc_dy += dy
            acc_dyx += dy * tl.where(m, (w - mean[:, None]) * rstd[:, None], 0.0)
        mean_dy = tl.sum(acc_dy, axis=1) / K
        sum_dy_xhat = tl.sum(acc_dyx, axis=1)
        for k0 in range(0, K, BLOCK_K):
            w, offs, m = _load_rows(w_ptr, rows, rmask, K, k0, BLOCK_K)
            dy, offs, m = _load_rows(dy_ptr, rows, rmask, K, k0, BLOCK_K)
            xhat = (w - mean[:, None]) * rstd[:, None]
            dw = (dy - mean_dy[:, None] - xhat * (sum_dy_xhat / K)[:, None]) * (rstd * gs)[:, None]
            tl.store(dw_ptr + offs, dw.to(dw_ptr.dtype.element_ty), mask=m)
    # d out / d gain = xhat * scale, summed over the row
    tl.store(dgain_ptr + rows, sum_dy_xhat * scale, mask=rmask)


def config(fan_in: int, device: torch.device = torch.device("cuda"), gpu_config: bool = False
           ) -> types.MappingProxyType:
    """Tile for rows of ``fan_in`` elements: whole rows in registers when they fit, else a loop.
    CPU tensors (the interpreter) get taller tiles unless ``gpu_config``. Memoised and read-only:
    training standardises every conv's weight and differentiates the standardisation every step,
    and the launch's host time, not the kernel's, is what these small launches cost."""
    return _config(fan_in, device.type == "cuda" or gpu_config)


@functools.lru_cache(maxsize=1024)
def _config(fan_in: int, gpu: bool) -> types.MappingProxyType:
    tile = TILE if gpu else CPU_TILE
    for block_k in BLOCK_KS:
        if fan_in <= block_k:
            return types.MappingProxyType(dict(ROWS=tile // block_k, BLOCK_K=block_k, SINGLE=True,
                                               num_warps=NUM_WARPS))
    # Looping over longer rows keeps two fp32 accumulator tiles (backward) live across the loop:
    # half a tile keeps them at 8 values a thread, clear of ptxas's register budget.
    return types.MappingProxyType(dict(ROWS=1, BLOCK_K=TILE // 2, SINGLE=False, num_warps=NUM_WARPS))


_CONFIGS = [config(k) for k in BLOCK_KS] + [config(BLOCK_KS[-1] + 1)]
AOT = [
    # (no argument aligned: the kernel never specialises on it)
    AotSpec(_std_fwd_kernel, dict(scale="fp32", eps="fp32"), [dict(PACKED=False, **c) for c in _CONFIGS]),
    # packed: fp32 weight in, 16-bit out (the fused conv's operand under autocast)
    AotSpec(_std_fwd_kernel, dict(w_ptr="*fp32", gain_ptr="*fp32", scale="fp32", eps="fp32"),
            [dict(PACKED=True, **c) for c in _CONFIGS]),
    AotSpec(_std_bwd_kernel, dict(dgain_ptr="*fp32", scale="fp32", eps="fp32"), _CONFIGS,
            aligned=("dy_ptr", "w_ptr", "gain_ptr", "dw_ptr", "dgain_ptr", "K")),
    # the fused conv's backward: the conv's 16-bit weight gradient in, the fp32 raw weight's out
    AotSpec(_std_bwd_kernel, dict(w_ptr="*fp32", gain_ptr="*fp32", dw_ptr="*fp32", dgain_ptr="*fp32", scale="fp32",
                                  eps="fp32"), _CONFIGS,
            aligned=("dy_ptr", "w_ptr", "gain_ptr", "dw_ptr", "dgain_ptr", "K"), dtypes=("fp16", "bf16")),
    # many fp32 weights at once into their packed operands (forward_many: a training forward's convs)
    AotSpec(_std_fwd_many_kernel, dict(table_ptr="*i64", coef_ptr="*fp32"), _CONFIGS,
            aligned=("table_ptr", "coef_ptr", "out_ptr")),
]


def _rows(weight: torch.Tensor):
    c_out = weight.shape[0]
    return c_out, weight.numel() // c_out


def rows_layout(weight: torch.Tensor) -> Optional[torch.memory_format]:
    """The layout in which each of ``weight``'s rows (one per output channel) is one dense block of its
    fan-in, the only layouts the kernels read: contiguous (the fan-in channel-major), or for a 4-D
    weight channels_last-contiguous (tap-major: a channels_last model's kxk conv weights, and cuDNN's
    weight gradients of channels_last activations). None for any other layout (the caller copies).
    The kernels' row statistics do not depend on the order within a row, so a weight and its
    gradient in the same layout need no copy to contiguous; only the packed write's offsets do."""
    if weight.is_contiguous():
        return torch.contiguous_format
    if weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return None


def _check_rows(t: torch.Tensor, name: str, ref: Optional[torch.Tensor] = None) -> torch.memory_format:
    """``t``'s rows layout (see :func:`rows_layout`); with ``ref``, it must be ``ref``'s, element for element."""
    layout = rows_layout(t)
    if layout is None:
        raise ValueError(f"{name} must be contiguous or channels_last-contiguous, got strides {t.stride()}")
    if ref is not None and (t.shape != ref.shape or t.stride() != ref.stride() and any(
            a != b for a, b, n in zip(t.stride(), ref.stride(), t.shape) if n > 1)):
        raise ValueError(f"{name} {tuple(t.shape)} (strides {t.stride()}) must be laid out like the weight "
                         f"{tuple(ref.shape)} (strides {ref.stride()})")
    return layout


def forward(weight: torch.Tensor, gain: torch.Tensor, scale: float, eps: float, gpu_config: bool = False,
            packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``out``, the standardised ``weight`` in ``weight``'s layout and dtype; ``weight`` contiguous or
    channels_last-contiguous (:func:`rows_layout`), ``gain`` C_out contiguous values (any shape:
    (C_out,), a conv's (C_out, 1, 1, 1)). ``packed``: instead write the result into this contiguous
    (kh, kw, C_in/groups, C_out) tensor, in its dtype, and return it. ``gpu_config``: the GPU tiles
    on CPU tensors too (tests)."""
    c_out, fan_in = _rows(weight)
    layout = _check_rows(weight, "weight")
    # (the packed write's offsets: a channels_last row is tap-major already, so it is written as a
    # 1x1 conv's row is, TAPS 1: the same binary as every 1x1 conv's)
    taps = weight.shape[2] * weight.shape[3] if weight.dim() == 4 and layout == torch.contiguous_format else 1
    if packed is None:
        out = torch.empty_like(weight, memory_format=layout)
    else:
        if weight.dim() != 4 or packed.shape != (*weight.shape[2:], weight.shape[1], c_out) \
                or not packed.is_contiguous():
            raise ValueError(f"packed must be a contiguous (kh, kw, C_in/groups, C_out) tensor for weight "
                             f"{tuple(weight.shape)}, got {tuple(packed.shape)}")
        out = packed
    cfg = _config(fan_in, weight.is_cuda or gpu_config)
    with device_guard(weight):
        launch(_std_fwd_kernel, (cdiv(c_out, cfg["ROWS"]),), weight, gain, out, c_out, fan_in, taps, float(scale),
               float(eps), PACKED=packed is not None, **cfg)
    return out


def backward(grad_out: torch.Tensor, weight: torch.Tensor, gain: torch.Tensor, scale: float, eps: float,
             gpu_config: bool = False):
    """``(grad_weight, grad_gain)``: grad_weight in ``weight``'s layout and dtype, grad_gain fp32 with
    C_out values. ``weight`` contiguous or channels_last-contiguous (:func:`rows_layout`),
    ``grad_out`` in the same layout (a channels_last conv weight's gradient from cuDNN, as it comes:
    no copy), ``gain`` C_out contiguous values. ``grad_out`` may be in another float dtype than
    ``weight`` (the fused conv's 16-bit weight gradient of an fp32 weight): the kernel reads it as
    fp32, exact for any 16-bit value, so for an fp32 weight the same bits as casting it first,
    without that cast's launch and pass."""
    c_out, fan_in = _rows(weight)
    layout = _check_rows(weight, "weight")
    _check_rows(grad_out, "grad_out", weight)
    grad_weight = torch.empty_like(weight, memory_format=layout)
    grad_gain = torch.empty(c_out, device=weight.device, dtype=torch.float32)
    cfg = _config(fan_in, weight.is_cuda or gpu_config)
    with device_guard(weight):
        launch(_std_bwd_kernel, (cdiv(c_out, cfg["ROWS"]),), grad_out, weight, gain, grad_weight, grad_gain, c_out,
               fan_in, float(scale), float(eps), **cfg)
    return grad_weight, grad_gain


# forward_many's output buffer places each packed operand at a multiple of this many bytes: 16-byte
# aligned, as a fresh allocation is, so the fused conv reading it specialises (and tiles) as it would
# for an operand of its own
_OPERAND_ALIGN = 256
_PLANS: dict = {}  # forward_many's plans, by the weights' and gains' addresses, shapes and coefficients
_PLANS_MAX = 16    # (a model's training forward needs one: bounded should the parameters keep moving)
_CAPTURED: set = set()  # keys of plans whose tables a CUDA graph reads: never dropped (its replays read them)


def forward_many(weights: Sequence[torch.Tensor], gains: Sequence[torch.Tensor], scales: Sequence[float],
                 epss: Sequence[float], dtype: torch.dtype, gpu_config: bool = False) -> Optional[List[torch.Tensor]]:
    """Each ``weights[i]`` standardised (``gains[i]``, ``scales[i]``, ``epss[i]``) into its packed
    (kh, kw, C_in/groups, C_out) operand in ``dtype``: the values :func:`forward` writes with
    ``packed=``, in the same bits (each weight gets the tile it gets alone, and the same kernel body),
    from one launch per tile instead of one per weight. The operands are views of one buffer.

    For a training forward, which standardises every conv weight of a model before its convs run
    (nfnet_fast.nn): the launch, its host time, is what a weight's standardisation costs, and a step
    makes 57. The table of addresses the kernel reads is built once per set of weights (parameters
    keep their storage from step to step) and kept on the device, for good once a CUDA graph captured
    a launch reading it; so None, where the call would have to build one while a graph is being
    captured (a host-to-device copy). A weight that
    :func:`reads_packed` refuses, or on another device than the first, gets None in the list (the
    caller standardises it itself). ``dtype``: fp32, fp16 or bf16."""
    n = len(weights)
    if not n or not (len(gains) == len(scales) == len(epss) == n):
        raise ValueError(f"forward_many needs as many gains, scales and eps as weights (got {len(weights)}, "
                         f"{len(gains)}, {len(scales)}, {len(epss)}), and at least one")
    device = weights[0].device
    gpu = device.type == "cuda" or gpu_config
    # (what the plan depends on: each tensor's address, device, dtype, shape and strides, each
    # coefficient. Held by the caller as it is: no reference to the tensors is kept.)
    key = [device, dtype, gpu]
    for w, g, sc, ep in zip(weights, gains, scales, epss):
        key += (w.data_ptr(), w.get_device(), w.dtype, w.shape, w.stride(), g.data_ptr(), g.get_device(), g.dtype,
                g.shape, g.stride(), sc, ep)
    key = tuple(key)
    plan = _PLANS.get(key)
    capturing = _capturing(device)
    if plan is None:
        if capturing:
            return None
        plan = _plan(weights, gains, scales, epss, dtype, gpu)
        if len(_PLANS) >= _PLANS_MAX:
            for old in [k for k in _PLANS if k not in _CAPTURED]:
                _PLANS.pop(old, None)  # (its tables' memory waits for the launches reading them: below)
        _PLANS[key] = plan
    if capturing:
        _CAPTURED.add(key)
    total, groups, views = plan
    buffer = torch.empty(total, device=device, dtype=dtype)
    with device_guard(buffer):
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        for cfg, table, coef, programs in groups:
            launch(_std_fwd_many_kernel, (programs,), table, coef, buffer, **cfg)
            if stream is not None:  # (a table dropped from the cache is not reused before this launch ends,
                table.record_stream(stream)  # whichever stream it ran on)
                coef.record_stream(stream)
    return [None if v is None else buffer.as_strided(*v) for v in views]


def _capturing(device: torch.device) -> bool:
    """Whether a CUDA graph is being captured on ``device``'s current stream."""
    if device.type != "cuda":
        return False
    if device.index is None or device.index == torch.cuda.current_device():
        return torch.cuda.is_current_stream_capturing()
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def plan_tables() -> List[torch.Tensor]:
    """The device tables every kept :func:`forward_many` plan holds (a cache across steps: memory books)."""
    return [t for plan in _PLANS.values() for group in plan[1] for t in group[1:3]]


def reads_packed(weight: torch.Tensor, gain: torch.Tensor) -> bool:
    """Whether :func:`forward_many` takes this weight and gain as they are: a 4-D fp32 weight whose rows
    are dense (:func:`rows_layout`), a contiguous fp32 gain of C_out values on its device."""
    return (weight.dim() == 4 and weight.dtype == torch.float32 and gain.dtype == torch.float32
            and gain.device == weight.device and gain.is_contiguous() and gain.numel() == weight.shape[0]
            and rows_layout(weight) is not None)


def _plan(weights, gains, scales, epss, dtype, gpu):
    """forward_many's launches for these weights: (buffer elements, [(tile, int64 table, fp32 table,
    programs)], [(shape, strides, offset) of each operand, or None for a weight it does not read])."""
    device, itemsize = weights[0].device, torch.empty((), dtype=dtype).element_size()
    align = _OPERAND_ALIGN // itemsize
    rows_by_tile: dict = {}
    views, offset = [], 0
    for w, g, sc, ep in zip(weights, gains, scales, epss):
        if w.device != device or not reads_packed(w, g):
            views.append(None)
            continue
        layout = rows_layout(w)
        c_out, fan_in = _rows(w)
        kh, kw, cg = w.shape[2], w.shape[3], w.shape[1]
        taps = kh * kw if layout == torch.contiguous_format else 1  # (as forward's packed write)
        cfg = _config(fan_in, gpu)
        tile = (cfg["ROWS"], cfg["BLOCK_K"], cfg["SINGLE"], cfg["num_warps"])
        ints, floats = rows_by_tile.setdefault(tile, ([], []))
        for row0 in range(0, c_out, cfg["ROWS"]):
            ints += (w.data_ptr(), g.data_ptr(), offset, c_out, fan_in, taps, row0)
            floats += (float(sc), float(ep))
        shape = (kh, kw, cg, c_out)
        views.append((shape, (kw * cg * c_out, cg * c_out, c_out, 1), offset))
        offset += -(-w.numel() // align) * align
    groups = []
    for (rows, block_k, single, warps), (ints, floats) in rows_by_tile.items():
        table = torch.tensor(ints, dtype=torch.int64).to(device)
        coef = torch.tensor(floats, dtype=torch.float32).to(device)
        groups.append((dict(ROWS=rows, BLOCK_K=block_k, SINGLE=single, num_warps=warps), table, coef,
                       len(floats) // 2))
    if offset >= 2 ** 31:  # (the kernel's offsets into the buffer are int32)
        return 1, [], [None] * len(views)
    return max(offset, 1), groups, views
