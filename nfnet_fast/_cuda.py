"""The ``cuda`` backend: ops of the compiled extension ``nfnet_fast._C`` (csrc/).

The C++ side defines the schemas and the CPU/CUDA kernels; this module registers their fake
kernels (for torch.compile and meta tensors) and their autograd, and wraps them with the
signatures of :mod:`nfnet_fast.ops`. Importing it needs the extension to load.
"""
from __future__ import annotations

import torch

from ._backends import extension

if extension() is None:  # pragma: no cover - nfnet_fast.ops only imports this module when it loads
    raise ImportError("nfnet_fast._C is not available; see nfnet_fast.backends()")

_ops = torch.ops.nfnet_fast


# --- scaled weight standardisation -------------------------------------------------------------

@torch.library.register_fake("nfnet_fast::scaled_std_weight")
def _(weight, gain, scale, eps):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("nfnet_fast::scaled_std_weight_backward")
def _(grad_out, weight, gain, scale, eps):
    return (torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(gain, memory_format=torch.contiguous_format))


def _std_setup(ctx, inputs, output):
    weight, gain, ctx.scale, ctx.eps = inputs
    ctx.save_for_backward(weight, gain)


def _std_backward(ctx, grad):
    weight, gain = ctx.saved_tensors
    dw, dgain = _ops.scaled_std_weight_backward(grad, weight, gain, ctx.scale, ctx.eps)
    return dw, dgain, None, None


torch.library.register_autograd("nfnet_fast::scaled_std_weight", _std_backward, setup_context=_std_setup)


def scaled_std_weight(weight, gain, scale, eps):
    return _ops.scaled_std_weight(weight, gain, scale, eps)
