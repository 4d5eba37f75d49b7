"""Every tool that works on a timm NF model works on the converted model, on every backend that
runs here: forward-mode AD, torch.func, torch.export, ONNX, torch.fx, timm's feature extraction;
torch.jit.script is refused with one clear line. Distributed training is in test_distributed.py."""
import copy
import subprocess
import sys
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F

import nfnet_fast
from conftest import assert_rel_close, cpu_backends, randomize_
from nfnet_fast import _backends, ops
from nfnet_fast import _reference as ref_ops

# torch's own forward-mode decompositions script a helper on first use, and torch.jit.script now
# warns that it is deprecated: torch's business, not this project's (nfnet_fast never scripts)
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.script` is deprecated:FutureWarning")

MODEL_BACKENDS = [b for b in _backends.NAMES if all(b in cpu_backends(op) for op in _backends.OPS)]


def _pair(backend, name="test_nfnet", seed=0, **kwargs):
    ref = randomize_(timm.create_model(name, **kwargs), seed).eval()
    return ref, nfnet_fast.convert(copy.deepcopy(ref), backend=backend).eval()


def _x(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- forward-mode AD: the right tangent on every backend, never a silent zero -------------------

def _op_cases():
    """(name, function of tensors, primals) for every op; the compiled backends define no jvp rule,
    so ops.py routes dual and functorch tensors to the reference math."""
    y, sc, w = _x(2, 12, 5, 3, seed=1), _x(2, 12, 5, 3, seed=2), _x(1, 1, 5, seed=3)
    wt, g = _x(6, 4, 3, 3, seed=4), 1 + 0.3 * _x(6, 1, 1, 1, seed=5)
    return [
        ("silu_scale", lambda b: lambda x: ops.silu_scale(x, 0.7, backend=b), (y,)),
        ("eca", lambda b: lambda x, w: ops.eca(x, w, 1.3, backend=b), (y, w)),
        ("eca_residual", lambda b: lambda y, w, s: ops.eca_residual(y, w, s, 0.2, 2.0, backend=b), (y, w, sc)),
        ("eca_residual_next", lambda b: lambda y, w, s: ops.eca_residual(y, w, s, 0.2, 2.0, 0.9, backend=b),
         (y, w, sc)),
        ("scaled_std_weight", lambda b: lambda w, g: ops.scaled_std_weight(w, g, 0.3, 1e-5, backend=b), (wt, g)),
    ]


def _float64_math(name):
    """The op's math in float64 (the reference backend computes in fp32 whatever the input)."""
    def eca_gate(x, w):
        return torch.sigmoid(F.conv1d(x.mean((2, 3)).unsqueeze(1), w.reshape(1, 1, -1), padding=2).squeeze(1))

    def residual(y, w, s):
        return y * eca_gate(y, w)[:, :, None, None] * 0.4 + s

    return {
        "silu_scale": lambda x: F.silu(x) * 0.7,
        "eca": lambda x, w: x * eca_gate(x, w)[:, :, None, None] * 1.3,
        "eca_residual": residual,
        "eca_residual_next": lambda y, w, s: (residual(y, w, s), F.silu(residual(y, w, s)) * 0.9),
        "scaled_std_weight": lambda w, g: (w - w.mean((1, 2, 3), keepdim=True)) / torch.sqrt(
            w.var((1, 2, 3), unbiased=False, keepdim=True) + 1e-5) * g * 0.3,
    }[name]


@pytest.mark.parametrize("case", range(5), ids=[c[0] for c in _op_cases()])
@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_jvp_of_every_op(backend, case):
    name, make, primals = _op_cases()[case]
    tangents = tuple(_x(*p.shape, seed=10 + i) for i, p in enumerate(primals))
    expect = torch.func.jvp(_float64_math(name), tuple(p.double() for p in primals),
                            tuple(t.double() for t in tangents))[1]
    expect = expect if isinstance(expect, tuple) else (expect,)
    # torch.func.jvp (functorch) and torch.autograd.forward_ad (dual tensors) both
    _, tangent_out = torch.func.jvp(make(backend), primals, tangents)
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        out = make(backend)(*duals)
        dual_tangent = [torch.autograd.forward_ad.unpack_dual(o).tangent
                        for o in (out if isinstance(out, tuple) else (out,))]
    for got in ((tangent_out if isinstance(tangent_out, tuple) else (tangent_out,)), dual_tangent):
        for g, e in zip(got, expect):
            assert g is not None and g.abs().max() > 0
            assert_rel_close(g, e, 1e-5, f"{backend} {name} tangent")


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_jvp_of_a_whole_model_against_timm(backend):
    ref, fast = _pair(backend, seed=1)
    x, t = _x(1, 3, 32, 32, seed=1), _x(1, 3, 32, 32, seed=2)
    _, expect = torch.func.jvp(ref, (x,), (t,))
    out, tangent = torch.func.jvp(fast, (x,), (t,))
    assert_rel_close(out, ref(x), what=f"{backend} jvp primal")
    assert_rel_close(tangent, expect, what=f"{backend} jvp tangent")


# --- torch.func: grad, vjp, jacrev, vmap over a model ------------------------------------------

@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_torch_func_transforms_against_timm(backend):
    ref, fast = _pair(backend, seed=2, num_classes=3)
    x, target = _x(2, 3, 32, 32, seed=3), torch.tensor([0, 2])

    def loss(model):
        return lambda params, x: F.cross_entropy(torch.func.functional_call(model, params, (x,)), target)

    params = {n: p.detach() for n, p in ref.named_parameters()}
    expect = torch.func.grad(loss(ref))(params, x)
    got = torch.func.grad(loss(fast))({n: p.detach() for n, p in fast.named_parameters()}, x)
    for n in expect:
        assert_rel_close(got[n], expect[n], what=f"{backend} torch.func.grad {n}")

    _, pull_ref = torch.func.vjp(ref, x)
    out, pull = torch.func.vjp(fast, x)
    cot = _x(*out.shape, seed=4)
    assert_rel_close(pull(cot)[0], pull_ref(cot)[0], what=f"{backend} vjp")

    xs = _x(1, 3, 16, 16, seed=5)
    assert_rel_close(torch.func.jacrev(fast)(xs), torch.func.jacrev(ref)(xs), what=f"{backend} jacrev")

    batch = _x(3, 2, 3, 16, 16, seed=6)  # vmap over a leading dimension of 3 batches of 2
    assert_rel_close(torch.func.vmap(fast)(batch), torch.func.vmap(ref)(batch), what=f"{backend} vmap")


# --- export: torch.export, ONNX (both exporters), save/load ------------------------------------

def _nfnet_nodes(graph):
    return [n for n in graph.nodes if "nfnet_fast" in str(n.target)]


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_records_reference_math(backend, strict, tmp_path):
    """The exported program holds plain aten ops (ops.py routes exporting to the reference math), so
    torch.export.load needs no nfnet_fast: shown in a fresh interpreter that never imports it."""
    ref, fast = _pair(backend, seed=3)
    x = _x(2, 3, 32, 32, seed=7)
    batch = torch.export.Dim("batch", min=1, max=16)
    ep = torch.export.export(fast, (x,), dynamic_shapes=({0: batch},), strict=strict)
    assert _nfnet_nodes(ep.graph) == []
    assert_rel_close(ep.module()(x), ref(x), what=f"{backend} export")
    x3 = _x(3, 3, 32, 32, seed=8)
    assert_rel_close(ep.module()(x3), ref(x3), what=f"{backend} export, another batch size")
    path = tmp_path / "m.pt2"
    torch.export.save(ep, path)
    torch.save((x3, ref(x3)), tmp_path / "io.pt")
    code = ("import sys, torch\n"
            f"ep = torch.export.load({str(path)!r}); x, expect = torch.load({str(tmp_path / 'io.pt')!r})\n"
            "err = ((ep.module()(x) - expect).abs().max() / expect.abs().max()).item()\n"
            "assert 'nfnet_fast' not in sys.modules, 'loading imported nfnet_fast'\n"
            "print(err)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert float(run.stdout.split()[-1]) <= 1e-4


@pytest.mark.parametrize("backend", MODEL_BACKENDS)
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_onnx_export_runs_in_onnxruntime(backend, dynamo, tmp_path):
    import onnxruntime  # installed by make setup (pyproject's test extra)
    ref, fast = _pair(backend, seed=4)
    x = _x(2, 3, 32, 32, seed=9)
    path = str(tmp_path / "m.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes
        torch.onnx.export(fast, (x,), path, dynamo=dynamo, **({} if dynamo else dict(opset_version=17)))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert_rel_close(torch.from_numpy(out), ref(x).detach(), what=f"{backend} onnx dynamo={dynamo}")


# --- torch.fx and timm's feature extraction ------------------------------------------------------

@pytest.mark.parametrize("backend", MODEL_BACKENDS)
def test_fx_symbolic_trace_and_feature_extractor(backend):
    """The ops are torch.fx leaf functions (nfnet_fast/nn.py), so the modules trace."""
    from timm.models import create_feature_extractor

    ref, fast = _pair(backend, seed=5)
    x = _x(2, 3, 32, 32, seed=10)
    gm = torch.fx.symbolic_trace(fast)
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert {n.target.__name__ for n in calls} >= {"_fused_conv", "_silu_scale"}
    # each conv one leaf node that standardises its weight itself (gain among its arguments)
    convs = [n for n in calls if n.target.__name__ == "_fused_conv"]
    assert len(convs) == sum(isinstance(m, timm.layers.ScaledStdConv2d) for m in fast.modules())
    assert all(len(n.args) > 13 and n.args[13] is not None for n in convs)
    assert_rel_close(gm(x), ref(x), what=f"{backend} fx")
    nodes = ["stages.1", "final_conv", "head.fc"]
    got = create_feature_extractor(fast, return_nodes=nodes)(x)
    expect = create_feature_extractor(ref, return_nodes=nodes)(x)
    for n in nodes:
        assert_rel_close(got[n], expect[n], what=f"{backend} feature {n}")


def test_jit_script_is_refused_with_one_clear_line():
    _, fast = _pair("reference")
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script.*use torch.compile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(fast)


def test_reference_math_runs_in_the_exported_program_only_when_exporting(monkeypatch):
    """Outside export/tracing/functorch the compiled backends run (the routing costs no speed)."""
    if "cuda" not in cpu_backends("silu_scale"):
        pytest.skip("the cuda backend's CPU twins are not built here")
    calls = []
    monkeypatch.setitem(_backends._tables["reference"], "silu_scale",
                        lambda *a: calls.append(1) or ref_ops.silu_scale(*a))
    ops._resolved.clear()
    try:
        x = _x(2, 3)
        ops.silu_scale(x, 0.5, backend="cuda")
        assert calls == []
        torch.func.jvp(lambda t: ops.silu_scale(t, 0.5, backend="cuda"), (x,), (x,))
        assert calls == [1]
    finally:
        ops._resolved.clear()
