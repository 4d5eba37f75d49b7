"""Training: nfnet_fast.adaptive_clip_grad_ against timm.utils.adaptive_clip_grad, and one SGD + AGC training step
of every backend against timm's (docs/design.md section 3)."""
import itertools
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import adaptive_clip_grad
from torch.utils._python_dispatch import TorchDispatchMode

import nfnet_fast
from conftest import assert_rel_close, cpu_backends, randomize_, weight_copies
from nfnet_fast import _backends, train
from nfnet_fast.train import adaptive_clip_grad_

# fp32 against timm's fp32: both take each unit's norm with the same reduction (torch.linalg.vector_norm over the
# unit's elements; bit-identical on this CPU), so the only room left is another order of the same fp32 sum (another
# build's vectorisation, a GPU): a few ulps (1.2e-7 each) in a norm, carried linearly through
# max_norm / grad_norm into the scaled gradient. 1e-6 * max|timm| per tensor is about 8 ulps.
FP32_TOL = 1e-6
# bf16 (unit roundoff 2^-8): a unit's scale is rounded to bf16 before the multiply, whose result is rounded again:
# each element within 2 * 2^-8 of the exact (float64) AGC of the same bf16 inputs.
BF16_TOL = 2.0 ** -7
PATHS = {"per-tensor": False, "batched": True}  # the CPU path, and the accelerator path run on the CPU
# who issues the ops: the extension's C++ op (csrc/adaptive_clip_grad.cpp, the default where it is built) or its
# Python twin (train._clip_group: no extension, torch.compile)
NATIVE = train._native_agc()
IMPLS = {"python": False, "native": True}
needs_native = pytest.mark.skipif(not NATIVE, reason="nfnet_fast._C is not built (the C++ op)")
IMPL_PARAMS = [pytest.param(False, id="python"), pytest.param(True, id="native", marks=needs_native)]

# Backends that run a whole model on the CPU here (triton through the interpreter, cuda through its C++ twins).
STEP_BACKENDS = [b for b in _backends.NAMES if all(b in cpu_backends(op) for op in _backends.OPS)]


def _unit_norms(t):
    t = t.double()
    return t.norm().reshape(1) if t.dim() <= 1 else t.flatten(1).norm(dim=1)


def _random_grads(params, seed):
    """Gradients that put some units far below AGC's threshold and some far above: per tensor a scale 10**U(-4, 0),
    per unit (row) another 10**U(-1, 0)."""
    g = torch.Generator().manual_seed(seed)
    grads = []
    for p in params:
        r = torch.randn(p.shape, generator=g) * 10 ** (-4 * torch.rand((), generator=g))
        if p.dim() > 1:
            r *= (10 ** -torch.rand(p.shape[0], generator=g)).view(-1, *[1] * (p.dim() - 1))
        grads.append(r.to(p.dtype))
    return grads


def _leaves(params, grads, dtype=None, memory_format=None):
    """Fresh leaf copies of `params` with `grads` (both in `dtype`, 4-D ones in `memory_format`)."""
    out = []
    for p, g in zip(params, grads):
        fmt = memory_format if (memory_format is not None and p.dim() == 4) else torch.contiguous_format
        q = p.detach().to(dtype or p.dtype).clone(memory_format=fmt).requires_grad_()
        q.grad = g.to(dtype or g.dtype).clone(memory_format=fmt)
        out.append(q)
    return out


@pytest.fixture(scope="module")
def l0_params():
    """eca_nfnet_l0's parameters (randomised as in conftest.randomize_) and random gradients."""
    params = [p.detach() for p in randomize_(timm.create_model("eca_nfnet_l0"), seed=3).parameters()]
    return params, _random_grads(params, seed=4)


def _check_against_timm(params, grads, tol, what, clip_factor=0.015, norm_type=2.0, batched=None, native=None,
                        **kwargs):
    ref, out = _leaves(params, grads, **kwargs), _leaves(params, grads, **kwargs)
    adaptive_clip_grad(ref, clip_factor, norm_type=norm_type)
    adaptive_clip_grad_(out, clip_factor, norm_type=norm_type, _batched=batched, _native=native)
    for i, (r, o) in enumerate(zip(ref, out)):
        assert o.grad.stride() == r.grad.stride(), f"{what}: tensor {i} changed layout"
        assert_rel_close(o.grad, r.grad, tol, f"{what} tensor {i} {tuple(r.shape)}")
    return ref


