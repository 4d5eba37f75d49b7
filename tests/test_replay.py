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

_C = nfnet_fast._backends.extension()  # (None where not built, or built from other sources than csrc/)

pytestmark = pytest.mark.skipif(not hasattr(_C, "_replay_register"),
                                reason=f"the extension is not available: {nfnet_fast.backends()['cuda'].reason}")

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


def _calls(name, body, make_args, n=6):
    """``n`` calls of ``body`` through the replay, each against the body itself on the same arguments."""
    for _ in range(n):
        args = make_args()
        got = _replay.call(name, body, args)
        want = body(*args)
        assert type(got) is type(want) and torch.equal(got, want)


def test_a_body_that_reads_values_or_outside_tensors_runs_as_it_is(native_replay):
    """A record is refused where the body's work depends on a tensor's values (item) or reads a tensor the
    record cannot name (a cached constant): the body runs on every call, with its own result."""
    gen = torch.Generator().manual_seed(3)
    constant = torch.randn(5, generator=gen)

    def branching(x):
        return x * 2 if x.sum().item() > 0 else x - 1

    def outside(x):
        return x + constant

    for name, body in (("test::branching", branching), ("test::outside", outside)):
        _calls(name, body, lambda: (torch.randn(5, generator=gen),))
        assert _replay.status(name) == {"replayed": 0, "refused": 1, "recording": 0}, name


def test_plain_aten_bodies_replay_natively(native_replay):
    """A body of aten ops alone (views, a wrapped number, lists, a dtype and a memory format, two results of
    one op, the same tensor passed twice) replays natively from its third call, to its bits."""
    gen = torch.Generator().manual_seed(4)

    def body(x, y, scale, dims):
        z = (x * scale).to(torch.float64).permute(0, 2, 3, 1).contiguous(memory_format=torch.contiguous_format)
        lo, hi = torch.aminmax(y.float(), dim=1)
        s = torch.empty((2, 3), dtype=torch.bfloat16, device=x.device).fill_(1.5)
        return z.sum(dims, keepdim=True), lo + hi, s, torch.cat([x, y], dim=1)

    for same in (False, True):
        for _ in range(5):
            x = torch.randn(2, 3, 4, 5, generator=gen).contiguous(memory_format=torch.channels_last)
            y = x if same else torch.randn(2, 3, 4, 5, generator=gen)
            args = (x, y, -0.5, [1, 3])
            got, want = _replay.call("test::aten", body, args), body(*args)
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
    assert _replay.status("test::aten") == {"replayed": 2, "refused": 0, "recording": 0}
    assert all(r.native is not None for r in _replay.records("test::aten"))


def test_a_body_that_settles_late_replays_and_one_that_never_does_is_refused(native_replay):
    """Records are made until two in a row agree (a first call's tuning, say), at most four."""
    gen = torch.Generator().manual_seed(5)
    calls = {"late": 0, "never": 0}

    def late(x):
        calls["late"] += 1
        return x * (calls["late"] if calls["late"] < 4 else 2)  # (calls 2 and 3 recorded, each its own work)

    def never(x):
        calls["never"] += 1
        return x * calls["never"]

    for name, body, settled in (("test::late", late, 1), ("test::never", never, 0)):
        for i in range(9):
            x = torch.randn(4, generator=gen)
            n = calls[name.split("::")[1]]
            got = _replay.call(name, body, (x,))
            if name == "test::late":
                assert torch.equal(got, x * (n + 1 if n + 1 < 4 else 2)), i
            else:  # (each call a new value: the record of the last call would be wrong, the body is not)
                assert torch.equal(got, x * (n + 1)), i
        assert _replay.status(name) == {"replayed": settled, "refused": 1 - settled, "recording": 0}, name


def test_each_layout_alignment_and_scalar_is_a_signature_of_its_own(native_replay):
    """Strides, a pointer's 16-byte alignment, a float's sign and an int against a bool each key apart."""
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(64, generator=gen)

    def body(x, a):
        return x * a if x.data_ptr() % 16 == 0 else x - a  # (a body's Python may branch on any of them)

    for x, a in ((base[:32], 2.0), (base[1:33], 2.0), (base[:32].view(4, 8).t(), 2.0), (base[:32], -0.0),
                 (base[:32], 0.0), (base[:32], True), (base[:32], 1)):
        for _ in range(4):
            got, want = _replay.call("test::keys", body, (x, a)), body(x, a)
            assert got.dtype == want.dtype and torch.equal(got, want) and got.stride() == want.stride()
            assert torch.equal(torch.sign(got), torch.sign(want))
    assert _replay.status("test::keys")["replayed"] == 7


