"""The native launcher's parameters against the compiled kernels' own (run by tests/test_triton.py in a
process of its own: Triton must compile here, so no TRITON_INTERPRET, and its driver is replaced).

Triton compiles each launch's specialisation for sm_90 for real (no GPU needed); the driver is a stand-in
whose launcher records instead of launching. For every launch variant (pointer alignment, dtype, an int's
==1, %16 and range, do_not_specialize ints, keyword flags, constexprs, warps), each launched twice through
nfnet_fast.kernels.launch with NATIVE_LAUNCH on:

* before its first launch, the native launcher knows no binary for it unless Triton's own lookup already
  picks one (no launch of a signature with another binary's parameters);
* after it, the native launcher's binary is the one Triton's lookup picks, with its warps and shared memory;
* its parameter bytes are what the binary's PTX declares (count and each size), holding the launch's
  values in order (device addresses, ints, fp32 floats), then the two null scratch pointers;
* the second time, after the extension's registry was reset, the memo registers each binary again.

Prints "ok" and the number of variants checked; raises on the first difference.

``step`` (the second argument): instead, the binaries are stand-ins (no compile; their parameter types are
Triton's specialisation's, as a real binary's), and the native launcher runs dry (all but cuLaunchKernel).
A training step (forward, backward) of eca_nfnet_l0's layers at 1/8 width, channels_last, on the triton
backend, fills the memo; then the memo is emptied and a second step runs: every one of its launches must
come from the native launcher (none through Triton's JITFunction.run), so none of the kernels a step uses
has a parameter type, argument or binary the native launcher refuses.
"""
import os
import re
import struct
import sys

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import CompiledKernel  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class Driver:  # (the target is sm_90; launches are recorded by each binary's stand-in launcher)
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 7
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")
    def is_active(self): return True


functions = iter(range(0x1000, 0x100000, 0x10))


STEP = sys.argv[1:] == ["step"]  # (else "ptx", or no argument)


class StandIn(CompiledKernel):  # (a binary's attributes that the memo and the native launcher read; no code)
    def __init__(self, signature):
        self.src, self.metadata = type("Src", (), {"signature": signature}), type("Md", (), {"num_ctas": 1})
        self.packed_metadata, self.function, self.module = (4, 1, 0), next(functions), None


def compile_(self, key, signature, device, constexprs, options, attrs, warmup):
    if STEP:
        binary = StandIn(signature)
    else:
        binary = self.compile(self.ASTSource(self, signature, constexprs, attrs),
                              target=GPUTarget("cuda", 90, 32), options=options.__dict__)
        binary.function = next(functions)  # (as if loaded: a distinct CUfunction per binary; module stays None)
    binary._run = lambda *args: None
    binary.launch_metadata = lambda *args: None  # (else it would load the binary for the launch hooks)
    self.device_caches[device][0][key] = binary
    return binary


triton.runtime.driver.set_active(Driver())
JITFunction._do_compile = compile_

from nfnet_fast import kernels  # noqa: E402
from nfnet_fast.kernels import eca_residual as E  # noqa: E402
from nfnet_fast.kernels import fused_conv as F  # noqa: E402
from nfnet_fast.kernels import silu_scale as S  # noqa: E402

kernels.LAUNCH_CACHE = kernels.NATIVE_LAUNCH = True
native = kernels._native_module()
assert native, "the extension has no native launcher"


if STEP:
    import dataclasses

    import timm.models.nfnet as timm_nfnet

    import nfnet_fast
    import nfnet_fast._triton  # noqa: F401  (the triton backend's ops, registered whatever the registry says)
    from nfnet_fast.benchmark import random_weights_

    native._triton_init(torch.Tensor, kernels._NATIVE_DTYPES, True)  # (dry: no driver here)
    os.environ["TRITON_INTERPRET"] = "1"  # so that the registry lets the triton backend take CPU tensors
    nfnet_fast._backends._infos.clear()  # (read again: the kernels stay the compiled JITFunctions)
    narrow = dataclasses.replace(timm_nfnet.model_cfgs["eca_nfnet_l0"], channels=(32, 64, 192, 192), stem_chs=16,
                                 group_size=8, num_features=288)
    model = nfnet_fast.convert(random_weights_(timm_nfnet.NormFreeNet(narrow, num_classes=10)), backend="triton")
    model = model.train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([1, 2])

    def step():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    step()  # fills the memo and registers every binary natively
    kernels._launches.clear()  # (so a launch the native launcher refused goes through JITFunction.run)
    triton_path, native_hits, native_launch = [], [], native._triton_launch
    jit_run = JITFunction.run
    JITFunction.run = lambda self, *a, **k: (triton_path.append(self.__name__), jit_run(self, *a, **k))[1]

    class Counting:  # (the extension module's functions, its launch counted)
        def __getattr__(self, name):
            return getattr(native, name)

        def _triton_launch(self, *a):
            done = native_launch(*a)
            native_hits.append(done is not None)
            return done
    kernels._native = Counting()
    step()
    assert not triton_path, f"launches that took Triton's path: {sorted(set(triton_path))}"
    assert len(native_hits) > 200 and all(native_hits), (len(native_hits), native_hits.count(False))
    print(f"ok {len(native_hits)} launches")
    sys.exit(0)


