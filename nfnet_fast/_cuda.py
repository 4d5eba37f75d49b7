"""The ``cuda`` backend: the ops of the compiled extension ``nfnet_fast._C`` (csrc/).

The C++ side defines each op's schema beside its kernels (csrc/<op>_cpu.cpp) and the CPU/CUDA
kernels; this module registers their fake kernels and autograd (the ones the triton backend shares,
:mod:`nfnet_fast._library`) and enters the ops in the backend registry. On CPU tensors the C++ CPU
twins run. Importing it needs the extension to load.
"""
from __future__ import annotations

import torch

from . import _backends, _library

if _backends.extension() is None:  # pragma: no cover - nfnet_fast imports this module only when it loads
    raise ImportError("nfnet_fast._C is not available; see nfnet_fast.backends()")


def _stats_like(y: torch.Tensor, sums=None) -> torch.Tensor:
    """The (N, C) channel means eca_residual saves for its backward (fp64 for float64 y)."""
    return y.new_empty(y.shape[:2], dtype=torch.float64 if y.dtype == torch.float64 else torch.float32)


def fused_conv(x, weight, bias, stride, padding, groups, act, act_gain, pool, want_sums, pre_x=None, pre_beta=1.0,
               gain=None, std_scale=1.0, std_eps=0.0, pre_act=False, want_out=True, keep_z=False, return_z=False,
               return_input=False):
    """No vendor fused convolution is adopted yet (cuDNN's graph API or CUTLASS would be, where a GPU
    measurement shows it faster than the Triton kernel on a shape): the cuda backend runs the Triton
    kernel where triton runs on the tensor's device, else the reference."""
    fn = _backends.op_function("triton", "fused_conv")
    if fn is None or not _backends.backends()["triton"].runs_on(x.device.type):
        fn = _backends.op_function("reference", "fused_conv")
    return fn(x, weight, bias, stride, padding, groups, act, act_gain, pool, want_sums, pre_x, pre_beta, gain,
              std_scale, std_eps, pre_act, want_out, keep_z, return_z, return_input)


_library.register("", eca_stats_like=_stats_like)
_functions = dict(_library.public_functions(""), fused_conv=fused_conv)
scaled_std_weight, eca, eca_residual, silu_scale = (_functions[op] for op in _backends.OPS[:4])
_backends.register_ops("cuda", _functions)
