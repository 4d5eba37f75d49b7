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


def _stats_like(y: torch.Tensor) -> torch.Tensor:
    """The (N, C) channel means eca_residual saves for its backward (fp64 for float64 y)."""
    return y.new_empty(y.shape[:2], dtype=torch.float64 if y.dtype == torch.float64 else torch.float32)


_library.register("", eca_stats_like=_stats_like)
_functions = _library.public_functions("")
scaled_std_weight, eca, eca_residual, silu_scale = (_functions[op] for op in _backends.OPS)
_backends.register_ops("cuda", _functions)
