"""Recorded op bodies replayed (nfnet_fast._replay, csrc/replay.cpp), against the bodies themselves, bit for bit.

Without a GPU the interpreter runs the kernels, whose launches have no binary: a stand-in (``_binary_by_rule``)
gives each launch the parameter kinds Triton's specialisation gives it, and the native replayer's launches
call a hook (``_replay_launch_hook``, implemented below) instead of the driver. The hook checks the parameter
bits C++ packed against the record's values, then runs the launch in the interpreter with the tensors C++
handed it. So everything native but cuLaunchKernel runs: the records' encoding, the aten ops through the
dispatcher, the tensor slots, the packing.
"""
import inspect
import struct

import pytest
import torch

import nfnet_fast
from nfnet_fast import _replay, kernels, ops

try:
    from nfnet_fast import _C
except ImportError:
    _C = None

pytestmark = pytest.mark.skipif(not hasattr(_C, "_replay_register"), reason="the extension is not built")

# the hook's calls: (kernel name, mismatches between the packed bits and the record's values)
HOOKED = []


def _params(kernel):
    """(name, is_constexpr, do_not_specialize) of each parameter of an interpreted kernel."""
    import triton

    fn = kernel.fn
    no_spec = set(getattr(kernel, "kwargs", {}).get("do_not_specialize", ()) or ())
    out = []
    for i, p in enumerate(inspect.signature(fn).parameters.values()):
        constexpr = p.annotation is triton.language.constexpr or p.annotation == "tl.constexpr"
        out.append((p.name, constexpr, p.name in no_spec or i in no_spec))
    return out


def _kind(value, constexpr, no_specialize):
    """What Triton's specialisation makes of a launch argument (tests/native_launch_check.py checks real binaries)."""
    if constexpr or value is None:
        return "-"
    if isinstance(value, (torch.Tensor, _replay._Tensor)):
        return "p"
    if type(value) is bool:
        return "b"
    if type(value) is float:
        return "f"
    if type(value) is int:
        if value == 1 and not no_specialize:
            return "-"
        return "i" if -2 ** 31 <= value < 2 ** 31 else "u" if value >= 2 ** 63 else "l"
    raise TypeError(type(value))


def _binary_by_rule(kernel, compiled, args, kwargs):
    params = _params(kernel)
    values = list(args) + [kwargs.get(name) for name, _, _ in params[len(args):]]
    slots = "".join(_kind(v, c, n) for v, (_, c, n) in zip(values, params))
    return [name for name, _, _ in params], slots, 0x1000 + id(kernel) % 4096 * 16, 4, 0


def _bits(kind, value):
    if kind == "p":
        return 0 if value is None else value.data_ptr()
    if kind == "f":
        return struct.unpack("<I", struct.pack("<f", value))[0]
    if kind == "i":
        return struct.unpack("<I", struct.pack("<i", value))[0]
    if kind == "b":
        return int(bool(value))
    return value & (2 ** 64 - 1)


def _hook(record, step, tensors, params):
    rec = _replay._native_records[record]
    _, kernel, grid, args, kwargs, aligned, device, compiled = rec.steps[step]
    names, slots, *_ = _binary_by_rule(kernel, compiled, args, kwargs)
    given = iter(tensors)
    filled = [next(given) if type(a) is _replay._Tensor else a for a in args]
    assert next(given, None) is None, "more tensors than the launch's pointers"
    values = filled + [kwargs.get(n) for n in names[len(filled):]]
    expected = [_bits(k, v) for k, v in zip(slots, values) if k != "-"] + [0, 0]
    got = [p & (2 ** 64 - 1) for p in params]
    HOOKED.append((kernel.__name__, got != expected))
    kernel[grid](*filled, **kwargs)  # (not through kernels.launch: a test counts the launches that go there)


_lib = None


@pytest.fixture
def native_replay(monkeypatch):
    """Replay on, natively, with the hook for launches; every record forgotten before and after."""
    global _lib
    if _lib is None:
        _lib = torch.library.Library("nfnet_fast", "IMPL")
        _lib.impl("_replay_launch_hook", _hook, "CompositeExplicitAutograd")
    monkeypatch.setattr(_replay, "_binary", _binary_by_rule)
    monkeypatch.setattr(_replay, "ENABLED", True)
    _replay.clear()
    _C._replay_hook(True)
    HOOKED.clear()
    yield
    _C._replay_hook(False)
    _replay.clear()


def _conv_inputs(gen, cin, cout, k, channels_last, dtype, gain):
    x = torch.randn(2, cin, 9, 7, generator=gen).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, k, k, generator=gen) * 0.3
    b = torch.randn(cout, generator=gen)
    g = torch.randn(cout, 1, 1, 1, generator=gen) if gain else None
    return [t.requires_grad_() if t is not None else None for t in (x, w, b, g)]