def _clipped_units(before, after):
    """(units whose gradient changed, units left alone) over all tensors."""
    changed = torch.cat([(_unit_norms(a.grad) != _unit_norms(b)) for a, b in zip(after, before)])
    return int(changed.sum()), int((~changed).sum())


@pytest.mark.parametrize("norm_type, channels_last", [(2.0, False), (math.inf, False), (2.0, True)],
                         ids=["2-nchw", "inf-nchw", "2-channels_last"])
def test_matches_timm_on_eca_nfnet_l0(l0_params, norm_type, channels_last):
    """Every parameter of eca_nfnet_l0 (ndim 1, 2, 3, 4; the gains are (C, 1, 1, 1)), thousands of units clipped
    and thousands not, on both paths: the result within fp32 rounding of timm's, the gradients' layout kept."""
    params, grads = l0_params
    assert {p.dim() for p in params} == {1, 2, 3, 4}
    fmt = torch.channels_last if channels_last else None
    ref = _leaves(params, grads, memory_format=fmt)
    adaptive_clip_grad(ref, 0.015, norm_type=norm_type)
    for (path, batched), (impl, native) in itertools.product(PATHS.items(), IMPLS.items()):
        if native and not NATIVE:
            continue
        out = _leaves(params, grads, memory_format=fmt)
        adaptive_clip_grad_(out, 0.015, norm_type=norm_type, _batched=batched, _native=native)
        for i, (r, o) in enumerate(zip(ref, out)):
            assert o.grad.stride() == r.grad.stride(), f"{impl} {path}: tensor {i} changed layout"
            assert_rel_close(o.grad, r.grad, FP32_TOL, f"{impl} {path} ord={norm_type} tensor {i} {tuple(r.shape)}")
    clipped, kept = _clipped_units(grads, ref)
    assert clipped > 1000 and kept > 1000, (clipped, kept)


