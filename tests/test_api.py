"""Public API surface: backends(), the nn modules' timm constructors, unavailable-backend errors."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import EcaModule as TimmEca
from timm.layers import ScaledStdConv2d as TimmStdConv
from timm.layers import ScaledStdConv2dSame as TimmStdConvSame

import nfnet_fast
from conftest import assert_rel_close
from nfnet_fast import _backends, ops
from nfnet_fast import nn as fnn


def test_backends_report():
    info = nfnet_fast.backends()
    assert list(info) == ["reference", "triton", "cuda"]
    assert info["reference"].available and "cpu" in info["reference"].devices
    for b in info.values():
        assert isinstance(b, nfnet_fast.BackendInfo)
        assert b.available == bool(b.devices)
        if not b.available:
            assert b.reason, f"{b.name} is unavailable without a reason"
    if not torch.cuda.is_available():
        assert "cuda" not in info["triton"].devices and "cuda" not in info["cuda"].devices


def test_unavailable_backend_is_a_clear_error(monkeypatch):
    down = _backends.BackendInfo("cuda", False, (), "nfnet_fast._C is not built (test)")
    real = _backends.backends()
    monkeypatch.setattr(_backends, "backends", lambda: {**real, "cuda": down})
    monkeypatch.setattr(ops, "_resolved", {})
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run silu_scale on cpu tensors here: .*not built"):
        ops.silu_scale(torch.ones(3), 1.0, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='cuda' is not available here"):
        nfnet_fast.create_model("test_nfnet", backend="cuda")
    assert ops.resolve_backend("auto", "cpu") == "reference"


@pytest.mark.parametrize("cls, timm_cls, kwargs", [
    (fnn.ScaledStdConv2d, TimmStdConv, dict(stride=2, groups=2, gamma=1.7, eps=1e-5)),
    (fnn.ScaledStdConv2dSame, TimmStdConvSame, dict(stride=2, gamma=1.7, eps=1e-5)),
])
def test_conv_modules_take_timm_args(cls, timm_cls, kwargs):
    torch.manual_seed(0)
    ref = timm_cls(8, 12, 3, **kwargs)
    torch.manual_seed(0)
    fast = cls(8, 12, 3, **kwargs, backend="reference")
    with torch.no_grad():
        ref.gain.uniform_(0.5, 1.5)
        fast.gain.copy_(ref.gain)
    assert isinstance(fast, timm_cls)
    x = torch.randn(2, 8, 11, 9)
    assert_rel_close(fast(x), ref(x), 1e-5)
    with torch.no_grad():
        fast.eval()
        assert_rel_close(fast(x), ref(x), 1e-5)
        assert fast.standardized_weight() is fast.standardized_weight(), "eval weights are cached"


def test_eca_module_and_from_timm():
    ref = TimmEca(96)
    with torch.no_grad():
        ref.conv.weight.normal_()
    fast = fnn.EcaModule(96)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 96, 5, 5)
    assert_rel_close(fast(x), ref(x), 1e-6)
    mlp = TimmEca(96, use_mlp=True)
    assert not fnn.EcaModule.can_convert(mlp)
    with pytest.raises(TypeError, match="cannot convert"):
        fnn.EcaModule.from_timm(mlp)
    with pytest.raises(TypeError, match="cannot convert"):
        fnn.ScaledStdConv2d.from_timm(torch.nn.Conv2d(2, 2, 1))


def test_block_constructor_matches_timm():
    from timm.models.nfnet import NormFreeBlock as TimmBlock
    args = dict(in_chs=32, out_chs=64, stride=2, alpha=0.2, beta=0.8, group_size=16, ch_div=8, reg=False,
                extra_conv=True, attn_layer=lambda c, **dd: TimmEca(c, **dd), act_layer=torch.nn.SiLU,
                conv_layer=lambda *a, **k: TimmStdConv(*a, gamma=1.78, eps=1e-5, **k))
    torch.manual_seed(0)
    ref = TimmBlock(**args)
    fast = fnn.NormFreeBlock(**args)
    nfnet_fast.convert(fast)
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
        fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 32, 9, 9)
    assert_rel_close(fast(x), ref(x))
    out, a_next = fast.forward_fused(x, beta_next=0.9)
    assert_rel_close(out, ref(x))
    assert_rel_close(a_next, F.silu(ref(x)) * 0.9)


def test_import_without_extension():
    """`import nfnet_fast` never fails because nfnet_fast._C is missing; backends() says why."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['nfnet_fast._C'] = None\n"
            "import torch, nfnet_fast\n"
            "b = nfnet_fast.backends()['cuda']\n"
            "assert not b.available and 'not built' in b.reason, b\n"
            "m = nfnet_fast.create_model('test_nfnet').eval()\n"
            "print(m(torch.randn(1, 3, 32, 32)).shape)\n"
            "try:\n    nfnet_fast.ops.silu_scale(torch.ones(2), 1.0, backend='cuda')\n"
            "except RuntimeError as e:\n    print('error:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([1, 1000])" in out.stdout
    assert "backend='cuda' cannot run silu_scale on cpu tensors here: nfnet_fast._C is not built" in out.stdout


