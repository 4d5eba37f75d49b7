"""The ``triton`` backend: the Triton kernels of ``nfnet_fast.kernels`` as ``torch.library`` ops.

Every kernel launch sits inside a ``torch.library.custom_op`` named ``nfnet_fast::triton_<op>``
(the compiled extension owns the plain ``nfnet_fast::<op>`` names), with a fake kernel and, for the
forward ops, an autograd formula whose backward is again a custom op. So ``torch.compile(
fullgraph=True)`` sees single opaque nodes with exact output strides, ``torch.library.opcheck``
passes, and CUDA graphs can capture the launches. (``torch.library.triton_op`` would let
Inductor see into the kernels, but cannot be fake-traced under ``TRITON_INTERPRET=1``.)

The functions at the bottom have the reference signatures; :mod:`nfnet_fast.ops` validates the
arguments and calls them.

Layouts: activations in NCHW or channels_last are used as they are and outputs keep that format;
other strides are copied first (to the format ``torch.empty_like`` suggests, else NCHW).
Gradients arriving in another layout are copied to the activation's.

float64 (a dtype the ops accept for checks) runs the reference implementation: its math is fp32
either way, and the kernels are compiled and verified for fp32, fp16 and bf16 only.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _reference
from ._library import register_scaled_std_weight
from .kernels import eca_residual as _eca
from .kernels import scaled_std_weight as _std
from .kernels import silu_scale as _silu

__all__ = ["scaled_std_weight", "eca", "eca_residual", "silu_scale"]


# ---------------------------------------------------------------------------------------------
# layouts


def _is_dense(t: Tensor) -> bool:
    """Whether ``t``'s elements fill one contiguous span of memory (any order of dimensions)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda p: p[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _dense(t: Tensor) -> Tensor:
    """``t`` if dense, else a dense copy in the memory format ``torch.empty_like`` suggests."""
    return t if _is_dense(t) else torch.empty_like(t).copy_(t)