@pytest.mark.parametrize("native", IMPL_PARAMS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_ndim(path, dtype, native):
    """Tensors of ndim 0 to 5, with units (rows) designed above and below the threshold, in one call: the clipped
    units end at max_norm exactly as in timm, the others unchanged."""
    g = torch.Generator().manual_seed(0)
    shapes = [(), (7,), (6, 5), (4, 3, 5), (8, 3, 3, 3), (1, 1, 1, 1), (3, 2, 2, 2, 2), (5, 1, 1, 1)]
    ratios = torch.tensor([0.1, 3.0, 0.5, 10.0, 0.99, 1.01, 100.0, 1.5], dtype=torch.float64)  # of the threshold
    params, grads = [torch.randn(s, generator=g, dtype=dtype) for s in shapes], []
    for i, p in enumerate(params):
        rows = p.shape[0] if p.dim() > 1 else 1
        r = torch.randn(p.shape, generator=g, dtype=dtype)
        want = _unit_norms(p).clamp(min=1e-3) * 0.015 * ratios[(torch.arange(rows) + i) % len(ratios)]
        factor = (want / _unit_norms(r)).to(dtype)
        grads.append(r * (factor.view(rows, *[1] * (p.dim() - 1)) if p.dim() > 1 else factor[0]))
    ref = _check_against_timm(params, grads, FP32_TOL if dtype == torch.float32 else 1e-12, f"{path} {dtype}",
                              batched=PATHS[path], native=native)
    clipped, kept = _clipped_units(grads, ref)
    assert clipped >= 8 and kept >= 8


@pytest.mark.parametrize("native", IMPL_PARAMS)
@pytest.mark.parametrize("path", PATHS)
def test_bf16(l0_params, path, native):
    """bf16 parameters and gradients: each element within 2^-7 of the exact AGC (float64 math on the same bf16
    inputs); timm's own bf16 result (norms rounded to bf16) is further from it."""
    params, grads = l0_params
    params, grads = params[:60], grads[:60]  # the stem and the first stages: enough units, a fraction of the time
    exact = _leaves(params, grads, dtype=torch.bfloat16)
    exact = _leaves([p.double() for p in exact], [p.grad.double() for p in exact])
    adaptive_clip_grad(exact, 0.015)
    out, ref = _leaves(params, grads, dtype=torch.bfloat16), _leaves(params, grads, dtype=torch.bfloat16)
    adaptive_clip_grad_(out, 0.015, _batched=PATHS[path], _native=native)
    adaptive_clip_grad(ref, 0.015)
    worst_ours = worst_timm = 0.0
    for i, (o, r, e) in enumerate(zip(out, ref, exact)):
        assert o.grad.dtype == torch.bfloat16
        err = (o.grad.double() - e.grad).abs()
        bound = BF16_TOL * e.grad.abs() + 1e-30
        assert (err <= bound).all(), f"tensor {i}: {(err / bound).max().item():.2f}x the bf16 bound"
        worst_ours = max(worst_ours, (err / bound).max().item())
        worst_timm = max(worst_timm, ((r.grad.double() - e.grad).abs() / bound).max().item())
    assert worst_ours <= worst_timm
    clipped, kept = _clipped_units([g.to(torch.bfloat16).double() for g in grads], exact)
    assert clipped > 100 and kept > 100


def test_tensor_argument_and_generator():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(16, 8, generator=g).requires_grad_()
    p.grad = torch.randn(16, 8, generator=g) * torch.logspace(-4, 0, 16).view(-1, 1)
    ref = p.detach().clone().requires_grad_()
    ref.grad = p.grad.clone()
    adaptive_clip_grad(ref, 0.02)
    adaptive_clip_grad_(p, 0.02)
    assert_rel_close(p.grad, ref.grad, FP32_TOL, "tensor argument")
    q = torch.randn(5, generator=g).requires_grad_()
    q.grad = torch.full((5,), 10.0)
    adaptive_clip_grad_((t for t in [q]), 0.01)  # any iterable, a generator included
    torch.testing.assert_close(q.grad.norm(), q.detach().norm() * 0.01)


@pytest.mark.parametrize("native", IMPL_PARAMS)
def test_params_without_grad_and_empty(native):
    g = torch.Generator().manual_seed(2)
    params = [torch.randn(4, 3, generator=g).requires_grad_() for _ in range(4)]
    params[0].grad = torch.full((4, 3), 5.0)
    params[2].grad = torch.full((4, 3), 1e-6)
    ref = [p.detach().clone().requires_grad_() for p in params]
    for r, p in zip(ref, params):
        r.grad = None if p.grad is None else p.grad.clone()
    adaptive_clip_grad(ref, 0.01)
    adaptive_clip_grad_(params, 0.01, _native=native)
    assert params[1].grad is None and params[3].grad is None
    for r, p in zip(ref, params):
        if p.grad is not None:
            assert_rel_close(p.grad, r.grad, FP32_TOL, "with grad")
    adaptive_clip_grad_([], _native=native)
    adaptive_clip_grad_([params[1], params[3]], _native=native)  # none with a gradient
    adaptive_clip_grad_(torch.nn.Linear(2, 2).parameters(), _native=native)  # never had a backward
    empty = torch.empty(0, 3).requires_grad_()
    empty.grad = torch.empty(0, 3)
    adaptive_clip_grad_([empty], _native=native)


@pytest.mark.parametrize("native", IMPL_PARAMS)
def test_zero_parameters_use_eps_and_duplicates_clip_once(native):
    """A zero-initialised unit gets a gradient of norm eps * clip_factor (timm's max(||p||, eps)); a tensor given
    twice is clipped once (timm's second pass is a no-op but for rounding)."""
    p = torch.zeros(3, 4).requires_grad_()
    p.grad = torch.ones(3, 4)
    adaptive_clip_grad_([p, p], clip_factor=0.5, eps=1e-2, _native=native)
    torch.testing.assert_close(p.grad.norm(dim=1), torch.full((3,), 0.5 * 1e-2))


def test_mixed_dtypes_in_one_call():
    """fp32 and fp64 tensors in one call, grouped by (device, dtype) as torch's clip_grad_norm_ groups them."""
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(6, 4, generator=g, dtype=dt) for dt in (torch.float32, torch.float64, torch.float32)]
    grads = _random_grads(params, seed=5)
    for path, native in itertools.product(PATHS.values(), (False, True) if NATIVE else (False,)):
        _check_against_timm(params, grads, FP32_TOL, "mixed dtypes", batched=path, native=native)


def test_exported_lazily_from_the_package():
    assert nfnet_fast.adaptive_clip_grad_ is train.adaptive_clip_grad_
    assert "adaptive_clip_grad_" in dir(nfnet_fast) and "adaptive_clip_grad_" in nfnet_fast.__all__


