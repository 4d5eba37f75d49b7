"""The backend registry: which op backends run on this machine (and for the missing ones, why),
and each backend's op table.

Three backends implement every op in :mod:`nfnet_fast.ops`, each in its own module, which fills
its table here when imported (``nfnet_fast/__init__.py`` imports the ones that run here):

* ``reference`` (``_reference.py``): plain PyTorch, the specification; runs on any device.
* ``triton`` (``_triton.py``): the Triton kernels of ``nfnet_fast.kernels``; CUDA tensors, or CPU
  tensors when ``TRITON_INTERPRET=1`` was set before triton was imported.
* ``cuda`` (``_cuda.py``): the compiled extension ``nfnet_fast._C``; CUDA kernels for CUDA tensors
  (when it was built with nvcc) and their CPU twins for CPU tensors.
"""
from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

NAMES = ("reference", "triton", "cuda")  # the one list of backend names (ops, CLI, benchmarks use it)
OPS = ("scaled_std_weight", "eca", "eca_residual", "silu_scale", "fused_conv")  # every backend implements these


@dataclass(frozen=True)
class BackendInfo:
    """Availability of one backend.

    Attributes:
        name: ``"reference"``, ``"triton"`` or ``"cuda"``.
        available: True when the backend runs on at least one device here.
        devices: device types (``"cpu"``, ``"cuda"``) whose tensors it runs on here.
        reason: why it is unavailable, or on which devices it is not (empty when it runs everywhere).
        any_device: it also runs on every other device type PyTorch supports (meta, mps, ...):
            plain PyTorch code (``reference``).
        notes: what else to know, e.g. an op that runs another backend's kernel.
    """

    name: str
    available: bool
    devices: tuple[str, ...]
    reason: str = ""
    any_device: bool = False
    notes: str = ""

    def runs_on(self, device_type: str) -> bool:
        return self.any_device or device_type in self.devices


_tables: dict[str, dict[str, Callable]] = {}


def register_ops(backend: str, functions: dict[str, Callable]) -> None:
    """Enter a backend's op table: op name -> function with the signature of :mod:`nfnet_fast.ops`'
    op of that name (arguments already validated). Called once by each backend module at import."""
    if backend not in NAMES:
        raise ValueError(f"unknown backend {backend!r}; the backends are {NAMES}")
    _tables[backend] = dict(functions)


def op_function(backend: str, op: str) -> Optional[Callable]:
    """The function implementing ``op`` on ``backend``, or None (backend not loaded here, or the op
    not implemented by it)."""
    return _tables.get(backend, {}).get(op)


def _cuda_device_present() -> bool:
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled ``nfnet_fast._C`` module, or None when it is not built, fails to load, or was built from
    other sources than the checkout's csrc/ (nfnet_fast._sources)."""
    return _load_extension()[0]


@functools.lru_cache(maxsize=None)
def _load_extension():
    try:
        from . import _C, _sources

        stale = _sources.mismatch(_C)
        if stale:  # (said once: backend="auto" would otherwise fall back to another backend without a word)
            warnings.warn(f"{stale}; the cuda backend is off until then", RuntimeWarning, stacklevel=2)
            return None, stale
        return _C, ""
    except ModuleNotFoundError:
        return None, ("nfnet_fast._C is not built (installed with NFNET_FAST_SKIP_EXT=1, or the build was skipped); "
                      "rebuild with `pip install --no-build-isolation -e .`")
    except (ImportError, OSError) as e:  # built against another torch, missing shared library, ...
        return None, f"nfnet_fast._C failed to load: {e}"


def extension_has_cuda_kernels() -> bool:
    """True when ``nfnet_fast._C`` was compiled with its CUDA kernels (nvcc present at build time)."""
    return extension() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "nfnet_fast::scaled_std_weight", "CUDA")


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
        return ""
    except Exception as e:  # noqa: BLE001 - any failure to import triton means the backend is out
        return f"triton cannot be imported: {e}"


def _reference() -> BackendInfo:
    devices = ("cpu", "cuda") if _cuda_device_present() else ("cpu",)
    return BackendInfo("reference", True, devices, any_device=True)


def _triton() -> BackendInfo:
    err = _triton_import_error()
    if err:
        return BackendInfo("triton", False, (), err)
    devices = []
    if triton_interpreted():
        devices.append("cpu")
    if _cuda_device_present():
        devices.append("cuda")
    if not devices:
        return BackendInfo("triton", False, (), "no CUDA device, and TRITON_INTERPRET=1 is not set for CPU tensors")
    reason = "" if len(devices) == 2 else (
        "CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)" if "cpu" not in devices
        else "no CUDA device: CPU tensors only, through the interpreter")
    return BackendInfo("triton", True, tuple(devices), reason)


# No vendor fused convolution (cuDNN's graph API, CUTLASS) is adopted before a GPU measurement shows
# one faster than the Triton kernel on a shape (issue: fused convolutions).
_CUDA_NOTES = ("fused_conv runs the Triton kernel (or the reference where triton does not run): no vendor fused "
               "convolution is adopted yet")


def _cuda() -> BackendInfo:
    ext, err = _load_extension()
    if ext is None:
        return BackendInfo("cuda", False, (), err)
    if not extension_has_cuda_kernels():
        return BackendInfo("cuda", True, ("cpu",), "nfnet_fast._C was built without nvcc: CPU twins only (rebuild "
                           "with the CUDA toolkit)", notes=_CUDA_NOTES)
    if not _cuda_device_present():
        return BackendInfo("cuda", True, ("cpu",), "no CUDA device: CPU twins only", notes=_CUDA_NOTES)
    return BackendInfo("cuda", True, ("cpu", "cuda"), notes=_CUDA_NOTES)


_infos: dict = {}


def backends() -> dict[str, BackendInfo]:
    """Availability of every backend on this machine.

    Returns:
        A dict from backend name to :class:`BackendInfo`, in the order ``reference``, ``triton``, ``cuda``.

    Example:
        >>> import nfnet_fast
        >>> {name: info.available for name, info in nfnet_fast.backends().items()}  # doctest: +SKIP
        {'reference': True, 'triton': False, 'cuda': True}
    """
    # Computed once (what runs here does not change within a process): afterwards a plain dict read,
    # which torch.compile can trace (it cannot trace the imports that the first call makes).
    if not _infos:
        _infos.update(reference=_reference(), triton=_triton(), cuda=_cuda())
    return dict(_infos)
