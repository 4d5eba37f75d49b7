"""Fused convolution on NHWC (channels_last) activations: Triton implicit-GEMM kernels.

One launch computes, for an input ``x`` (N, Cin, H, W) stored channels_last::

    x'  = avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)   (pool=True, on load)
    y   = act(conv2d(x', w, stride, padding, groups) + bias) * act_gain   (fp32 accumulation)
    out = y stored channels_last in x's dtype                             (unless want_out=False)
    sums[n, o] = sum_hw y[n, o]                                           (want_sums=True, fp32)

as a GEMM of M = N*Ho*Wo output pixels (rows), Cout output channels (columns) and, per group,
K = Cin/groups * kh * kw. Two kernels:

- ``_conv1x1_kernel``: the 1x1 stride-1 convolution is a plain GEMM of the (M, Cin) activation
  matrix (NHWC rows are pixels) by the (Cin, Cout) weight; with POOL the A tile is the average of
  up to four input pixels, computed in fp32 while loading (the downsample shortcut's pool never
  reaches memory), rounded to the activation dtype as the unfused pool's output would be.
- ``_conv_kernel``: any kh x kw, stride, zero padding (top/left given, bottom/right implied by Ho
  and Wo, so TF 'same' padding fits), grouped. A column tile lies inside one group (BLOCK_N
  columns of the group's Cout/groups), so every tile is a dense GEMM over its group's K. Two
  ways to walk K, chosen per layer (constexpr FLAT_K):
  * tap-major (group width >= BLOCK_K, e.g. L0's width 64): a single loop over (tap, channel
    block); each step loads BLOCK_K contiguous channels of one shifted pixel per row (16-byte
    vectors), so the software pipeliner sees one loop with 9 * ceil(width / BLOCK_K) steps;
  * flat (narrow groups: the stem's Cin 3 and 16, odd widths): k = tap * width + channel runs
    over all taps at once, so the 3-channel stem conv is one 32-deep step (K = 27) instead of
    nine steps that are 29/32 padding.

The weight is packed once to (kh, kw, Cin/groups, Cout) = a K-major (K, Cout) matrix in the
activation dtype (:func:`pack_weight`): the B tile of every step is BLOCK_K contiguous rows of
BLOCK_N contiguous output channels, for either K walk. A weight already laid out that way (a view
``packed.permute(3, 2, 0, 1)``, as the modules cache their eval weights) is used without a copy.

Weight standardisation (``gain`` given: ``weight`` is the raw weight of a ScaledStdConv2d): one
launch of ``scaled_std_weight``'s kernel standardises the raw (fp32) weight per output channel and
writes it straight into the packed matrix in the activation dtype, where unfused it would take
three (standardise, cast, pack). Why not standardise while the conv loads its weight tiles: every
row tile of the GEMM loads the whole weight again (162 row tiles for the 1536x1536 conv at bs 256,
9x9), so the fp32 raw weight would cross L2 162 times (1.5 GB, about the GEMM's own 0.13 ms) and
every B tile would pass through registers for the affine map instead of going to shared memory
by cp.async; the one launch moves each weight once (fp32 in, 16-bit out).

SiLU prologue (PRE_ACT, 1x1 kernel only): ``x`` is an NF block's input and every element the
kernel loads becomes ``silu(x) * pre_beta`` in fp32, rounded to x's dtype as ``silu_scale`` would
have stored it (before the pool's average), so no pass writes the pre-activation. It costs a SiLU
per element per column tile; whether that beats the write it saves is for a GPU to measure
(docs/design.md section 5). Other kernel shapes, and launches that also want the sums, given
``pre_act`` take one ``silu_scale`` launch first (no NF block makes such a launch).

Epilogue, on the fp32 accumulator: + bias (fp32), activation (a runtime index: none, SiLU, ReLU,
exact erf GELU) times act_gain (timm's GammaAct, the dm_ variants' gamma), one store in the
activation dtype, skipped (runtime flag has_out) where only the sums are wanted: the final conv,
whose output the head uses only through its global average pool, so a training step never holds
that output (0.22 MiB a sample at 224 px) and the forward never writes it. Channel sums
(want_sums) are taken from the
fp32 values before rounding and written without atomics: rows are flattened (n, oh, ow), so a tile
of BLOCK_M rows may hold the end of one image and the start of the next (several, when HW <
BLOCK_M); it writes one partial row per image it touches into ``part[n, s, :]``, where s = tile -
first tile of image n, so each (n, s) slot has exactly one writer. The partial rows are zero-filled
(a slot of an image that no tile reaches adds nothing) and one aten reduction over the slots makes
the (N, Cout) sums: deterministic, where atomics would make the sums (ECA's gate, and through it
every later activation) change from run to run in the last bits. A zero fill and an aten sum (one
dispatcher call each) cost the host less than a Triton launch with its Python did (``_sums_kernel``,
25 a training step; N * S * Cout fp32 either way: S = 2 for 9x9, 4 for 18x18 and 26 for 56x56 at
BLOCK_M = 128).
Its (N, Cout) result is what conv3 hands to ``eca_residual(sums=)`` and the final conv to the
head's global average pool.

Backward (:func:`backward`, BWD): the gradient of the pre-activation ``z = conv + bias`` needs z,
which the forward does not keep (it would be one more activation held per conv). The same kernel
recomputes it: with BWD its epilogue loads the output's gradient tile instead of storing y, adds
the sums' gradient of its image, and stores ``(grad_out + grad_sums) * act_gain * act'(z)`` in the
activation dtype, with the fp32 partial sums of it that the bias gradient needs. Those need no
per-image sums: one aten reduction of the zero-filled partial rows over the images and the slots
makes the bias gradient (``sum_images``). That
is one GEMM plus two activation volumes (grad_out in, z's gradient out) where aten's formula
took a convolution and about ten fp32 elementwise passes (~86 bytes an output element); cuDNN and
cuBLAS then compute the data and weight gradients from it (``aten.convolution_backward``).

Tiles (see "launch configurations"): 128-row Hopper tiles with compiler alignment hints where the
launcher has checked 16-channel alignment (all of eca_nfnet_l0 but the stem's 3-channel input),
64-row tiles without them otherwise; fp32 runs the same tiles with shorter K steps. On a GPU the
launcher times the verified tiles that fit a shape once and keeps the fastest in a cache file
(see "autotuning").

Numerics: fp32 inputs use IEEE fp32 dots (``input_precision="ieee"``, never TF32: the fp32
contract is 1e-4 of max); fp16/bf16 inputs use tensor cores (wgmma on sm_90, mma.sync on sm_80)
with fp32 accumulation. Offsets of whole activations are int64.
"""
from __future__ import annotations

import functools
import json
import os
import re
import tempfile
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from . import AotSpec, cdiv, device_guard, launch
from . import scaled_std_weight as _std
from . import silu_scale as _silu

ACTS = (None, "silu", "relu", "gelu")  # the kernels' ``act`` argument is the index in this tuple
# fp32 inputs take K steps of at most FP32_K (a constexpr of each tile): 16 on a GPU; FP32_K_SHALLOW
# with the pool prologue's four A tiles and on the 4-warp kxk tiles (see the kernels' BK); under the
# interpreter the whole BLOCK_K.


def _fp32_dot_min_k() -> int:
    """The shallowest fp32 ``tl.dot`` this Triton compiles for NVIDIA GPUs: 8 on Triton 3.8; 16 on 3.6,
    the GPU machine's, which asserts K >= 16 for 32-bit operands (its first GPU run failed so)."""
    try:
        from triton.backends.nvidia.compiler import min_dot_size
        from triton.backends.compiler import GPUTarget
        return int(min_dot_size(GPUTarget("cuda", 90, 32))(tl.float32, tl.float32)[2])
    except Exception:  # noqa: BLE001 - another layout of Triton's backend: the depth every version takes
        return 16


# the 8-deep fp32 step of the register-heaviest tiles (16 spills there), where this Triton compiles one
FP32_K_SHALLOW = max(8, _fp32_dot_min_k())

# ---------------------------------------------------------------------------------------------
# launch configurations
#
# ALIGNED tiles run only where the launcher has checked that Cin, Cout and both per-group widths
# are multiples of 16 and every tensor starts 16-byte aligned (all of eca_nfnet_l0 but the stem's
# 3-channel input): the kernels then tell the compiler so (see "kernels" below), so loads and
# stores are 16-byte vectors and the pipeliner uses cp.async whatever divisibility the JIT's own
# specialisation saw, and the AOT matrix's compile without divisibility is the code that runs.
# Without the hints a 128-row 16-bit tile needs a 64-bit address per element and spills up to
# 850 bytes (measured on the AOT matrix).
#
# Hopper tiles: 128-row tiles (two m64 wgmma per warpgroup), BLOCK_K 64 (128 bytes of bf16 per row:
# whole swizzled shared-memory lines), 3-4 pipeline stages. Shared memory per stage is
# (BLOCK_M + BLOCK_N) * BLOCK_K * 2 bytes in 16-bit: 32 KB for 128x128x64 (3 stages: 96 KB),
# 24 KB for 128x64x64 (4 stages: 96 KB), inside sm_80's 164 KB as well as sm_90's 228 KB.
# GROUP_M: 8 row tiles share their column tiles in L2 (the weight is small; this keeps an
# A row-panel hot while all of its column tiles run, which matters for Cout >= 1536).
#
# 1x1 GEMM: Cout >= 128 takes 128x128 at 8 warps (L0: 128..2304 outputs; 384 = 3 tiles);
# Cout <= 64 takes 128x64 at 4 warps.
GEMM_WIDE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, NUM_STAGES=3, ALIGNED=True, FP32_K=16, num_warps=8)
GEMM_NARROW = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, NUM_STAGES=4, ALIGNED=True, FP32_K=16, num_warps=4)
# 1x1 with the pool prologue: each K step loads four A tiles (the 2x2 window), and the pipeliner
# stages all four in shared memory, so the step is 32 deep: (4 * 128 + 128) * 32 * 2 = 40 KB a
# stage at 128x128 (3 stages: 120 KB; 64 deep would be 240 KB, over sm_90's 228 KB).
GEMM_POOL_WIDE = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, NUM_STAGES=3, ALIGNED=True,
                      FP32_K=FP32_K_SHALLOW, num_warps=8)