class _Record(TorchDispatchMode):
    """Every aten op dispatched (a composite C++ op's too: CompositeImplicitAutograd dispatches what it calls)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def _launches(ops):
    """The ops that launch a kernel: views and detach launch nothing."""
    return [f for f in ops if not any(r.alias_info is not None and not r.alias_info.is_write
                                      for r in f._schema.returns)]


@pytest.mark.parametrize("native", IMPL_PARAMS)
def test_fewer_ops_than_timm(l0_params, native):
    """The point of it: on eca_nfnet_l0 the batched path dispatches under a tenth of the (kernel-launching) ops of
    timm's per-parameter loop."""
    params, grads = l0_params
    counts = {}
    for name, clip in (("timm", adaptive_clip_grad),
                       ("ours", lambda ps, c: adaptive_clip_grad_(ps, c, _batched=True, _native=native))):
        leaves = _leaves(params, grads)
        with _Record() as mode:
            clip(leaves, 0.015)
        counts[name] = len(_launches(mode.ops))
    assert counts["ours"] * 10 < counts["timm"], counts


def _odd_layouts(params, grads, seed):
    """Leaves of ``params`` whose gradients come in every layout a .grad may have: contiguous, channels_last, and
    (every third tensor of ndim >= 2) a permuted view that is neither, which AGC's rows copy and copy back."""
    out = _leaves(params, grads)
    g = torch.Generator().manual_seed(seed)
    for i, q in enumerate(out):
        if q.dim() == 4 and i % 3 == 1:
            q.grad = q.grad.contiguous(memory_format=torch.channels_last)
        elif q.dim() >= 2 and i % 3 == 2:
            dims = list(range(q.dim()))[::-1]
            q.grad = q.grad.permute(dims).contiguous().permute(dims)
        if i % 5 == 0:  # some units far above the threshold whatever the random scale
            q.grad.mul_(10 ** (3 * torch.rand((), generator=g).item()))
    return out


@needs_native
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtypes", [(torch.float32,), (torch.bfloat16,), (torch.float64,),
                                    (torch.float32, torch.bfloat16)], ids=["fp32", "bf16", "fp64", "fp32+bf16"])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1.5])
def test_native_issues_its_python_twins_ops(l0_params, path, dtypes, norm_type):
    """The C++ op (the default) and its Python twin (train._clip_group, which torch.compile traces) dispatch the
    same computing aten ops in the same order, so they give the same bits: eca_nfnet_l0's parameters, gradients in every
    layout, some tensors given twice, some without a gradient, an empty one, one or two dtypes in one call."""
    params, grads = l0_params
    params, grads = params[::2], grads[::2]  # (every ndim and most row lengths, half the time)
    results, records = {}, {}
    for native in (False, True):
        leaves = _odd_layouts(params, grads, seed=7)
        for i, q in enumerate(leaves):
            dtype = dtypes[i % len(dtypes)]
            if q.dtype != dtype:  # (the gradient keeps its layout)
                leaves[i] = q.detach().to(dtype).requires_grad_()
                leaves[i].grad = q.grad.to(dtype)
        leaves[3].grad = None
        empty = torch.zeros(0, 4, dtype=dtypes[0]).requires_grad_()
        empty.grad = torch.zeros(0, 4, dtype=dtypes[0])
        with _Record() as mode:
            adaptive_clip_grad_(leaves + [leaves[5], empty, leaves[0]], 0.015, norm_type=norm_type,
                                _batched=PATHS[path], _native=native)
        results[native], records[native] = leaves, mode.ops
    with_grad = [q.grad for q in leaves if q.grad is not None]
    assert sum(not g.is_contiguous() and not train._channels_last(g) for g in with_grad) >= 3
    assert sum(train._channels_last(g) for g in with_grad) >= 3
    assert _launches(records[True]) == _launches(records[False])  # (views may differ: they compute nothing)
    if PATHS[path]:  # (a few per row length and dtype, where timm's dispatches ten per tensor)
        assert len(_launches(records[True])) < 80 * len(dtypes)
    for i, (a, b) in enumerate(zip(results[True], results[False])):
        if b.grad is None:
            assert a.grad is None
            continue
        assert a.grad.stride() == b.grad.stride(), f"tensor {i} changed layout"
        assert torch.equal(a.grad, b.grad), f"tensor {i} {tuple(a.shape)} {a.dtype}"


