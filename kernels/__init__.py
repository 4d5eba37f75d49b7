"""Triton kernels of nfnet_fast, one file per fused op (installed as ``nfnet_fast.kernels``).

Each op file holds its ``@triton.jit`` kernels, the launchers that pick a configuration and a grid,
and ``AOT``: every (kernel, argument types, constexpr values, warps) the launchers can use, which
:mod:`nfnet_fast.kernels.aot` compiles for sm_90 and sm_80 without a GPU. Kernels know nothing of
modules or autograd; :mod:`nfnet_fast._triton` registers them as ``torch.library`` ops.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, NamedTuple

import torch


class AotSpec(NamedTuple):
    """One kernel's ahead-of-time compile matrix.

    Attributes:
        kernel: the ``@triton.jit`` function.
        types: Triton types of the arguments that are not the defaults: by default an argument
            named ``*_ptr`` points at the activation dtype (``"*T"``, which the compile matrix runs
            over: fp32, fp16, bf16) and any other non-constexpr argument is ``"i32"``.
        configs: every constexpr dict the launcher can pass, with ``num_warps`` among the keys.
        aligned: arguments a typical launch sees 16-divisible (fresh allocations, channel counts):
            the matrix compiles each config with Triton's ``tt.divisibility=16`` on these (as such
            a launch specialises) and with none (the worst case).
    """

    kernel: object
    types: Dict[str, str]
    configs: List[dict]
    aligned: tuple = ()


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host-side integers. (``triton.cdiv`` is a ConstexprFunction
    since Triton 3.5, about 2 us a call on the host: a training step makes a few hundred launches,
    each of which pays its launcher's Python before the GPU sees anything.)"""
    return -(-a // b)


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device); no-op for CPU tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
