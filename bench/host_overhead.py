"""Host (CPU) time per call of each backend's ops, outside the kernels: what a training step pays per
op before the GPU sees a launch (docs/triton-training-step.md). On a GPU machine everything is real
(tiny tensors, so the kernels never hold the host back). Without one, the Triton kernels are real
JITFunctions (no interpreter) under a driver that targets sm_90 and whose launcher does nothing:
JITFunction.run runs its whole Python path (binder, specialisation key, cache lookup) and stops where
the C launcher would start; the cuda backend runs its C++ CPU twins on tiny tensors (an upper bound).

Last, the host time of a whole training step (benchmark.train_step: forward, backward, AGC,
optimizer) of eca_nfnet_l0's layer graph at 1/8 of its width (the same 57 convs, 12 ECA blocks and
layer sequence; batch 2, 32 px, fp32), timm's model and each backend's, by phase, and an eval
forward at batch 1. On the CPU aten's ops do their (tiny) work where the Triton kernels do none:
timm's convolutions, and the data and weight gradients that nfnet_fast's conv backward leaves to
aten, take real CPU time (about 8 ms of timm's backward). A step that a GPU finishes sooner than
its host issues it runs at this pace.

    PYTHONPATH=. python bench/host_overhead.py [--profile]

--profile: then a cProfile of 10 steps of the fastest nfnet_fast path (native launches where the extension has
them, else the launch cache's), by own time.

Rows triton+lc, triton+native and triton+replay: the triton backend with the launch cache (kernels.LAUNCH_CACHE),
with native launches too (kernels.NATIVE_LAUNCH: each memoised binary launched from C++), and with its op bodies
replayed from C++ as well (nfnet_fast._replay). Without a GPU the native launches run dry: everything but
cuLaunchKernel, as Triton's launcher does nothing here.
"""
import os
import sys
import time
import types

os.environ.pop("TRITON_INTERPRET", None)
import torch
import triton
from triton.backends.compiler import GPUTarget

GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if GPU else "cpu")

class FakeDriver:
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")
    def is_active(self): return True

from triton.compiler import CompiledKernel


class FakeKernel(CompiledKernel):  # (a CompiledKernel, so that kernels.launch's cache may keep it)
    def __init__(self, signature: dict):
        self.function, self.packed_metadata, self.module = 0, (4, 1, 0), 1
        # (what registering it with the native launcher reads: its specialisation's parameter types, no
        # clusters, no scratch)
        self.src, self.metadata = types.SimpleNamespace(signature=signature), types.SimpleNamespace(num_ctas=1)
        self._run = lambda *args: None  # where the C launcher (argument parsing, cuLaunchKernelEx) would run
    def launch_metadata(self, grid, stream, *args):  # (CompiledKernel's builds a LazyDict for the hooks)
        return None
    def __del__(self):
        pass

from triton.runtime.jit import JITFunction


def _do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    kernel = FakeKernel(signature)  # each specialisation "compiles" once into the kernel cache, as a real one
    self.device_caches[device][0][key] = kernel
    return kernel


if not GPU:
    triton.runtime.driver.set_active(FakeDriver())
    JITFunction._do_compile = _do_compile

import nfnet_fast, nfnet_fast._triton  # kernels are decorated now: real JITFunctions
from nfnet_fast import ops
if not GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # so the registry lets the triton backend take CPU tensors
    nfnet_fast._backends._infos.clear()   # (and convert(backend="triton") too: availability is re-read)
from nfnet_fast.kernels import eca_residual as K_eca
assert isinstance(K_eca._apply_nhwc_kernel, JITFunction)
torch.set_num_threads(1)

def bench(fn, n=200, reps=15):
    for _ in range(20):
        fn()
    ts = []
    for _ in range(reps):
        if GPU:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        ts.append((time.perf_counter() - t) / n * 1e6)  # host time: tiny kernels never fill the queue
    if GPU:
        torch.cuda.synchronize()
    return min(ts)

N, C, H = 1, 8, 2
y = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last).to(DEV).requires_grad_()
sc = torch.randn(N, C, H, H).contiguous(memory_format=torch.channels_last).to(DEV).requires_grad_()
sums = y.detach().float().sum((2, 3))
w = torch.randn(1, 1, 5, device=DEV, requires_grad=True)
g = torch.randn_like(y)
wt = torch.randn(8, 4, 1, 1, device=DEV, requires_grad=True)
gain = torch.ones(8, 1, 1, 1, device=DEV, requires_grad=True)
gw = torch.randn(8, 4, 1, 1, device=DEV)