@needs_native
def test_native_checks_its_arguments():
    """The op itself (torch.ops.nfnet_fast.adaptive_clip_grad_) refuses what adaptive_clip_grad_ never passes it,
    with the argument named: lists of two lengths, a gradient of another shape than its parameter, an integer
    tensor; and called directly it clips as its twin does."""
    op = torch.ops.nfnet_fast.adaptive_clip_grad_
    p, g = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(RuntimeError, match="2 parameters and 1 gradients"):
        op([p, p], [g], 0.01, 1e-3, 2.0)
    with pytest.raises(RuntimeError, match=r"gradient 1 has shape \[3, 4\] but its parameter has shape \[4, 3\]"):
        op([p, p], [g, torch.randn(3, 4)], 0.01, 1e-3, 2.0)
    with pytest.raises(RuntimeError, match="parameter 0 must be a floating-point tensor"):
        op([torch.ones(3, dtype=torch.long)], [torch.ones(3, dtype=torch.long)], 0.01, 1e-3, 2.0)
    op([], [], 0.01, 1e-3, 2.0)
    gen = torch.Generator().manual_seed(17)
    params = [torch.randn(s, generator=gen) for s in [(6, 4), (3, 2, 2), (5,)]]
    for batched in (False, True):
        grads = [g * 100 for g in _random_grads(params, seed=18)]
        twin = [g.clone() for g in grads]
        op(params, grads, 0.01, 1e-3, 2.0, batched=batched)
        train._clip_group(params, twin, 0.01, 1e-3, 2.0, batched)
        assert all(torch.equal(a, b) for a, b in zip(grads, twin))
        assert not all(torch.equal(a, b * 100) for a, b in zip(grads, _random_grads(params, seed=18)))


def test_compiled_agc_gives_the_eager_bits(monkeypatch):
    """Under torch.compile (fullgraph) AGC traces its Python twin without asking whether the extension is built
    (the first ask imports it, which dynamo cannot trace: without the extension, a failed compile); the compiled
    call clips to the same bits as the eager one (the C++ op where it is built)."""
    g = torch.Generator().manual_seed(11)
    shapes = [(8, 4, 3, 3), (8, 1, 1, 1), (8,), (6, 8), (16, 8, 1, 1)]
    params = [torch.randn(s, generator=g) for s in shapes]
    grads = _random_grads(params, seed=12)
    eager, compiled = _leaves(params, grads), _leaves(params, grads)
    adaptive_clip_grad_(eager, 0.015)
    native_agc = train._native_agc

    def asked():
        assert not torch.compiler.is_compiling(), "asked for the extension while compiling"
        return native_agc()
    monkeypatch.setattr(train, "_native_agc", asked)
    torch.compile(lambda ps: adaptive_clip_grad_(ps, 0.015), fullgraph=True, backend="eager")(compiled)
    clipped, kept = _clipped_units(grads, eager)
    assert clipped and kept
    for i, (a, b) in enumerate(zip(eager, compiled)):
        assert torch.equal(a.grad, b.grad), f"tensor {i}"


@pytest.mark.parametrize("native", IMPL_PARAMS)
def test_which_path_runs(native):
    """The default call runs the C++ op where it is built (so the twin tests above compare two things), the twin
    otherwise or when asked."""
    from torch.overrides import TorchFunctionMode

    class Calls(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    p = torch.randn(4, 3).requires_grad_()
    p.grad = torch.randn(4, 3)
    with Calls() as mode:
        adaptive_clip_grad_([p], 0.01, _native=None if native else False)
    assert any("nfnet_fast.adaptive_clip_grad_" in n for n in mode.names) == native, mode.names[:5]


@pytest.mark.parametrize("native", IMPL_PARAMS)
@pytest.mark.parametrize("path", PATHS)
def test_transposed_gradient(path, native):
    """A gradient whose rows are a view although it is neither contiguous nor channels_last (a transposed 1x1
    conv's: strides (1, C_out, ...)), alone with its row length or beside another tensor: clipped as timm clips
    it, in place (the batched path once copied it back onto itself, which _foreach_copy_ refuses)."""
    g = torch.Generator().manual_seed(13)
    params = [torch.randn(32, 16, 1, 1, generator=g), torch.randn(8, 5, generator=g), torch.randn(4, 5, generator=g)]
    grads = _random_grads(params, seed=14)
    for leaves_of in (lambda: _leaves(params, grads), lambda: _leaves(params[:1], grads[:1])):
        ref, out = leaves_of(), leaves_of()
        for q in out:
            q.grad = q.grad.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0) if q.dim() == 4 else q.grad
        assert not out[0].grad.is_contiguous() and not train._channels_last(out[0].grad)
        storage = out[0].grad.data_ptr()
        adaptive_clip_grad(ref, 0.015)
        adaptive_clip_grad_(out, 0.015, _batched=PATHS[path], _native=native)
        assert out[0].grad.data_ptr() == storage
        for i, (r, o) in enumerate(zip(ref, out)):
            assert_rel_close(o.grad, r.grad, FP32_TOL, f"tensor {i}")
    assert _clipped_units(grads[:1], ref)[0] > 0