GEMM_POOL_NARROW = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, NUM_STAGES=3, ALIGNED=True,
                        FP32_K=FP32_K_SHALLOW, num_warps=4)
# kxk implicit GEMM, tap-major: group width >= 64 takes BLOCK_K 64 (L0's grouped 3x3s: width 64,
# Cout/groups 64, one column tile per group; the stem's 64->128 takes the 128-wide tile);
# widths 32..63 take BLOCK_K 32 (the stem's 32->64).
# (fp32: 8-deep K steps on the 4-warp tiles: 16 spilled 8 bytes on sm_80 without divisibility hints under
# Triton 3.8; Triton 3.6, which takes no fp32 dot under 16 deep, compiles them 16 deep: FP32_K_SHALLOW)
CONV_K64_N64 = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, NUM_STAGES=4, FLAT_K=False, ALIGNED=True,
                    FP32_K=FP32_K_SHALLOW, num_warps=4)
CONV_K64_N128 = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, NUM_STAGES=3, FLAT_K=False, ALIGNED=True,
                     FP32_K=16, num_warps=8)
CONV_K32_N64 = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, NUM_STAGES=4, FLAT_K=False, ALIGNED=True,
                    FP32_K=FP32_K_SHALLOW, num_warps=4)
# flat K walk for group widths < 32 (the stem's 3->16 and 16->32, odd widths): element gathers,
# no alignment to exploit; 32-wide column tiles (L0's stem has 16 and 32 outputs).
CONV_FLAT = dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, NUM_STAGES=3, FLAT_K=True, ALIGNED=False,
                 FP32_K=16, num_warps=4)
# ... and with z_out (HAS_Z): 64-row tiles, as z's pointer tile spilled 48 bytes at 128 rows (fp32, sm_90)
CONV_FLAT_Z = dict(CONV_FLAT, BLOCK_M=64)
# Unaligned channel counts (not in L0; odd widths of other models), a 64-bit address per element:
# 64x64x32 tiles at 2 stages stay clear of spills (64x64x16 with the pool's four A tiles).
GEMM_GENERIC = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, NUM_STAGES=2, ALIGNED=False, FP32_K=16, num_warps=4)
GEMM_POOL_GENERIC = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, GROUP_M=8, NUM_STAGES=2, ALIGNED=False,
                         FP32_K=FP32_K_SHALLOW, num_warps=4)
CONV_GENERIC = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, NUM_STAGES=2, FLAT_K=False, ALIGNED=False,
                    FP32_K=16, num_warps=4)
# The backward's recompute (BWD) holds the output's gradient tile beside the accumulator: at
# 128x128 per 8 warps (64 fp32 values a thread of each) that spilled 150-550 bytes on sm_90 and
# sm_80 (the AOT matrix, bf16 and fp32); at most 64 columns per 8 warps (32 a thread) spills none.


def bwd_tile(tile: dict) -> dict:
    """The tile a backward launch runs in place of the forward's ``tile`` (see above)."""
    return dict(tile, BLOCK_N=min(64, tile["BLOCK_N"]), num_warps=8)


def z_tile(tile: dict) -> dict:
    """The tile a forward launch with z_out (HAS_Z) runs in place of ``tile`` (see CONV_FLAT_Z)."""
    return dict(CONV_FLAT_Z) if tile == CONV_FLAT else tile


# The kept pre-activation's gradient pass (_z_grad_kernel, elementwise): 64 x 64 tiles at 8 warps (at 4, fp32 spilled
# 8 bytes on sm_80; 128 x 64 at 4 warps spilled up to 928)
Z_GRAD_TILE = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8)


# Under the interpreter (CPU tensors) every program and every loop step costs milliseconds of
# Python (index arithmetic over the whole tile) whatever the tile's size, while numpy does the tile
# math fast: CPU launches take one tile as large as the problem (powers of two, capped), so a conv
# is a few programs of a few K steps (eca_nfnet_l0's forward at 64 px: 234 s with 32x16x16 tiles).
# SMALL_TILE (32x16x16) is what tests pass as config= to cover many row/column tiles, images split
# across tiles and the swizzled tile order on small shapes; gpu_config=True runs the GPU tiles.
SMALL_TILE = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, NUM_STAGES=1, FP32_K=16, num_warps=4)
CPU_MAX = dict(BLOCK_M=1024, BLOCK_N=1024, BLOCK_K=512)


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(int(n), 1))))


def config(kind: str, group_width: int, cout_per_group: int, device: torch.device = torch.device("cuda"),
           pool: bool = False, aligned: bool = True, gpu_config: bool = False, rows: int = 1,
           taps: int = 1) -> dict:
    """The tile for a ``kind`` ("1x1" or "conv") launch with ``group_width`` input and
    ``cout_per_group`` output channels per group; ``aligned``: see ALIGNED above (a copy: callers
    may edit it). fp32 inputs use the same tile with a shorter K step (see the kernels' BK). CPU tensors
    (the interpreter) get a tile as large as the problem (``rows`` output pixels, ``taps`` kernel
    taps) unless ``gpu_config``."""
    if device.type != "cuda" and not gpu_config:
        cfg = dict(BLOCK_M=_pow2(rows, 16, CPU_MAX["BLOCK_M"]), BLOCK_N=_pow2(cout_per_group, 16, CPU_MAX["BLOCK_N"]),
                   BLOCK_K=_pow2(group_width * taps, 16, CPU_MAX["BLOCK_K"]), GROUP_M=8, NUM_STAGES=1,
                   num_warps=4, ALIGNED=aligned)
        cfg["FP32_K"] = cfg["BLOCK_K"]  # (no registers to spill under the interpreter)
        if kind == "conv":
            cfg["FLAT_K"] = group_width < cfg["BLOCK_K"]
        return cfg
    if kind == "1x1":
        if not aligned:
            return dict(GEMM_POOL_GENERIC if pool else GEMM_GENERIC)
        if pool:
            return dict(GEMM_POOL_WIDE if cout_per_group >= 128 else GEMM_POOL_NARROW)
        return dict(GEMM_WIDE if cout_per_group >= 128 else GEMM_NARROW)
    if group_width < 32:
        return dict(CONV_FLAT)
    if not aligned:
        return dict(CONV_GENERIC)
    if group_width < 64:
        return dict(CONV_K32_N64)
    return dict(CONV_K64_N128 if cout_per_group >= 128 else CONV_K64_N64)


# ---------------------------------------------------------------------------------------------
# autotuning
#
# Only among tiles of the AOT matrix (compiled for sm_90 and sm_80 without spills, inside shared
# memory: tests/test_fused_conv_kernels.py), so tuning can change speed but never correctness or
# resource use. The first launch of a shape on a GPU times each candidate with
# triton.testing.do_bench and keeps the fastest, in memory and in a JSON file per GPU model and
# Triton version, so later processes (and CUDA-graph captures, which cannot time) use it at once.

AUTOTUNE_ENV = "NFNET_FAST_AUTOTUNE"    # "0": always the heuristic tile of config(), nothing timed
CACHE_DIR_ENV = "NFNET_FAST_CACHE_DIR"  # where the cache file lives (default ~/.cache/nfnet_fast)
TILES = dict(GEMM_WIDE=GEMM_WIDE, GEMM_NARROW=GEMM_NARROW, GEMM_GENERIC=GEMM_GENERIC, GEMM_POOL_WIDE=GEMM_POOL_WIDE,
             GEMM_POOL_NARROW=GEMM_POOL_NARROW, GEMM_POOL_GENERIC=GEMM_POOL_GENERIC, CONV_K64_N64=CONV_K64_N64,
             CONV_K64_N128=CONV_K64_N128, CONV_K32_N64=CONV_K32_N64, CONV_FLAT=CONV_FLAT, CONV_GENERIC=CONV_GENERIC)


def tile_name(tile: dict) -> str:
    """The name in TILES of a tile returned by :func:`config` (on a GPU)."""
    return next(name for name, t in TILES.items() if t == tile)


def candidates(kind: str, group_width: int, cout_per_group: int, pool: bool = False, aligned: bool = True) -> List[str]:
    """Names of the verified tiles that can run a ``kind`` launch ("1x1" or "conv"): the heuristic
    choice of :func:`config` first (the pick when timing ties or is off), then the others."""
    first = tile_name(config(kind, group_width, cout_per_group, torch.device("cuda"), pool, aligned))
    wide = cout_per_group >= 128  # (a 128-wide column tile on 64 columns would compute half padding)
    if kind == "1x1":
        same = ((["GEMM_POOL_WIDE"] * wide + ["GEMM_POOL_NARROW"]) if pool else (["GEMM_WIDE"] * wide + ["GEMM_NARROW"])
                ) if aligned else []
    elif aligned and group_width >= 64:  # a 32-deep step walks a 64-wide group in two channel blocks
        same = ["CONV_K64_N128"] * wide + ["CONV_K64_N64", "CONV_K32_N64"]
    else:  # flat K walk, unaligned, or width 32..63: one tile fits
        same = []
    return [first] + [name for name in same if name != first]


def autotune_enabled() -> bool:
    return os.environ.get(AUTOTUNE_ENV, "1") != "0"


def cache_path(device: torch.device) -> str:
    """The cache file of ``device``'s GPU model and this Triton version."""
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "nfnet_fast")
    return os.path.join(root, _cache_file_name(device))


@functools.lru_cache(maxsize=None)
def _cache_file_name(device: torch.device) -> str:
    """(Looked up once per device: tuned() asks on every launch.)"""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    gpu = re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-")
    return f"fused_conv-{gpu}-triton{triton.__version__}.json"


_TABLES: Dict[str, Dict[str, str]] = {}  # cache file -> {shape key: tile name}, as read and as tuned


