"""Shared test helpers: randomised NF models, the docs/design.md tolerance, and the Triton interpreter switch."""
import collections
import contextlib
import os

import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present; the switch
# must be set before triton is first imported (nfnet_fast imports it lazily).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


# Triton's interpreter, made faster without changing what it runs (tests/test_conftest.py compares each change
# with the original): the originals replaced, by name, for that test.
INTERPRETER_ORIGINALS = {}


def _interpreter_scans_builtins_once() -> None:
    """Every call of a ``@triton.jit`` helper inside an interpreted kernel (each program's ``_mma``,
    ``_epilogue``, ``tl.sigmoid``...) patches ``triton.language`` again, and each patch scans its modules with
    ``inspect.getmembers`` for the builtins to patch: ~0.5 ms a call, an eighth of an interpreted model's
    time. The builtins are fixed once ``triton.language`` is imported, and nothing is patched yet when this
    runs (no kernel has run), so their names are listed here once per module; a scan then visits those names
    only and patches each that is a builtin at that moment, as the scan of every member does. Modules not
    listed here keep their own scan."""
    import inspect

    import triton.language as tl
    from triton.runtime import interpreter
    original, patch_attr = getattr(interpreter, "_patch_builtin", None), getattr(interpreter, "_patch_attr", None)
    if original is None or patch_attr is None:
        return
    modules = (tl, tl.core, tl.core.tensor, tl.math, getattr(tl.core, "tensor_descriptor_base", None))
    builtin_names = {m: [name for name, member in inspect.getmembers(m) if tl.core.is_builtin(member)]
                     for m in modules if m is not None}

    def patch_builtin(pkg, builder, scope):
        listed = builtin_names.get(pkg)
        if listed is None:
            return original(pkg, builder, scope)
        for name in listed:
            member = getattr(pkg, name)
            if tl.core.is_builtin(member):
                patch_attr(pkg, name, member, builder, scope)
    INTERPRETER_ORIGINALS["_patch_builtin"] = original
    interpreter._patch_builtin = patch_builtin


def _interpreter_launches_in_a_fresh_stack_chunk() -> None:
    """CPython 3.11 keeps Python frames in 16 KiB chunks and frees a chunk as soon as the frames in it return
    (_PyThreadState_PopFrame): a hot call that crosses a chunk's end allocates and frees one (an mmap and a
    munmap) on every crossing. An interpreted kernel makes millions of small calls, so it ran 1x or 2-4x slower
    depending on the depth of the Python stack it was launched from: nf_regnet_b0's test in test_model.py took
    37 s called from a script, 63 s under pytest, 130-162 s in the suite's xdist workers. Each interpreted
    launch therefore goes through a function whose frame (2200 locals, 17.6 KiB) is larger than a chunk: it
    always starts a fresh chunk (of 32 KiB), and the launch's own calls run in the 14 KiB after it, at the same
    depth wherever it was launched from (that test: 30 s under pytest)."""
    from triton.runtime import interpreter
    executor = getattr(interpreter, "GridExecutor", None)
    if executor is None:
        return
    launch = executor.__call__
    namespace = {}
    exec("def launch_in_a_fresh_chunk(launch, args, kwargs):\n    "
         + " = ".join(f"_unused{i}" for i in range(2200)) + " = None\n    return launch(*args, **kwargs)\n",
         namespace)
    in_a_fresh_chunk = namespace["launch_in_a_fresh_chunk"]

    def padded_launch(self, *args, **kwargs):
        return in_a_fresh_chunk(launch, (self, *args), kwargs)
    INTERPRETER_ORIGINALS["GridExecutor.__call__"] = launch
    executor.__call__ = padded_launch


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_scans_builtins_once()
    _interpreter_launches_in_a_fresh_stack_chunk()

