"""Reference backend: the ops of :mod:`nfnet_fast.ops` in plain PyTorch.

This is the specification every kernel is checked against. Math runs in fp32 (autocast off),
results are stored in the input's dtype; autograd comes from PyTorch.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from . import _backends


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


def eca_residual(y, weight, shortcut, alpha, attn_gain, beta_next):
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


_backends.register_ops("reference", {op: globals()[op] for op in _backends.OPS})
