"""The ``torch.library`` registration shared by the compiled backends (``_cuda`` and ``_triton``).

Each op has one schema, the same for both backends (``<prefix><op>`` and its private backward
``_<prefix><op>_backward`` in the ``nfnet_fast`` namespace: prefix ``""`` for the C++ extension,
``"triton_"`` for the Triton kernels), and so one fake kernel and one autograd formula, registered
here for either backend by :func:`register`. :func:`public_functions` then wraps a backend's ops
with the signatures of :mod:`nfnet_fast.ops`.

The names are the ops' vocabulary everywhere (ops.py, csrc/, kernels/, tests)::

    scaled_std_weight(weight, gain, scale, eps) -> out
        _scaled_std_weight_backward(grad_out, weight, gain, scale, eps) -> (grad_weight, grad_gain)
    silu_scale(x, beta) -> out
        _silu_scale_backward(grad_out, x, beta) -> grad_x
    eca_residual(y, weight, shortcut?, coef, beta_next?) -> (x_next, a_next, stats)
        _eca_residual_backward(grad_x_next?, grad_a_next?, y, weight, shortcut?, stats, coef, beta_next?)
            -> (grad_y, grad_weight, grad_shortcut)

``x_next = coef * y * gate(y) [+ shortcut]``, ``a_next = silu(x_next) * beta_next`` (a (0,) tensor
without ``beta_next``), ``stats`` the backend's saved channel statistics (C++: the (N, C) means;
Triton: (N, S, C) fp32 partial sums). ``ops.eca`` is ``eca_residual`` without a shortcut.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format

KERNEL_OPS = ("scaled_std_weight", "silu_scale", "eca_residual")  # each a schema pair (forward, backward)


def activation_format(t: Tensor) -> torch.memory_format:
    """The layout an activation op runs in and returns: NCHW if ``t`` is contiguous, channels_last
    if it is channels_last-contiguous, else the format its strides resemble (``t`` is then copied).
    The C++ side applies the same rule (csrc/eca_residual.h, eca_format)."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return suggest_memory_format(t)


def _empty_act(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=activation_format(t))


