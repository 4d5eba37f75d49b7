"""The ``cuda`` backend: ops of the compiled extension ``nfnet_fast._C`` (csrc/).

The C++ side defines the schemas (csrc/ops.cpp) and the CPU/CUDA kernels; this module registers
their fake kernels (for torch.compile and meta tensors) and their autograd, and wraps them with
the signatures of :mod:`nfnet_fast.ops`. On CPU tensors the C++ CPU twins run. Importing it needs
the extension to load.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch._prims_common import suggest_memory_format

from ._backends import extension
from ._library import register_scaled_std_weight

if extension() is None:  # pragma: no cover - nfnet_fast.ops only imports this module when it loads
    raise ImportError("nfnet_fast._C is not available; see nfnet_fast.backends()")

_ops = torch.ops.nfnet_fast


# --- scaled weight standardisation -------------------------------------------------------------

register_scaled_std_weight("nfnet_fast::scaled_std_weight", _ops.scaled_std_weight_backward)


def scaled_std_weight(weight, gain, scale, eps):
    return _ops.scaled_std_weight(weight, gain, scale, eps)


# --- silu(x) * beta ----------------------------------------------------------------------------

@torch.library.register_fake("nfnet_fast::silu_scale")
def _(x, beta):
    return torch.empty_like(x)  # x's strides when dense, else its suggested format: as the kernels


@torch.library.register_fake("nfnet_fast::silu_scale_backward")
def _(grad_out, x, beta):
    return torch.empty_like(x)


def _silu_setup(ctx, inputs, output):
    x, ctx.beta = inputs
    ctx.save_for_backward(x)


def _silu_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _ops.silu_scale_backward(grad, x, ctx.beta), None


torch.library.register_autograd("nfnet_fast::silu_scale", _silu_backward, setup_context=_silu_setup)


def silu_scale(x, beta):
    return _ops.silu_scale(x, beta)


# --- ECA and the fused block tail ----------------------------------------------------------------

def _act_format(x: torch.Tensor) -> torch.memory_format:
    """The layout the ECA kernels run in and return (csrc/eca.h, eca_format)."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return suggest_memory_format(x)


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _like_act(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_act_format(x))


@torch.library.register_fake("nfnet_fast::eca_forward")
def _(x, weight, shortcut, scale, beta_next):
    out = _like_act(x)
    act = _like_act(x) if beta_next is not None else x.new_empty((0,))
    mean = x.new_empty((x.shape[0], x.shape[1]), dtype=_math_dtype(x))
    return out, act, mean


@torch.library.register_fake("nfnet_fast::eca_backward")
def _(grad_out, grad_act, x, weight, shortcut, mean, scale, beta_next):
    grad_x = _like_act(x)
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    grad_shortcut = _like_act(x) if grad_act is not None else x.new_empty((0,))
    return grad_x, grad_weight, grad_shortcut


def _eca_setup(ctx, inputs, output):
    x, weight, shortcut, ctx.scale, ctx.beta_next = inputs
    ctx.mark_non_differentiable(output[2])  # the channel means: saved for the backward only
    ctx.has_shortcut = shortcut is not None
    # the shortcut only matters to the backward through act (it recomputes out = shortcut + ...)
    ctx.save_for_backward(x, weight, shortcut if ctx.beta_next is not None else None, output[2])


def _eca_backward(ctx, grad_out, grad_act, grad_mean):
    x, weight, shortcut, mean = ctx.saved_tensors
    with_act = ctx.beta_next is not None
    grad_x, grad_weight, grad_total = _ops.eca_backward(
        grad_out, grad_act if with_act else None, x, weight, shortcut, mean, ctx.scale, ctx.beta_next)
    grad_shortcut = None
    if ctx.has_shortcut:
        # out = shortcut + ...: its gradient is the total gradient of out, which the kernel computed
        # only when act added to it.
        grad_shortcut = grad_total if with_act else grad_out
    return grad_x, grad_weight, grad_shortcut, None, None


torch.library.register_autograd("nfnet_fast::eca_forward", _eca_backward, setup_context=_eca_setup)


def eca(x: torch.Tensor, weight: torch.Tensor, gain: float) -> torch.Tensor:
    return _ops.eca_forward(x, weight, None, gain, None)[0]


def eca_residual(y: torch.Tensor, weight: torch.Tensor, shortcut: torch.Tensor, alpha: float, attn_gain: float,
                 beta_next: Optional[float]):
    # The reference multiplies the gate by the Python float alpha * attn_gain: the same product here.
    out, act, _ = _ops.eca_forward(y, weight, shortcut, alpha * attn_gain, beta_next)
    return out if beta_next is None else (out, act)