# a 1x1 fused conv (16 -> 16 channels, 4x4): weight, gain, bias, and the eval cache's packed weight
cx = torch.randn(1, 16, 4, 4).contiguous(memory_format=torch.channels_last).to(DEV).requires_grad_()
cw = torch.randn(16, 16, 1, 1, device=DEV, requires_grad=True)
cb = torch.zeros(16, device=DEV, requires_grad=True)
cgain = torch.ones(16, 1, 1, 1, device=DEV, requires_grad=True)
cw_packed = cw.detach().permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
cg = torch.randn(1, 16, 4, 4, device=DEV).contiguous(memory_format=torch.channels_last)

rows = []
from nfnet_fast import _backends
BACKENDS = [be for be in ("cuda", "triton") if _backends.op_function(be, "eca_residual") is not None]
for be in BACKENDS:  # (cuda: not where the extension is not built, as in bench/gpu_stack_check.sh's venv)
    class ops:  # the backend's own functions (ops' argument checks are the same for both: left out)
        eca_residual = staticmethod(lambda *a, backend, sums=None: _backends.op_function(backend, "eca_residual")(*a, sums=sums))
        scaled_std_weight = staticmethod(lambda *a, backend: _backends.op_function(backend, "scaled_std_weight")(*a))
        silu_scale = staticmethod(lambda *a, backend: _backends.op_function(backend, "silu_scale")(*a))
    def eca_fwd():
        with torch.no_grad():
            ops.eca_residual(y, w, sc, 0.2, 2.0, 1.1, sums=sums, backend=be)
    def eca_step():  # as in a block in training: a_next unused (conv1 and downsample save x), x_next's grad only
        xn, an = ops.eca_residual(y, w, sc, 0.2, 2.0, 1.1, sums=sums, backend=be)
        torch.autograd.backward(xn, g)
    def eca_step_ga():  # the a_next-gradient path (before pre_x): grads for both outputs
        xn, an = ops.eca_residual(y, w, sc, 0.2, 2.0, 1.1, sums=sums, backend=be)
        torch.autograd.backward([xn, an], [g, g])
    def std_fwd():
        with torch.no_grad():
            ops.scaled_std_weight(wt, gain, 0.04, 1e-5, backend=be)
    def std_step():
        ops.scaled_std_weight(wt, gain, 0.04, 1e-5, backend=be).backward(gw)
    def silu_step():
        ops.silu_scale(sc, 1.1, backend=be).backward(g)
    conv = _backends.op_function(be, "fused_conv")  # (both backends run the Triton kernels)

    def conv_fwd():  # eval: the cached standardised weight, packed and in x's dtype already
        with torch.no_grad():
            conv(cx, cw_packed, cb, 1, (0, 0, 0, 0), 1, "silu", 1.0, False, False)

    def conv_step():  # training: raw weight and gain standardised in the op; one backward op
        out = conv(cx, cw, cb, 1, (0, 0, 0, 0), 1, "silu", 1.0, False, False, None, 1.0, cgain, 0.1, 1e-5)
        torch.autograd.backward(out, cg)
    r = {k: bench(f) for k, f in dict(eca_fwd=eca_fwd, eca_step=eca_step, eca_step_ga=eca_step_ga, std_fwd=std_fwd,
                                       std_step=std_step, silu_step=silu_step, conv_fwd=conv_fwd,
                                       conv_step=conv_step).items()}
    rows.append((be, r))
# the autograd + aten part alone: the same pattern with an aten-only function of similar shape
def aten_step():
    out = y * 2.0 + sc
    torch.autograd.backward(out, g)
base = bench(aten_step)
# and timm's own conv_step: the same 1x1 conv as timm's modules run it in training (ScaledStdConv2d's batch_norm
# standardisation and conv2d, then SiLU), so that a machine's conv_step row reads against timm's on that machine
from timm.layers import ScaledStdConv2d as _TimmStdConv
timm_conv = _TimmStdConv(16, 16, 1).to(DEV)
def timm_conv_step():
    torch.autograd.backward(torch.nn.functional.silu(timm_conv(cx)), cg)
timm_conv_us = bench(timm_conv_step)
print(f"host us per call ({DEV.type}, 1 thread), tiny tensors; reference points: aten y*2+sc fwd+bwd = {base:.1f} us, "
      f"timm's conv_step (ScaledStdConv2d + SiLU, fwd+bwd) = {timm_conv_us:.1f} us")
print(f"{'op':14s}" + "".join(f"{be:>10s}" for be, _ in rows))
for k in rows[0][1]:
    print(f"{k:14s}" + "".join(f"{r[k]:10.1f}" for _, r in rows))

# Triton's launch path alone (JITFunction.run up to the C launcher), per launch, for the eca backward's kernels
from nfnet_fast.kernels import eca_residual as E
yy = y.detach()
st, wk, dp = (torch.zeros(shape, device=DEV) for shape in ((N, 1, C), (5,), (N, 1, C)))
pl = E.plan(yy.shape, True, torch.device("cuda"), pool=True)
def launch_reduce():
    E._reduce_nhwc_kernel[pl.grid](yy, yy, yy, yy, yy, st, wk, dp, dp, C, H * H, 1, 1, 5, 0.25, 0.4, 0.0, 1,
                                   HAS_GX=True, HAS_GA=False, SUMS=False, **pl.tile)