def _op(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def _names(prefix: str, op: str):
    return f"nfnet_fast::{prefix}{op}", f"nfnet_fast::_{prefix}{op}_backward"


# ---------------------------------------------------------------------------------------------
# fake kernels: shapes, dtypes and devices checked with torch._check, so a wrong call fails where
# it is made (also inside torch.compile) instead of reaching a kernel


def _check_same(t: Tensor, name: str, ref: Tensor, ref_name: str, dtype: bool = True) -> None:
    torch._check(t.device == ref.device, lambda: f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype:
        torch._check(t.dtype == ref.dtype, lambda: f"{name} dtype {t.dtype} must equal {ref_name} dtype {ref.dtype}")


def _check_shape(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    torch._check(t.shape == ref.shape,
                 lambda: f"{name} shape {tuple(t.shape)} must equal {ref_name} shape {tuple(ref.shape)}")


def _check_float(t: Tensor, name: str) -> None:
    torch._check(t.dtype.is_floating_point, lambda: f"{name} must be a floating-point tensor, got {t.dtype}")


def _fake_std(weight, gain, scale, eps):
    _check_float(weight, "weight")
    torch._check(weight.dim() >= 2, lambda: f"weight must be (C_out, ...), got shape {tuple(weight.shape)}")
    torch._check(gain.numel() == weight.shape[0],
                 lambda: f"gain must have one value per output channel ({weight.shape[0]}), got {tuple(gain.shape)}")
    _check_same(gain, "gain", weight, "weight")
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _fake_std_backward(grad_out, weight, gain, scale, eps):
    _fake_std(weight, gain, scale, eps)
    _check_shape(grad_out, "grad_out", weight, "weight")
    _check_same(grad_out, "grad_out", weight, "weight", dtype=False)
    return (torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(gain, memory_format=torch.contiguous_format))


def _fake_silu(x, beta):
    _check_float(x, "x")
    return torch.empty_like(x)  # x's strides when dense, else its suggested format: as the kernels


def _fake_silu_backward(grad_out, x, beta):
    _check_float(x, "x")
    _check_shape(grad_out, "grad_out", x, "x")
    _check_same(grad_out, "grad_out", x, "x", dtype=False)
    return torch.empty_like(x)


def _check_eca(y, weight, shortcut, beta_next):
    _check_float(y, "y")
    torch._check(y.dim() == 4, lambda: f"y must be (N, C, H, W), got shape {tuple(y.shape)}")
    torch._check(weight.numel() % 2 == 1, lambda: f"weight must hold an odd number of taps, got {weight.numel()}")
    _check_same(weight, "weight", y, "y", dtype=False)
    if shortcut is not None:
        _check_shape(shortcut, "shortcut", y, "y")
        _check_same(shortcut, "shortcut", y, "y")
    torch._check(beta_next is None or shortcut is not None,
                 lambda: "beta_next needs a shortcut: the next pre-activation belongs to the residual form")


def _fake_eca(stats_like):
    def fake(y, weight, shortcut, coef, beta_next):
        _check_eca(y, weight, shortcut, beta_next)
        a_next = _empty_act(y) if beta_next is not None else y.new_empty((0,))
        return _empty_act(y), a_next, stats_like(y)
    return fake


def _fake_eca_backward(grad_x_next, grad_a_next, y, weight, shortcut, stats, coef, beta_next):
    _check_eca(y, weight, shortcut, beta_next)
    torch._check(grad_x_next is not None or grad_a_next is not None,
                 lambda: "the backward needs grad_x_next or grad_a_next")
    for g, name in ((grad_x_next, "grad_x_next"), (grad_a_next, "grad_a_next")):
        if g is not None:
            _check_shape(g, name, y, "y")
            _check_same(g, name, y, "y", dtype=False)
    grad_shortcut = _empty_act(y) if grad_a_next is not None else y.new_empty((0,))
    return _empty_act(y), torch.empty_like(weight, memory_format=torch.contiguous_format), grad_shortcut


# ---------------------------------------------------------------------------------------------
# autograd: each gradient computed only when needs_input_grad asks for it


def _std_setup(ctx, inputs, output):
    weight, gain, ctx.scale, ctx.eps = inputs
    ctx.save_for_backward(weight, gain)


def _std_backward(backward_op):
    def backward(ctx, grad):
        weight, gain = ctx.saved_tensors
        need_w, need_gain = ctx.needs_input_grad[:2]
        grad_weight, grad_gain = backward_op(grad, weight, gain, ctx.scale, ctx.eps)  # one kernel makes both
        return grad_weight if need_w else None, grad_gain if need_gain else None, None, None
    return backward


def _silu_setup(ctx, inputs, output):
    x, ctx.beta = inputs
    ctx.save_for_backward(x)


def _silu_backward(backward_op):
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return backward_op(grad, x, ctx.beta), None
    return backward


def _eca_setup(ctx, inputs, output):
    y, weight, shortcut, ctx.coef, ctx.beta_next = inputs
    ctx.mark_non_differentiable(output[2])  # the statistics: saved for the backward only
    if ctx.beta_next is None:
        ctx.mark_non_differentiable(output[1])  # the (0,) placeholder
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no zeros to read
    # the shortcut matters to the backward only through a_next (which recomputes x_next from it)
    ctx.save_for_backward(y, weight, shortcut if ctx.beta_next is not None else None, output[2])


def _eca_backward(backward_op):
    def backward(ctx, grad_x_next, grad_a_next, _grad_stats):
        y, weight, shortcut, stats = ctx.saved_tensors
        need_y, need_w, need_shortcut = ctx.needs_input_grad[:3]
        if ctx.beta_next is None:
            grad_a_next = None
        if grad_x_next is None and grad_a_next is None:
            return None, None, None, None, None
        if grad_a_next is None:
            # x_next = coef * gate * y + shortcut: the shortcut's gradient is grad_x_next itself
            grad_shortcut = grad_x_next if need_shortcut else None
            if not (need_y or need_w):
                return None, None, grad_shortcut, None, None
            grad_y, grad_weight, _ = backward_op(grad_x_next, None, y, weight, None, stats, ctx.coef, None)
        else:
            grad_y, grad_weight, grad_total = backward_op(grad_x_next, grad_a_next, y, weight, shortcut, stats,
                                                          ctx.coef, ctx.beta_next)
            grad_shortcut = grad_total if need_shortcut else None
        return grad_y if need_y else None, grad_weight if need_w else None, grad_shortcut, None, None
    return backward


def register(prefix: str, eca_stats_like: Callable[[Tensor], Tensor]) -> None:
    """Fake kernels and autograd for one backend's three op pairs (``prefix``: see the module doc);
    ``eca_stats_like(y)`` is the empty ``stats`` tensor that backend's eca_residual returns."""
    fakes = {"scaled_std_weight": (_fake_std, _fake_std_backward, _std_setup, _std_backward),
             "silu_scale": (_fake_silu, _fake_silu_backward, _silu_setup, _silu_backward),
             "eca_residual": (_fake_eca(eca_stats_like), _fake_eca_backward, _eca_setup, _eca_backward)}
    for op, (fake, fake_backward, setup, make_backward) in fakes.items():
        forward, backward = _names(prefix, op)
        torch.library.register_fake(forward)(fake)
        torch.library.register_fake(backward)(fake_backward)
        torch.library.register_autograd(forward, make_backward(_op(backward)), setup_context=setup)


def public_functions(prefix: str, float64=None) -> dict:
    """The functions of :mod:`nfnet_fast.ops`' signatures over one backend's ops (arguments already
    validated by ``ops``), for the backend registry. ``float64``: a module whose functions take
    float64 inputs (a dtype the ops accept for checks) when the backend's kernels do not."""
    std, silu, eca_res = (_op(_names(prefix, op)[0]) for op in KERNEL_OPS)

    def wide(t: Tensor) -> bool:
        return float64 is not None and t.dtype == torch.float64

    def scaled_std_weight(weight: Tensor, gain: Tensor, scale: float, eps: float) -> Tensor:
        if wide(weight):
            return float64.scaled_std_weight(weight, gain, scale, eps)
        return std(weight, gain, scale, eps)

    def silu_scale(x: Tensor, beta: float) -> Tensor:
        if wide(x):
            return float64.silu_scale(x, beta)
        return silu(x, beta)

    def eca(x: Tensor, weight: Tensor, gain: float) -> Tensor:
        if wide(x):
            return float64.eca(x, weight, gain)
        return eca_res(x, weight, None, gain, None)[0]

    def eca_residual(y: Tensor, weight: Tensor, shortcut: Tensor, alpha: float, attn_gain: float,
                     beta_next: Optional[float]):
        if wide(y):
            return float64.eca_residual(y, weight, shortcut, alpha, attn_gain, beta_next)
        # the reference multiplies the gate by the Python float alpha * attn_gain: the same product here
        x_next, a_next, _ = eca_res(y, weight, shortcut, alpha * attn_gain, beta_next)
        return x_next if beta_next is None else (x_next, a_next)

    return dict(scaled_std_weight=scaled_std_weight, eca=eca, eca_residual=eca_residual, silu_scale=silu_scale)
