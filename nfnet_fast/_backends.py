"""Which op backends run on this machine, and for the missing ones, why.

Three backends implement every op in :mod:`nfnet_fast.ops`:

* ``reference``: plain PyTorch, the specification; runs on any device.
* ``triton``: the Triton kernels of ``nfnet_fast.kernels``; CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before triton was imported.
* ``cuda``: the compiled extension ``nfnet_fast._C``; CUDA kernels for CUDA tensors (when it was
  built with nvcc) and their CPU twins for CPU tensors.
"""
from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass

import torch

NAMES = ("reference", "triton", "cuda")


@dataclass(frozen=True)
class BackendInfo:
    """Availability of one backend.

    Attributes:
        name: ``"reference"``, ``"triton"`` or ``"cuda"``.
        available: True when the backend runs on at least one device here.
        devices: device types (``"cpu"``, ``"cuda"``) whose tensors it runs on here (``reference``,
            plain PyTorch, also runs on any other device type PyTorch supports: meta, mps, ...).
        reason: why it is unavailable, or on which devices it is not (empty when it runs everywhere).
    """

    name: str
    available: bool
    devices: tuple[str, ...]
    reason: str = ""


def _cuda_device_present() -> bool:
    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def extension():
    """The compiled ``nfnet_fast._C`` module, or None when it is not built or fails to load."""
    return _load_extension()[0]


@functools.lru_cache(maxsize=None)
def _load_extension():
    try:
        return importlib.import_module("nfnet_fast._C"), ""
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
        importlib.import_module("triton")
        return ""
    except Exception as e:  # noqa: BLE001 - any failure to import triton means the backend is out
        return f"triton cannot be imported: {e}"


def _reference() -> BackendInfo:
    devices = ("cpu", "cuda") if _cuda_device_present() else ("cpu",)
    return BackendInfo("reference", True, devices)


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


def _cuda() -> BackendInfo:
    ext, err = _load_extension()
    if ext is None:
        return BackendInfo("cuda", False, (), err)
    if not extension_has_cuda_kernels():
        return BackendInfo("cuda", True, ("cpu",),
                           "nfnet_fast._C was built without nvcc: CPU twins only (rebuild with the CUDA toolkit)")
    if not _cuda_device_present():
        return BackendInfo("cuda", True, ("cpu",), "no CUDA device: CPU twins only")
    return BackendInfo("cuda", True, ("cpu", "cuda"))


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
