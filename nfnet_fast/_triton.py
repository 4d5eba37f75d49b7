"""The ``triton`` backend: the Triton kernels of ``nfnet_fast.kernels`` as ``torch.library`` ops.

Every kernel launch sits inside a ``torch.library.custom_op`` named ``nfnet_fast::triton_<op>``,
its backward ``nfnet_fast::_triton_<op>_backward`` (the compiled extension owns the plain
``nfnet_fast::<op>`` names; :func:`nfnet_fast._library.custom_op` makes them and keeps each body,
which eager calls run without the dispatcher), with the schemas, fake kernels and autograd of
:mod:`nfnet_fast._library`, which the cuda backend shares. So ``torch.compile(fullgraph=True)``
sees single opaque nodes with exact output strides, ``torch.library.opcheck`` passes, and CUDA
graphs can capture the launches. (``torch.library.triton_op`` would let Inductor see into the
kernels, but cannot be fake-traced under ``TRITON_INTERPRET=1``.)

Layouts: activations in NCHW or channels_last are used as they are and outputs keep that format;
other strides are copied first (:func:`nfnet_fast._library.activation_format`). Gradients arriving
in another layout are copied to the activation's.

float64 (a dtype the ops accept for checks) runs the reference implementation: its math is fp32
either way, and the kernels are compiled and verified for fp32, fp16 and bf16 only.
"""
from __future__ import annotations

import threading
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _backends, _library, _reference, _replay
from .kernels import eca_residual as _eca
from .kernels import fused_conv as _conv
from .kernels import scaled_std_weight as _std
from .kernels import silu_scale as _silu

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


def _activation(t: Tensor) -> Tensor:
    """A 4-D activation as NCHW- or channels_last-contiguous (copied only when it is neither)."""
    return t.contiguous(memory_format=_library.activation_format(t))