def _read_table(path: str) -> Dict[str, str]:
    try:
        with open(path) as f:
            table = json.load(f)
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            raise ValueError("not a JSON object of tile names")
        return table
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        warnings.warn(f"nfnet_fast: ignoring the fused_conv tile cache {path} ({e}); shapes are timed again",
                      RuntimeWarning, stacklevel=3)
        return {}


def _write_table(path: str, table: Dict[str, str]) -> None:
    """Merge ``table`` into the file (another process may have added shapes) and replace it
    atomically, so a reader never sees half a file."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        merged = {**_read_table(path), **table}
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".fused_conv-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(merged, f, indent=0, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"nfnet_fast: cannot write the fused_conv tile cache {path} ({e}); tuned tiles last "
                      f"for this process only (set {CACHE_DIR_ENV} to a writable folder)", RuntimeWarning, stacklevel=3)


def _bench(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=5, rep=20)


def tuned(key: str, names: Sequence[str], device: torch.device, run_candidate: Callable[[str], object]) -> str:
    """The candidate (a name of TILES, or VENDOR) for the launch ``key``: from the cache, or the
    fastest of ``names`` timed now with ``run_candidate(name)`` (the whole launch) and then cached. The
    first name without timing: a single candidate, autotuning off, or a CUDA graph capturing."""
    if len(names) == 1 or not autotune_enabled() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return names[0]
    path = cache_path(device)
    table = _TABLES.get(path)
    if table is None:
        table = _TABLES[path] = _read_table(path)
    if table.get(key) in names:
        return table[key]
    times = {name: _bench(lambda name=name: run_candidate(name)) for name in names}
    best = min(names, key=lambda name: times[name])  # (a tie keeps the heuristic's, listed first)
    table[key] = best
    _write_table(path, {key: best})
    return best


# The vendor candidate: the same function as separate aten ops, the convolution (with its bias) in
# cuDNN or cuBLAS, then the activation, gain and sums as passes of their own. Slower wherever the
# Triton kernel is near the vendor's conv (the passes cost what fusing saves), but the grouped 3x3
# convs at 18x18 and 36x36 ran 4-5x faster in cuDNN than in inductor's Triton templates on the H200
# (../shared/DESIGN.md section 10): timing decides per shape. 16-bit only: fp32 convs in cuDNN may
# use TF32 (torch.backends.cudnn.allow_tf32), which the fp32 contract excludes. The backward's
# recompute (BWD) has one too: cuDNN's conv and aten's activation backward (eager timm's backward
# of the pair), so no shape's backward is slower than eager's because a Triton tile is slow there.
VENDOR = "aten"


def _vendor_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int, padding4,
                 groups: int, act: int, act_gain: float, pool: bool, want_sums: bool, want_out: bool = True,
                 z_out: Optional[torch.Tensor] = None):
    dt = x.dtype
    if pool:
        x = torch.nn.functional.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
    pt, pb, pl, pr = padding4
    b = None if bias is None else bias.to(dt)
    if pt == pb and pl == pr:
        y = torch.nn.functional.conv2d(x, weight.to(dt), b, stride, (pt, pl), 1, groups)
    else:
        y = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (pl, pr, pt, pb)), weight.to(dt), b, stride, 0, 1,
                                       groups)
    y = y.contiguous(memory_format=torch.channels_last)
    if z_out is not None:  # (the activation below works in place)
        z_out.copy_(y)
    if ACTS[act] == "silu":
        y = torch.nn.functional.silu(y, inplace=True)
    elif ACTS[act] == "relu":
        y = y.relu_()
    elif ACTS[act] == "gelu":
        y = torch.nn.functional.gelu(y)
    if act_gain != 1.0:
        y = y.mul_(act_gain)
    if not want_out:
        return y.float().sum((2, 3))
    return (y, y.float().sum((2, 3))) if want_sums else y


def _vendor_conv_backward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
                          padding4, groups: int, act: int, act_gain: float, want_sums: bool,
                          grad_out: Optional[torch.Tensor], grad_sums: Optional[torch.Tensor]):
    """The vendor candidate of a backward launch (BWD): z = conv + bias recomputed by cuDNN, then
    aten's own activation backward (one fused pass when only grad_out comes, as eager timm's)."""
    z = _vendor_conv(x, weight, bias, stride, padding4, groups, 0, 1.0, False, False)
    g = grad_out
    if g is None or grad_sums is not None or act_gain != 1.0:  # (fp32 sums and gains: rare, in fp32)
        g = torch.zeros_like(z, dtype=torch.float32) if g is None else g.float()
        if grad_sums is not None:
            g = g + grad_sums.float()[:, :, None, None]
        if act_gain != 1.0:
            g = g * act_gain
        z = z.float()
    if ACTS[act] == "silu":
        gz = torch.ops.aten.silu_backward(g, z)
    elif ACTS[act] == "relu":
        gz = torch.ops.aten.threshold_backward(g, z, 0)
    elif ACTS[act] == "gelu":
        gz = torch.ops.aten.gelu_backward(g, z)
    else:
        gz = g
    gz = gz.to(x.dtype).contiguous(memory_format=torch.channels_last)
    return (gz, gz.float().sum((2, 3))) if want_sums else gz


def tuned_choice(x: torch.Tensor, weight_shape, stride: int = 1, padding: Padding = 0, groups: int = 1,
                 pool: bool = False, want_sums: bool = False, pre_act: bool = False,
                 has_z: bool = False) -> Optional[str]:
    """What the tuning picked for this launch in this process or the cache file (a name of TILES,
    or VENDOR), or None if it has not tuned it (reports say which path ran). ``has_z``: a forward
    launch that also stores its pre-activation (``z_out``)."""
    table = _TABLES.get(cache_path(x.device), {})
    return table.get(_tune_key(x, weight_shape, stride, normalize_padding(padding), groups, pool, want_sums,
                               pre_act=pre_act, has_z=has_z))


def _tune_key(x: torch.Tensor, weight_shape, stride: int, padding, groups: int, pool: bool, want_sums: bool,
              backward: bool = False, pre_act: bool = False, vendor: bool = True, has_z: bool = False) -> str:
    """The tuning table's key of a launch. ``vendor=False`` on a 16-bit launch (tuned among the Triton
    tiles alone) has a key of its own: it must neither take nor overwrite the pick of a tuning that
    timed cuDNN too. So has a launch storing z (``has_z``): its epilogue's extra store takes registers
    (the 128x128 bf16 1x1 tile with sums, the final conv's, went from 128 to 243 on sm_90; without sums
    from 171 to 175), so its fastest tile may not be the plain launch's, and each is timed as it runs."""
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight_shape
    return (f"{str(x.dtype).replace('torch.', '')} n{n} x{cin}x{h}x{w} w{cout}x{kh}x{kw} s{stride} "
            f"p{','.join(map(str, padding))} g{groups}{' pool' if pool else ''}{' sums' if want_sums else ''}"
            f"{' backward' if backward else ''}{' pre_act' if pre_act else ''}{' z' if has_z else ''}"
            f"{' novendor' if not vendor and x.dtype != torch.float32 else ''}")


# ---------------------------------------------------------------------------------------------
# shared pieces


@triton.jit
def _tile_ids(num_m, num_n, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program: GROUP_M row tiles walk all column tiles before the
    next group starts, so their A panels and the weight stay in L2."""
    pid = tl.program_id(0)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _mma(a, b, acc):
    """acc += a @ b: IEEE fp32 FMAs for fp32 operands (never TF32), tensor cores otherwise."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _act(y, act):
    """The activation, picked by a runtime index into ACTS: a uniform branch taken once per tile,
    which costs nothing next to the tile's GEMM and keeps the compile matrix 4x smaller than an
    ACT constexpr would."""
    if act == 1:  # silu
        y = y * tl.sigmoid(y)
    elif act == 2:  # relu
        y = tl.maximum(y, 0.0)
    elif act == 3:  # exact gelu, as F.gelu(approximate="none")
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    return y


@triton.jit
def _act_grad(z, act):
    """d act(z) / dz (fp32) for the runtime index ``act``, as ``nfnet_fast._library._act_grad``."""
    d = z * 0.0 + 1.0
    if act == 1:  # silu
        s = tl.sigmoid(z)
        d = s * (1.0 + z * (1.0 - s))
    elif act == 2:  # relu
        d = (z > 0.0).to(tl.float32)
    elif act == 3:  # exact gelu: Phi(z) + z * phi(z)
        d = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    return d


@triton.jit
def _pre_act(v, pre_beta, PRE_ACT: tl.constexpr):
    """With PRE_ACT, silu(v) * pre_beta in fp32, rounded to v's dtype: the value silu_scale (or
    eca_residual's a_next) would have written for the conv to read (zero padding stays zero)."""
    if PRE_ACT:
        f = v.to(tl.float32)
        v = (f * tl.sigmoid(f) * pre_beta).to(v.dtype)
    return v


@triton.jit
def _bias(acc, bias_ptr, cols, cmask):
    """The pre-activation z = acc + bias (fp32) of a GEMM tile."""
    return acc + tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]