def test_python_replay_is_the_native_ones_specification(native_replay, monkeypatch):
    """A record the native replayer cannot take (here: no binary for the interpreter's launches) replays in
    Python under PYTHON_REPLAY, to the body's bits; without it the body runs."""
    monkeypatch.setattr(_replay, "_binary", lambda *a: None)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 16, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 16, 1, 1, generator=gen)
    for python in (False, True):
        _replay.clear()
        monkeypatch.setattr(_replay, "PYTHON_REPLAY", python)
        with torch.no_grad():
            for _ in range(4):
                xi = x + torch.randn(x.shape, generator=gen).contiguous(memory_format=torch.channels_last)
                got = ops.fused_conv(xi, w, None, act="silu", backend="triton")
                _replay.ENABLED = False
                want = ops.fused_conv(xi, w, None, act="silu", backend="triton")
                _replay.ENABLED = True
                assert torch.equal(got, want)
        st = _replay.status("nfnet_fast::triton_fused_conv")
        assert st == {"replayed": int(python), "refused": 1 - int(python), "recording": 0}, (python, st)


@pytest.mark.parametrize("steps,why", [
    ([("op", "aten::no_such_op", "", [], [])], "aten::no_such_op"),
    ([("op", "aten::neg", "", [("t", 0)], [])], "one slot per result"),
    ([("op", "aten::neg", "", [("t", 5)], [1])], "slot out of range"),
    ([("op", "aten::neg", "", [("q", 0)], [1])], "unknown kind"),
    ([("launch", 0, 4, 0, (1, 1), 0, [])], "grid of three"),
    ([("launch", 0, 4, 0, (1, 1, 1), 0, [("i", 2 ** 31)])], "i32 parameter out of range"),
    ([("walk",)], "unknown kind")])
def test_the_native_replayer_refuses_a_malformed_record(steps, why):
    with pytest.raises(ValueError, match=why):
        _C._replay_register(1, 2, steps, [1])


