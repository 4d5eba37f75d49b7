"""``silu(x) * beta`` (the NF block's scaled pre-activation): Triton forward and backward kernels.

Elementwise over the flat storage of a dense tensor: the launchers take tensors whose elements
fill one contiguous span of memory (any dense layout: NCHW, channels_last, ...) and write outputs
with the same strides, so the memory format is kept without any index arithmetic. Math is fp32,
storage is the input's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import AotSpec, cdiv, device_guard, launch

# 4096 elements a program at 8 warps = 16 per thread: 16-byte vector loads for every dtype
# (several for fp32/fp64), enough bytes in flight per SM to cover HBM latency, and a grid of
# numel/4096 programs (tens of thousands at the network's sizes) that fills 132 SMs many times over.
BLOCK = 4096
NUM_WARPS = 8


@triton.jit
def _silu_scale_fwd_kernel(x_ptr, out_ptr, numel, beta, BLOCK: tl.constexpr):
    # int64 offsets: a large batch can exceed 2**31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = x * tl.sigmoid(x) * beta
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_scale_bwd_kernel(grad_ptr, x_ptr, dx_ptr, add_ptr, numel, beta, has_add, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(x)
    # d/dx [x * sigmoid(x)] = s * (1 + x * (1 - s))
    dx = g * beta * s * (1.0 + x * (1.0 - s))
    if has_add:  # x's gradient from its other uses, summed here in fp32 (one read) instead of by a pass of its own
        dx += tl.load(add_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


AOT = [
    AotSpec(_silu_scale_fwd_kernel, dict(beta="fp32"), [dict(BLOCK=BLOCK, num_warps=NUM_WARPS)],
            aligned=("x_ptr", "out_ptr", "numel")),
    AotSpec(_silu_scale_bwd_kernel, dict(beta="fp32"), [dict(BLOCK=BLOCK, num_warps=NUM_WARPS)],
            aligned=("grad_ptr", "x_ptr", "dx_ptr", "add_ptr", "numel")),
]


def forward(x: torch.Tensor, beta: float) -> torch.Tensor:
    """``silu(x) * beta`` for a dense ``x``; the output has ``x``'s strides."""
    out = torch.empty_like(x)
    n = x.numel()
    with device_guard(x):
        launch(_silu_scale_fwd_kernel, (cdiv(n, BLOCK),), x, out, n, float(beta), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def backward(grad: torch.Tensor, x: torch.Tensor, beta: float, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Gradient of ``silu(x) * beta`` wrt ``x``; ``grad`` and ``x`` dense with the same strides. With
    ``add`` (x's gradient from its other uses, x's shape), the sum of the two: ``add`` is read in the same
    pass (in x's dtype and strides; another layout or dtype is copied into them first)."""
    dx = torch.empty_like(x)
    n = x.numel()
    if add is not None:
        if add.shape != x.shape:
            raise ValueError(f"add must have x's shape {tuple(x.shape)}, got {tuple(add.shape)}")
        if add.dtype != x.dtype or add.stride() != x.stride():
            add = torch.empty_like(x).copy_(add)
    with device_guard(x):
        launch(_silu_scale_bwd_kernel, (cdiv(n, BLOCK),), grad, x, dx, x if add is None else add, n, float(beta),
               int(add is not None), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return dx