# Under pytest-xdist (`-n N`) each worker takes its share of the cores for torch's intra-op threads, so
# N workers do not each start one thread per core and fight over them (the interpreted Triton kernels
# are mostly single-threaded Python; the workers are what runs them side by side). The cores this process
# may run on, as the Makefile's nproc counts them (a container's CPU affinity), not the machine's.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, usable_cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# docs/design.md section 3: fp32 against timm fp32, max|out - ref| <= 1e-4 * max|ref|.
REL_TOL = 1e-4


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, tol: float = REL_TOL, what: str = "") -> None:
    """max|out - ref| <= tol * max|ref| (the contract of docs/design.md section 3), with a readable message."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= tol * scale, f"{what}: max|out-ref| = {err:.3e} > {tol:g} * max|ref| = {tol * scale:.3e}"


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a random value (timm zero-initialises conv3's gain and the biases,
    which would hide bugs): gains around 1, biases and ECA weights small but non-zero, weights
    scaled by fan_in ** -0.5 as initialised models have them. (Unit-variance weights in the layers
    that are not standardised, SE's and the classifier's, make some NF models chaotic: timm's own
    fp32 logits then differ from float64 by 2e-2 (nfnet_l0), so no fp32 comparison means anything;
    with this scaling timm's fp32 error is ~1e-6 on every NF kind, see test_model.py.)"""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if name.endswith("gain") or name.endswith("skipinit_gain"):
            p.copy_(1.0 + 0.3 * r)
        elif name.endswith("bias"):
            p.copy_(0.1 * r)
        elif p.dim() == 3:  # ECA conv1d kernel
            p.copy_(0.5 * r)
        else:
            p.copy_(r * p[0].numel() ** -0.5 if p.dim() > 1 else 0.1 * r)
    return model


def gpu_training_step(dtype: torch.dtype):
    """``(model, x, step)``: eca_nfnet_l0 on the triton backend (randomised, channels_last, train mode) on the
    GPU, a batch of 2 at 96 px, and ``step()``, one training step (bf16 autocast when ``dtype`` is bf16)
    that returns the loss and every gradient, cloned. The GPU tests that compare launch paths bit for bit."""
    import timm

    import nfnet_fast

    model = nfnet_fast.convert(randomize_(timm.create_model("eca_nfnet_l0", num_classes=10), seed=5), backend="triton")
    model = model.cuda().train().to(memory_format=torch.channels_last)
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 3, 96, 96, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (2,), device="cuda", generator=g)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return [loss.detach().clone()] + [p.grad.clone() for p in model.parameters()]

    return model, x, step


def steps_here_and_on_a_side_stream(step) -> list:
    """``[step(), step()]``: one on the current stream, one on a side stream ordered between it and what follows."""
    runs = [step()]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        runs.append(step())
    torch.cuda.current_stream().wait_stream(side)
    return runs