def test_a_record_that_does_not_fit_raises_instead_of_running():
    """The native replayer checks the inputs' count, that each slot it reads holds a tensor, and the alignment
    a binary was specialised for (a wrong record, or a key that missed something, raises: no launch)."""
    rid = _C._replay_register(1, 2, [("op", "aten::neg", "", [("t", 0)], [1])], [1])
    x = torch.randn(3)
    assert torch.equal(torch.ops.nfnet_fast._replay(rid, [x])[0], -x)
    with pytest.raises(RuntimeError, match="2 inputs for a record of 1"):
        torch.ops.nfnet_fast._replay(rid, [x, x])
    rid = _C._replay_register(1, 3, [("op", "aten::neg", "", [("t", 2)], [1])], [1])
    with pytest.raises(RuntimeError, match="holds no tensor"):
        torch.ops.nfnet_fast._replay(rid, [x])
    rid = _C._replay_register(1, 1, [("launch", 0, 4, 0, (1, 1, 1), 0, [("p", 0, True)])], [0])
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        torch.ops.nfnet_fast._replay(rid, [torch.randn(8)[1:]])
    _C._replay_clear()
    with pytest.raises(RuntimeError, match="no record"):
        torch.ops.nfnet_fast._replay(rid, [x])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_replay_gives_the_bodies_bits(dtype, monkeypatch):
    """On the GPU, training steps of eca_nfnet_l0 (batch 2, 96 px) with the op bodies replayed natively (aten
    ops through the dispatcher, launches with cuLaunchKernel) give the bodies' bits: the steps that record,
    the steps that replay (whose launches none come from the bodies' Python), one of them on another stream,
    and an eval forward captured in a CUDA graph from replays and replayed."""
    from conftest import captured_eval, gpu_training_step, steps_here_and_on_a_side_stream

    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(_replay, "ENABLED", False)
    _replay.clear()
    model, x, step = gpu_training_step(dtype)

    expect = step()
    with torch.no_grad():
        expect_eval = model.eval()(x).clone()
    model.train()
    monkeypatch.setattr(_replay, "ENABLED", True)
    try:
        # (a signature's first call, then two that record and agree; the fourth makes each call's node, whose
        # backward runs the Python formula once and makes its plan)
        runs = [step() for _ in range(4)]
        with torch.no_grad():
            for _ in range(3):
                model.eval()(x)
        model.train()
        # every launch made from Python, on any thread (the backward's run on autograd's device thread):
        # Triton's JITFunction.run, and the native launcher's entry from kernels.launch
        from triton.runtime.jit import JITFunction
        direct, jit_run, native = [], JITFunction.run, kernels._native_module()
        assert native, "no native launcher in this build"

        class Counting:
            def __getattr__(self, name):
                return getattr(native, name)

            def _triton_launch(self, kernel_id, *a):
                direct.append(kernels._kept.get(kernel_id, kernel_id))
                return native._triton_launch(kernel_id, *a)

        monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: (direct.append(self), jit_run(self, *a, **k))[1])
        monkeypatch.setattr(kernels, "_native", Counting())
        formula, nodes = [], []  # (node backwards that ran the Python formula; node forwards)
        monkeypatch.setattr(_replay, "_node_backward", lambda *a, _f=_replay._node_backward: formula.append(1) or _f(*a))
        monkeypatch.setattr(_replay, "_node_op", lambda *a, _f=torch.ops.nfnet_fast._replay_node.default:
                            nodes.append(1) or _f(*a))
        runs += steps_here_and_on_a_side_stream(step)
        names = {getattr(k, "__name__", str(k)) for k in direct}
        assert names <= {"_std_fwd_many_kernel"}, sorted(names)  # (the model's own launch, not an op body's)
        assert nodes and not formula, (len(nodes), len(formula))  # (every training call a node, with its plan)
        for name in _replay._tables:
            st = _replay.status(name)
            assert st == {"replayed": st["replayed"], "refused": 0, "recording": 0} and st["replayed"], (name, st)
        assert torch.equal(captured_eval(model, x), expect_eval)
        for got in runs:
            assert all(torch.equal(a, b) for a, b in zip(got, expect))
    finally:
        _replay.clear()


def _peak_bytes(fn) -> int:
    """The most bytes live at once during ``fn()`` beyond what was live before (the CPU allocator's events)."""
    import itertools

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    return max(itertools.accumulate((n for _, n in events), initial=0))


def test_a_replay_frees_each_temporary_where_the_body_does(native_replay):
    """The native replay drops each tensor after the last step that reads it, so its peak memory is the
    body's (holding every step's result to the end would make it 3 tensors here, the body's is 2)."""
    x = torch.randn(1 << 18)

    def body(x):
        a = x * 2
        b = a + 1
        del a
        c = b * 3
        del b
        return c - 1

    for _ in range(3):
        _replay.call("test::temporaries", body, (x,))
    assert _replay.status("test::temporaries")["replayed"] == 1
    replayed, plain = _peak_bytes(lambda: _replay.call("test::temporaries", body, (x,))), _peak_bytes(lambda: body(x))
    # (up to a few bytes: the body makes a wrapped-number tensor per Python number, the replay holds them)
    assert abs(replayed - 2 * x.nbytes) < 64 and abs(plain - 2 * x.nbytes) < 64, (replayed, plain)


def test_an_id_dropped_by_a_clear_is_never_another_record():
    """A replay holding an id from before a clear (another thread, say) finds no record, never a newer one."""
    x = torch.randn(3)
    old = _C._replay_register(1, 2, [("op", "aten::neg", "", [("t", 0)], [1])], [1])
    _C._replay_clear()
    new = _C._replay_register(1, 2, [("op", "aten::exp", "", [("t", 0)], [1])], [1])
    assert new != old
    with pytest.raises(RuntimeError, match="no record"):
        torch.ops.nfnet_fast._replay(old, [x])
    assert torch.equal(torch.ops.nfnet_fast._replay(new, [x])[0], x.exp())