def triton_pick(kernel, args, kwargs):
    cache, key_cache, _, _, binder = kernel.device_caches[0]
    _, spec, options = binder(*args, **kwargs, debug=False,
                              instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
    return cache.get(triton.runtime.jit.compute_cache_key(key_cache, spec, options))


PTX_FORMATS = {"u64": "<Q", "b64": "<Q", "s64": "<q", "u32": "<I", "b32": "<I", "s32": "<i", "f32": "<f",
               "u8": "<B", "b8": "<B", "s8": "<b", "u16": "<H", "b16": "<H"}


def ptx_params(binary):
    """The PTX types of the kernel's parameters, in order."""
    ptx = binary.asm["ptx"]
    entry = re.search(r"\.entry\s+" + re.escape(binary.name) + r"\s*\((.*?)\)", ptx, re.S)
    assert entry, binary.name
    return re.findall(r"\.param\s+\.(\w+)", entry.group(1))


def expected_bytes(kernel, binary, args, kwargs):
    values = list(args) + [kwargs[p.name] for p in kernel.params[len(args):]]
    kept = [v for p, v in zip(kernel.params, values) if binary.src.signature[p.name] != "constexpr"]
    types = ptx_params(binary)
    assert len(types) == len(kept) + 2, (binary.name, types, len(kept))  # (+ the two scratch pointers)
    out = b""
    for ty, v in zip(types, kept + [None, None]):
        fmt = PTX_FORMATS[ty]
        if isinstance(v, torch.Tensor):
            v = v.data_ptr()
        elif v is None:
            v = 0
        elif isinstance(v, bool):
            v = int(v)
        elif isinstance(v, int) and fmt in ("<Q", "<I", "<H", "<B"):
            v &= (1 << (8 * struct.calcsize(fmt))) - 1  # (a negative int's two's complement, as the slot holds it)
        out += struct.pack(fmt, v)
    return out


x = torch.empty(8192)
xh = torch.empty(8192, dtype=torch.float16)
cases = []
silu = dict(BLOCK=1024, num_warps=4)
for args, kw in (((x, x, 4096, 1.5), silu), ((x[1:], x, 4096, 1.5), silu), ((xh, xh, 4096, 1.5), silu),
                 ((x, x, 1, 1.5), silu), ((x, x, 17, 1.5), silu), ((x, x, 2 ** 31, 1.5), silu),
                 ((x, x, 4096, 1.5), dict(silu, num_warps=8)), ((x, x, 4096, 1.5), dict(silu, BLOCK=2048))):
    cases.append((S._silu_scale_fwd_kernel, (4,), args, kw))
for has_add in (0, 1):
    cases.append((S._silu_scale_bwd_kernel, (4,), (x, x, x[4:], x[2:], 4096, 0.25, has_add), silu))
pool = dict(BLOCK_P=32, BLOCK_C=16)  # (S and per: do_not_specialize, so their range keys, not their value)
for c, s, per in ((16, 1, 1), (17, 2, 16), (1, 17, 2 ** 31), (16, 5, -5), (16, 2 ** 31, 1)):
    cases.append((E._pool_nhwc_kernel, (4, 2, 3), (x, x[1:], c, 64, s, per), pool))
tile = dict(POOL=False, SUMS=True, BWD=False, PRE_ACT=False, HAS_Z=False, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32,
            GROUP_M=8, NUM_STAGES=2, ALIGNED=True, FP32_K=32, num_warps=4)
base = (x,) * 8 + (4096, 64, 64, 8, 8, 8, 64, 4, 1, 1.0)
for flags in (dict(has_grad=0, has_gsums=0, has_out=1, pre_beta=0.5), dict(has_grad=1, has_gsums=0, has_out=1,
                                                                           pre_beta=0.5)):
    cases.append((F._conv1x1_kernel, (64,), base, dict(tile, **flags)))

for round_ in range(2):
    if round_:  # (the extension's registry reset: the memo's launches register their binaries again)
        native._triton_clear()
    for kernel, grid, args, kw in cases:
        before = native._triton_pack(id(kernel), 0, args, kw)
        pick = triton_pick(kernel, args, kw)
        if pick is None:
            assert before is None, (kernel.__name__, args, kw, "a native binary for a signature Triton never compiled")
        kernels.launch(kernel, grid, *args, **kw)
        binary = triton_pick(kernel, args, kw)
        packed = native._triton_pack(id(kernel), 0, args, kw)
        assert packed is not None, (kernel.__name__, args, kw, "not registered")
        got, function, num_warps, shared = packed
        assert function == binary.function, (kernel.__name__, args, kw, "another binary")
        assert (num_warps, shared) == (binary.packed_metadata[0], binary.packed_metadata[2]), (kernel.__name__, kw)
        assert got == expected_bytes(kernel, binary, args, kw), (kernel.__name__, args, kw)
print(f"ok {len(cases)}")
sys.exit(0)
