"""Reference backend: the ops of :mod:`nfnet_fast.ops` in plain PyTorch.

This is the specification every kernel is checked against. Math runs in fp32 (autocast off),
results are stored in the input's dtype; autograd comes from PyTorch.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _backends, _library


def _no_autocast(t: torch.Tensor):
    try:
        return torch.autocast(device_type=t.device.type, enabled=False)
    except RuntimeError:  # a device type without autocast (meta): nothing to turn off
        return contextlib.nullcontext()


def scaled_std_weight(weight: torch.Tensor, gain: torch.Tensor, scale: float, eps: float) -> torch.Tensor:
    # timm's own formula (ScaledStdConv2d.forward), so fp32 results equal timm's bit for bit.
    with _no_autocast(weight):
        w = weight.float()
        out = F.batch_norm(w.reshape(1, w.shape[0], -1), None, None,
                           weight=(gain.float() * scale).reshape(-1), training=True, momentum=0.0, eps=eps)
        return out.reshape_as(weight).to(weight.dtype)


def eca_gate(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sigmoid(conv1d(mean_hw(x), weight)) in fp32, shape (N, C)."""
    k = weight.numel()
    with _no_autocast(x):
        pooled = x.float().mean((2, 3))
        logits = F.conv1d(pooled.unsqueeze(1), weight.float().reshape(1, 1, k), padding=(k - 1) // 2)
        return torch.sigmoid(logits.squeeze(1))


def eca(x: torch.Tensor, weight: torch.Tensor, gain: float) -> torch.Tensor:
    with _no_autocast(x):
        g = eca_gate(x, weight)
        return (x.float() * (g * gain)[:, :, None, None]).to(x.dtype)


def eca_residual(y, weight, shortcut, alpha, attn_gain, beta_next, sums=None, biases=None):
    # (sums: y's channel sums, a shortcut for the compiled backends; the specification pools y)
    if biases is not None:  # (their gradients through plain autograd: ops.eca_residual)
        y, shortcut = _library.through_bias(y, biases[0]), _library.through_bias(shortcut, biases[1])
    with _no_autocast(y):
        g = eca_gate(y, weight) * (alpha * attn_gain)
        x_next = torch.addcmul(shortcut.float(), y.float(), g[:, :, None, None])
        if beta_next is None:
            return x_next.to(y.dtype)
        a_next = F.silu(x_next).mul_(beta_next)  # silu's backward needs its input, not its output
        return x_next.to(y.dtype), a_next.to(y.dtype)


def silu_scale(x: torch.Tensor, beta: float) -> torch.Tensor:
    with _no_autocast(x):
        return F.silu(x.float()).mul_(beta).to(x.dtype)  # silu's backward needs its input, not its output



ACTS = {None: None, "silu": F.silu, "relu": F.relu, "gelu": F.gelu}  # gelu: the exact (erf) form


def fused_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: int,
               padding: Tuple[int, int, int, int], groups: int, act: Optional[str], act_gain: float, pool: bool,
               want_sums: bool, pre_x: Optional[torch.Tensor] = None, pre_beta: float = 1.0,
               gain: Optional[torch.Tensor] = None, std_scale: float = 1.0, std_eps: float = 0.0,
               pre_act: bool = False, want_out: bool = True, keep_z: bool = False, return_z: bool = False,
               return_input: bool = False):
    """``act(conv2d(pool(x), weight) + bias) * act_gain`` as timm's layers compute it, call for call
    (avg_pool2d, the conv with its bias, the activation, GammaAct's multiply), so fp32 results and
    autocast behaviour equal timm's; ``padding`` is (top, bottom, left, right); with ``want_sums``
    also the fp32 (N, C) sums of the output over its pixels; with ``gain`` the weight standardised
    first (ScaledStdConv2d's own batch_norm, :func:`scaled_std_weight`). (``pre_x``: what ``x`` was
    made from, a memory shortcut of the compiled backends' autograd; the specification
    differentiates x. ``keep_z``: their memory-for-time choice, which autograd here makes itself, so
    ``return_z`` gives ``(result, None)``; ``return_input`` ``(result, pre_x or x)``, the given tensor itself,
    whose gradients autograd adds.)
    With ``pre_act``, ``x`` is an NF block's pre-activation: the conv's input
    is ``silu_scale(x, pre_beta)``, as the block computes it. With ``want_out=False`` only the sums
    are returned (the output is a temporary here)."""
    given = x
    if pre_act:
        x = silu_scale(x, pre_beta)
    if gain is not None:
        weight = scaled_std_weight(weight, gain, std_scale, std_eps)
    if pool:
        x = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
    top, bottom, left, right = padding
    if top == bottom and left == right:
        out = F.conv2d(x, weight, bias, stride, (top, left), 1, groups)
    else:  # TF 'same' padding, as timm's pad_same then conv2d
        out = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, stride, 0, 1, groups)
    if ACTS[act] is not None:
        out = ACTS[act](out)
    if act_gain != 1.0:
        out = out * act_gain
    if not want_out:
        res = out.float().sum((2, 3))
    else:
        res = (out, out.float().sum((2, 3))) if want_sums else out
    res = (res,) + ((None,) if return_z else ()) + ((pre_x if pre_x is not None else given,) if return_input else ())
    return res if len(res) > 1 else res[0]


_backends.register_ops("reference", {op: globals()[op] for op in _backends.OPS})