@pytest.mark.parametrize("native", IMPL_PARAMS)
@pytest.mark.parametrize("path", PATHS)
def test_gradient_of_another_dtype(path, native):
    """A parameter whose .data changed dtype after its backward keeps a gradient of the old dtype: clipped with
    the parameter's group, as timm clips it (the C++ op once refused it)."""
    g = torch.Generator().manual_seed(15)
    params = [torch.randn(6, 4, generator=g), torch.randn(5, 3, generator=g, dtype=torch.float64)]
    grads = _random_grads(params, seed=16)
    ref, out = _leaves(params, grads), _leaves(params, grads)
    for leaves in (ref, out):
        leaves[0].data = leaves[0].data.double()
        assert leaves[0].grad.dtype == torch.float32
    adaptive_clip_grad(ref, 0.015)
    adaptive_clip_grad_(out, 0.015, _batched=PATHS[path], _native=native)
    for i, (r, o) in enumerate(zip(ref, out)):
        assert o.grad.dtype == r.grad.dtype
        assert_rel_close(o.grad, r.grad, FP32_TOL, f"tensor {i}")


# --- one training step against timm --------------------------------------------------------------------

# test_nfnet with ECA attention: timm's smallest NF model with the eca_nfnet block (every fused op), small enough
# for the Triton interpreter; eca_nfnet_l0 itself on the backends that are fast on a CPU (the interpreter takes
# about 30 s for its step).
# Each also channels_last (model and batch), as finetune and the benchmark train on a GPU: the kxk conv weights are
# then channels_last too, and their gradients must come out in that layout.
STEP_CASES = [pytest.param("test_nfnet", 48, dict(attn_layer="eca", attn_kwargs={}), b, cl,
                           id=f"test_nfnet-eca-{b}" + "-channels_last" * cl)
              for b in STEP_BACKENDS for cl in (False, True)]
STEP_CASES += [pytest.param("eca_nfnet_l0", 32, {}, b, cl, id=f"eca_nfnet_l0-{b}" + "-channels_last" * cl)
               for b in STEP_BACKENDS if b != "triton" for cl in (False, True)]


def _units(t):
    """``t``'s AGC units as float64 rows, as timm's unitwise_norm takes them: one row per output unit (dim 0) of a
    tensor of 2 or more dimensions, the whole tensor otherwise."""
    return (t.reshape(1, -1) if t.dim() <= 1 else t.reshape(t.shape[0], -1)).double()


def _train_step(model, x, y, clip):
    """One step as finetune takes it: cross-entropy, backward, AGC 0.015 on all but the classifier, SGD with
    Nesterov momentum and weight decay from timm's optimizer factory. Returns the loss, the gradients before AGC and
    the clipped ones."""
    opt = create_optimizer_v2(model, "sgd", lr=0.1, momentum=0.9, weight_decay=1e-4)
    assert all(group["nesterov"] for group in opt.param_groups)
    model.train()
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    raw = {n: p.grad.clone() for n, p in model.named_parameters()}
    head = {id(p) for p in model.get_classifier().parameters()}
    clip([p for p in model.parameters() if id(p) not in head], 0.015)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.step()
    return loss.detach(), raw, grads