def test_threads_recording_and_replaying_one_body(native_replay):
    """Four threads calling one body over shared and own signatures: no error, every result the body's."""
    import threading

    def body(x, k):
        return (x * k).sum(0)

    errors = []

    def work(seed):
        gen = torch.Generator().manual_seed(seed)
        try:
            for i in range(40):
                x = torch.randn(3, 2 + (i + seed) % 5, generator=gen)
                k = float(i % 3)
                got = _replay.call("test::threads", body, (x, k))
                if not torch.equal(got, body(x, k)):
                    errors.append((seed, i))
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert _replay.status("test::threads")["refused"] == 0


def test_a_custom_op_inside_a_body_is_one_step(native_replay):
    """A custom op a body calls is recorded as one step and replayed through the dispatcher: its own
    launches are not recorded as well (they would run twice)."""
    gen = torch.Generator().manual_seed(8)

    def body(x):
        return torch.ops.nfnet_fast.triton_silu_scale(x, 0.5) * 2

    for _ in range(5):
        x = torch.randn(4, 8, generator=gen)
        assert torch.equal(_replay.call("test::nested", body, (x,)), body(x))
    (record,) = _replay.records("test::nested")
    assert record.native is not None
    assert [s[1].__name__ for s in record.steps] == ["triton_silu_scale.default", "mul.Tensor"]


def test_optional_tensor_lists_replay_natively(native_replay):
    """An index's ``Tensor?[]`` (None for a whole dimension), and an upsampling's optional float arguments."""
    gen = torch.Generator().manual_seed(9)

    def body(x, idx):
        return x[:, idx], torch.nn.functional.interpolate(x, scale_factor=(2.0, 1.5), mode="nearest")

    for _ in range(4):
        x, idx = torch.randn(2, 5, 4, 4, generator=gen), torch.randint(0, 5, (3,), generator=gen)
        got, want = _replay.call("test::lists", body, (x, idx)), body(x, idx)
        assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(got, want))
    (record,) = _replay.records("test::lists")
    assert record.native is not None
    assert [s[1].__name__ for s in record.steps] == ["index.Tensor", "upsample_nearest2d.default"], record.steps


# ---------------------------------------------------------------------------------------------
# replayed calls as C++ autograd nodes (_replay.call_node, csrc/replay.cpp ReplayNode)

@pytest.fixture
def node_counts(native_replay, monkeypatch):
    """Counts of the node forwards replayed and of the node backwards that ran the Python formula."""
    counts = {"forward": 0, "formula": 0}
    node_op, formula = torch.ops.nfnet_fast._replay_node.default, _replay._node_backward

    def forward(*args):
        counts["forward"] += 1
        return node_op(*args)

    def backward(*args):
        counts["formula"] += 1
        return formula(*args)

    monkeypatch.setattr(_replay, "_node_op", forward)
    monkeypatch.setattr(_replay, "_node_backward", backward)
    return counts


@pytest.mark.parametrize("channels_last, keep_z", [(True, False), (False, False), (True, True)])
def test_training_steps_run_as_nodes_with_native_backward_plans(node_counts, channels_last, keep_z, monkeypatch):
    """From the fifth step of a narrow NF model on, every op call of the training step is one C++ node and
    every node's backward replays its plan (no Python formula, no launch from Python but the model's own
    standardised-ahead one); the loss and every gradient stay the bodies' bits. With every conv keeping its
    pre-activation (nn._FusedConv.keep_z), the nodes save it and their plans launch its gradient pass."""
    import threading

    monkeypatch.setattr(nfnet_fast.nn._FusedConv, "keep_z", keep_z)
    model = _narrow_model("triton", channels_last)
    gen = torch.Generator().manual_seed(4)
    applied = []

    def step(x, y):
        model.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return [loss] + [p.grad for p in model.parameters()]

    def through_python(kernel, grid, args, kwargs):
        direct.append(kernel.__name__)
        return kernel[grid](*args, **kwargs)

    original_apply = {}
    for op in _replay._node_ops:  # (the Python autograd.Function's calls: none once every signature is a node)
        original_apply[op] = op.function.apply
    for call in range(6):
        x, y = torch.randn(2, 3, 32, 32, generator=gen), torch.randint(0, 5, (2,), generator=gen)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        node_counts.update(forward=0, formula=0)
        direct = []
        applied.clear()
        if call == 5:
            kernels.RECORDERS[threading.get_ident()] = through_python
            for op in original_apply:
                op.function.apply = lambda *a, _f=original_apply[op]: applied.append(1) or _f(*a)
        try:
            replayed = step(x, y)
        finally:
            kernels.RECORDERS.pop(threading.get_ident(), None)
            for op, f in original_apply.items():
                op.function.apply = f
        if call == 5:
            assert set(direct) == {"_std_fwd_many_kernel"}, direct
            assert not applied and node_counts["formula"] == 0, (len(applied), node_counts)
            assert node_counts["forward"] >= 3 * 6, node_counts  # (each block: its convs, ECA tail, SiLU)
            kernels.RECORDERS[threading.get_ident()] = through_python  # (the bodies' launches, counted)
        _replay.ENABLED = False
        try:
            expected = step(x, y)
        finally:
            kernels.RECORDERS.pop(threading.get_ident(), None)
        _replay.ENABLED = True
        if call == 5:  # (the stem's 3 and each block's 3 activated convs, and the final conv)
            assert direct.count("_z_grad_kernel") == (3 + 3 * 5 + 1 if keep_z else 0), direct
        assert all(torch.equal(a, b) for a, b in zip(replayed, expected)), call
    assert not any(bad for _, bad in HOOKED)