@triton.jit
def _epilogue(z, pid_m, rows, cols, cmask, out_ptrs, grad_ptrs, z_ptrs, out_mask, M, Cout, HW, S, act, act_gain,
              part_ptr, gsums_ptr, has_grad, has_gsums, has_out, HAS_Z: tl.constexpr, SUMS: tl.constexpr,
              BWD: tl.constexpr, BLOCK_M: tl.constexpr):
    """From the fp32 pre-activation tile ``z`` (the accumulator plus the bias): the activation times act_gain,
    one store of the (BLOCK_M, BLOCK_N) output tile at ``out_ptrs`` (if has_out), and z itself at ``z_ptrs``
    in the output's dtype (HAS_Z: what a training conv keeps for its backward, see "backward"); with
    SUMS one fp32 partial channel sum per image the tile touches (see the module docstring). With BWD (see
    "backward") the tile stored and summed is instead the gradient of z: (grad_out + grad_sums[n]) *
    act_gain * act'(z), grad_out's tile at ``grad_ptrs`` (if has_grad), grad_sums (N, Cout) fp32 at
    ``gsums_ptr`` (if has_gsums)."""
    if BWD:
        g = z * 0.0
        if has_grad:
            g += tl.load(grad_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        if has_gsums:
            g += tl.load(gsums_ptr + (rows // HW)[:, None] * Cout + cols[None, :], mask=out_mask, other=0.0)
        y = g * act_gain * _act_grad(z, act)
    else:
        if HAS_Z:
            zs = z
            if z_ptrs.dtype.element_ty == tl.float16:  # (finite: act'(inf) is 0 * inf; at 65504 it is the limit)
                zs = tl.minimum(tl.maximum(z, -65504.0), 65504.0)
            tl.store(z_ptrs, zs.to(z_ptrs.dtype.element_ty), mask=out_mask)
        y = _act(z, act) * act_gain
    if SUMS:
        # No mask needed: columns past Cout hold act(0 + 0) = 0 (BWD: a zero gradient), and rows
        # past M belong to image M // HW, past the last one summed.
        img = rows // HW
        m0 = pid_m * BLOCK_M
        for j in range(m0 // HW, (tl.minimum(m0 + BLOCK_M, M) - 1) // HW + 1):
            seg = tl.sum(tl.where((img == j)[:, None], y, 0.0), axis=0)
            slot = pid_m - (j * HW) // BLOCK_M  # this tile's index among image j's tiles
            tl.store(part_ptr + (j * S + slot) * Cout + cols, seg, mask=cmask)
    if has_out:
        tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------
# kernels
#
# ALIGNED hints: ``tl.max_contiguous(tl.multiple_of(ptrs, [1, 16]), [1, RUN])`` says that along
# the channel axis runs of RUN pointers are contiguous and start 16-byte aligned, and
# ``tl.max_constancy(mask, [1, 16])`` that the mask only changes at multiples of 16 channels: what
# the launcher checked. They must be written in the kernel body (the compiler drops them when a
# helper function applies them), and they are no-ops under the interpreter.


@triton.jit
def _conv1x1_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, z_ptr, part_ptr, grad_ptr, gsums_ptr, M, K, Cout, H, W, Wo, HW,
                    S, act, act_gain, has_grad, has_gsums, has_out, pre_beta, POOL: tl.constexpr, SUMS: tl.constexpr,
                    BWD: tl.constexpr, PRE_ACT: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    NUM_STAGES: tl.constexpr, ALIGNED: tl.constexpr, FP32_K: tl.constexpr):
    """out[M, Cout] = act(A[M, K] @ w[K, Cout] + bias): A = x's NHWC rows (K = Cin), or with POOL
    the 2x2 ceil-mode average of x (H x W) at output pixel m of the (Ho x Wo = HW) pooled grid.
    With PRE_ACT, x is a pre-activation and every element is read as silu(x) * pre_beta (before
    the pool's average)."""
    pid_m, pid_n = _tile_ids(tl.cdiv(M, BLOCK_M), tl.cdiv(Cout, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < M
    cmask = cols < Cout
    # the K step: BLOCK_K for 16-bit inputs (tensor cores), at most FP32_K for fp32 ones, whose IEEE dot
    # runs on FMAs with its operand slices in registers (a 64-deep step of a 128x128 tile spills
    # thousands of bytes); the tile stays the config's, so the grid and the sums' slots do not depend
    # on the dtype. Written here, not in a helper: Triton 3.6 returns a helper's constexpr as a tensor.
    BK: tl.constexpr = min(BLOCK_K, FP32_K) if x_ptr.dtype.element_ty == tl.float32 else BLOCK_K
    kk = tl.arange(0, BK)
    if POOL:
        n = rows // HW
        pix = rows - n * HW
        ih = 2 * (pix // Wo)
        iw = 2 * (pix % Wo)
        # ceil mode, no padding: the window is clipped at the bottom/right edge and the divisor
        # counts only the pixels inside (count_include_pad is moot without padding).
        has_r = iw + 1 < W
        has_b = ih + 1 < H
        inv = 1.0 / ((1 + has_r.to(tl.float32)) * (1 + has_b.to(tl.float32)))
        a_row = ((n * H + ih) * W + iw).to(tl.int64) * K
        # the window's other three pixels: row offsets, and which rows have them
        r_row = a_row + tl.where(has_r, K, 0)
        b_row = a_row + tl.where(has_b, W * K, 0)
        rb_row = b_row + tl.where(has_r, K, 0)
    else:
        a_row = rows.to(tl.int64) * K
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in tl.range(0, K, BK, num_stages=NUM_STAGES):
        k = k0 + kk
        kmask = k < K
        am = rmask[:, None] & kmask[None, :]
        a_ptrs = x_ptr + a_row[:, None] + k[None, :]
        w_ptrs = w_ptr + k[:, None] * Cout + cols[None, :]
        wm = kmask[:, None] & cmask[None, :]
        if POOL:
            # Clipped window pixels re-read the top-left one (always inside; an L1 hit) instead
            # of masking the load per row, so all four loads share one mask; the divisor
            # (inv) and the selects below leave them out of the average.
            r_ptrs = x_ptr + r_row[:, None] + k[None, :]
            b_ptrs = x_ptr + b_row[:, None] + k[None, :]
            rb_ptrs = x_ptr + rb_row[:, None] + k[None, :]
            if ALIGNED:
                a_ptrs = tl.max_contiguous(tl.multiple_of(a_ptrs, [1, 16]), [1, BK])
                r_ptrs = tl.max_contiguous(tl.multiple_of(r_ptrs, [1, 16]), [1, BK])
                b_ptrs = tl.max_contiguous(tl.multiple_of(b_ptrs, [1, 16]), [1, BK])
                rb_ptrs = tl.max_contiguous(tl.multiple_of(rb_ptrs, [1, 16]), [1, BK])
                am = tl.max_constancy(am, [1, min(BK, 16)])
            a = _pre_act(tl.load(a_ptrs, mask=am, other=0.0), pre_beta, PRE_ACT).to(tl.float32)
            a += tl.where(has_r[:, None], _pre_act(tl.load(r_ptrs, mask=am, other=0.0), pre_beta, PRE_ACT).to(
                tl.float32), 0.0)
            a += tl.where(has_b[:, None], _pre_act(tl.load(b_ptrs, mask=am, other=0.0), pre_beta, PRE_ACT).to(
                tl.float32), 0.0)
            a += tl.where((has_r & has_b)[:, None], _pre_act(tl.load(rb_ptrs, mask=am, other=0.0), pre_beta,
                                                             PRE_ACT).to(tl.float32), 0.0)
            a = (a * inv[:, None]).to(x_ptr.dtype.element_ty)
        else:
            if ALIGNED:
                a_ptrs = tl.max_contiguous(tl.multiple_of(a_ptrs, [1, 16]), [1, BK])
                am = tl.max_constancy(am, [1, min(BK, 16)])
            a = _pre_act(tl.load(a_ptrs, mask=am, other=0.0), pre_beta, PRE_ACT)
        if ALIGNED:
            w_ptrs = tl.max_contiguous(tl.multiple_of(w_ptrs, [1, 16]), [1, BLOCK_N])
            wm = tl.max_constancy(wm, [1, 16])
        b = tl.load(w_ptrs, mask=wm, other=0.0)
        acc = _mma(a, b, acc)
    out_offs = rows.to(tl.int64)[:, None] * Cout + cols[None, :]
    out_ptrs = out_ptr + out_offs
    grad_ptrs = grad_ptr + out_offs
    z_ptrs = z_ptr + out_offs
    out_mask = rmask[:, None] & cmask[None, :]
    if ALIGNED:
        out_ptrs = tl.max_contiguous(tl.multiple_of(out_ptrs, [1, 16]), [1, BLOCK_N])
        grad_ptrs = tl.max_contiguous(tl.multiple_of(grad_ptrs, [1, 16]), [1, BLOCK_N])
        z_ptrs = tl.max_contiguous(tl.multiple_of(z_ptrs, [1, 16]), [1, BLOCK_N])
        out_mask = tl.max_constancy(out_mask, [1, 16])
    _epilogue(_bias(acc, bias_ptr, cols, cmask), pid_m, rows, cols, cmask, out_ptrs, grad_ptrs, z_ptrs, out_mask, M,
              Cout, HW, S, act, act_gain, part_ptr, gsums_ptr, has_grad, has_gsums, has_out, HAS_Z, SUMS, BWD, BLOCK_M)


@triton.jit
def _conv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, z_ptr, part_ptr, grad_ptr, gsums_ptr, M, H, W, Cin, Wo, HW, Cout,
                 Cg, Cog, stride, pad_h, pad_w, S, act, act_gain, has_grad, has_gsums, has_out, KH: tl.constexpr,
                 KW: tl.constexpr, SUMS: tl.constexpr, BWD: tl.constexpr, HAS_Z: tl.constexpr,
                 FLAT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 GROUP_M: tl.constexpr, NUM_STAGES: tl.constexpr, ALIGNED: tl.constexpr, FP32_K: tl.constexpr):
    """Grouped KH x KW convolution as an implicit GEMM: row m = output pixel (n, oh, ow) of the
    (Ho x Wo = HW) grid, columns = Cog outputs of one group (Cg inputs each), K = KH*KW*Cg."""
    tiles_g = tl.cdiv(Cog, BLOCK_N)
    pid_m, pid_n = _tile_ids(tl.cdiv(M, BLOCK_M), (Cout // Cog) * tiles_g, GROUP_M)
    g = pid_n // tiles_g
    nn = (pid_n - g * tiles_g) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = nn < Cog
    cols = g * Cog + nn
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n = rows // HW
    pix = rows - n * HW
    oh = pix // Wo
    ih0 = oh * stride - pad_h
    iw0 = (pix - oh * Wo) * stride - pad_w
    nH = n * H
    x_g = x_ptr + g * Cg
    # the K step, as in _conv1x1_kernel
    BK: tl.constexpr = min(BLOCK_K, FP32_K) if x_ptr.dtype.element_ty == tl.float32 else BLOCK_K
    kk = tl.arange(0, BK)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if FLAT_K:
        KT = KH * KW * Cg
        for k0 in tl.range(0, KT, BK, num_stages=NUM_STAGES):
            k = k0 + kk
            kmask = k < KT
            tap = k // Cg
            c = k - tap * Cg
            kh = tap // KW
            ih = ih0[:, None] + kh[None, :]
            iw = iw0[:, None] + (tap - kh * KW)[None, :]
            ok = rmask[:, None] & kmask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            src = ((nH[:, None] + ih) * W + iw).to(tl.int64)
            a = tl.load(x_g + src * Cin + c[None, :], mask=ok, other=0.0)
            w_ptrs = w_ptr + k[:, None] * Cout + cols[None, :]
            wm = kmask[:, None] & cmask[None, :]
            if ALIGNED:
                w_ptrs = tl.max_contiguous(tl.multiple_of(w_ptrs, [1, 16]), [1, BLOCK_N])
                wm = tl.max_constancy(wm, [1, 16])
            b = tl.load(w_ptrs, mask=wm, other=0.0)
            acc = _mma(a, b, acc)
    else:
        CB = tl.cdiv(Cg, BK)
        for step in tl.range(0, KH * KW * CB, num_stages=NUM_STAGES):
            tap = step // CB
            c = (step - tap * CB) * BK + kk
            kmask = c < Cg
            kh = tap // KW
            ih = ih0 + kh
            iw = iw0 + (tap - kh * KW)
            ok = rmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            src = ((nH + ih) * W + iw).to(tl.int64)
            a_ptrs = x_g + src[:, None] * Cin + c[None, :]
            am = ok[:, None] & kmask[None, :]
            w_ptrs = w_ptr + (tap * Cg + c)[:, None] * Cout + cols[None, :]
            wm = kmask[:, None] & cmask[None, :]
            if ALIGNED:
                a_ptrs = tl.max_contiguous(tl.multiple_of(a_ptrs, [1, 16]), [1, BK])
                am = tl.max_constancy(am, [1, min(BK, 16)])
                w_ptrs = tl.max_contiguous(tl.multiple_of(w_ptrs, [1, 16]), [1, BLOCK_N])
                wm = tl.max_constancy(wm, [1, 16])
            a = tl.load(a_ptrs, mask=am, other=0.0)
            b = tl.load(w_ptrs, mask=wm, other=0.0)
            acc = _mma(a, b, acc)
    out_offs = rows.to(tl.int64)[:, None] * Cout + cols[None, :]
    out_ptrs = out_ptr + out_offs
    grad_ptrs = grad_ptr + out_offs
    z_ptrs = z_ptr + out_offs
    out_mask = rmask[:, None] & cmask[None, :]
    if ALIGNED:
        out_ptrs = tl.max_contiguous(tl.multiple_of(out_ptrs, [1, 16]), [1, BLOCK_N])
        grad_ptrs = tl.max_contiguous(tl.multiple_of(grad_ptrs, [1, 16]), [1, BLOCK_N])
        z_ptrs = tl.max_contiguous(tl.multiple_of(z_ptrs, [1, 16]), [1, BLOCK_N])
        out_mask = tl.max_constancy(out_mask, [1, 16])
    _epilogue(_bias(acc, bias_ptr, cols, cmask), pid_m, rows, cols, cmask, out_ptrs, grad_ptrs, z_ptrs, out_mask, M,
              Cout, HW, S, act, act_gain, part_ptr, gsums_ptr, has_grad, has_gsums, has_out, HAS_Z, SUMS, BWD, BLOCK_M)


@triton.jit
def _z_grad_kernel(z_ptr, out_ptr, part_ptr, grad_ptr, gsums_ptr, M, Cout, HW, S, act, act_gain, has_grad, has_gsums,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr):
    """The backward's epilogue (BWD) on a kept pre-activation: z's (M, Cout) rows as the forward stored them
    (HAS_Z) stand in for the GEMM that recomputes them, so a kept z costs its gradient one elementwise pass
    (z and grad_out in, z's gradient out, the same partial sums) instead of a convolution."""
    pid_m = tl.program_id(0)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < Cout
    offs = rows.to(tl.int64)[:, None] * Cout + cols[None, :]
    z_ptrs = z_ptr + offs
    out_ptrs = out_ptr + offs
    grad_ptrs = grad_ptr + offs
    mask = (rows < M)[:, None] & cmask[None, :]
    if ALIGNED:
        z_ptrs = tl.max_contiguous(tl.multiple_of(z_ptrs, [1, 16]), [1, BLOCK_N])
        out_ptrs = tl.max_contiguous(tl.multiple_of(out_ptrs, [1, 16]), [1, BLOCK_N])
        grad_ptrs = tl.max_contiguous(tl.multiple_of(grad_ptrs, [1, 16]), [1, BLOCK_N])
        mask = tl.max_constancy(mask, [1, 16])
    z = tl.load(z_ptrs, mask=mask, other=0.0).to(tl.float32)
    _epilogue(z, pid_m, rows, cols, cmask, out_ptrs, grad_ptrs, z_ptrs, mask, M, Cout, HW, S, act, act_gain, part_ptr,
              gsums_ptr, has_grad, has_gsums, 1, False, True, True, BLOCK_M)


# ---------------------------------------------------------------------------------------------
# launchers

Padding = Union[int, Sequence[int]]


def normalize_padding(padding: Padding) -> Tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` from an int, ``(pad_h, pad_w)`` or ``(top, bottom, left, right)``."""
    if type(padding) is tuple and len(padding) == 4 and all(type(p) is int for p in padding):
        return padding  # (the launchers' own form, every call: returned as it is)
    if isinstance(padding, int):
        return (padding,) * 4
    padding = tuple(int(p) for p in padding)
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    if len(padding) == 4:
        return padding
    raise ValueError(f"padding must be an int, (pad_h, pad_w) or (top, bottom, left, right), got {padding}")


def pack_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(Cout, Cin/groups, kh, kw) -> contiguous (kh, kw, Cin/groups, Cout) in ``dtype``: the
    K-major (K, Cout) matrix the kernels read (k = (tap, channel)). Free (no copy) for a weight
    that is already a view ``packed.permute(3, 2, 0, 1)`` in ``dtype``: cache frozen weights so."""
    return weight.detach().to(dtype).permute(2, 3, 1, 0).contiguous()


def _act_index(act: Optional[str]) -> int:
    if act not in ACTS:
        raise ValueError(f"act must be one of {ACTS}, got {act!r}")
    return ACTS.index(act)


def _sum_slots(hw: int, tile_m: int) -> int:
    """S: the most row tiles one image of ``hw`` output pixels can touch (partial rows per image)."""
    return (tile_m - 1 + hw - 1) // tile_m + 1


def fused_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, stride: int = 1,
               padding: Padding = 0, groups: int = 1, act: Optional[str] = None, act_gain: float = 1.0,
               pool: bool = False, want_sums: bool = False, config: Optional[dict] = None,
               packed_weight: Optional[torch.Tensor] = None, gpu_config: bool = False,
               autotune: Optional[bool] = None, vendor: Optional[bool] = None, gain: Optional[torch.Tensor] = None,
               std_scale: float = 1.0, std_eps: float = 0.0, backward: bool = False,
               grad_out: Optional[torch.Tensor] = None, grad_sums: Optional[torch.Tensor] = None,
               pre_act: bool = False, pre_beta: float = 1.0, want_out: bool = True,
               std_out: Optional[torch.Tensor] = None, sum_images: bool = False, std_ready: bool = False,
               z_out: Optional[torch.Tensor] = None):
    """``act(conv2d(pool(x), weight, stride, padding, groups) + bias) * act_gain`` in one launch,
    channels_last. The specification is ``nfnet_fast._reference.fused_conv``.

    Args:
        x: (N, Cin, H, W), fp32/fp16/bf16; made channels_last-contiguous if it is not (a copy).
        weight: (Cout, Cin/groups, kh, kw), any float dtype; used in ``x``'s dtype (like a conv
            under autocast); ignored (only its shape is read) when ``packed_weight`` is given.
        bias: (Cout,) or None; added in fp32.
        stride: the convolution's stride (both dimensions).
        padding: zero padding: an int, ``(pad_h, pad_w)`` or ``(top, bottom, left, right)``.
        groups: the convolution's groups.
        act: None, "silu", "relu" or "gelu" (exact erf form), applied after the bias.
        act_gain: multiplies the activation's output (timm's GammaAct).
        pool: a 2x2, stride-2, ceil-mode average pool (count_include_pad=False) of ``x`` first,
            applied while loading; needs a 1x1 kernel, stride 1, no padding and groups 1.
        want_sums: also return fp32 (N, Cout) sums over H*W of the output (before its rounding
            to ``x``'s dtype).
        config: a tile (see :func:`config`) instead of the launcher's choice.
        packed_weight: :func:`pack_weight` of ``weight`` in ``x``'s dtype, if already packed.
        gpu_config: the GPU tiles on CPU tensors too (tests).
        autotune: pick the tile among :func:`candidates` by timing (:func:`tuned`); default:
            on for CUDA tensors unless ``NFNET_FAST_AUTOTUNE=0``, off elsewhere.
        vendor: let the tuning also time the VENDOR candidate (aten's convolution, then separate
            passes); default: for fp16/bf16 CUDA tensors.
        gain: None, or ``weight`` is a raw ScaledStdConv2d weight and the conv uses
            ``(w - mean) / sqrt(var + eps) * gain * std_scale`` per output channel (fp32 statistics
            over the fan-in, as ``scaled_std_weight``), standardised into the packed matrix by one
            launch (see "Weight standardisation" above).
        std_scale, std_eps: the standardisation's scale (``gamma * fan_in ** -0.5``) and eps.
        backward: compute, instead of the output, the gradient of the pre-activation
            ``z = conv2d(x, weight) + bias`` for the output's gradient ``grad_out`` (N, Cout, Ho,
            Wo) and the sums' gradient ``grad_sums`` (N, Cout) fp32 (either may be None):
            ``(grad_out + grad_sums[:, :, None, None]) * act_gain * act'(z)``, z recomputed in the
            GEMM (see "backward"); ``want_sums`` then sums that gradient per (image, channel) (the
            bias gradient, summed over images). No pool (the backward pools once for cuDNN's weight
            gradient anyway and passes the pooled input).
        pre_act: ``x`` is a pre-activation and the conv's input is ``silu(x) * pre_beta`` (fp32
            math, rounded to x's dtype, as ``silu_scale`` writes it), computed as the 1x1 kernel
            loads its A tiles (before the pool's average), so that input is never written; other
            convs take one ``silu_scale`` launch first. Not with ``backward``.
        pre_beta: that pre-activation's scale.
        want_out: False: only the sums are wanted (with ``want_sums``; not with ``backward``): the
            output is computed but never written, nor allocated.
        std_out: with ``gain``, the contiguous (kh, kw, Cin/groups, Cout) tensor in ``x``'s dtype
            to standardise the weight into (a new one if None): the caller keeps it (a training
            forward's op returns it, so that the backward need not standardise again).
        std_ready: ``std_out`` holds that standardised weight already (the caller made it with
            ``scaled_std_weight.forward_many``, with the weights of other convs): no launch here.
        sum_images: with ``want_sums``, the sums are summed over the images too: fp32 (Cout,),
            the bias gradient of a ``backward`` launch (one reduction of the partial rows over
            images and slots, not per-image sums summed again).
        z_out: None, or a channels_last (N, Cout, Ho, Wo) tensor in ``x``'s dtype (not with
            ``backward``) that the epilogue also stores the pre-activation ``z = conv + bias`` into,
            rounded as the output is: a training conv keeps it so that its backward (``backward(z=)``)
            needs no GEMM to recompute it.

    Returns:
        ``out`` (N, Cout, Ho, Wo) channels_last in ``x``'s dtype, ``(out, sums)`` with
        ``want_sums`` (sums (Cout,) with ``sum_images``), or ``sums`` alone with ``want_out=False``.
    """
    if x.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"x and weight must be 4-d, got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    nb, cin, h, w = x.shape
    cout, cg, kh, kw = weight.shape
    if groups < 1 or cin != cg * groups or cout % groups:
        raise ValueError(f"groups={groups} does not fit x {tuple(x.shape)} and weight {tuple(weight.shape)}")
    if bias is not None and bias.numel() != cout:
        raise ValueError(f"bias has {bias.numel()} values for {cout} output channels")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    pt, pb, pl, pr = normalize_padding(padding)
    if min(pt, pb, pl, pr) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    a = _act_index(act)
    if not want_out and (not want_sums or backward):
        raise ValueError("want_out=False needs want_sums=True (the sums are then the only result) and no backward")
    one_by_one = kh == 1 and kw == 1 and stride == 1 and (pt, pb, pl, pr) == (0, 0, 0, 0) and groups == 1
    if pre_act and backward:
        raise ValueError("pre_act=True is a forward prologue: the backward takes the activated input")
    if pre_act and (not one_by_one or want_sums):
        # the prologue is in the 1x1 kernel without sums only, the launches NF blocks make (conv1,
        # the downsample): the implicit-GEMM kernel has none, and with the sums' epilogue the pooled
        # 128x64 fp32 tile spilled (the AOT matrix)
        x, pre_act = _silu.forward(x if _is_dense(x) else x.contiguous(), pre_beta), False
    if pool:
        if not one_by_one or backward:
            raise ValueError("pool=True needs a 1x1 kernel, stride 1, no padding and groups 1 (the downsample conv), "
                             "and no backward")
        h, w = (h + 1) // 2, (w + 1) // 2  # the pooled grid the GEMM runs on
    ho, wo = _out_hw((h, w), (kh, kw), stride, (pt, pb, pl, pr))
    if ho < 1 or wo < 1:
        raise ValueError(f"input {tuple(x.shape)} too small for kernel {kh}x{kw} with padding {padding}")
    if nb * x.shape[2] * x.shape[3] >= 2 ** 31 or nb * ho * wo >= 2 ** 31:
        raise ValueError("more than 2**31 pixels in one batch")

    x = x.contiguous(memory_format=torch.channels_last)
    # (without the output, a one-element tensor of its dtype stands in for the kernel's out_ptr, which
    # it never stores through: has_out 0)
    out = (torch.empty((nb, cout, ho, wo), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
           if want_out else x.new_empty((1,)))
    if z_out is not None and (backward or z_out.shape != (nb, cout, ho, wo) or z_out.dtype != x.dtype
                              or not z_out.is_contiguous(memory_format=torch.channels_last)):
        raise ValueError(f"z_out must be a channels_last {(nb, cout, ho, wo)} {x.dtype} tensor of a forward launch, "
                         f"got {tuple(z_out.shape)} {z_out.dtype}{' with backward' if backward else ''}")
    if std_out is not None and gain is None:
        raise ValueError("std_out is where the weight is standardised to: it needs gain")
    if std_ready and std_out is None:
        raise ValueError("std_ready=True says std_out holds the standardised weight: it needs std_out")
    if gain is not None:
        if gain.numel() != cout:
            raise ValueError(f"gain has {gain.numel()} values for {cout} output channels")
        wt = torch.empty((kh, kw, cg, cout), device=x.device, dtype=x.dtype) if std_out is None else std_out
    else:
        wt = pack_weight(weight, x.dtype) if packed_weight is None else packed_weight
    _check_operand(wt, "packed weight" if std_out is None else "std_out", (kh, kw, cg, cout), x.dtype)
    if gain is not None and not std_ready:  # (checked first: the launch writes into wt)
        _std.forward(_std_rows(weight), _values(gain), std_scale, std_eps, gpu_config, packed=wt)
    b = (torch.zeros(cout, device=x.device, dtype=torch.float32) if bias is None
         else bias if bias.dtype == torch.float32 and bias.is_contiguous() else bias.detach().float().contiguous())
    m = nb * ho * wo
    hw = ho * wo
    cog = cout // groups
    if backward:
        grad_out, grad_sums = _incoming_grads(grad_out, grad_sums, out.shape, x.dtype)
    # absent gradients: any tensor of the right types stands in (has_grad / has_gsums say 0)
    grad_t = grad_out if grad_out is not None else out
    gsums_t = grad_sums if grad_sums is not None else b
    z_t = out if z_out is None else z_out  # (without HAS_Z out stands in)
    aligned = _is_aligned((cin, cout, cg, cog), (x, wt, out, z_t, grad_t, gsums_t))
    flags = dict(has_grad=int(grad_out is not None), has_gsums=int(grad_sums is not None), has_out=int(want_out),
                 HAS_Z=z_out is not None)

    def run_tile(cfg: dict):
        """Run the conv with tile ``cfg`` into ``out``; the sums' partial rows (N, slots, Cout)."""
        if one_by_one:
            cfg.pop("FLAT_K", None)
        else:
            cfg.setdefault("FLAT_K", cg < cfg["BLOCK_K"])
        if z_out is not None:
            cfg = z_tile(cfg)
        slots = _sum_slots(hw, cfg["BLOCK_M"])
        part = b if not want_sums else torch.zeros((nb, slots, cout), device=x.device, dtype=torch.float32)
        if m:
            with device_guard(x):
                if one_by_one:
                    grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(cout, cfg["BLOCK_N"]),)
                    launch(_conv1x1_kernel, grid, x, wt, b, out, z_t, part, grad_t, gsums_t, m, cin, cout, x.shape[2],
                           x.shape[3], wo, hw, slots, a, float(act_gain), **flags, pre_beta=float(pre_beta),
                           POOL=bool(pool), SUMS=bool(want_sums), BWD=bool(backward), PRE_ACT=bool(pre_act), **cfg)
                else:
                    grid = (cdiv(m, cfg["BLOCK_M"]) * groups * cdiv(cog, cfg["BLOCK_N"]),)
                    launch(_conv_kernel, grid, x, wt, b, out, z_t, part, grad_t, gsums_t, m, h, w, cin, wo, hw, cout,
                           cg, cog, stride, pt, pl, slots, a, float(act_gain), **flags, KH=kh, KW=kw, SUMS=bool(want_sums),
                           BWD=bool(backward), **cfg)
        return part

    def vendor_launch():
        if backward:
            return _vendor_conv_backward(x, wt.permute(3, 2, 0, 1), bias, stride, (pt, pb, pl, pr), groups, a,
                                         float(act_gain), want_sums, grad_out, grad_sums)
        xin = _silu.forward(x, pre_beta) if pre_act else x  # (the unfused way: a pass that writes it)
        return _vendor_conv(xin, wt.permute(3, 2, 0, 1), bias, stride, (pt, pb, pl, pr), groups, a, float(act_gain),
                            pool, want_sums, want_out, z_out)

    if autotune is None:
        autotune = x.is_cuda
    if vendor is None:
        vendor = x.is_cuda and x.dtype != torch.float32
    if config is not None:  # never claim an alignment the tensors do not have
        cfg = dict(config)
        cfg["ALIGNED"] = bool(cfg.get("ALIGNED", aligned)) and aligned
    else:
        # the choice below (tile lists, the tuning table's key and lookup) costs tens of us of host
        # time a call, so it is made once per launch signature and process
        memo = (x.device, x.dtype, x.shape, weight.shape, stride, (pt, pb, pl, pr), groups, bool(pool),
                bool(want_sums), bool(backward), bool(pre_act), z_out is not None, aligned,
                bool(autotune) and autotune_enabled(), bool(vendor), bool(gpu_config))
        pick = _PICKS.get(memo)
        if pick is None:
            pick, final = _choose(x, weight, (pt, pb, pl, pr), stride, groups, pool, want_sums, backward, pre_act,
                                  z_out is not None, aligned, autotune and m, vendor, gpu_config, one_by_one, cg, cog,
                                  lambda cfg: run_tile(dict(cfg)), vendor_launch)
            if final:
                _PICKS[memo] = pick
        if pick == VENDOR:
            res = vendor_launch()
            if want_sums and sum_images:  # (the vendor candidate's sums are per image)
                return (res[0], res[1].sum(0)) if want_out else res.sum(0)
            return res
        cfg = dict(pick)
    part = run_tile(cfg)
    if not want_sums:
        return out
    sums = part.sum((0, 1) if sum_images else 1)  # (slots no tile wrote are zeros: they add nothing)
    return (out, sums) if want_out else sums


def backward(grad_out: Optional[torch.Tensor], grad_sums: Optional[torch.Tensor], x: torch.Tensor,
             weight: torch.Tensor, bias: Optional[torch.Tensor], *, stride: int = 1, padding: Padding = 0,
             groups: int = 1, act: Optional[str] = None, act_gain: float = 1.0, pool: bool = False,
             pre_beta: Optional[float] = None, gain: Optional[torch.Tensor] = None, std_scale: float = 1.0,
             std_eps: float = 0.0, needs: Sequence[bool] = (True, True, True, True), gpu_config: bool = False,
             std_weight: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None,
             grad_x_add: Optional[torch.Tensor] = None):
    """Gradients ``(grad_x, grad_weight, grad_bias, grad_gain)`` of :func:`fused_conv` for the
    output's gradient ``grad_out`` and the sums' ``grad_sums`` (either may be None); each None where
    ``needs`` (x, weight, bias, gain) says so, or where there is no such argument. See "backward".

    ``weight`` in ``x``'s dtype, or with ``gain`` the raw weight (standardised here again, one
    launch, unless ``std_weight`` is the forward's standardised weight, its ``std_out``; the
    standardisation's backward turns the conv's weight gradient into the raw weight's and the
    gain's: one launch). With ``pre_beta``, ``x`` is the tensor the convolved input
    was made from as ``silu(x) * pre_beta`` (recomputed here: one launch), and grad_x is x's
    gradient through it (one launch). With ``z``, the pre-activation the forward kept
    (``fused_conv(z_out=)``), the activation's gradient reads it (:func:`z_grad`) instead of recomputing
    it by a GEMM. With ``grad_x_add``, x's gradient from its other uses (x's shape), grad_x is the sum of
    the two: with ``pre_beta`` added in the SiLU backward's pass (one more read, no pass of its own), else
    by an add. Everything a conv's backward needs is this one call, so a training step pays one op's
    host overhead per conv.

    grad_x comes back in x's memory format (NCHW or channels_last), grad_weight in weight's
    (channels_last where weight is channels_last-contiguous and not contiguous, else contiguous) and
    dtype, grad_bias fp32, grad_gain like gain.
    """
    need_x, need_w, need_b, need_gain = needs
    if grad_x_add is not None and grad_x_add.shape != x.shape:
        raise ValueError(f"grad_x_add must have x's shape {tuple(x.shape)}, got {tuple(grad_x_add.shape)}")
    need_gain = need_gain and gain is not None
    need_b = need_b and bias is not None
    pre_x = None
    if pre_beta is not None:
        pre_x = x if _is_dense(x) else x.contiguous()
        x = _silu.forward(pre_x, pre_beta)
    raw = packed = None
    grad_w_format = _memory_format(weight)  # (the layout AccumulateGrad wants: the parameter's, see below)
    if gain is not None:  # the GEMM's packed operand: the forward's, or standardised again as it was
        raw, gain_flat = _std_rows(weight), _values(gain)
        cout, cg, kh, kw = raw.shape
        if std_weight is None:
            packed = _std.forward(raw, gain_flat, std_scale, std_eps, gpu_config,
                                  packed=torch.empty((kh, kw, cg, cout), device=x.device, dtype=x.dtype))
        else:
            _check_operand(std_weight, "std_weight", (kh, kw, cg, cout), x.dtype)
            packed = std_weight
        weight = packed.permute(3, 2, 0, 1)  # (cuDNN copies it into its own layout)
        if cout == 1:  # (aten's CPU conv refused one output channel's view, strides (1, 1, 9, 3) for a 3x3
            weight = weight.contiguous()  # weight, on a batch of one; a copy of one filter, wherever it runs)
    pt, pb, pl, pr = normalize_padding(padding)
    xin = torch.nn.functional.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False) if pool else x
    conv = dict(stride=stride, padding=(pt, pb, pl, pr), groups=groups)
    grad_b = None
    if act is not None and z is not None:  # the kept z: its gradient in one elementwise pass (with its sums)
        # (channels_last as the forward stored it, unless a saved-tensor hook gave it back in another layout:
        # save_on_cpu(pin_memory=True) returns a contiguous copy)
        z = z.contiguous(memory_format=torch.channels_last)
        grad_z, sums = z_grad(z, grad_out, grad_sums, act=act, act_gain=act_gain, gpu_config=gpu_config)
        if need_b:
            grad_b = sums
    elif act is not None:  # z recomputed in the GEMM, its gradient made in the epilogue (with its sums)
        grad_z, sums = fused_conv(xin, weight, bias, act=act, act_gain=act_gain, want_sums=True, backward=True,
                                  grad_out=grad_out, grad_sums=grad_sums, gpu_config=gpu_config, packed_weight=packed,
                                  sum_images=True, **conv)
        if need_b:
            grad_b = sums
    else:  # no activation: z is the output, its gradient needs no recompute (and often no pass at all)
        g = grad_out
        if g is None or grad_sums is not None or act_gain != 1.0:
            if g is None:  # only the sums have a gradient: each output pixel gets its channel's
                ho, wo = _out_hw(xin.shape[2:], weight.shape[2:], stride, (pt, pb, pl, pr))
                g = torch.zeros((x.shape[0], weight.shape[0], ho, wo), device=x.device, dtype=torch.float32)
            else:
                g = g.float()
            if grad_sums is not None:
                g = g + grad_sums.float()[:, :, None, None]
            if act_gain != 1.0:
                g = g * act_gain
        grad_z = g.to(x.dtype).contiguous(memory_format=torch.channels_last)
        if need_b:
            grad_b = g.sum((0, 2, 3), dtype=torch.float32)
    symmetric = pt == pb and pl == pr
    xpad = xin if symmetric else torch.nn.functional.pad(xin, (pl, pr, pt, pb))
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_z, xpad, weight, None, [stride] * 2, [pt, pl] if symmetric else [0, 0], [1, 1], False, [0, 0], groups,
        [need_x, need_w or need_gain, False])
    if grad_x is not None:
        if not symmetric:
            grad_x = grad_x[:, :, pt:pt + xin.shape[2], pl:pl + xin.shape[3]]
        if pool:
            grad_x = torch.ops.aten.avg_pool2d_backward(grad_x, x, [2, 2], [2, 2], [0, 0], True, False, None)
        if pre_x is not None:  # d(silu(p) * beta)/dp = beta * silu'(p), elementwise in pre_x's layout
            grad_x = _silu.backward(grad_x if grad_x.stride() == pre_x.stride() else
                                    torch.empty_like(pre_x).copy_(grad_x), pre_x, pre_beta, add=grad_x_add)
        elif grad_x_add is not None:
            grad_x = grad_x + grad_x_add
        grad_x = grad_x.contiguous(memory_format=_memory_format(x if pre_x is None else pre_x))
    # grad_w in the weight's own layout (_memory_format): a channels_last model's kxk weights get
    # channels_last gradients, as cuDNN makes them for channels_last activations, with no copy here;
    # and AccumulateGrad, which copies a gradient into its parameter's strides where they differ
    # (autograd's layout contract), copies none either
    grad_gain = None
    if raw is not None and grad_w is not None:  # (the standardisation's backward reads both in raw's layout)
        grad_w, grad_gain = _std.backward(grad_w.contiguous(memory_format=_std.rows_layout(raw)), raw, gain_flat,
                                          std_scale, std_eps)  # (any dtype)
        grad_gain = (grad_gain if gain.dtype == torch.float32 else grad_gain.to(gain.dtype)).view(gain.shape) \
            if need_gain else None
    if grad_w is not None:
        grad_w = grad_w.contiguous(memory_format=grad_w_format) if need_w else None
    return grad_x, grad_w, grad_b, grad_gain


def _incoming_grads(grad_out: Optional[torch.Tensor], grad_sums: Optional[torch.Tensor], shape, dtype: torch.dtype):
    """A backward launch's incoming gradients checked against the output's ``shape`` and laid out for the
    kernels: ``grad_out`` channels_last in ``dtype``, ``grad_sums`` (N, Cout) fp32 contiguous (either may be None)."""
    if grad_out is not None:
        if grad_out.shape != shape:
            raise ValueError(f"grad_out must have the output's shape {tuple(shape)}, got {tuple(grad_out.shape)}")
        grad_out = grad_out.to(dtype).contiguous(memory_format=torch.channels_last)
    if grad_sums is not None:
        if grad_sums.shape != tuple(shape[:2]):
            raise ValueError(f"grad_sums must be {tuple(shape[:2])}, got {tuple(grad_sums.shape)}")
        grad_sums = grad_sums.to(torch.float32).contiguous()
    return grad_out, grad_sums


def z_grad(z: torch.Tensor, grad_out: Optional[torch.Tensor], grad_sums: Optional[torch.Tensor], *, act: str,
           act_gain: float = 1.0, gpu_config: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(grad_z, grad_bias)`` for a kept pre-activation ``z`` (N, Cout, Ho, Wo) channels_last: ``grad_z =
    (grad_out + grad_sums[:, :, None, None]) * act_gain * act'(z)`` in z's dtype, channels_last, and its fp32
    (Cout,) sums over images and pixels (the bias gradient), in one launch: the BWD epilogue of
    :func:`fused_conv` with z loaded instead of recomputed (either gradient may be None)."""
    if z.dim() != 4 or not z.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"z must be a channels_last 4-d tensor, got {tuple(z.shape)} with strides {z.stride()}")
    nb, cout, ho, wo = z.shape
    grad_out, grad_sums = _incoming_grads(grad_out, grad_sums, z.shape, z.dtype)
    m, hw = nb * ho * wo, ho * wo
    # Z_GRAD_TILE; on CPU tensors (the interpreter) a tile as large as the problem, as config()
    gpu = z.is_cuda or gpu_config
    block_m = Z_GRAD_TILE["BLOCK_M"] if gpu else _pow2(m, 16, CPU_MAX["BLOCK_M"])
    block_n = Z_GRAD_TILE["BLOCK_N"] if gpu else _pow2(cout, 16, CPU_MAX["BLOCK_N"])
    slots = _sum_slots(hw, block_m)
    grad_z = torch.empty_like(z, memory_format=torch.channels_last)
    part = torch.zeros((nb, slots, cout), device=z.device, dtype=torch.float32)
    grad_t = grad_out if grad_out is not None else z
    gsums_t = grad_sums if grad_sums is not None else part
    if m:
        with device_guard(z):
            launch(_z_grad_kernel, (cdiv(m, block_m), cdiv(cout, block_n)), z, grad_z, part, grad_t, gsums_t, m, cout,
                   hw, slots, _act_index(act), float(act_gain), int(grad_out is not None), int(grad_sums is not None),
                   BLOCK_M=block_m, BLOCK_N=block_n, ALIGNED=_is_aligned((cout,), (z, grad_z, grad_t)),
                   num_warps=Z_GRAD_TILE["num_warps"])
    return grad_z, part.sum((0, 1))


def _std_rows(weight: torch.Tensor) -> torch.Tensor:
    """A raw weight as the standardisation kernels read it: ``weight`` itself where its rows are dense
    (contiguous, or a channels_last model's kxk weight), else a contiguous copy."""
    return weight if _std.rows_layout(weight) is not None else weight.contiguous()


def _check_operand(t: torch.Tensor, name: str, shape: tuple, dtype: torch.dtype) -> None:
    """The GEMM's packed weight operand ``t`` (given, or to be written) is contiguous ``shape`` in ``dtype``."""
    if t.shape != shape or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous {shape} in {dtype}, got {tuple(t.shape)} {t.dtype}")


def _values(t: torch.Tensor) -> torch.Tensor:
    """``t``'s values contiguous, for a kernel that reads them flat (a conv's (C_out, 1, 1, 1) gain):
    ``t`` itself where it is contiguous, whatever its shape, else a flat copy."""
    return t if t.is_contiguous() else t.reshape(-1).contiguous()


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill one span of memory in some order (elementwise kernels' input)."""
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _out_hw(hw, khw, stride: int, padding4):
    """The output grid of a (kh, kw) conv with ``stride`` and (top, bottom, left, right) padding."""
    pt, pb, pl, pr = padding4
    return (hw[0] + pt + pb - khw[0]) // stride + 1, (hw[1] + pl + pr - khw[1]) // stride + 1


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a channels_last-contiguous (and not NCHW-contiguous) tensor, else NCHW."""
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


_PICKS: Dict[tuple, Union[str, dict]] = {}  # launch signature -> tile (or VENDOR), see fused_conv


def _choose(x, weight, padding4, stride, groups, pool, want_sums, backward, pre_act, has_z, aligned, autotune, vendor,
            gpu_config, one_by_one, cg, cog, run_tile, vendor_launch):
    """``(tile or VENDOR, final)`` for a launch: tuned (from the cache file, or timed now with
    ``run_tile(tile)`` / ``vendor_launch()``) where autotuning applies, else the heuristic's;
    ``final`` is False when a CUDA graph capture made tuning fall back to the heuristic."""
    tile = bwd_tile if backward else dict
    if autotune and (x.is_cuda or gpu_config):
        names = candidates("1x1" if one_by_one else "conv", cg, cog, pool, aligned) + [VENDOR] * bool(vendor)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        key = _tune_key(x, weight.shape, stride, padding4, groups, pool, want_sums, backward, pre_act, bool(vendor),
                        has_z)
        pick = tuned(key, names, x.device,
                     lambda name: vendor_launch() if name == VENDOR else run_tile(tile(TILES[name])))
        return (pick if pick == VENDOR else tile(TILES[pick])), not capturing
    cfg = config_for(x, weight, groups, stride, padding4, pool, aligned, gpu_config)
    return (bwd_tile(cfg) if backward and (x.is_cuda or gpu_config) else cfg), True


def _is_aligned(channels, tensors) -> bool:
    """ALIGNED's condition: channel counts multiples of 16, tensors starting 16-byte aligned."""
    bits = 0
    for c in channels:
        bits |= c
    for t in tensors:
        bits |= t.data_ptr()
    return bits & 15 == 0


def config_for(x: torch.Tensor, weight: torch.Tensor, groups: int = 1, stride: int = 1, padding: Padding = 0,
               pool: bool = False, aligned: Optional[bool] = None, gpu_config: bool = False) -> dict:
    """The tile :func:`fused_conv` picks for these arguments (``aligned``: by default from the
    channel counts and ``x``'s address)."""
    cout, cg, kh, kw = weight.shape
    if aligned is None:
        aligned = _is_aligned((cg * groups, cout, cg, cout // groups), (x,))
    one_by_one = (kh, kw, stride, groups) == (1, 1, 1, 1) and normalize_padding(padding) == (0, 0, 0, 0)
    pt, pb, pl, pr = normalize_padding(padding)
    h, w = x.shape[2:]
    if pool:
        h, w = (h + 1) // 2, (w + 1) // 2
    rows = x.shape[0] * ((h + pt + pb - kh) // stride + 1) * ((w + pl + pr - kw) // stride + 1)
    return config("1x1" if one_by_one else "conv", cg, cout // groups, x.device, pool, aligned, gpu_config,
                  rows=rows, taps=kh * kw)


def cost(n: int, cin: int, h: int, w: int, cout: int, k: int, *, stride: int = 1, groups: int = 1,
         padding: Optional[int] = None, pool: bool = False, dtype_bytes: int = 2, want_sums: bool = False) -> dict:
    """Work of one :func:`fused_conv` launch on an (n, cin, h, w) input with a k x k kernel:
    ``flops`` (2 per multiply-add) and ``bytes``, the least HBM traffic possible: the input read
    once (at full resolution with ``pool``), the output written once, the weight once (activation
    dtype), the fp32 bias and sums. ``padding`` defaults to k // 2."""
    hin, win = h, w
    if pool:
        h, w = (h + 1) // 2, (w + 1) // 2
    p = k // 2 if padding is None else padding
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    flops = 2 * n * ho * wo * cout * (cin // groups) * k * k
    nbytes = dtype_bytes * (n * cin * hin * win + n * cout * ho * wo + cout * (cin // groups) * k * k) + 4 * cout
    if want_sums:
        nbytes += 4 * n * cout
    return dict(flops=flops, bytes=nbytes, out_shape=(n, cout, ho, wo))


# ---------------------------------------------------------------------------------------------
# ahead-of-time compile matrix: every constexpr combination the launchers above pass (3x3 and 1x1 kernels)

_F32 = "*fp32"
_SUMS = (False, True)
_PRE_SUMS = ((False, False), (True, False), (False, True))  # (SUMS, PRE_ACT): the prologue never with sums
_HAS_Z = (False, True)  # a forward launch with z_out (a training conv keeping its pre-activation) or without
GEMM_TILES = [GEMM_WIDE, GEMM_NARROW, GEMM_GENERIC]
GEMM_POOL_TILES = [GEMM_POOL_WIDE, GEMM_POOL_NARROW, GEMM_POOL_GENERIC]
CONV_TILES = [CONV_K64_N64, CONV_K64_N128, CONV_K32_N64, CONV_FLAT, CONV_GENERIC]
# Kernel sizes precompiled for the conv kernel: 3x3, every kxk conv of L0 and of the NF family;
# other sizes (and 1x1 convs with a stride or groups) take the same kernel through the JIT.
CONV_KERNEL_SIZES = [(3, 3)]
# BWD (the backward's recompute, see "backward"): every tile but the pool's (the backward passes a
# pooled input), without the PRE_ACT prologue (the backward convolves the activated input it made).
_FLOATS = dict(act_gain="fp32", pre_beta="fp32")
AOT = [
    AotSpec(_conv1x1_kernel, dict(bias_ptr=_F32, part_ptr=_F32, gsums_ptr=_F32, **_FLOATS),
            [dict(POOL=False, SUMS=s, BWD=False, PRE_ACT=p, HAS_Z=z, **t) for t in GEMM_TILES for s, p in _PRE_SUMS
             for z in _HAS_Z]
            + [dict(POOL=True, SUMS=s, BWD=False, PRE_ACT=p, HAS_Z=z, **t) for t in GEMM_POOL_TILES
               for s, p in _PRE_SUMS for z in _HAS_Z]
            + [dict(POOL=False, SUMS=s, BWD=True, PRE_ACT=False, HAS_Z=False, **bwd_tile(t)) for t in GEMM_TILES
               for s in _SUMS],
            aligned=("x_ptr", "w_ptr", "bias_ptr", "out_ptr", "z_ptr", "part_ptr", "grad_ptr", "gsums_ptr", "K",
                     "Cout")),
    AotSpec(_conv_kernel, dict(bias_ptr=_F32, part_ptr=_F32, gsums_ptr=_F32, act_gain="fp32"),
            [dict(KH=kh, KW=kw, SUMS=s, BWD=bwd, HAS_Z=z, **(bwd_tile(t) if bwd else z_tile(t) if z else t))
             for t in CONV_TILES for (kh, kw) in CONV_KERNEL_SIZES for s in _SUMS
             for bwd, z in ((False, False), (False, True), (True, False))],
            aligned=("x_ptr", "w_ptr", "bias_ptr", "out_ptr", "z_ptr", "part_ptr", "grad_ptr", "gsums_ptr", "Cin",
                     "Cout", "Cg", "Cog")),
    AotSpec(_z_grad_kernel, dict(part_ptr=_F32, gsums_ptr=_F32, act_gain="fp32"),
            [dict(Z_GRAD_TILE, ALIGNED=al) for al in (False, True)],
            aligned=("z_ptr", "out_ptr", "part_ptr", "grad_ptr", "gsums_ptr", "Cout")),
]