def _nchw_or_nhwc(t: Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def _activation(t: Tensor) -> Tensor:
    """A 4-D activation as NCHW- or channels_last-contiguous (copied only when it is neither)."""
    if _nchw_or_nhwc(t):
        return t
    out = torch.empty_like(t)
    if not _nchw_or_nhwc(out):  # dense in some other order of dimensions
        out = torch.empty_like(t, memory_format=torch.contiguous_format)
    return out.copy_(t)


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` (shaped like the dense ``ref``) with ``ref``'s strides, copied only if they differ
    (strides of size-1 dimensions do not matter)."""
    if all(a == b or n == 1 for a, b, n in zip(t.stride(), ref.stride(), ref.shape)):
        return t
    return torch.empty_like(ref).copy_(t)


def _taps(weight: Tensor) -> Tensor:
    """The ECA conv1d kernel as K contiguous fp32 values (whatever its dtype and shape)."""
    return weight.reshape(-1).to(torch.float32).contiguous()


def _partial_sums_like(y: Tensor) -> Tensor:
    n, c = y.shape[:2]
    s = _eca.pool_splits(tuple(y.shape), _eca.is_channels_last(y), y.device)
    return y.new_empty((n, s, c), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# silu_scale


@torch.library.custom_op("nfnet_fast::triton_silu_scale", mutates_args=())
def _silu_scale_op(x: Tensor, beta: float) -> Tensor:
    return _silu.forward(_dense(x), beta)


@_silu_scale_op.register_fake
def _(x, beta):
    return torch.empty_like(_dense(x))


@torch.library.custom_op("nfnet_fast::triton_silu_scale_backward", mutates_args=())
def _silu_scale_backward_op(grad: Tensor, x: Tensor, beta: float) -> Tensor:
    x = _dense(x)
    return _silu.backward(_like(grad, x), x, beta)


@_silu_scale_backward_op.register_fake
def _(grad, x, beta):
    return torch.empty_like(_dense(x))


def _silu_setup(ctx, inputs, output):
    x, ctx.beta = inputs
    ctx.save_for_backward(x)


def _silu_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return _silu_scale_backward_op(grad, x, ctx.beta), None


_silu_scale_op.register_autograd(_silu_backward, setup_context=_silu_setup)


# ---------------------------------------------------------------------------------------------
# scaled_std_weight


@torch.library.custom_op("nfnet_fast::triton_scaled_std_weight", mutates_args=())
def _std_op(weight: Tensor, gain: Tensor, scale: float, eps: float) -> Tensor:
    return _std.forward(weight.contiguous(), gain.reshape(-1).contiguous(), scale, eps)


@torch.library.custom_op("nfnet_fast::triton_scaled_std_weight_backward", mutates_args=())
def _std_backward_op(grad: Tensor, weight: Tensor, gain: Tensor, scale: float, eps: float) -> Tuple[Tensor, Tensor]:
    dw, dgain = _std.backward(grad.contiguous(), weight.contiguous(), gain.reshape(-1).contiguous(), scale, eps)
    return dw, dgain.to(gain.dtype).reshape(gain.shape)


register_scaled_std_weight("nfnet_fast::triton_scaled_std_weight", _std_backward_op)


# ---------------------------------------------------------------------------------------------
# eca, eca_residual
#
# The forward ops also return the (N, S, C) fp32 partial channel sums, which the backward reuses
# (non-differentiable, dropped by the public functions). A missing output gradient reaches the
# backward as None (materialize_grads off), so an unused a_next or x_next costs no traffic.


@torch.library.custom_op("nfnet_fast::triton_eca", mutates_args=())
def _eca_op(x: Tensor, weight: Tensor, gain: float) -> Tuple[Tensor, Tensor]:
    out, _, part = _eca.forward(_activation(x), _taps(weight), None, gain, None)
    return out, part


@_eca_op.register_fake
def _(x, weight, gain):
    x = _activation(x)
    return torch.empty_like(x), _partial_sums_like(x)


@torch.library.custom_op("nfnet_fast::triton_eca_residual", mutates_args=())
def _eca_residual_op(y: Tensor, weight: Tensor, shortcut: Tensor, alpha: float,
                     attn_gain: float) -> Tuple[Tensor, Tensor]:
    y = _activation(y)
    x, _, part = _eca.forward(y, _taps(weight), _like(shortcut, y), alpha * attn_gain, None)
    return x, part


@_eca_residual_op.register_fake
def _(y, weight, shortcut, alpha, attn_gain):
    y = _activation(y)
    return torch.empty_like(y), _partial_sums_like(y)


@torch.library.custom_op("nfnet_fast::triton_eca_residual_next", mutates_args=())
def _eca_residual_next_op(y: Tensor, weight: Tensor, shortcut: Tensor, alpha: float, attn_gain: float,
                          beta_next: float) -> Tuple[Tensor, Tensor, Tensor]:
    y = _activation(y)
    return _eca.forward(y, _taps(weight), _like(shortcut, y), alpha * attn_gain, beta_next)


@_eca_residual_next_op.register_fake
def _(y, weight, shortcut, alpha, attn_gain, beta_next):
    y = _activation(y)
    return torch.empty_like(y), torch.empty_like(y), _partial_sums_like(y)


@torch.library.custom_op("nfnet_fast::triton_eca_backward", mutates_args=())
def _eca_backward_op(grad: Tensor, y: Tensor, weight: Tensor, part: Tensor, coef: float) -> Tuple[Tensor, Tensor]:
    """(dy, dweight) of ``coef * y * gate``, for ``grad`` = dL/d(output); the shortcut's gradient
    of eca_residual is ``grad`` itself."""
    y = _activation(y)
    dy, dw, _ = _eca.backward(_like(grad, y), None, y, _taps(weight), None, part, coef, None)
    return dy, dw.to(weight.dtype).reshape(weight.shape)


@_eca_backward_op.register_fake
def _(grad, y, weight, part, coef):
    return torch.empty_like(_activation(y)), torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.custom_op("nfnet_fast::triton_eca_residual_next_backward", mutates_args=())
def _eca_residual_next_backward_op(grad_x: Optional[Tensor], grad_a: Tensor, y: Tensor, weight: Tensor,
                                   shortcut: Tensor, part: Tensor, coef: float,
                                   beta_next: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(dy, dweight, dshortcut) of eca_residual with the next pre-activation, given dL/da (and
    dL/dx when x_next is used too)."""
    y = _activation(y)
    dy, dw, dsc = _eca.backward(None if grad_x is None else _like(grad_x, y), _like(grad_a, y), y, _taps(weight),
                                _like(shortcut, y), part, coef, beta_next)
    return dy, dw.to(weight.dtype).reshape(weight.shape), dsc


@_eca_residual_next_backward_op.register_fake
def _(grad_x, grad_a, y, weight, shortcut, part, coef, beta_next):
    y = _activation(y)
    return torch.empty_like(y), torch.empty_like(weight, memory_format=torch.contiguous_format), torch.empty_like(y)


def _eca_setup(ctx, inputs, output):
    x, weight, ctx.coef = inputs
    ctx.mark_non_differentiable(output[-1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, output[-1])


def _eca_backward(ctx, grad, _part_grad):
    if grad is None:
        return None, None, None
    x, weight, part = ctx.saved_tensors
    dx, dw = _eca_backward_op(grad, x, weight, part, ctx.coef)
    return dx, dw, None


def _residual_setup(ctx, inputs, output):
    y, weight, shortcut, alpha, attn_gain = inputs[:5]
    ctx.coef = alpha * attn_gain
    ctx.beta_next = inputs[5] if len(inputs) > 5 else None
    ctx.mark_non_differentiable(output[-1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(y, weight, shortcut if ctx.beta_next is not None else None, output[-1])


def _residual_backward(ctx, grad_x, *rest):
    grad_a = rest[0] if ctx.beta_next is not None else None
    nones = (None,) * (3 if ctx.beta_next is not None else 2)
    y, weight, shortcut, part = ctx.saved_tensors
    if grad_a is None:
        if grad_x is None:
            return (None, None, None) + nones
        dy, dw = _eca_backward_op(grad_x, y, weight, part, ctx.coef)
        return (dy, dw, grad_x) + nones  # d x_next / d shortcut = 1
    dy, dw, dsc = _eca_residual_next_backward_op(grad_x, grad_a, y, weight, shortcut, part, ctx.coef, ctx.beta_next)
    return (dy, dw, dsc) + nones


_eca_op.register_autograd(_eca_backward, setup_context=_eca_setup)
_eca_residual_op.register_autograd(_residual_backward, setup_context=_residual_setup)
_eca_residual_next_op.register_autograd(_residual_backward, setup_context=_residual_setup)


# ---------------------------------------------------------------------------------------------
# the backend's functions (reference signatures; arguments already validated by nfnet_fast.ops)


def scaled_std_weight(weight: Tensor, gain: Tensor, scale: float, eps: float) -> Tensor:
    if weight.dtype == torch.float64:
        return _reference.scaled_std_weight(weight, gain, scale, eps)
    return _std_op(weight, gain, scale, eps)


def eca(x: Tensor, weight: Tensor, gain: float) -> Tensor:
    if x.dtype == torch.float64:
        return _reference.eca(x, weight, gain)
    return _eca_op(x, weight, gain)[0]


def eca_residual(y: Tensor, weight: Tensor, shortcut: Tensor, alpha: float, attn_gain: float,
                 beta_next: Optional[float]):
    if y.dtype == torch.float64:
        return _reference.eca_residual(y, weight, shortcut, alpha, attn_gain, beta_next)
    if beta_next is None:
        return _eca_residual_op(y, weight, shortcut, alpha, attn_gain)[0]
    x_next, a_next, _ = _eca_residual_next_op(y, weight, shortcut, alpha, attn_gain, beta_next)
    return x_next, a_next


def silu_scale(x: Tensor, beta: float) -> Tensor:
    if x.dtype == torch.float64:
        return _reference.silu_scale(x, beta)
    return _silu_scale_op(x, beta)