def plan_only():
    E.plan(yy.shape, True, torch.device("cuda"), pool=True)
from nfnet_fast import kernels as _kernels
def launch_reduce_cached():  # the same launch through kernels.launch with its cache on
    _kernels.launch(E._reduce_nhwc_kernel, pl.grid, yy, yy, yy, yy, yy, st, wk, dp, dp, C, H * H, 1, 1, 5, 0.25,
                    0.4, 0.0, 1, HAS_GX=True, HAS_GA=False, SUMS=False, **pl.tile)
_kernels.LAUNCH_CACHE, _was = True, _kernels.LAUNCH_CACHE
cached_us = bench(launch_reduce_cached, n=2000)
_native_was = _kernels.NATIVE_LAUNCH
NATIVE = bool(_kernels._native_module())
if NATIVE and not GPU:  # (no driver: the native launches run dry, everything but cuLaunchKernel, as Triton's here)
    _kernels._native._triton_init(torch.Tensor, _kernels._NATIVE_DTYPES, True)
_kernels.NATIVE_LAUNCH = NATIVE
native_us = bench(launch_reduce_cached, n=2000) if NATIVE else float("nan")
_kernels.LAUNCH_CACHE, _kernels.NATIVE_LAUNCH = _was, _native_was
from nfnet_fast import _replay  # noqa: E402
REPLAY, _replay_was = NATIVE and _replay._native_module() is not None, _replay.ENABLED
print(f"one Triton launch (16 args + 5 constexprs), Python path only: {bench(launch_reduce, n=2000):.1f} us, "
      f"with the launch cache {cached_us:.1f} us, natively {native_us:.1f} us"
      f"{'' if GPU else ' (its driver call left out)'}; eca plan(): {bench(plan_only, n=2000):.1f} us")

# One eval conv call (conv_fwd's 1x1 conv, packed weight, no grad), entered at each layer from the public op
# down to the launcher, triton backend: where its host time sits (docs/triton-training-step.md section 13)
if "triton" in BACKENDS:
    from nfnet_fast import _library
    from nfnet_fast import ops as _ops
    from nfnet_fast.kernels import fused_conv as K_conv
    _name = "nfnet_fast::triton_fused_conv"
    lx, lb, lw = cx.detach(), cb.detach(), cw_packed
    op_args = (lx, lw, lb, 1, [0, 0, 0, 0], 1, 1, 1.0, False, False, None, 1.0, None, 1.0, 0.0, False, True, None, False)
    body, direct, backend_fn = _library._BODIES[_name], _library._direct(_name), _backends.op_function("triton", "fused_conv")
    layers = {
        "ops.fused_conv (public checks, backend choice)": lambda: _ops.fused_conv(
            lx, lw, lb, padding=(0, 0, 0, 0), act="silu", backend="triton"),  # (the modules' 4-tuple)
        "backend function (autocast, autograd choice)": lambda: backend_fn(
            lx, lw, lb, 1, (0, 0, 0, 0), 1, "silu", 1.0, False, False),
        "_library._direct (dispatch-mode checks)": lambda: direct(*op_args),
        "op body (_triton.fused_conv_op)": lambda: body(*op_args),
        "kernels.fused_conv (checks, tile memo, launch)": lambda: K_conv.fused_conv(
            lx, lw, lb, act="silu", packed_weight=lw.permute(2, 3, 1, 0)),
    }
    print("one eval conv call entered at each layer, host us (triton backend; without / with the launch cache"
          + (" / its body replayed natively, launches native" if REPLAY else "") + "):")
    for label, fn in layers.items():
        with torch.no_grad():
            plain = bench(fn, n=500)
            _kernels.LAUNCH_CACHE = True
            cached = bench(fn, n=500)
            replayed = float("nan")
            if REPLAY and label.split()[0] in ("ops.fused_conv", "backend", "_library._direct"):  # (above the body)
                _kernels.NATIVE_LAUNCH, _replay.ENABLED = True, True
                replayed = bench(fn, n=500)
                _kernels.NATIVE_LAUNCH, _replay.ENABLED = _native_was, _replay_was
            _kernels.LAUNCH_CACHE = _was
        print(f"  {label:50s}{plain:8.1f}{cached:8.1f}" + (f"{replayed:8.1f}" if REPLAY else ""))