def _settled_conv(gen, channels_last=True, calls=4, **requires):
    """A 3x3 conv with gain called ``calls`` times (grads taken each time), so that its signature is a node."""
    def make():
        x, w, b, g = _conv_inputs(gen, 8, 16, 3, channels_last, torch.float32, True)
        for t, name in ((x, "x"), (w, "w"), (b, "b"), (g, "g")):
            t.requires_grad_(requires.get(name, True))
        return x, w, b, g

    for _ in range(calls):
        _loss(*_conv(*make())).backward()
    return make


def _conv(x, w, b, g):
    return ops.fused_conv(x, w, b, stride=1, padding=1, act="silu", act_gain=1.3, want_sums=True, gain=g,
                          std_scale=0.7, std_eps=1e-4, backend="triton")


def _loss(out, sums):
    """(the same loss each time: its gradients' strides are part of a backward's key)"""
    return (out * torch.linspace(-1, 1, out.shape[1])[:, None, None]).sum() + sums.square().sum()


def test_a_node_keeps_autograd_semantics(node_counts):
    """A node frees its saved tensors after a backward (a second one raises, as autograd's), retains them
    with retain_graph, refuses a saved input modified in place, passes them through saved-tensor hooks, and
    gives no gradient to an input that needs none; each result is the Python Function's."""
    gen = torch.Generator().manual_seed(11)
    make = _settled_conv(gen)
    x, w, b, g = make()
    out, sums = _conv(x, w, b, g)
    assert "ReplayNode" in out.grad_fn.name()
    loss = _loss(out, sums)
    loss.backward(retain_graph=True)
    once = [t.grad.clone() for t in (x, w, b, g)]
    loss.backward()
    assert all(torch.equal(t.grad, 2 * o) for t, o in zip((x, w, b, g), once))
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()

    x, w, b, g = make()
    out, sums = _conv(x, w, b, g)
    with torch.no_grad():
        w.mul_(2)
    with pytest.raises(RuntimeError, match="inplace"):
        _loss(out, sums).backward()

    packed = []
    for enabled in (True, False):
        _replay.ENABLED = enabled
        torch.manual_seed(0)
        x, w, b, g = make()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(enabled) or t, lambda t: t):
            out, sums = _conv(x, w, b, g)
        _loss(out, sums).backward()
    _replay.ENABLED = True
    assert packed.count(True) == packed.count(False) > 0

    make = _settled_conv(gen, x=False, b=False)
    x, w, b, g = make()
    out, sums = _conv(x, w, b, g)
    assert "ReplayNode" in out.grad_fn.name()
    _loss(out, sums).backward()
    x2, w2, b2, g2 = (t.detach().requires_grad_(t.requires_grad) for t in (x, w, b, g))
    _replay.ENABLED = False
    out2, sums2 = _conv(x2, w2, b2, g2)
    _loss(out2, sums2).backward()
    _replay.ENABLED = True
    assert x.grad is None and b.grad is None
    assert torch.equal(w.grad, w2.grad) and torch.equal(g.grad, g2.grad)