@pytest.mark.parametrize("name, size, kwargs, backend, channels_last", STEP_CASES)
def test_training_step_matches_timm(name, size, kwargs, backend, channels_last):
    """Same random weights (every parameter, gains included), same batch: timm with timm's AGC against nfnet_fast
    with adaptive_clip_grad_. Loss, every gradient and every parameter after the step within 1e-4 * max|timm|
    (docs/design.md section 3). Each unit of a clipped gradient no further from timm's, in L2, than the same unit was
    before AGC (plus AGC's own fp32 rounding): AGC moves a unit that lies outside the ball of radius
    0.015 * |the parameter's unit| onto it, a projection, which never moves two points further apart in L2.
    (1e-4 * max|timm's clipped gradient| would not do: clipping can shrink a tensor's max far more than its error,
    174x for eca_nfnet_l0's final_conv at 32 px, which left the fp32 noise of a deep backward, 2e-6 of the unclipped
    max for timm itself, above that bound.)"""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    ref = randomize_(timm.create_model(name, num_classes=10, **kwargs), seed=21).to(memory_format=layout)
    fast = nfnet_fast.create_model(name, backend=backend, num_classes=10, **kwargs)
    fast.load_state_dict(ref.state_dict())
    fast.to(memory_format=layout)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, size, size, generator=g).contiguous(memory_format=layout)
    y = torch.randint(0, 10, (2,), generator=g)
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    loss_ref, raw_ref, grads_ref = _train_step(ref, x, y, adaptive_clip_grad)
    loss, raw, grads = _train_step(fast, x, y, adaptive_clip_grad_)
    assert_rel_close(loss, loss_ref, what=f"{name} {backend} loss")
    params_ref = dict(ref.named_parameters())
    for n, p in fast.named_parameters():
        assert_rel_close(raw[n], raw_ref[n], what=f"{name} {backend} grad of {n}")
        clipped_err = _units(grads[n] - grads_ref[n]).norm(dim=1)
        bound = _units(raw[n] - raw_ref[n]).norm(dim=1) + 1e-6 * _units(grads_ref[n]).norm(dim=1)
        worst = int((clipped_err - bound).argmax())
        assert (clipped_err <= bound).all(), (f"{name} {backend} clipped grad of {n}, unit {worst}: |out-ref| = "
                                              f"{clipped_err[worst]:.3e} > {bound[worst]:.3e}")
        assert_rel_close(p.detach(), params_ref[n].detach(), what=f"{name} {backend} {n} after the step")
    moved = sum(not torch.equal(params_ref[n], before[n]) for n in before)
    assert moved == len(before), "every parameter takes a step"


@pytest.mark.parametrize("backend", [b for b in STEP_BACKENDS if b != "reference"])
def test_channels_last_step_does_no_wasted_work(backend):
    """A channels_last model (how finetune and the benchmark train on a GPU), whose kxk conv weights are channels_last
    too: its forward and backward copy no conv weight and no weight gradient. (They used to copy each kxk weight
    four times a step: into a contiguous copy to standardise in the forward and again in the backward, the weight
    gradient into contiguous, and back into the weight's strides in AccumulateGrad.) And no silu_scale backward
    runs: every block's pre-activation feeds convs that send its gradient to the block input themselves, so none
    reaches it. (Autograd used to hand each block's silu_scale backward a zero gradient it made, which the backward
    copied into x's layout, ran its kernel on, and autograd added into x's gradient: ~9 activation volumes of
    memory traffic a block.)"""
    from torch.profiler import ProfilerActivity, profile

    model = nfnet_fast.create_model("test_nfnet", backend=backend, num_classes=10, attn_layer="eca", attn_kwargs={})
    randomize_(model, seed=6).train().to(memory_format=torch.channels_last)
    weights = [m.weight for m in model.modules() if isinstance(m, nfnet_fast.nn.ScaledStdConv2d)]
    assert sum(not w.is_contiguous() for w in weights) >= 4  # (the kxk ones; a 1x1 weight is both layouts)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 48, 48, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (2,), generator=g)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        F.cross_entropy(model(x), y).backward()
    copies = {tuple(w.shape): weight_copies(prof, w.shape) for w in weights}
    assert not any(copies.values()), f"weight-shaped copies: {copies}"
    assert not [e.name for e in prof.events() if "silu_scale_backward" in e.name]
    # (AccumulateGrad's layout contract: the weight's strides, those of size-1 dimensions aside)
    assert all(a == b for w in weights for a, b, n in zip(w.grad.stride(), w.stride(), w.shape) if n > 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["timm"] + [b for b in _backends.NAMES if b != "reference"])