def test_extension_built_from_other_sources_is_refused(tmp_path, monkeypatch):
    """An nfnet_fast._C built from other C++ sources than the checkout's csrc/ (a pull or an edit without a
    rebuild, a prebuilt _C.so carried from another commit) could register ops of other schemas or semantics: it
    is refused, with a line that says to rebuild; one built from them, or with no csrc/ to compare with (an
    installed wheel), loads. Where the build was required (CI: NFNET_FAST_REQUIRE_CUDA=1) the extension here is
    the checkout's, so that test_cuda_ext cannot skip for a digest that the build got wrong."""
    import importlib.util
    import os
    import shutil
    import types
    import warnings

    from nfnet_fast import _sources

    copy = tmp_path / "csrc"
    shutil.copytree(_sources.CHECKOUT_CSRC, copy)
    here = _sources.digest()
    assert here is not None and len(here) == 16 and _sources.digest(str(copy)) == here
    for name in ("module.cpp~", ".module.cpp.swp", "notes.txt"):  # (an editor's files are not sources)
        (copy / name).write_text("x")
    assert _sources.digest(str(copy)) == here
    assert _sources.mismatch(types.SimpleNamespace(SOURCES_DIGEST=here), str(copy)) == ""
    names = sorted(p.name for p in copy.iterdir() if p.name.endswith(_sources.SOURCE_SUFFIXES))
    edited = copy / names[len(names) // 2]
    edited.write_bytes(edited.read_bytes() + b" ")
    assert _sources.digest(str(copy)) != here
    why = _sources.mismatch(types.SimpleNamespace(SOURCES_DIGEST=here), str(copy))
    assert f"built from {here}" in why and "rebuild it with `pip install --no-build-isolation -e .`" in why, why
    assert "built from None" in _sources.mismatch(types.SimpleNamespace(), str(copy))
    edited.rename(copy / "renamed.h")  # (a file's name counts too)
    assert _sources.digest(str(copy)) not in (here, None)
    (copy / "module.cpp").unlink()
    assert _sources.digest(str(copy)) is None and _sources.mismatch(types.SimpleNamespace(), str(copy)) == ""

    if importlib.util.find_spec("nfnet_fast._C") is None:
        return
    from nfnet_fast import _C
    assert _C.SOURCES_DIGEST == here
    extension, why = _backends._load_extension.__wrapped__()
    assert extension is _C and why == ""
    if os.environ.get("NFNET_FAST_REQUIRE_CUDA") == "1":
        assert nfnet_fast.backends()["cuda"].available, nfnet_fast.backends()["cuda"].reason
    monkeypatch.setattr(_sources, "digest", lambda csrc=None: "0" * 16)
    with pytest.warns(RuntimeWarning, match="the cuda backend is off until then"):  # (not silently off)
        extension, why = _backends._load_extension.__wrapped__()
    assert extension is None and f"built from {here}" in why and "rebuild" in why, why
    # nor do Triton's native launches use it (they take the extension from the registry too)
    from nfnet_fast import kernels
    monkeypatch.setattr(_backends, "extension", lambda: _backends._load_extension.__wrapped__()[0])
    warnings.simplefilter("ignore", RuntimeWarning)  # (the refusal's warning, checked above; pytest restores)
    monkeypatch.setattr(kernels, "_native", None)
    assert kernels._native_module() is False


def test_every_available_backend_implements_every_op():
    """A backend that runs here runs every op (no silent fallback to another backend)."""
    for name, info in nfnet_fast.backends().items():
        for device in info.devices:
            for op in ("scaled_std_weight", "eca", "eca_residual", "silu_scale"):
                assert ops.resolve_backend(name, device, op) == name


def _compiled_prefixes():
    """The op-name prefixes of the compiled backends loaded here (nfnet_fast/_library.py)."""
    return [p for b, p in (("cuda", ""), ("triton", "triton_")) if _backends.op_function(b, "eca") is not None]


@pytest.mark.parametrize("prefix", _compiled_prefixes())
def test_fake_kernels_check_their_arguments(prefix):
    """The fake kernels (what torch.compile and meta tensors run) refuse a wrong call where it is
    made, naming the argument, instead of passing it on to a real kernel."""
    lib = torch.ops.nfnet_fast
    m = dict(device="meta")
    y, w = torch.empty(2, 8, 4, 4, **m), torch.empty(5, **m)
    eca, eca_backward = getattr(lib, prefix + "eca_residual"), getattr(lib, f"_{prefix}eca_residual_backward")
    with pytest.raises(RuntimeError, match="shortcut shape"):
        eca(y, w, torch.empty(2, 4, 4, 4, **m), 1.0, None)
    with pytest.raises(RuntimeError, match="shortcut dtype"):
        eca(y, w, torch.empty(2, 8, 4, 4, dtype=torch.float16, **m), 1.0, None)
    with pytest.raises(RuntimeError, match="odd number of taps"):
        eca(y, torch.empty(4, **m), None, 1.0, None)
    with pytest.raises(RuntimeError, match="beta_next needs a shortcut"):
        eca(y, w, None, 1.0, 0.5)
    stats = eca(y, w, y, 1.0, 0.5)[2]
    with pytest.raises(RuntimeError, match="grad_a_next shape"):
        eca_backward(y, y[:1], y, w, y, stats, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="needs grad_x_next or grad_a_next"):
        eca_backward(None, None, y, w, y, stats, 1.0, 0.5)
    with pytest.raises(RuntimeError, match="gain must have one value per output channel"):
        getattr(lib, prefix + "scaled_std_weight")(torch.empty(4, 3, 3, 3, **m), torch.empty(3, **m), 1.0, 1e-5)
    with pytest.raises(RuntimeError, match="grad_out shape"):
        getattr(lib, f"_{prefix}silu_scale_backward")(torch.empty(3, **m), torch.empty(4, **m), 1.0)
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        getattr(lib, prefix + "silu_scale")(torch.empty(4, dtype=torch.int64, **m), 1.0)


@pytest.mark.parametrize("backend", ["reference"] + [b for b in ("triton", "cuda") if _backends.op_function(b, "eca")])
def test_gradients_only_where_asked(backend, rng):
    """Each backward returns a gradient for exactly the inputs that need one."""
    y, shortcut = torch.randn(2, 6, 3, 3, generator=rng), torch.randn(2, 6, 3, 3, generator=rng)
    weight = torch.randn(5, generator=rng)
    for wanted in ({"y"}, {"weight"}, {"shortcut"}, {"y", "shortcut"}):
        leaves = {n: t.clone().requires_grad_(n in wanted) for n, t in
                  (("y", y), ("weight", weight), ("shortcut", shortcut))}
        x_next, a_next = ops.eca_residual(leaves["y"], leaves["weight"], leaves["shortcut"], 0.2, 2.0, 0.9,
                                          backend=backend)
        (x_next.sum() + a_next.sum()).backward()
        assert {n for n, t in leaves.items() if t.grad is not None} == wanted, (backend, wanted)
    w, gain = torch.randn(6, 3, 3, 3, generator=rng), torch.randn(6, 1, 1, 1, generator=rng).requires_grad_()
    ops.scaled_std_weight(w, gain, 0.3, 1e-5, backend=backend).sum().backward()
    assert gain.grad is not None and w.grad is None