def captured_eval(model, x) -> torch.Tensor:
    """``model.eval()(x)`` captured in a CUDA graph (after one eager call) and replayed: the graph's output."""
    graph, model = torch.cuda.CUDAGraph(), model.eval()
    with torch.no_grad():
        model(x)
        with torch.cuda.graph(graph):
            static_out = model(x)
    graph.replay()
    torch.cuda.synchronize()
    return static_out


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` skip cleanly, with one reason, where no CUDA device is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def random_like(out: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random tensor shaped like `out`, on `out`'s device and dtype (an upstream gradient).

    The numbers come from a CPU generator, so they are the same on every device; a CPU generator
    cannot fill a CUDA tensor directly (`torch.randn(..., generator=cpu_gen, device="cuda")` raises)."""
    return torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device, out.dtype)


def poison_freed_memory(numel: int) -> None:
    """Leave ``numel`` fp32 NaNs in memory just freed, where the allocator is likely to place the next
    allocations: a kernel's output that something should have written but did not then reads NaN
    instead of the zeros or old values it could otherwise be given by chance."""
    torch.full((numel,), float("nan")).sum()


TF32_SWITCHES = (torch.backends.cudnn, torch.backends.cuda.matmul)


@contextlib.contextmanager
def ieee_fp32_switches():
    """TF32 off inside, the switches as they were afterwards.

    cuDNN's TF32 switch is on by default: a float32 reference conv (ECA's conv1d, timm's convs) would
    then round its operands to 10 mantissa bits (~5e-4 relative), far outside the 1e-4 contract."""
    saved = [m.allow_tf32 for m in TF32_SWITCHES]
    try:
        for m in TF32_SWITCHES:
            m.allow_tf32 = False
        yield
    finally:
        for m, v in zip(TF32_SWITCHES, saved):
            m.allow_tf32 = v


@pytest.fixture(autouse=True)
def ieee_fp32():
    """Every test runs with TF32 off and leaves the switches as it found them."""
    with ieee_fp32_switches():
        yield


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


def cpu_backends(op: str):
    """Backends that implement `op` for CPU tensors here (triton through the interpreter, cuda
    through its CPU twins)."""
    from nfnet_fast import _backends, ops

    found = []
    for name in _backends.NAMES:
        try:
            ops.resolve_backend(name, "cpu", op)
        except RuntimeError:
            continue
        found.append(name)
    return found


def dtype_tol(dtype: torch.dtype) -> float:
    """Relative tolerance of an fp32-math op stored in `dtype`, against the fp32 reference rounded to
    `dtype`: a couple of units in the last place of the storage type."""
    return {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]


def grad_tol(dtype: torch.dtype) -> float:
    """Relative tolerance of gradients against float64: fp32 1e-5; in fp16/bf16 the backward rounds
    the gradients it stores and reduces low-precision products, a few ulps more than the forward."""
    return 1e-5 if dtype == torch.float32 else 4 * dtype_tol(dtype)


def check_backward_against_float64(outs, refs, leaves, dtype: torch.dtype, rng, what: str) -> None:
    """Backward of ``outs`` (in ``dtype``) and of their float64 ``refs`` with the same random upstream
    gradients, then each leaf's gradient against its float64 twin's.

    ``leaves``: ``(name, leaf, float64_leaf, tol)`` with ``tol=None`` for :func:`grad_tol`."""
    grads = [torch.randn(o.shape, generator=rng).to(dtype) for o in outs]
    torch.autograd.backward(list(outs), grads)
    torch.autograd.backward(list(refs), [g.double() for g in grads])
    for name, leaf, ref_leaf, tol in leaves:
        assert_rel_close(leaf.grad.double(), ref_leaf.grad, grad_tol(dtype) if tol is None else tol,
                         f"{what} {name} grad")


class DropsGradient(torch.autograd.Function):
    """``b`` (a copy) with ``a`` an input that gets no gradient (None): ``a``'s producer stays in the
    graph, and is run, but no gradient reaches it, as with an NF block's pre-activation, whose convs
    send its gradient to the block input themselves (``pre_x``)."""

    @staticmethod
    def forward(ctx, a, b):
        return b.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def weight_copies(prof, shape) -> int:
    """Copies of a ``shape`` tensor (a conv weight's, or its gradient's) in a profile, outside aten's own
    convolution_backward (which copies its weight operand into the layout it wants: aten's business)."""
    count = 0
    for ev in prof.events():
        if ev.name == "aten::copy_" and ev.input_shapes and tuple(ev.input_shapes[0]) == tuple(shape):
            parent = ev.cpu_parent
            while parent is not None and parent.name != "aten::convolution_backward":
                parent = parent.cpu_parent
            count += parent is None
    return count


@contextlib.contextmanager
def counted_work(*kernel_modules):
    """Counts, during the block, the Triton launches of ``kernel_modules``' kernels (``launches``:
    kernel name -> count) and the bytes-moving copies made outside those launches (``copies``: the
    element count of each ``aten::copy_``, which ``clone``, ``contiguous`` and ``.to`` all end in).
    Copies inside a launch are the interpreter's own and are left out."""
    from torch.profiler import ProfilerActivity, profile, record_function

    work = {"launches": collections.Counter(), "copies": []}
    patched = []
    for mod in kernel_modules:
        for name, kernel in vars(mod).items():
            if name.endswith("_kernel") and hasattr(kernel, "run"):
                def run(*args, _run=kernel.run, _name=name, **kwargs):
                    work["launches"][_name] += 1
                    with record_function("counted_work.launch"):
                        return _run(*args, **kwargs)
                patched.append((kernel, kernel.run))
                kernel.run = run
    try:
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            yield work
    finally:
        for kernel, run in patched:
            kernel.run = run
    for ev in prof.events():
        if ev.name != "aten::copy_":
            continue
        parent = ev.cpu_parent
        while parent is not None and parent.name != "counted_work.launch":
            parent = parent.cpu_parent
        if parent is None:
            numel = 1
            for size in ev.input_shapes[0]:
                numel *= size
            work["copies"].append(numel)