def _conv_step(x, w, b, g, k, act, want_sums):
    out = ops.fused_conv(x, w, b, stride=1, padding=k // 2, groups=1, act=act, act_gain=1.3, want_sums=want_sums,
                         gain=g, std_scale=0.7, std_eps=1e-4, backend="triton")
    out, sums = out if want_sums else (out, None)
    loss = (out.float() * torch.linspace(-1, 1, out.shape[1])[:, None, None]).sum()
    if sums is not None:
        loss = loss + sums.square().sum()
    loss.backward()
    return [out, sums] + [t.grad for t in (x, w, b, g) if t is not None]


@pytest.mark.parametrize("k,act,want_sums,gain,channels_last", [
    (3, "silu", True, True, True), (1, None, False, True, False), (3, "gelu", False, False, True),
    (1, "relu", True, False, True)])
def test_fused_conv_replays_natively_to_the_bodies_bits(native_replay, k, act, want_sums, gain, channels_last):
    gen = torch.Generator().manual_seed(k * 7 + want_sums + 2 * gain)
    for call in range(5):
        inputs = _conv_inputs(gen, 16, 32, k, channels_last, torch.float32, gain)
        replayed = _conv_step(*inputs, k, act, want_sums)
        _replay.ENABLED = False
        expected = _conv_step(*[t.detach().clone().requires_grad_() if t is not None else None for t in inputs],
                              k, act, want_sums)
        _replay.ENABLED = True
        for got, want in zip(replayed, expected):
            assert (got is None) == (want is None)
            if got is not None:
                assert got.shape == want.shape and got.stride() == want.stride() and got.dtype == want.dtype
                assert torch.equal(got, want), call
    for op in ("nfnet_fast::triton_fused_conv", "nfnet_fast::_triton_fused_conv_backward"):
        assert _replay.status(op) == {"replayed": 1, "refused": 0, "recording": 0}, op
        assert _replay.records(op)[0].native is not None
    assert HOOKED and not any(bad for _, bad in HOOKED), HOOKED


def _narrow_model(backend, channels_last):
    import dataclasses

    import timm.models.nfnet as timm_nfnet

    from nfnet_fast.benchmark import random_weights_

    torch.manual_seed(0)
    narrow = dataclasses.replace(timm_nfnet.model_cfgs["eca_nfnet_l0"], channels=(16, 32, 48, 64), stem_chs=8,
                                 group_size=8, num_features=96, depths=(1, 1, 2, 1))
    model = nfnet_fast.convert(random_weights_(timm_nfnet.NormFreeNet(narrow, num_classes=5)), backend=backend)
    return model.train().to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [True, False])
def test_training_steps_replay_natively_to_the_bodies_bits(native_replay, channels_last):
    """Every op of a narrow NF model's training step (the forward's standardised-ahead operands included) is
    replayed natively from its third call on, and each step's loss and gradients are the bodies' bits."""
    model = _narrow_model("triton", channels_last)
    gen = torch.Generator().manual_seed(1)

    def step(x, y):
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return [loss] + [p.grad for p in model.parameters()]

    import threading

    def through_python(kernel, grid, args, kwargs):  # (a launch the bodies' Python made: no replay)
        direct.append(kernel.__name__)
        return kernel[grid](*args, **kwargs)

    for call in range(4):
        x, y = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 5, (2,), generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        HOOKED.clear()
        direct = []
        if call == 3:  # (every signature recorded twice by now: the whole step replays)
            kernels.RECORDERS[threading.get_ident()] = through_python
        try:
            replayed = step(x, y)
        finally:
            kernels.RECORDERS.pop(threading.get_ident(), None)
        if call == 3:  # (the weights standardised ahead: one call from the model's forward, not an op body)
            assert set(direct) == {"_std_fwd_many_kernel"} and len(HOOKED) > 50, (direct, len(HOOKED))
        _replay.ENABLED = False
        expected = step(x, y)
        _replay.ENABLED = True
        assert all(torch.equal(a, b) for a, b in zip(replayed, expected)), call
    names = [n for n in _replay._tables]
    assert {"nfnet_fast::triton_fused_conv", "nfnet_fast::_triton_fused_conv_backward",
            "nfnet_fast::triton_eca_residual", "nfnet_fast::_triton_eca_residual_backward"} <= set(names)
    for name in names:
        st = _replay.status(name)
        assert st["refused"] == 0 and st["recording"] == 0 and st["replayed"] > 0, (name, st)
    assert not any(bad for _, bad in HOOKED)  # (the packed bits of the last step's launches)