# A whole training step, by phase (benchmark.train_step's four), of eca_nfnet_l0's layer graph at 1/8 width
import dataclasses
import timm.models.nfnet as timm_nfnet
from timm.utils import adaptive_clip_grad
from nfnet_fast.benchmark import random_weights_
from nfnet_fast.train import adaptive_clip_grad_, agc_parameters
narrow = dataclasses.replace(timm_nfnet.model_cfgs["eca_nfnet_l0"], channels=(32, 64, 192, 192), stem_chs=16,
                             group_size=8, num_features=288)
sx = torch.randn(2, 3, 32, 32, device=DEV).contiguous(memory_format=torch.channels_last)
st = torch.tensor([1, 2], device=DEV)


def step_phases(model, opt, clip):
    """Host seconds of each phase of one step (the GPU's queue drained first and last on a GPU)."""
    marks = [time.perf_counter()]
    loss = torch.nn.functional.cross_entropy(model(sx), st)
    marks.append(time.perf_counter())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    marks.append(time.perf_counter())
    clip(agc_parameters(model), clip_factor=0.01)
    marks.append(time.perf_counter())
    opt.step()
    if GPU:
        torch.cuda.synchronize()
    marks.append(time.perf_counter())
    return [b - a for a, b in zip(marks, marks[1:])]


steps, models = {}, {}
runs = [(None, "timm")] + [(be, be) for be in BACKENDS]
if "triton" in BACKENDS:
    # triton again with kernels.LAUNCH_CACHE (the memoised launches), and with NATIVE_LAUNCH too (each memoised
    # binary launched from C++; without a GPU a dry run: all but cuLaunchKernel, as Triton's launcher is stubbed)
    runs.append(("triton", "triton+lc"))
    if NATIVE:
        runs.append(("triton", "triton+native"))
    if REPLAY:
        runs.append(("triton", "triton+replay"))


def use_path(name: str) -> None:
    """The switches of a row: the launch cache, native launches, replayed bodies."""
    _kernels.LAUNCH_CACHE = name in ("triton+lc", "triton+native", "triton+replay")
    _kernels.NATIVE_LAUNCH = name in ("triton+native", "triton+replay")
    _replay.ENABLED = name == "triton+replay"


for be, name in runs:
    use_path(name)
    _replay.clear()
    model = random_weights_(timm_nfnet.NormFreeNet(narrow, num_classes=10))
    model = (model if be is None else nfnet_fast.convert(model, backend=be)).to(DEV).train()
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
    clip = adaptive_clip_grad if be is None else adaptive_clip_grad_
    for _ in range(3):
        step_phases(model, opt, clip)
    timed = [step_phases(model, opt, clip) for _ in range(25)]
    steps[name] = [min(r[i] for r in timed) * 1e3 for i in range(4)] + [min(sum(r) for r in timed) * 1e3]
    models[name] = model, opt, clip
    model.eval()
    with torch.no_grad():  # (the batch-1 eager inference rows of the GPU report are paced so)
        steps[name].append(bench(lambda: model(sx[:1]), n=5) / 1e3)
print(f"training step of eca_nfnet_l0's layers at 1/8 width, batch 2, 32 px, fp32 ({DEV.type}, 1 thread): host ms, "
      "min of 25 (each phase's own minimum); an eval forward at batch 1; triton+lc: with the launch cache "
      "(NFNET_FAST_LAUNCH_CACHE=1); triton+native: its binaries launched from C++ (NFNET_FAST_NATIVE_LAUNCH=1; a dry run without a GPU); "
      "triton+replay: the op bodies replayed from C++ too (NFNET_FAST_REPLAY=1)")
_kernels.LAUNCH_CACHE, _kernels.NATIVE_LAUNCH, _replay.ENABLED = _was, _native_was, _replay_was
print(f"{'':10s}" + "".join(f"{k:>10s}" for k in ("forward", "backward", "AGC", "optimizer", "step", "eval b1")))
for name, row in steps.items():
    print(f"{name:10s}" + "".join(f"{v:10.2f}" for v in row))


# --profile: where the host time of the fastest path goes, function by function (its own time, callees
# excluded): on a GPU machine this separates Python from the C launchers, cuDNN's calls and the allocator,
# which the stubbed launcher here cannot show
if "--profile" in sys.argv:
    import cProfile
    import pstats
    name = list(models)[-1]  # (the fastest nfnet_fast path: replays and native launches where there are, else the memo's)
    model, opt, clip = models[name]
    use_path(name)
    model.train()
    for _ in range(3):
        step_phases(model, opt, clip)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(10):
        step_phases(model, opt, clip)
    prof.disable()
    _kernels.LAUNCH_CACHE, _kernels.NATIVE_LAUNCH, _replay.ENABLED = _was, _native_was, _replay_was
    print(f"\ncProfile of 10 training steps ({name}, {DEV.type}), the 30 functions of most own time:")
    stats = pstats.Stats(prof)
    stats.strip_dirs().sort_stats("tottime").print_stats(30)