def test_cuda_graphed_training_step_matches_eager(backend, dtype):
    """benchmark.graph_for_training (the training benchmark's "cudagraph" rows): three steps of
    benchmark.train_step, new data each, replaying the captured forward and backward, against the same
    steps run eagerly: every loss and every parameter after each step within the fp32 contract (bf16:
    the same kernels under autocast, so within a few bf16 roundings)."""
    from nfnet_fast.benchmark import graph_for_training, train_step
    ref = randomize_(timm.create_model("eca_nfnet_l0", num_classes=10), seed=31)  # (TF32 off: conftest)
    models = []
    for _ in range(2):
        model = timm.create_model("eca_nfnet_l0", num_classes=10)
        model.load_state_dict(ref.state_dict())
        if backend != "timm":
            nfnet_fast.convert(model, backend=backend)
        models.append(model.cuda().train().to(memory_format=torch.channels_last))
    g = torch.Generator(device="cuda").manual_seed(3)
    batches = [(torch.randn(4, 3, 96, 96, device="cuda", generator=g).contiguous(memory_format=torch.channels_last),
                torch.randint(0, 10, (4,), device="cuda", generator=g)) for _ in range(3)]
    eager, graphed = models
    graph_for_training(graphed, batches[0][0].clone(), dtype)
    assert "forward" in vars(graphed), "make_graphed_callables did not replace the forward"
    tol = 1e-4 if dtype == "fp32" else 2e-2
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    for i, (x, y) in enumerate(batches):
        loss_eager = train_step(eager, opts[0], x, y, dtype)
        loss_graphed = train_step(graphed, opts[1], x, y, dtype)
        assert_rel_close(loss_graphed, loss_eager, tol, f"{backend} {dtype} step {i} loss")
        params = dict(eager.named_parameters())
        for n, p in graphed.named_parameters():
            assert_rel_close(p.detach(), params[n].detach(), tol, f"{backend} {dtype} step {i}: {n}")


def test_training_step_clips_some_units_and_not_others():
    """The step above exercises both branches of AGC: timm's clipping changes some units' gradients, not all."""
    model = randomize_(timm.create_model("test_nfnet", num_classes=10, attn_layer="eca", attn_kwargs={}), seed=21)
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(2, 3, 48, 48, generator=g), torch.randint(0, 10, (2,), generator=g)
    F.cross_entropy(model(x), y).backward()
    head = {id(p) for p in model.get_classifier().parameters()}
    params = [p for p in model.parameters() if id(p) not in head]
    before = [p.grad.clone() for p in params]
    adaptive_clip_grad(params, 0.015)
    clipped, kept = _clipped_units(before, params)
    assert clipped > 0 and kept > 0, (clipped, kept)


def test_benchmark_step_clips_each_model_with_its_librarys_agc(monkeypatch):
    """nfnet_fast.benchmark.train_step (the training benchmark's and peak_memory's step) clips a model nfnet_fast
    converted with adaptive_clip_grad_ and a timm model (eager or compiled) with timm's, each on all but the
    classifier."""
    from nfnet_fast import benchmark as B

    calls = []
    monkeypatch.setattr(B, "adaptive_clip_grad", lambda ps, clip_factor: calls.append(("timm", len(ps))))
    monkeypatch.setattr(B, "adaptive_clip_grad_", lambda ps, clip_factor: calls.append(("nfnet_fast", len(ps))))
    ref = timm.create_model("test_nfnet", num_classes=10, attn_layer="eca", attn_kwargs={})
    fast = nfnet_fast.convert(timm.create_model("test_nfnet", num_classes=10, attn_layer="eca", attn_kwargs={}),
                              backend="reference")
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    trunk = len([n for n, _ in ref.named_parameters() if not n.startswith("head.fc")])
    assert 0 < trunk < len(list(ref.parameters()))
    for model in (ref, fast, torch.compile(ref, backend="eager")):  # (compiled: "_orig_mod." names)
        B.train_step(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), x, y, "fp32")
    assert calls == [("timm", trunk), ("nfnet_fast", trunk), ("timm", trunk)]
    assert not B.is_converted(torch.compile(ref)) and B.is_converted(torch.compile(fast))
