"""Triton kernels of nfnet_fast, one file per fused op (installed as ``nfnet_fast.kernels``).

Each op file holds its ``@triton.jit`` kernels, the launchers that pick a configuration and a grid,
and ``AOT``: every (kernel, argument types, constexpr values, warps) the launchers can use, which
:mod:`nfnet_fast.kernels.aot` compiles for sm_90 and sm_80 without a GPU. Kernels know nothing of
modules or autograd; :mod:`nfnet_fast._triton` registers them as ``torch.library`` ops. Every
launch goes through :func:`launch` (below: its optional cache of launch signatures).
"""
from __future__ import annotations

import contextlib
import os
from threading import get_ident as _get_ident
from operator import itemgetter
from typing import Dict, List, NamedTuple, Optional

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
        dtypes: the activation dtypes ``"*T"`` runs over (None: fp32, fp16 and bf16).
    """

    kernel: object
    types: Dict[str, str]
    configs: List[dict]
    aligned: tuple = ()
    dtypes: Optional[tuple] = None


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the launchers' host-side integers. (``triton.cdiv`` is a ConstexprFunction
    since Triton 3.5, about 2 us a call on the host: a training step makes a few hundred launches,
    each of which pays its launcher's Python before the GPU sees anything.)"""
    return -(-a // b)


_NO_SWITCH = contextlib.nullcontext()  # (stateless: one instance serves every launch)


def device_guard(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device): a ``torch.cuda.device`` switch
    where ``t``'s GPU is not the current one; nothing for CPU tensors or where it is, the usual case
    (the switch's object and its two device exchanges cost a few us of host time, and a training
    step makes ~400 launches)."""
    if not t.is_cuda or t.get_device() == torch._C._cuda_getDevice():
        return _NO_SWITCH
    return torch.cuda.device(t.device)


# ---------------------------------------------------------------------------------------------
# launches
#
# ``kernel[grid](...)`` runs Triton's JITFunction.run on every launch: it binds the arguments,
# specialises each one, hashes the options and looks the binary up, then calls the binary's launcher.
# That Python is most of a launch's host cost: 23.5-32.9 us on the H100 machine's host, and a training
# step makes 404 Triton launches (docs/triton-training-step.md). With LAUNCH_CACHE, :func:`launch`
# memoises, per launch signature, the CompiledKernel that the first such launch returned, and later
# calls its launcher with the arguments JITFunction.run itself passes it. That argument list is the
# same in Triton 3.6 and 3.8: grid, stream, CUfunction, packed metadata, launch metadata, the two hooks
# (None here: the launcher calls a hook only when it is not None, and Triton's default hooks are empty
# chains), then every parameter in order, constexprs included, which the launcher skips. The memo key
# is at least as fine as Triton's own cache key: the device; for each positional runtime argument, its
# type and what Triton specialises on (a tensor's dtype and 16-byte alignment, an int's value, or for
# a do_not_specialize int its i32/i64/u64 range); each keyword's type and value. A constexpr passed
# positionally, an argument type it does not key, hooks, debug and instrumentation modes, callable
# grids and the interpreter's kernels take the normal path. Not checked, unlike JITFunction.run: that
# the globals a kernel read have not changed since it compiled (nfnet_fast's never change). Measured on
# the build machine with Triton's launcher stubbed: 10.0 -> 5.4 us a launch. Not yet run on a GPU, so
# off by default: NFNET_FAST_LAUNCH_CACHE=1 turns it on.

try:
    import triton as _triton
    from triton import knobs as _knobs
    from triton.compiler import CompiledKernel as _CompiledKernel
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # (no Triton: the cache never applies)
    _triton = None

# Native launches (docs/native-launch.md): with NATIVE_LAUNCH (and the cache on), each memoised binary is also
# registered with the extension (csrc/triton_launch.cpp), and a later launch of the same signature is one call
# into C++, which keys the arguments (at least as finely as the memo below), packs the binary's parameters and
# calls cuLaunchKernel on the current stream: no Python key, no Triton launcher. A binary that needs scratch
# memory, clusters, PDL or a cooperative launch, a parameter type it does not pack, or an argument it does not
# key stays on the memo's path. Its packing is checked on the CPU against the PTX's parameters
# (tests/test_triton.py); its launches have not yet run on a GPU, so it is off by default:
# NFNET_FAST_NATIVE_LAUNCH=1 turns it on (and the launch cache with it).
NATIVE_LAUNCH = os.environ.get("NFNET_FAST_NATIVE_LAUNCH", "0") == "1" and _triton is not None
LAUNCH_CACHE = (os.environ.get("NFNET_FAST_LAUNCH_CACHE", "0") == "1" or NATIVE_LAUNCH) and _triton is not None
_LAUNCH_MEMO_MAX = 4096  # (a memo entry per shape: bounded by a model's layers, unless the shapes keep changing)
_key_fns: dict = {}      # (id(kernel), positional types) -> key function, or None: no memo for these types
_launches: dict = {}     # memo key -> (binary, launcher, CUfunction, packed metadata, keyword-parameter getter,
#                          whether the native launcher refused it)
_kept: dict = {}         # id(kernel) -> kernel, so that ids in the keys stay the kernels'
# thread id -> launch hook of the body being recorded on that thread (nfnet_fast._replay): it records the
# launch, then makes it
RECORDERS: dict = {}


def _key_fn(kernel, types: tuple):
    """A function of the positional arguments that returns what Triton specialises on, for this exact
    tuple of their types: a tensor's dtype and 16-byte alignment (one OR of all pointers when all are
    aligned), an int's value (its ==1, %16 and range), or for a do_not_specialize int its range only
    (i32, i64, u64), nothing more for float, bool and None (fp32, u1 and a constexpr None, whatever
    the value). None where an argument is a constexpr or of another type: no memo for such launches."""
    exprs, tensors = [], []
    for i, t in enumerate(types):
        if kernel.params[i].is_constexpr:
            return None
        if issubclass(t, torch.Tensor):
            tensors.append(i)
            exprs.append(f"a[{i}].dtype")
        elif t is int:
            exprs.append(f"(a[{i}] < -2147483648, a[{i}] > 2147483647, a[{i}] >= 9223372036854775808)"
                         if kernel.params[i].do_not_specialize else f"a[{i}]")
        elif t not in (float, bool, type(None)):
            return None
    ptrs = " | ".join(f"a[{i}].data_ptr()" for i in tensors) or "0"
    each = ", ".join(f"a[{i}].data_ptr() & 15 == 0" for i in tensors)
    namespace: dict = {}
    exec(f"def key(a):\n    al = ({ptrs}) & 15\n    if al:\n        al = ({each},)\n"  # noqa: S102 (our source)
         f"    return (al, {', '.join(exprs)})\n", namespace)
    return namespace["key"]


def _plain_launches() -> bool:
    """Nothing is switched on that makes JITFunction.run do more than find the binary and launch it."""
    rt = _knobs.runtime
    return not (rt.launch_enter_hook.calls or rt.launch_exit_hook.calls or rt.debug
                or _knobs.compilation.instrumentation_mode
                or getattr(rt, "add_stages_inspection_hook", None) is not None)


# (the pointer dtypes a natively launched signature may hold: their index is the key's dtype code)
_NATIVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int16, torch.int32,
                  torch.int64, torch.uint8, torch.bool)
# a binary's parameter type (its signature) -> how the native launcher passes it (csrc/triton_launch.cpp, Slot)
_NATIVE_SLOTS = {"constexpr": "-", "i32": "i", "i64": "l", "u64": "u", "fp32": "f", "u1": "b", "i1": "b"}
_native = None           # nfnet_fast._C once a binary was registered with it; False: no native launches here


def _native_module():
    """The extension's native launcher, loaded (and told torch's tensor type and dtypes) on first use."""
    global _native
    if _native is None:
        try:  # (through the registry, which refuses an extension built from other sources than csrc/)
            from nfnet_fast import _backends
            _C = _backends.extension()
        except ImportError:
            _C = None
        _native = _C if hasattr(_C, "_triton_launch") else False
        if _native:
            _native._triton_init(torch.Tensor, _NATIVE_DTYPES)
    return _native


def native_slots(kernel, compiled) -> Optional[str]:
    """How each parameter of ``kernel`` goes into a native launch of the binary ``compiled`` (one
    csrc/triton_launch.cpp Slot per parameter: ``-`` none, ``p`` a pointer, ``i``/``l``/``u``/``f``/``b``
    an i32, i64, u64, fp32 or bool), or None for a binary the native launchers cannot launch (scratch,
    clusters, PDL, cooperative, tensor descriptors, another parameter type; not a CompiledKernel)."""
    if _triton is None or not isinstance(compiled, _CompiledKernel):
        return None
    md = compiled.metadata
    if (md.num_ctas != 1 or getattr(md, "launch_pdl", False)
            or getattr(md, "launch_cooperative_grid", False) or getattr(md, "global_scratch_size", 0)
            or getattr(md, "profile_scratch_size", 0) or getattr(md, "tensordesc_meta", None)):
        return None
    signature = compiled.src.signature
    slots = "".join(_NATIVE_SLOTS.get(signature.get(p.name, "?"), "p" if signature.get(p.name, "").startswith("*")
                                      else "?") for p in kernel.params)
    return None if "?" in slots else slots


def _register_native(kernel, compiled, device: int, args: tuple, kwargs: dict) -> bool:
    """Register the binary that Triton just launched for these arguments with the native launcher; False
    where it cannot launch it (see NATIVE_LAUNCH)."""
    native = _native_module()
    slots = native_slots(kernel, compiled) if native else None
    if slots is None:
        return False
    kid, (num_warps, _, shared) = id(kernel), compiled.packed_metadata
    entry = (kid, device, args, kwargs, slots, int(compiled.function), num_warps, shared, compiled)
    done = native._triton_register(*entry)
    if done is None:  # (the extension does not know the kernel yet, or its registry was reset since)
        native._triton_describe(kid, kernel.__name__, [p.name for p in kernel.params],
                                "".join("1" if p.is_constexpr else "0" for p in kernel.params),
                                "".join("1" if p.do_not_specialize else "0" for p in kernel.params))
        done = native._triton_register(*entry)
    return bool(done)


def launch(kernel, grid, /, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)``; with LAUNCH_CACHE, memoised per launch signature (above), and with
    NATIVE_LAUNCH launched from C++ once memoised. Returns the CompiledKernel launched."""
    if RECORDERS:
        hook = RECORDERS.get(_get_ident())
        if hook is not None:
            return hook(kernel, grid, args, kwargs)
    if not LAUNCH_CACHE or type(kernel) is not _JITFunction or type(grid) is not tuple or kernel.pre_run_hooks \
            or not _plain_launches():
        return kernel[grid](*args, **kwargs)
    if NATIVE_LAUNCH and _native:
        n = len(grid)
        done = _native._triton_launch(id(kernel), grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, args,
                                      kwargs)
        if done is not None:
            return done
    types = tuple(map(type, args))
    kid = id(kernel)
    key_fn = _key_fns.get((kid, types), False)
    if key_fn is False:
        _kept[kid] = kernel
        key_fn = _key_fns[(kid, types)] = _key_fn(kernel, types)
    if key_fn is None:
        return kernel[grid](*args, **kwargs)
    driver = _triton.runtime.driver.active
    device = driver.get_current_device()
    # (a keyword's type too: True == 1 == 1.0 as keys, which Triton compiles apart)
    key = (kid, device, types, key_fn(args), tuple(kwargs.items()), tuple(map(type, kwargs.values())))
    hit = _launches.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **kwargs)  # (compiles if it must, launches, returns the binary)
        names = tuple(p.name for p in kernel.params[len(args):])
        if (isinstance(compiled, _CompiledKernel) and all(n in kwargs for n in names)
                and not any(isinstance(v, torch.Tensor) for v in kwargs.values())):
            if len(_launches) >= _LAUNCH_MEMO_MAX:
                _launches.clear()
            get = itemgetter(*names) if len(names) > 1 else (lambda kw, names=names: [kw[n] for n in names])
            # (the binary itself kept: Triton 3.8 unloads its module when it is collected)
            refused = NATIVE_LAUNCH and not _register_native(kernel, compiled, device, args, kwargs)
            _launches[key] = (compiled, compiled.run, compiled.function, compiled.packed_metadata, get, refused)
        return compiled
    compiled, run, function, packed, get, refused = hit
    if NATIVE_LAUNCH and not refused:
        # (the native launcher had no binary for it: memoised before native launches were on, or its
        # registry dropped it since (reset, bound); registered again, unless the launcher refuses it)
        if not _register_native(kernel, compiled, device, args, kwargs):
            _launches[key] = (compiled, run, function, packed, get, True)
    n = len(grid)
    run(grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, driver.get_current_stream(device), function,
        packed, None, None, None, *args, *get(kwargs))
    return compiled
