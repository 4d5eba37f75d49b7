"""torch.library pieces shared by the compiled backends (``_cuda`` and ``_triton``): each registers
its own ``scaled_std_weight`` op pair with the same fake kernels and autograd."""
from __future__ import annotations

import torch


def register_scaled_std_weight(forward: str, backward_op) -> None:
    """Fake kernels and autograd for a scaled_std_weight op named `forward` whose backward op
    (`backward_op(grad, weight, gain, scale, eps) -> (dw, dgain)`) is registered as `forward + "_backward"`."""

    @torch.library.register_fake(forward)
    def _(weight, gain, scale, eps):
        return torch.empty_like(weight, memory_format=torch.contiguous_format)

    @torch.library.register_fake(forward + "_backward")
    def _(grad_out, weight, gain, scale, eps):
        return (torch.empty_like(weight, memory_format=torch.contiguous_format),
                torch.empty_like(gain, memory_format=torch.contiguous_format))

    def setup(ctx, inputs, output):
        weight, gain, ctx.scale, ctx.eps = inputs
        ctx.save_for_backward(weight, gain)

    def backward(ctx, grad):
        weight, gain = ctx.saved_tensors
        dw, dgain = backward_op(grad, weight, gain, ctx.scale, ctx.eps)
        return dw, dgain, None, None

    torch.library.register_autograd(forward, backward, setup_context=setup)