def _like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` (shaped like the dense ``ref``) with ``ref``'s strides, copied only if they differ
    (strides of size-1 dimensions do not matter)."""
    if all(a == b or n == 1 for a, b, n in zip(t.stride(), ref.stride(), ref.shape)):
        return t
    return torch.empty_like(ref).copy_(t)


def _taps(weight: Tensor) -> Tensor:
    """The ECA conv1d kernel as K contiguous fp32 values (whatever its dtype and shape)."""
    return weight.reshape(-1).to(torch.float32).contiguous()


def _own_copy(sums: Tensor) -> Tensor:
    """The producer's (N, C) sums as fp32 contiguous in new memory: they become the op's saved
    ``stats`` output, which must not alias an input."""
    return sums.to(torch.float32, memory_format=torch.contiguous_format, copy=True)


def _stats_like(y: Tensor, sums: Optional[Tensor] = None) -> Tensor:
    """The (N, S, C) fp32 partial channel sums eca_residual saves for its backward (S = 1: ``sums``)."""
    y = torch.empty(y.shape, device=y.device, memory_format=_library.activation_format(y))
    n, c = y.shape[:2]
    s = 1 if sums is not None else _eca.pool_splits(tuple(y.shape), _eca.is_channels_last(y), y.device)
    return y.new_empty((n, s, c), dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# the ops (schemas: nfnet_fast/_library.py)


@_library.custom_op("nfnet_fast::triton_silu_scale")
def silu_scale_op(x: Tensor, beta: float) -> Tensor:
    return _silu.forward(_dense(x), beta)


@_library.custom_op("nfnet_fast::_triton_silu_scale_backward")
def _silu_scale_backward_op(grad_out: Tensor, x: Tensor, beta: float) -> Tensor:
    x = _dense(x)
    return _silu.backward(_like(grad_out, x), x, beta)


@_library.custom_op("nfnet_fast::triton_scaled_std_weight")
def scaled_std_weight_op(weight: Tensor, gain: Tensor, scale: float, eps: float) -> Tensor:
    return _std.forward(weight.contiguous(), gain.reshape(-1).contiguous(), scale, eps)


@_library.custom_op("nfnet_fast::_triton_scaled_std_weight_backward")
def _scaled_std_weight_backward_op(grad_out: Tensor, weight: Tensor, gain: Tensor, scale: float,
                                   eps: float) -> Tuple[Tensor, Tensor]:
    grad_weight, grad_gain = _std.backward(grad_out.contiguous(), weight.contiguous(), gain.reshape(-1).contiguous(),
                                           scale, eps)
    return grad_weight, grad_gain.to(gain.dtype).reshape(gain.shape)


# A missing output gradient reaches the backward as None (materialize_grads off), so an unused
# a_next or x_next costs no traffic.
@_library.custom_op("nfnet_fast::triton_eca_residual")
def eca_residual_op(y: Tensor, weight: Tensor, shortcut: Optional[Tensor], coef: float,
                    beta_next: Optional[float], sums: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    y = _activation(y)
    x_next, a_next, stats = _eca.forward(y, _taps(weight), None if shortcut is None else _like(shortcut, y), coef,
                                         beta_next, sums=None if sums is None else _own_copy(sums))
    return x_next, y.new_empty((0,)) if a_next is None else a_next, stats


@_library.custom_op("nfnet_fast::_triton_eca_residual_backward")
def _eca_residual_backward_op(grad_x_next: Optional[Tensor], grad_a_next: Optional[Tensor], y: Tensor,
                              weight: Tensor, shortcut: Optional[Tensor], stats: Tensor, coef: float,
                              beta_next: Optional[float], want_bias_sums: bool = False
                              ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    y = _activation(y)
    grad_y, grad_weight, grad_shortcut, bias_sums = _eca.backward(
        None if grad_x_next is None else _like(grad_x_next, y), None if grad_a_next is None else _like(grad_a_next, y),
        y, _taps(weight), None if shortcut is None else _like(shortcut, y), stats, coef, beta_next,
        want_bias_sums=want_bias_sums)
    grad_weight = grad_weight.to(weight.dtype).reshape(weight.shape)
    return (grad_y, grad_weight, y.new_empty((0,)) if grad_shortcut is None else grad_shortcut,
            y.new_empty((0,), dtype=_library.bias_sums_dtype(y)) if bias_sums is None
            else bias_sums.to(_library.bias_sums_dtype(y)))


# ---------------------------------------------------------------------------------------------
# weights standardised ahead (a training forward's convs: nfnet_fast.nn.NormFreeNet)
#
# A training forward standardises every conv's raw weight into the packed operand its GEMM reads:
# one launch per conv, 57 in eca_nfnet_l0, each with its host time (the step is paced by its host:
# docs/triton-training-step.md). ``standardised_ahead`` makes all of them first, one launch per tile
# (kernels.scaled_std_weight.forward_many: the same bits), and for its duration each fused_conv call
# whose weight and gain are the very tensors it standardised, unchanged since (their version
# counters), with the same scale, eps and compute dtype, takes its operand from here: the op's
# result, saved tensors and gradients are what they would be without it. Any other call (another
# weight, a weight changed in place in between, another dtype) standardises its weight itself.

_AHEAD = threading.local()  # .operands: id(weight) -> (weight, gain, versions, scale, eps, operand), or None


class standardised_ahead:
    """Context: ``convs`` ((weight, gain, scale, eps) each: fp32 raw weights and their gains)
    standardised now into their packed operands in ``dtype``, which the fused_conv calls inside
    take (above). Does nothing where forward_many declines (a CUDA graph capture before the first
    such call; a weight it does not read as it is). Nests: an inner scope's operands replace the
    outer's until it exits."""

    __slots__ = ("operands", "outer")

    def __init__(self, convs: Sequence[tuple], dtype: torch.dtype):
        made = _std.forward_many(*zip(*convs), dtype) if convs else None
        self.operands = None
        if made is not None:
            self.operands = {id(w): (w, g, (w._version, g._version), sc, ep, operand)
                             for (w, g, sc, ep), operand in zip(convs, made) if operand is not None}

    def __enter__(self):
        self.outer = getattr(_AHEAD, "operands", None)
        if self.operands is not None:
            _AHEAD.operands = self.operands
        return self

    def __exit__(self, *exc):
        _AHEAD.operands = self.outer
        return False


def _operand_ahead(weight: Tensor, gain: Tensor, scale: float, eps: float, dtype: torch.dtype) -> Optional[Tensor]:
    """The operand :class:`standardised_ahead` made of exactly this weight and gain as they are now,
    for this scale, eps and dtype; else None."""
    operands = getattr(_AHEAD, "operands", None)
    entry = operands.get(id(weight)) if operands else None
    if (entry is None or entry[0] is not weight or entry[1] is not gain or entry[2] != (weight._version, gain._version)
            or entry[3] != scale or entry[4] != eps or entry[5].dtype != dtype):
        return None
    return entry[5]


def _fused_conv_operand_ahead(args: tuple) -> tuple:
    """The ahead operand fused_conv_op's body takes for these arguments (or None): a tensor it reads besides
    its arguments, so a replay (nfnet_fast._replay) names it as an input and keys on it."""
    if len(args) != 19:  # (a call that left defaults: its ahead operand, if any, is unnamed and refuses the record)
        return (None,)
    x, weight, gain, std_scale, std_eps, compute_dtype = args[0], args[1], args[12], args[13], args[14], args[17]
    if gain is None or getattr(_AHEAD, "operands", None) is None or weight.dim() != 4:
        return (None,)
    return (_operand_ahead(weight, gain, std_scale, std_eps, x.dtype if compute_dtype is None else compute_dtype),)


_replay.EXTRA_INPUTS["nfnet_fast::triton_fused_conv"] = _fused_conv_operand_ahead


@_library.custom_op("nfnet_fast::triton_fused_conv")
def fused_conv_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding: List[int], groups: int,
                  act: int, act_gain: float, pool: bool, want_sums: bool, pre_x: Optional[Tensor] = None,
                  pre_beta: float = 1.0, gain: Optional[Tensor] = None, std_scale: float = 1.0,
                  std_eps: float = 0.0, pre_act: bool = False, want_out: bool = True,
                  compute_dtype: Optional[torch.dtype] = None,
                  want_z: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    # (pre_x: for the autograd only, which saves pre_x instead of x; see _library)
    if compute_dtype is not None:
        x = x.to(compute_dtype)
    # with a gain, the standardised weight the GEMM read: the autograd saves it for the backward
    std_weight, ready = None, False
    if gain is not None and weight.dim() == 4:  # (a wrong shape: fused_conv's checks say so)
        std_weight = _operand_ahead(weight, gain, std_scale, std_eps, x.dtype)
        ready = std_weight is not None
        if not ready:
            cout, cg, kh, kw = weight.shape
            std_weight = torch.empty((kh, kw, cg, cout), device=x.device, dtype=x.dtype)
    # with want_z (and an activation) the pre-activation too, which the autograd keeps for the backward
    z = _library.empty_out(x, weight, stride, padding, pool) if want_z and act else None
    res = _conv.fused_conv(x, weight, bias, stride=stride, padding=tuple(padding), groups=groups,
                           act=_library.ACTIVATIONS[act], act_gain=act_gain, pool=pool, want_sums=want_sums,
                           gain=gain, std_scale=std_scale, std_eps=std_eps, pre_act=pre_act, pre_beta=pre_beta,
                           want_out=want_out, std_out=std_weight, std_ready=ready, z_out=z)
    std_weight = x.new_empty((0,)) if std_weight is None else std_weight
    z = x.new_empty((0,)) if z is None else z
    if not want_out:  # the sums alone, and a (0,) placeholder for the output never written
        return x.new_empty((0,)), res, std_weight, z
    out, sums = res if want_sums else (res, None)
    return out, x.new_empty((0,), dtype=torch.float32) if sums is None else sums, std_weight, z


@_library.custom_op("nfnet_fast::_triton_fused_conv_backward")
def _fused_conv_backward_op(grad_out: Optional[Tensor], grad_sums: Optional[Tensor], x: Tensor, weight: Tensor,
                            bias: Optional[Tensor], stride: int, padding: List[int], groups: int, act: int,
                            act_gain: float, pool: bool, pre_beta: Optional[float], gain: Optional[Tensor],
                            std_scale: float, std_eps: float, need_x: bool, need_weight: bool, need_bias: bool,
                            need_gain: bool, compute_dtype: Optional[torch.dtype] = None,
                            std_weight: Optional[Tensor] = None, z: Optional[Tensor] = None,
                            grad_x_add: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    x_dtype = x.dtype
    if compute_dtype is not None:  # (the forward's cast, again: the autograd kept the caller's x)
        x = x.to(compute_dtype)
    grads = _conv.backward(grad_out, grad_sums, x, weight, bias, stride=stride, padding=tuple(padding), groups=groups,
                           act=_library.ACTIVATIONS[act], act_gain=act_gain, pool=pool, pre_beta=pre_beta, gain=gain,
                           std_scale=std_scale, std_eps=std_eps, needs=(need_x, need_weight, need_bias, need_gain),
                           std_weight=std_weight, z=z, grad_x_add=grad_x_add)
    grad_x, grad_weight, grad_bias, grad_gain = grads
    if grad_x is not None and grad_x.dtype != x_dtype:
        grad_x = grad_x.to(x_dtype)  # (a cast's backward)
    if grad_bias is not None and grad_bias.dtype != bias.dtype:
        grad_bias = grad_bias.to(bias.dtype)
    # (each missing gradient its own (0,) tensor: outputs of a custom op may not alias)
    return tuple(x.new_empty((0,)) if g is None else g for g in (grad_x, grad_weight, grad_bias, grad_gain))


_library.register("triton_", eca_stats_like=_stats_like)
_library.register_fused_conv("triton_")
_functions = dict(_library.public_functions("triton_", float64=_reference),
                  fused_conv=_library.fused_conv_function("triton_", float64=_reference))
scaled_std_weight, eca, eca_residual, silu_scale, fused_conv = (_functions[op] for op in _backends.OPS)
_backends.register_ops("triton", _functions)