def test_a_node_runs_its_backward_after_a_clear_and_gives_its_standardised_weight(node_counts, monkeypatch):
    """A node's spec and plans outlive a clear (a graph made before it still runs its backward), and
    fused_conv_std_weight reads a node's saved standardised weight as it reads the Function's."""
    from nfnet_fast import _library

    gen = torch.Generator().manual_seed(12)
    make = _settled_conv(gen, calls=5)
    x, w, b, g = make()
    out, sums = _conv(x, w, b, g)
    std = _library.fused_conv_std_weight(out)
    x2, w2, b2, g2 = (t.detach().requires_grad_() for t in (x, w, b, g))
    _replay.ENABLED = False
    out2, sums2 = _conv(x2, w2, b2, g2)
    assert torch.equal(std, _library.fused_conv_std_weight(out2))
    _replay.ENABLED = True
    kept = dict(_replay._native_records)
    _replay.clear()
    monkeypatch.setattr(_replay, "_native_records", kept)  # (what the test's launch hook reads, not the replayer)
    node_counts.update(formula=0)
    _loss(out, sums).backward()
    _loss(out2, sums2).backward()
    assert node_counts["formula"] == 0  # (its plan, made before the clear)
    assert all(torch.equal(a.grad, c.grad) for a, c in zip((x, w, b, g), (x2, w2, b2, g2)))
    assert _library.fused_conv_std_weight(out) is None  # (freed by the backward)


def test_a_backward_plan_without_a_body_call(node_counts):
    """ECA-residual with only its shortcut needing a gradient: the formula passes x_next's gradient through,
    so the plan has no record, and the gradient arrives as the formula's."""
    gen = torch.Generator().manual_seed(13)
    for call in range(6):
        y = torch.randn(2, 8, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
        shortcut = torch.randn(2, 8, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
        shortcut.requires_grad_()
        weight = torch.randn(3, generator=gen)
        grad = torch.randn(2, 8, 5, 5, generator=gen).contiguous(memory_format=torch.channels_last)
        node_counts.update(formula=0)
        out = ops.eca_residual(y, weight, shortcut, 0.3, 1.7, backend="triton")
        out.backward(grad)
        assert torch.equal(shortcut.grad, grad)
    assert "ReplayNode" in out.grad_fn.name() and node_counts["formula"] == 0


def test_the_native_replayer_refuses_a_malformed_node():
    forward = _C._replay_register(1, 2, [("op", "aten::neg", "", [("t", 0)], [1])], [1])
    with pytest.raises(ValueError, match="no forward record"):
        _C._replay_node_register(forward + 1000, 1, [], [])
    with pytest.raises(ValueError, match="inputs"):
        _C._replay_node_register(forward, 2, [], [])
    with pytest.raises(ValueError, match="saved tensor out of range"):
        _C._replay_node_register(forward, 1, [3], [])  # (output 1 of a record of one)
    with pytest.raises(ValueError, match="non-differentiable"):
        _C._replay_node_register(forward, 1, [0], [1])
    node = _C._replay_node_register(forward, 1, [0], [])
    x = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="inputs for a node"):
        torch.ops.nfnet_fast._replay_node(node, [x, x])
    (y,) = torch.ops.nfnet_fast._replay_node(node, [x])
    assert torch.equal(y, -x) and y.requires_grad
    _C._replay_clear()


def test_each_incoming_gradients_layout_is_a_backward_key_of_its_own(node_counts):
    """A node's backward plan is keyed by its incoming gradients' strides (and which are given): a gradient
    in another layout, or none for the sums, runs the formula (then has a plan of its own), with the
    Function's result each time."""
    gen = torch.Generator().manual_seed(14)
    make = _settled_conv(gen, calls=6)
    for i, (layout, with_sums) in enumerate(((torch.contiguous_format, True), (torch.channels_last, True),
                                             (torch.channels_last, False)) * 3):
        x, w, b, g = make()
        node_counts.update(formula=0)
        grad = torch.randn(2, 16, 9, 7, generator=gen).contiguous(memory_format=layout)
        results = []
        for enabled in (True, False):
            _replay.ENABLED = enabled
            leaves = [t.detach().requires_grad_() for t in (x, w, b, g)]
            out, sums = _conv(*leaves)
            if with_sums:
                torch.autograd.backward([out, sums], [grad, torch.ones_like(sums)])
            else:
                out.backward(grad)
            results.append([t.grad for t in leaves])
        _replay.ENABLED = True
        assert all(torch.equal(a, c) for a, c in zip(*results)), (layout, with_sums)
        if i < 3:  # (the settled calls' gradients are contiguous with sums: that key alone has a plan yet)
            assert node_counts["formula"] == (0 if i == 0 else 1), (i, node_counts)


def _aten_silu_bodies(monkeypatch):
    """silu_scale's triton bodies replaced by plain aten ones (no Triton: what runs under any Triton's
    interpreter); returns the backward body."""
    from nfnet_fast import _library

    monkeypatch.setitem(_library._BODIES, "nfnet_fast::triton_silu_scale",
                        lambda x, beta: torch.nn.functional.silu(x) * beta)

    def backward(grad, x, beta):
        s = torch.sigmoid(x)
        return grad * (s * (1 + x * (1 - s))) * beta

    monkeypatch.setitem(_library._BODIES, "nfnet_fast::_triton_silu_scale_backward", backward)
    return backward


def test_a_node_of_plain_aten_bodies(node_counts, monkeypatch):
    """An op whose bodies are plain aten becomes a node on its fourth call, whose backward runs the formula
    once and its plan after; values and gradients are the bodies' each time."""
    backward = _aten_silu_bodies(monkeypatch)
    gen = torch.Generator().manual_seed(15)
    for call in range(6):
        x, grad = torch.randn(3, 7, generator=gen).requires_grad_(), torch.randn(3, 7, generator=gen)
        node_counts.update(forward=0, formula=0)
        y = ops.silu_scale(x, 0.7, backend="triton")
        y.backward(grad)
        assert torch.equal(y, torch.nn.functional.silu(x) * 0.7)
        assert torch.equal(x.grad, backward(grad, x.detach(), 0.7))
        assert ("ReplayNode" in y.grad_fn.name()) == (call >= 3), call
        assert (node_counts["forward"], node_counts["formula"]) == ((0, 0) if call < 3 else (1, call == 3)), call


def test_a_node_backward_runs_the_formula_where_the_ops_own_path_would(node_counts, monkeypatch):
    """A settled node's backward leaves its plan for the formula where the op's own path would not run the
    body as recorded: a subclass gradient, a dispatch mode around the backward; it unpacks no saved tensor
    when no gradient comes (as the formula); and a node made for a body that has since been replaced is
    dropped."""
    from torch.testing._internal.two_tensor import TwoTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    from nfnet_fast import _library

    _aten_silu_bodies(monkeypatch)
    gen = torch.Generator().manual_seed(16)

    def call():
        x = torch.randn(3, 7, generator=gen).requires_grad_()
        return x, ops.silu_scale(x, 0.7, backend="triton")

    for _ in range(5):
        x, y = call()
        y.backward(torch.randn(3, 7, generator=gen))
    x, y = call()
    assert "ReplayNode" in y.grad_fn.name()
    grad = torch.randn(3, 7, generator=gen)
    node_counts.update(formula=0)
    y.backward(TwoTensor(grad, grad))
    assert type(x.grad) is TwoTensor and node_counts["formula"] == 1

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, y = call()
    with Seen() as seen:
        y.backward(grad)
    assert "nfnet_fast._triton_silu_scale_backward.default" in seen.ops, seen.ops

    class NoGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return None

    unpacked = []
    x, y = call()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: unpacked.append(1) or t):
        y = ops.silu_scale(x, 0.7, backend="triton")
    assert "ReplayNode" in y.grad_fn.name()
    NoGradient.apply(y).sum().backward()
    assert not unpacked and x.grad is None

    monkeypatch.setitem(_library._BODIES, "nfnet_fast::triton_silu_scale", lambda x, beta: x * beta)
    x, y = call()
    assert torch.equal(y, x * 0.7) and "ReplayNode" not in y.grad_fn.name()
