"""ops.fused_conv on every CPU backend here against the reference (timm's own calls: avg_pool2d,
conv2d with its bias, the activation, GammaAct's gain), forward and gradients; its registration
(opcheck, torch.compile); and eca_nfnet_l0's forward running no separate bias, SiLU or pool pass."""
import contextlib
import copy
import gc

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import nfnet_fast
from conftest import assert_rel_close, cpu_backends, randomize_, weight_copies
from nfnet_fast import _backends, ops
from nfnet_fast import _reference as ref_ops
from nfnet_fast.benchmark import saved_storage_bytes

BACKENDS = cpu_backends("fused_conv")
COMPILED = [b for b in BACKENDS if b != "reference"]

# (x shape, weight shape, stride, padding, groups, act, act_gain, pool): odd channel counts, odd H
# and W, batch 1, groups 1/2/3 with odd widths, strides 1 and 2, TF 'same' padding, every activation.
CASES = {
    "1x1 silu": ((2, 21, 9, 11), (37, 21, 1, 1), 1, 0, 1, "silu", 1.0, False),
    "1x1 pool": ((3, 19, 7, 9), (23, 19, 1, 1), 1, 0, 1, None, 1.0, True),
    "1x1 batch1 relu": ((1, 19, 7, 5), (24, 19, 1, 1), 1, 0, 1, "relu", 1.0, False),
    "3x3 g3 width5 s2": ((2, 15, 9, 7), (21, 5, 3, 3), 2, 1, 3, "silu", 1.0, False),
    "3x3 g2 gelu gain": ((1, 16, 8, 9), (24, 8, 3, 3), 1, 1, 2, "gelu", 1.7015043497085571, False),
    "3x3 same pad s2": ((2, 6, 9, 10), (10, 6, 3, 3), 2, (0, 1, 0, 1), 1, "silu", 1.0, False),
    "5x5 stem-like": ((2, 3, 13, 11), (8, 3, 5, 5), 2, 2, 1, None, 1.0, False),
    # one output channel, batch 1: its packed weight viewed as (1, C, kh, kw) has strides aten's CPU conv refused
    "3x3 one output channel": ((1, 3, 8, 8), (1, 3, 3, 3), 1, 1, 1, "silu", 1.0, False),
}


def _case(name, rng, dtype=torch.float32):
    x_shape, w_shape, stride, padding, groups, act, gain, pool = CASES[name]
    x = torch.randn(x_shape, generator=rng).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(w_shape, generator=rng) * (w_shape[1] * w_shape[2] * w_shape[3]) ** -0.5).to(dtype)
    b = (0.3 * torch.randn(w_shape[0], generator=rng)).to(dtype)
    return (x, w, b), dict(stride=stride, padding=padding, groups=groups, act=act, act_gain=gain, pool=pool)


def _leaves(tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("want_sums", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_against_reference(name, want_sums, backend, rng):
    """Forward, sums and the gradients of x, weight and bias (the sums' gradient included)."""
    tensors, kw = _case(name, rng)
    got_in, ref_in = _leaves(tensors), _leaves(tensors)
    got = ops.fused_conv(*got_in, want_sums=want_sums, backend=backend, **kw)
    ref = ops.fused_conv(*ref_in, want_sums=want_sums, backend="reference", **kw)
    got, ref = (got, ref) if want_sums else ((got,), (ref,))
    assert_rel_close(got[0], ref[0], 1e-5, f"{backend} {name} out")
    if want_sums:
        assert got[1].dtype == torch.float32 and got[1].shape == (tensors[0].shape[0], tensors[1].shape[0])
        assert_rel_close(got[1], ref[1], 1e-5, f"{backend} {name} sums")
    grads = [torch.randn(t.shape, generator=rng) for t in ref]
    torch.autograd.backward(got, grads)
    torch.autograd.backward(ref, grads)
    for a, r, what in zip(got_in, ref_in, ("x", "weight", "bias")):
        assert_rel_close(a.grad, r.grad, 1e-5, f"{backend} {name} {what} grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["1x1 silu", "1x1 pool", "3x3 g2 gelu gain", "3x3 same pad s2"])
def test_sums_only(name, backend, rng):
    """want_out=False returns the sums alone: the reference's sums, and the gradients of x, weight
    and bias for a gradient of the sums are the reference's (which makes and differentiates the
    output)."""
    tensors, kw = _case(name, rng)
    got_in, ref_in = _leaves(tensors), _leaves(tensors)
    got = ops.fused_conv(*got_in, want_sums=True, want_out=False, backend=backend, **kw)
    _, ref = ops.fused_conv(*ref_in, want_sums=True, backend="reference", **kw)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert_rel_close(got, ref, 1e-5, f"{backend} {name} sums")
    grad = torch.randn(ref.shape, generator=rng)
    got.backward(grad)
    ref.backward(grad)
    for a, r, what in zip(got_in, ref_in, ("x", "weight", "bias")):
        assert_rel_close(a.grad, r.grad, 1e-5, f"{backend} {name} {what} grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sums_hand_over_to_eca_residual(backend, rng):
    """conv3 -> ECA tail as the block runs it: the conv's sums feed eca_residual (no pooling pass);
    forward, next pre-activation and the gradients of x, the conv's weight and bias, ECA's weight and
    the shortcut equal the reference's, which pools y itself."""
    x, w, b = (torch.randn(2, 12, 7, 5, generator=rng), torch.randn(20, 12, 1, 1, generator=rng) * 12 ** -0.5,
               torch.randn(20, generator=rng))
    taps, shortcut = torch.randn(1, 1, 5, generator=rng), torch.randn(2, 20, 7, 5, generator=rng)
    shortcut = shortcut.contiguous(memory_format=torch.channels_last)
    results = []
    for b_name in (backend, "reference"):
        leaves = _leaves((x, w, b, taps, shortcut))
        y, sums = ops.fused_conv(*leaves[:3], want_sums=True, backend=b_name)
        x_next, a_next = ops.eca_residual(y, leaves[3], leaves[4], 0.2, 2.0, 0.9, sums=sums, backend=b_name)
        (x_next * torch.linspace(-1, 1, x_next.numel()).view_as(x_next) + a_next.square()).sum().backward()
        results.append((x_next, a_next, *(t.grad for t in leaves)))
    for got, ref, what in zip(*results, ("x_next", "a_next", "x", "weight", "bias", "eca weight", "shortcut")):
        assert_rel_close(got, ref, 1e-5, f"{backend} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pool", [False, True])
def test_pre_activation_saved_as_its_input(backend, pool, rng):
    """x = silu(pre_x) * beta (a block's pre-activation) read by two convs (conv1 and the pooled
    downsample, as in a block): with pre_x the compiled backends save pre_x instead of x and send
    x's gradient to pre_x; every gradient equals the reference's, and x is not among the tensors
    saved for the backward."""
    pre = torch.randn(2, 16, 7, 9, generator=rng).contiguous(memory_format=torch.channels_last)
    w1, b1 = torch.randn(24, 16, 1, 1, generator=rng) / 4, torch.randn(24, generator=rng)
    w2, b2 = torch.randn(20, 16, 1, 1, generator=rng) / 4, torch.randn(20, generator=rng)
    beta = 0.87
    results = []
    for b_name in (backend, "reference"):
        leaves = _leaves((pre, w1, b1, w2, b2))
        saved = set()

        def pack(t):
            saved.add(t.untyped_storage().data_ptr())
            return t
        x = ops.silu_scale(leaves[0], beta, backend=b_name)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y1 = ops.fused_conv(x, leaves[1], leaves[2], act="silu", pre_x=leaves[0], pre_beta=beta, backend=b_name)
            y2 = ops.fused_conv(x, leaves[3], leaves[4], pool=pool, pre_x=leaves[0], pre_beta=beta, backend=b_name)
        if b_name != "reference":
            assert x.untyped_storage().data_ptr() not in saved, "the pre-activation was saved"
        (y1 * torch.linspace(-1, 1, y1.numel()).view_as(y1)).sum().add(y2.square().sum()).backward()
        results.append([y1, y2] + [t.grad for t in leaves])
    for got, ref, what in zip(*results, ("y1", "y2", "pre_x", "w1", "b1", "w2", "b2")):
        assert_rel_close(got, ref, 1e-5, f"{backend} {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("want_sums", [False, True], ids=["", "sums"])
@pytest.mark.parametrize("std", [False, True], ids=["cached weight", "gain"])
@pytest.mark.parametrize("name", ["1x1 silu", "1x1 pool", "3x3 g3 width5 s2"])
def test_pre_act(name, std, want_sums, backend, rng):
    """pre_act: x is a block input and the conv reads silu(x) * beta. The reference is silu_scale and
    then the conv; the compiled backends run one op, which makes the pre-activation as the 1x1
    kernel loads x (a 3x3 conv: one silu_scale launch inside the op) and saves x, nothing else of
    x's size, for the backward; forward, sums and the gradients of x, weight, bias (and gain) agree."""
    (x, w, b), kw = _case(name, rng)
    beta = float(torch.empty(()).uniform_(0.5, 1.5, generator=rng))
    extra = []
    if std:
        w = w * 3 + 0.2 * torch.randn((), generator=rng)
        gain, scale, eps = _std_params(w, rng)
        extra = [gain]
    results = []
    for b_name in (backend, "reference"):
        leaves = _leaves([x, w, b] + extra)
        std_kw = dict(gain=leaves[3], std_scale=scale, std_eps=eps) if std else {}
        saved = set()

        def pack(t):
            saved.add((t.untyped_storage().data_ptr(), t.shape))
            return t
        with _AtenCounter() as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs = ops.fused_conv(*leaves[:3], pre_act=True, pre_beta=beta, want_sums=want_sums, backend=b_name,
                                  **std_kw, **kw)
        outs = outs if want_sums else (outs,)
        if b_name != "reference":
            names = [str(f.overloadpacket.__name__) for f, _ in counter.calls]
            assert names == ["triton_fused_conv"], names  # (no silu_scale op: inside the op, if at all)
            # the only x-sized tensor saved is x itself
            assert all(p == leaves[0].untyped_storage().data_ptr() or shape != x.shape for p, shape in saved)
        if not results:  # (one incoming gradient for both backends)
            grads = [torch.randn(t.shape, generator=rng) for t in outs]
        torch.autograd.backward(outs, grads)
        results.append(list(outs) + [t.grad for t in leaves])
    unfused = ops.fused_conv(ref_ops.silu_scale(x, beta), w, b, backend="reference",
                             **(dict(gain=extra[0], std_scale=scale, std_eps=eps) if std else {}), **kw)
    assert torch.equal(results[1][0], unfused), "the reference is not silu_scale, then the conv"
    names = ("out", "sums")[:len(outs)] + ("x", "weight", "bias", "gain")
    for got, ref, what in zip(*results, names):
        assert_rel_close(got, ref, 1e-5, f"{backend} {name} pre_act {what}")


@pytest.mark.parametrize("backend", COMPILED)
def test_pre_act_under_autocast(backend, rng):
    """An fp32 block input under fp16 autocast: the pre-activation is made in fp32 and then cast, as
    timm's block (whose SiLU autocast leaves in fp32) and the conv's cast do."""
    (x, w, b), kw = _case("1x1 pool", rng)
    outs = []
    for b_name in (backend, "reference"):
        with torch.autocast("cpu", dtype=torch.float16):
            outs.append(ops.fused_conv(x, w, b, pre_act=True, pre_beta=0.8, backend=b_name, **kw))
    assert outs[0].dtype == outs[1].dtype == torch.float16
    assert_rel_close(outs[0], outs[1], 2e-3, f"{backend} pre_act autocast")


STD_CASES = ["1x1 silu", "1x1 pool", "3x3 g3 width5 s2", "3x3 same pad s2", "5x5 stem-like", "3x3 one output channel"]


def _std_params(w, rng):
    """A ScaledStdConv2d's gain (around 1, its timm shape), scale and eps, random."""
    fan_in = w[0].numel()
    gain = (1 + 0.3 * torch.randn(w.shape[0], 1, 1, 1, generator=rng)).to(w.dtype)
    return gain, float(torch.empty(()).uniform_(1.0, 2.0, generator=rng)) * fan_in ** -0.5, 10 ** -float(
        torch.randint(4, 7, (), generator=rng))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", STD_CASES)
def test_standardised_weight(name, backend, rng):
    """With gain the op standardises the raw weight itself (the compiled backends while packing it):
    forward, sums and the gradients of x, the raw weight, the gain and the bias equal the
    reference's, which is ScaledStdConv2d's batch_norm and then the conv."""
    (x, w, b), kw = _case(name, rng)
    w = w * 3 + 0.2 * torch.randn((), generator=rng)  # a raw weight: not centred, not unit-scaled
    gain, scale, eps = _std_params(w, rng)
    std = dict(std_scale=scale, std_eps=eps)
    got_in, ref_in = _leaves((x, w, b, gain)), _leaves((x, w, b, gain))
    got = ops.fused_conv(*got_in[:3], gain=got_in[3], want_sums=True, backend=backend, **std, **kw)
    ref = ops.fused_conv(*ref_in[:3], gain=ref_in[3], want_sums=True, backend="reference", **std, **kw)
    expect = ops.fused_conv(x, ref_ops.scaled_std_weight(w, gain, scale, eps), b, backend="reference", **kw)
    assert_rel_close(ref[0], expect, 1e-6, f"{name} reference with gain")
    assert_rel_close(got[0], ref[0], 1e-5, f"{backend} {name} out")
    assert_rel_close(got[1], ref[1], 1e-5, f"{backend} {name} sums")
    grads = [torch.randn(t.shape, generator=rng) for t in ref]
    torch.autograd.backward(got, grads)
    torch.autograd.backward(ref, grads)
    for a, r, what in zip(got_in, ref_in, ("x", "weight", "bias", "gain")):
        assert a.grad.shape == r.grad.shape and a.grad.dtype == r.grad.dtype, what
        assert_rel_close(a.grad, r.grad, 1e-5, f"{backend} {name} {what} grad")


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("name", ["3x3 g3 width5 s2", "3x3 same pad s2", "5x5 stem-like"])
def test_channels_last_weight_is_not_copied(name, backend, rng):
    """A channels_last model's kxk weight (how a training step runs on a GPU): the op standardises and
    packs it where it is, and makes its gradient in its layout, so neither the op nor AccumulateGrad
    (which copies a gradient into its parameter's strides where they differ) copies the weight or its
    gradient, in the forward or the backward. Every result as a contiguous weight's, within the fp32
    contract (the standardisation's row sums run in another order)."""
    from torch.profiler import ProfilerActivity, profile

    (x, w, b), kw = _case(name, rng)
    w = w * 3 + 0.2 * torch.randn((), generator=rng)
    gain, scale, eps = _std_params(w, rng)
    results = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        leaves = _leaves((x, w.contiguous(memory_format=layout), b, gain))
        assert leaves[1].is_contiguous() == (layout == torch.contiguous_format)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = ops.fused_conv(*leaves[:3], gain=leaves[3], std_scale=scale, std_eps=eps, want_sums=True,
                                 backend=backend, **kw)
            grads = [torch.randn(t.shape, generator=torch.Generator().manual_seed(5)) for t in out]
            torch.autograd.backward(out, grads)
        assert leaves[1].grad.stride() == leaves[1].stride()
        results[layout] = out, [t.grad for t in leaves], weight_copies(prof, w.shape)
    assert results[torch.channels_last][2] == 0, "a channels_last weight or its gradient was copied"
    (out_c, grads_c, _), (out_cl, grads_cl, _) = results[torch.contiguous_format], results[torch.channels_last]
    for got, expect, what in zip([*out_cl, *grads_cl], [*out_c, *grads_c], ("out", "sums", "x", "w", "b", "gain")):
        assert_rel_close(got, expect, 1e-5, f"{backend} {name} channels_last weight: {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("x_grad", [False, True])
def test_standardised_weight_of_one_output_channel(x_grad, backend, rng):
    """A conv with gain and one output channel, on a channels_last batch of one image: its packed weight
    seen as (1, C, kh, kw) has strides that aten's CPU convolution backward refused for the weight
    gradient ("grad_weight must be contiguous"), with or without x's gradient. The gradients of the weight and
    gain (and x's, where it needs one) are the reference's."""
    (x, w, b), kw = _case("3x3 one output channel", rng)
    gain, scale, eps = _std_params(w, rng)
    grads = []
    for b_name in (backend, "reference"):
        xi = x.clone().requires_grad_(x_grad)
        wi, gi = w.clone().requires_grad_(), gain.clone().requires_grad_()
        out = ops.fused_conv(xi, wi, None, gain=gi, std_scale=scale, std_eps=eps, backend=b_name, **kw)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([wi.grad, gi.grad] + ([xi.grad] if x_grad else []))
    for got, ref, what in zip(*grads, ("weight", "gain", "x")):
        assert_rel_close(got, ref, 1e-5, f"{backend} {what} grad")


@pytest.mark.parametrize("backend", COMPILED)
def test_standardised_weight_under_autocast(backend, rng):
    """fp16 autocast with fp32 parameters (a training step's setting): the raw weight is
    standardised in fp32 and only then rounded to fp16, as timm's fp32 batch_norm and the conv's cast
    do (a weight cast first would lose the standardisation's precision); gradients come back fp32."""
    (x, w, b), kw = _case("3x3 g3 width5 s2", rng)
    w = w * 5 + 0.5  # far from standardised: a cast before standardising would show
    gain, scale, eps = _std_params(w, rng)
    outs, grads = [], []
    for b_name in (backend, "reference"):
        leaves = _leaves((x, w, b, gain))
        with torch.autocast("cpu", dtype=torch.float16):
            out = ops.fused_conv(*leaves[:3], gain=leaves[3], std_scale=scale, std_eps=eps, backend=b_name, **kw)
        assert out.dtype == torch.float16
        (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out)
        grads.append([t.grad for t in leaves])
    assert_rel_close(outs[0], outs[1], 2e-3, f"{backend} autocast out")
    for g, r, what in zip(*grads, ("x", "weight", "bias", "gain")):
        assert g.dtype == torch.float32, what
        assert_rel_close(g, r, 4e-3, f"{backend} autocast {what} grad")


def test_reference_is_timms_sequence_of_calls(rng):
    """The reference backend is the specification: timm's modules, call for call (bit for bit)."""
    from timm.models.nfnet import DownsampleAvg, GammaAct

    tensors, kw = _case("3x3 g2 gelu gain", rng)
    x, w, b = tensors
    act = GammaAct("gelu", gamma=kw["act_gain"])
    expect = act(F.conv2d(x, w, b, 1, 1, 1, 2))
    assert torch.equal(ops.fused_conv(x, w, b, backend="reference", **kw), expect)
    ds = DownsampleAvg(19, 23, stride=2)
    xp = torch.randn(2, 19, 7, 9, generator=rng)
    weight = ds.conv.get_weight() if hasattr(ds.conv, "get_weight") else None
    if weight is None:
        weight = F.batch_norm(ds.conv.weight.reshape(1, 23, -1), None, None, weight=(ds.conv.gain * ds.conv.scale)
                              .view(-1), training=True, momentum=0., eps=ds.conv.eps).reshape_as(ds.conv.weight)
    with torch.no_grad():
        assert torch.equal(ops.fused_conv(xp, weight, ds.conv.bias, pool=True, backend="reference"), ds(xp))


@pytest.mark.parametrize("backend", COMPILED)
def test_fp16(backend, rng):
    tensors, kw = _case("3x3 g3 width5 s2", rng, torch.float16)
    got = ops.fused_conv(*tensors, backend=backend, **kw)
    expect = ops.fused_conv(*[t.float() for t in tensors], backend="reference", **kw)
    assert got.dtype == torch.float16
    assert_rel_close(got, expect, 2e-3, f"{backend} fp16")


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(x=torch.ones(2, 4, 5)), ValueError, "x must be 4-D"),
    (dict(x=torch.ones(0, 4, 5, 5)), ValueError, "empty batch"),
    (dict(weight=torch.ones(6, 3, 3, 3)), ValueError, "do not fit x"),
    (dict(weight=torch.ones(6, 4, 3, 3, dtype=torch.float16)), TypeError, "weight has dtype"),
    (dict(bias=torch.ones(5)), ValueError, "one value per output channel"),
    (dict(stride=0), ValueError, "stride must be an int >= 1"),
    (dict(padding=(1, 2, 3)), ValueError, "padding must be"),
    (dict(padding=-1), ValueError, "padding must be"),
    (dict(padding=(1, 1, 1, -1)), ValueError, "padding must be"),
    (dict(padding=(True, 1, 1, 1)), ValueError, "padding must be"),
    (dict(stride=True), ValueError, "stride must be an int >= 1"),
    (dict(act_gain=True), TypeError, "act_gain must be a Python float"),
    (dict(groups=5), ValueError, "do not fit x"),
    (dict(act="tanh"), ValueError, "act must be one of"),
    (dict(act_gain="2"), TypeError, "act_gain must be a Python float"),
    (dict(pool=True), ValueError, "pool=True needs a 1x1 kernel"),
    (dict(x=torch.ones(1, 4, 2, 2), padding=0), ValueError, "smaller than the kernel"),
    (dict(backend="fast"), ValueError, "backend must be one of"),
    (dict(pre_x=torch.ones(2, 4, 5, 6)), ValueError, "pre_x shape"),
    (dict(pre_x=torch.ones(2, 4, 5, 5, device="meta")), ValueError, "pre_x is on meta"),
    (dict(pre_beta=None), TypeError, "pre_beta must be a Python float"),
    (dict(pre_act=True, pre_x=torch.ones(2, 4, 5, 5)), ValueError, "exclude each other"),
    (dict(gain=torch.ones(5)), ValueError, "gain must have one value per output channel"),
    (dict(gain=torch.ones(6, dtype=torch.float16)), TypeError, "gain has dtype"),
    (dict(gain=torch.ones(6, device="meta")), ValueError, "gain is on meta"),
    (dict(gain=torch.ones(6), std_eps=0.0), ValueError, "std_eps must be > 0"),
    (dict(want_out=False), ValueError, "want_out=False needs want_sums=True"),
    (dict(gain=torch.ones(6), std_scale="1"), TypeError, "std_scale must be a Python float"),
    (dict(gain=torch.ones(6), weight=torch.ones(6, 1, 1, 1), x=torch.ones(2, 1, 5, 5), padding=0), ValueError,
     "fan-in of 1"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input(kwargs, err, match, backend):
    args = dict(x=torch.ones(2, 4, 5, 5), weight=torch.ones(6, 4, 3, 3), bias=torch.ones(6), padding=1,
                backend=backend)
    args.update(kwargs)
    x, weight, bias = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(err, match=match):
        ops.fused_conv(x, weight, bias, **args)


def test_autocast_casts_like_conv2d(rng):
    """Under autocast an fp32 input and weight run in the autocast dtype, as F.conv2d does."""
    tensors, kw = _case("3x3 g3 width5 s2", rng)
    for backend in BACKENDS:
        with torch.autocast("cpu", dtype=torch.float16):
            out = ops.fused_conv(*tensors, backend=backend, **kw)
        assert out.dtype == torch.float16, backend


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("std", [False, True], ids=["weight", "gain"])
def test_autocast_keeps_the_callers_input(backend, std, rng):
    """Under autocast an fp32 input that needs no gradient (the stem's images) is cast inside the
    op: the autograd saves the caller's x and no fp16 copy of it, and the output and the weight's,
    bias's and gain's gradients are those of the input cast beforehand, to the bit (the same
    rounding)."""
    (x, w, b), kw = _case("5x5 stem-like", rng)
    gain = torch.rand(w.shape[0], 1, 1, 1, generator=rng).add_(0.5) if std else None
    std_kw = dict(gain=None, std_scale=0.3, std_eps=1e-5) if std else {}
    grad = None
    results = []
    for pre_cast in (False, True):
        w_in, b_in, *gain_in = _leaves((w, b) + ((gain,) if std else ()))
        if std:
            std_kw["gain"] = gain_in[0]
        saved = []

        def pack(t):
            saved.append(t)
            return t
        with torch.autocast("cpu", dtype=torch.float16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = ops.fused_conv(x.half() if pre_cast else x, w_in, b_in, backend=backend, **dict(kw, act="silu"),
                                 **std_kw)
        assert out.dtype == torch.float16
        if not pre_cast:
            ptrs = {t.untyped_storage().data_ptr() for t in saved}
            assert x.untyped_storage().data_ptr() in ptrs, "the caller's x is not what the autograd keeps"
            assert not [t for t in saved if t.shape == x.shape and t.dtype == torch.float16], "a cast copy was saved"
        grad = torch.randn(out.shape, generator=rng).half() if grad is None else grad
        out.backward(grad)
        results.append([out, w_in.grad, b_in.grad] + [g.grad for g in gain_in])
    for got, ref, what in zip(*results, ("out", "weight", "bias", "gain")):
        assert torch.equal(got, ref), f"{backend} {what}"


@pytest.mark.parametrize("backend", COMPILED)
def test_opcheck_and_compile(backend, rng):
    tensors, kw = _case("1x1 pool", rng)
    x, w, b = _leaves(tensors)
    op = torch.ops.nfnet_fast.triton_fused_conv
    torch.library.opcheck(op, (x, w, b, 1, [0, 0, 0, 0], 1, 1, 1.5, True, True))
    torch.library.opcheck(op, (x, w, None, 1, [0, 0, 0, 0], 1, 0, 1.0, True, False))
    gain = torch.rand(w.shape[0], 1, 1, 1, generator=rng).add_(0.5).requires_grad_()
    torch.library.opcheck(op, (x, w, b, 1, [0, 0, 0, 0], 1, 1, 1.0, True, True, None, 1.0, gain, 0.3, 1e-5))
    torch.library.opcheck(op, (x, w, b, 1, [0, 0, 0, 0], 1, 1, 1.0, True, True, None, 0.7, gain, 0.3, 1e-5, True))
    torch.library.opcheck(op, (x, w, b, 1, [0, 0, 0, 0], 1, 1, 1.0, True, True, None, 1.0, gain, 0.3, 1e-5, False,
                               False))  # the sums alone
    torch.library.opcheck(op, (x, w.half(), b, 1, [0, 0, 0, 0], 1, 1, 1.0, True, True, None, 1.0, None, 1.0, 0.0,
                               False, True, torch.float16))  # x cast in the op (grad_x cast back)
    # a channels_last kxk weight with its gain (a channels_last model's): its gradient in its layout, the fake's too
    (x3, w3, b3), _ = _case("3x3 g2 gelu gain", rng)
    x3, b3 = x3.requires_grad_(), b3.requires_grad_()
    w3 = w3.contiguous(memory_format=torch.channels_last).requires_grad_()
    gain3 = torch.rand(w3.shape[0], 1, 1, 1, generator=rng).add_(0.5).requires_grad_()
    conv3 = (1, [1, 1, 1, 1], 2, 3, 1.0, False)  # (stride, padding, groups, gelu, act_gain, pool)
    torch.library.opcheck(op, (x3, w3, b3, *conv3, True, None, 1.0, gain3, 0.3, 1e-5))
    grad_out = torch.randn(x3.shape[0], w3.shape[0], *x3.shape[2:], generator=rng).contiguous(
        memory_format=torch.channels_last)
    backward_op = torch.ops.nfnet_fast._triton_fused_conv_backward  # (no double backward: inputs detached)
    backward_args = (grad_out, None, *(t.detach() for t in (x3, w3, b3)), *conv3, None, gain3.detach(), 0.3, 1e-5,
                     True, True, True, True)
    assert backward_op(*backward_args)[1].stride() == w3.stride()
    torch.library.opcheck(backward_op, backward_args)

    def f(x, w, b):
        out, sums = ops.fused_conv(x, w, b, act="silu", pool=True, want_sums=True, backend=backend)
        return out.sum() + sums.sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    assert_rel_close(compiled(x, w, b), f(x, w, b), 1e-5, f"{backend} compiled")


def test_backward_fake_checks_the_standardised_weight():
    """Traced (meta tensors, the fake kernel), the backward op refuses a std_weight that is not the
    (kh, kw, Cin/groups, Cout) standardised weight in the conv's compute dtype, or comes without a gain."""
    op = torch.ops.nfnet_fast._triton_fused_conv_backward
    x = torch.empty(2, 6, 5, 5, device="meta")
    w, gain, grad = torch.empty(4, 3, 3, 3, device="meta"), torch.empty(4, 1, 1, 1, device="meta"), None

    def call(std_weight, gain=gain, compute_dtype=None):
        return op(torch.empty(2, 4, 5, 5, device="meta"), grad, x, w, None, 1, [1, 1, 1, 1], 2, 1, 1.0, False, None,
                  gain, 0.3, 1e-5, True, True, False, True, compute_dtype, std_weight)

    good = torch.empty(3, 3, 3, 4, device="meta")
    assert call(good)[0].shape == x.shape
    assert call(good.half(), compute_dtype=torch.float16)[0].shape == x.shape
    for bad, kw in ((torch.empty(3, 3, 4, 3, device="meta"), {}), (good.half(), {}), (good, dict(gain=None)),
                    (good, dict(compute_dtype=torch.bfloat16))):
        with pytest.raises(RuntimeError, match="std_weight"):
            call(bad, **kw)


def test_cuda_backend_says_its_convolutions_run_the_triton_kernel():
    info = nfnet_fast.backends()["cuda"]
    if info.available:
        assert "fused_conv" in info.notes and "Triton" in info.notes


# --- the model: no separate bias, activation or pool passes around the convolutions ---------------

class _AtenCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls, self.outputs = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func, args))
        out = func(*args, **(kwargs or {}))
        self.outputs.append(out)
        return out


@pytest.mark.parametrize("backend, silu_prologue", [(b, False) for b in COMPILED] + [  # (cuda: the same conv op)
    pytest.param(b, True, id=f"{b}-silu prologue") for b in COMPILED if b == "triton"])
def test_eca_nfnet_l0_forward_runs_fused_convolutions(backend, silu_prologue):
    """An eval forward of a converted eca_nfnet_l0 on a compiled backend runs all 57 convolutions as
    fused ops (bias in the epilogue: no aten convolution and so no separate bias pass; ECA's conv1d
    is inside the ECA op), no avg_pool2d (the downsample pool is the 1x1 conv's prologue), no SiLU
    pass (each is its conv's epilogue, the head's too), no global pooling (the final conv's sums),
    no add on activations (the residual is inside the ECA op), the final conv makes its sums and
    never its output (a (0,) placeholder), and every ECA-residual op gets its
    channel sums from conv3's epilogue instead of pooling y again. With the SiLU prologue no op
    writes a pre-activation: eca_residual makes x_next only, and the 1x1 convs reading a block's
    input (conv1, the downsample) apply silu(x) * beta as they load it."""
    ref = randomize_(timm.create_model("eca_nfnet_l0", num_classes=10), 3).eval()
    fast = nfnet_fast.convert(copy.deepcopy(ref), backend=backend, silu_prologue=silu_prologue).eval()
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast(x)  # warm the standardised-weight cache: its batch_norm-free op runs once per weight
        with _AtenCounter() as counter:
            out = fast(x)
        expect = ref(x)
    assert_rel_close(out, expect, what=f"{backend} fused model")
    names = [str(f.overloadpacket.__name__) if hasattr(f, "overloadpacket") else str(f) for f, _ in counter.calls]
    assert names.count("triton_fused_conv") == 57, names.count("triton_fused_conv")
    results = [res for name, res in zip(names, counter.outputs) if name == "triton_fused_conv"]
    assert [i for i, (conv_out, *_) in enumerate(results) if conv_out.numel() == 0] == [56]
    assert results[56][1].shape == (1, fast.num_features)
    for banned in ("convolution", "cudnn_convolution", "avg_pool2d", "silu", "silu_", "mean", "adaptive_avg_pool2d",
                   "_adaptive_avg_pool2d", "sigmoid", "mul"):
        assert banned not in names, (banned, names.count(banned))
    adds = [args for f, args in counter.calls if f.overloadpacket.__name__ in ("add", "add_", "addcmul")
            and any(isinstance(a, torch.Tensor) and a.dim() == 4 for a in args)]
    assert not adds, f"{len(adds)} adds on activations"
    eca = [args for f, args in counter.calls if f.overloadpacket.__name__.endswith("eca_residual")]
    assert len(eca) == 12, len(eca)  # one per block
    # the next pre-activation: from eca_residual (a_next, 11 blocks have a next) or the convs' prologue
    assert sum(args[4] is not None for args in eca) == (0 if silu_prologue else 11)
    # (without the prologue, the first block's pre-activation of the stem's output is a silu_scale pass)
    assert len([n for n in names if n.endswith("silu_scale")]) == (0 if silu_prologue else 1)
    prologues = [args for f, args in counter.calls if f.overloadpacket.__name__ == "triton_fused_conv"
                 and len(args) > 15 and args[15]]
    assert len(prologues) == (12 + 4 if silu_prologue else 0), len(prologues)  # conv1s, downsamples
    for args in eca:
        y, sums = args[0], args[5]
        assert isinstance(sums, torch.Tensor) and sums.shape == y.shape[:2] and sums.dtype == torch.float32
        torch.testing.assert_close(sums, y.float().sum((2, 3)), rtol=1e-5, atol=1e-5 * y.abs().amax().item())


@pytest.mark.parametrize("backend", COMPILED)
def test_training_block_does_not_save_its_pre_activation(backend, rng):
    """A converted NF block in training on a compiled backend holds one activation less for its
    backward than the reference (timm's sequence): the pre-activation silu(x) * beta, which its
    convs recompute from x; its gradients stay equal."""
    ref = randomize_(timm.create_model("eca_nfnet_l0", num_classes=10), 5).train()
    block = ref.stages[1][1]
    x = torch.randn(2, block.conv1.in_channels, 10, 9, generator=rng).contiguous(memory_format=torch.channels_last)
    results = []
    for b_name in (backend, "reference"):
        fast = nfnet_fast.convert(copy.deepcopy(block), backend=b_name).train()
        xi = x.clone().requires_grad_()
        nbytes, out = saved_storage_bytes(lambda: fast(xi))
        out.square().sum().backward()
        results.append((nbytes, out, xi.grad, fast.conv1.weight.grad, fast.conv3.gain.grad))
    (got_bytes, *got), (ref_bytes, *expect) = results
    assert got_bytes <= ref_bytes - x.numel() * x.element_size(), (got_bytes, ref_bytes)
    for g, e, what in zip(got, expect, ("out", "x grad", "conv1 weight grad", "conv3 gain grad")):
        assert_rel_close(g, e, 1e-5, f"{backend} {what}")


@pytest.mark.parametrize("backend", COMPILED)
def test_eager_training_skips_torchs_custom_op_autograd_wrapper(backend, monkeypatch, rng):
    """Eager training runs each op's registered autograd formula through nfnet_fast's own
    autograd.Function (_library._with_eager_autograd), never through torch's custom-op autograd
    wrapper, whose refill of the schema's defaults costs ~60 us a fused conv call on the host
    (pytorch#195110). What tracing runs, the op with its registered autograd (forced here by
    is_compiling), sees that wrapper, and the loss and every gradient are the same bits."""
    import torch._library.utils as library_utils
    real_fill_defaults, calls = library_utils.fill_defaults, []

    def fill_defaults(schema, args, kwargs):
        calls.append(schema.name)
        return real_fill_defaults(schema, args, kwargs)
    monkeypatch.setattr(library_utils, "fill_defaults", fill_defaults)
    ref = randomize_(timm.create_model("eca_nfnet_l0", num_classes=10), 17).train()
    fast = nfnet_fast.convert(ref, backend=backend).train()
    blocks = torch.nn.Sequential(fast.stem, *fast.stages[0][:1], *fast.stages[1][:2])  # stem, pooled downsample
    x = torch.randn(2, 3, 24, 21, generator=rng).contiguous(memory_format=torch.channels_last)
    results = []
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        blocks.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        calls.clear()
        with _AtenCounter() as counter:
            loss = blocks(xi).square().mean()
            loss.backward()
        ops_run = {str(f.overloadpacket.__name__) for f, _ in counter.calls}
        results.append([loss, xi.grad] + [p.grad for p in blocks.parameters()])
        if compiling:
            assert calls, "the ops' registered autograd was not run"
        else:
            assert not calls, f"torch's custom-op autograd ran for {sorted(set(calls))}"
        eca = "triton_eca_residual" if backend == "triton" else "eca_residual"  # (both run the Triton conv)
        assert {"triton_fused_conv", "_triton_fused_conv_backward", eca, f"_{eca}_backward"} <= ops_run, ops_run
    for i, (eager, registered) in enumerate(zip(*results)):
        assert (eager is None) == (registered is None), i
        if eager is not None:
            assert torch.equal(eager, registered), f"{backend} tensor {i}"


@pytest.mark.parametrize("backend", [b for b in COMPILED if b == "triton"])  # (cuda runs the same conv op)
def test_training_step_runs_one_op_per_conv(backend, monkeypatch):
    """A training step of a converted model on a compiled backend runs no separate weight
    standardisation, cast or pack: each conv op gets its raw weight and gain and standardises it in
    the launch that packs it; its backward is one op per conv with no aten elementwise passes
    around it; in eval, the modules' cached weight is already packed (and cast, under autocast), so
    no conv copies a weight at all. The backward uses the standardised weight its forward made, and
    so does the recompute of each block's conv3 (ECA's input y): the backward standardises nothing.
    Gradients stay timm's. (Under the op counter's dispatch mode the model does not standardise its
    weights ahead, so each conv standardises its own: test_training_forward_standardises_ahead.)"""
    from nfnet_fast.kernels import fused_conv as fc
    packed = {"std": 0, "copied": 0}
    real_std, real_pack = fc._std.forward, fc.pack_weight

    def std_forward(weight, gain, scale, eps, gpu_config=False, packed=None):
        packed_counts["std"] += packed is not None  # (the backward recomputes the unpacked weight)
        return real_std(weight, gain, scale, eps, gpu_config, packed=packed)

    def pack_weight(weight, dtype):
        out = real_pack(weight, dtype)
        packed_counts["copied"] += out.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
        return out
    packed_counts = packed
    monkeypatch.setattr(fc._std, "forward", std_forward)
    monkeypatch.setattr(fc, "pack_weight", pack_weight)
    ref = randomize_(timm.create_model("eca_nfnet_l0", num_classes=10), 11).train()
    fast = nfnet_fast.convert(copy.deepcopy(ref), backend=backend).train()
    convs = sum(isinstance(m, timm.layers.ScaledStdConv2d) for m in fast.modules())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    x = x.contiguous(memory_format=torch.channels_last)
    with _AtenCounter() as counter:
        out = fast(x)
    names = [str(f.overloadpacket.__name__) for f, _ in counter.calls]
    assert names.count("triton_fused_conv") == convs
    assert not [n for n in names if "scaled_std_weight" in n or n == "batch_norm" or "native_batch_norm" in n]
    assert packed == {"std": convs, "copied": 0}, packed
    expect = ref(x)
    assert_rel_close(out, expect, what=f"{backend} training forward")
    packed.update(std=0)
    with _AtenCounter() as counter:
        out.square().sum().backward()
    blocks = sum(isinstance(m, nfnet_fast.nn.NormFreeBlock) for m in fast.modules())
    assert packed == {"std": 0, "copied": 0}, packed  # (the forward's standardised weights, conv3's recompute too)
    expect.square().sum().backward()
    # the backward: one op per conv (the pre-activation's gradient from the recomputing GEMM's
    # epilogue, then cuDNN's data and weight gradients inside it), no aten convolution or SiLU
    # derivative chains around it; on activations only autograd's accumulating adds
    # (and each block's conv3 forward once more: ECA's input y, recomputed instead of held)
    names = [str(f.overloadpacket.__name__) for f, _ in counter.calls]
    assert names.count("_triton_fused_conv_backward") == convs
    assert names.count("triton_fused_conv") == blocks
    on_activations = {str(f.overloadpacket.__name__) for f, args in counter.calls
                      if any(isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[0] == x.shape[0] for a in args)}
    allowed = {"_triton_fused_conv_backward", "triton_fused_conv", "add", "detach"} | {  # (cuda's eca and silu ops too)
        name for prefix in ("", "triton_") for name in (f"_{prefix}silu_scale_backward", f"{prefix}silu_scale",
                                                        f"_{prefix}eca_residual_backward")}
    assert on_activations <= allowed, on_activations
    # Each gradient within 1e-5 (of its max) of the exact one, float64 timm's: 4.8e-6 at most here. Not of timm's
    # fp32 gradients: those are up to 7e-6 from exact themselves, so the two fp32 errors add up to ~1e-5 by
    # chance (1.02e-5 on stages.1.0's ECA weight with torch on one thread, where timm's CPU reductions sum in
    # another order; 1.1e-5 on another input). timm's own error is checked too, so the bound means something.
    exact = copy.deepcopy(ref).double()
    exact.zero_grad(set_to_none=True)
    exact(x.double()).square().sum().backward()
    for (name, p), q, e in zip(fast.named_parameters(), ref.parameters(), exact.parameters()):
        assert_rel_close(q.grad, e.grad, 1e-5, f"timm fp32 {name} grad (the model must be well-conditioned)")
        assert_rel_close(p.grad, e.grad, 1e-5, f"{backend} {name} grad")
    fast.eval()
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16, enabled=autocast):
            fast(x)  # fills the caches
            packed.update(std=0, copied=0)
            fast(x)
        assert packed == {"std": 0, "copied": 0}, (autocast, packed)


def _narrow_nfnet(seed: int):
    """eca_nfnet_l0's layer graph at 1/8 of its width (the same 57 convs and 12 ECA blocks), random weights."""
    import dataclasses

    import timm.models.nfnet as timm_nfnet
    cfg = dataclasses.replace(timm_nfnet.model_cfgs["eca_nfnet_l0"], channels=(32, 64, 192, 192), stem_chs=16,
                              group_size=8, num_features=288)
    return randomize_(timm_nfnet.NormFreeNet(cfg, num_classes=10), seed)


@pytest.mark.parametrize("backend", COMPILED)
def test_training_forward_standardises_ahead(backend, monkeypatch):
    """A training forward standardises all its convs' weights on entry, one launch per tile
    (kernels.scaled_std_weight.forward_many), and each conv op takes its operand instead of launching
    its own standardisation: the output, the loss and every gradient are the bits of the same step
    with one standardisation per conv. A conv whose weight changed in place after the entry (by a
    module of the trunk) standardises its own, so the changed weight's values are used; with a hook
    anywhere in the trunk nothing is standardised ahead; the scope ends with the forward, an
    exception too; an eval forward without gradients standardises nothing ahead (the convs' cached
    weights serve)."""
    from conftest import counted_work
    from nfnet_fast import _triton
    from nfnet_fast.kernels import scaled_std_weight as std_kernels

    took = []
    real_take = _triton._operand_ahead
    monkeypatch.setattr(_triton, "_operand_ahead", lambda *a: took.append(real_take(*a)) or took[-1])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)).contiguous(
        memory_format=torch.channels_last)

    def step(ahead: bool, hook=None):
        fast = nfnet_fast.convert(_narrow_nfnet(21), backend=backend).train().to(memory_format=torch.channels_last)
        if not ahead:
            fast._standardised_ahead = lambda x: contextlib.nullcontext()
        if hook is not None:
            hook(fast)
        took.clear()
        with counted_work(std_kernels) as work:
            out = fast(x)
        loss = torch.nn.functional.cross_entropy(out, torch.tensor([1, 7]))
        loss.backward()
        assert getattr(_triton._AHEAD, "operands", None) is None  # (the scope ended with the forward)
        return fast, dict(work["launches"]), [out, loss] + [p.grad for p in fast.parameters()], sum(
            t is not None for t in took)

    fast, forward, ahead, hits = step(True)
    convs = [m for m in fast.modules() if isinstance(m, timm.layers.ScaledStdConv2d)]
    tiles = {tuple(std_kernels.config(m.weight[0].numel()).items()) for m in convs}
    cpu_tiles = {tuple(std_kernels.config(m.weight[0].numel(), torch.device("cpu")).items()) for m in convs}
    assert forward == {"_std_fwd_many_kernel": len(cpu_tiles)}, forward
    assert hits == len(convs) == 57 and len(tiles) <= 5  # (on a GPU: one launch per tile, <= 5 of 57)
    _, forward, each, hits = step(False)
    assert forward == {"_std_fwd_kernel": len(convs)} and hits == 0, forward
    for i, (a, b) in enumerate(zip(ahead, each)):
        assert torch.equal(a, b), i

    class ChangesAWeight(torch.nn.Module):  # (code in the trunk that edits a later conv's weight in place)
        def __init__(self, weight):
            super().__init__()
            self.weight_to_change = [weight]

        def forward(self, x):
            with torch.no_grad():
                self.weight_to_change[0].add_(0.05)  # (its version counter moves after the entry)
            return F.silu(x)

    def change_a_weight(model):
        model.stages[1][0].act2 = ChangesAWeight(model.stages[2][1].conv2.weight)
    _, _, changed_ahead, hits = step(True, change_a_weight)
    assert hits == len(convs) - 1  # (the changed weight's conv standardises its own)
    _, _, changed_each, _ = step(False, change_a_weight)
    for i, (a, b) in enumerate(zip(changed_ahead, changed_each)):
        assert torch.equal(a, b), i
    assert not torch.equal(changed_ahead[0], ahead[0])

    def hook_an_activation(model):  # (a hook anywhere in the trunk could edit a weight through .data)
        model.stages[1][0].act2.register_forward_hook(lambda module, args, out: None)
    _, forward, hooked_ahead, hits = step(True, hook_an_activation)
    assert hits == 0 and forward == {"_std_fwd_kernel": len(convs)}, forward
    _, _, hooked_each, _ = step(False, hook_an_activation)  # (the hooked SiLU runs apart from its conv)
    for i, (a, b) in enumerate(zip(hooked_ahead, hooked_each)):
        assert torch.equal(a, b), i

    def fail(module, args):
        raise RuntimeError("a failing hook")
    handle = fast.stages[1][0].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="a failing hook"):
        fast(x)
    assert getattr(_triton._AHEAD, "operands", None) is None
    handle.remove()
    fast.eval()
    with torch.no_grad():
        fast(x)  # (fills the convs' caches)
        calls = []
        monkeypatch.setattr(std_kernels, "forward_many", lambda *a: calls.append(a))
        fast(x)
    assert calls == []


@pytest.mark.skipif("triton" not in COMPILED, reason="the triton backend does not run here")
def test_training_forward_of_a_model_made_under_inference_mode():
    """A model made under ``torch.inference_mode`` (its parameters inference tensors, which have no version
    counter) and frozen, then run in train mode with gradients on: its convs standardise their own weights
    (nothing is standardised ahead, which needs the version counters) and the output is the same model's,
    made normally."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(8)).contiguous(
        memory_format=torch.channels_last)
    outs = []
    for inference in (True, False):
        with torch.inference_mode(inference):
            fast = nfnet_fast.convert(_narrow_nfnet(6), backend="triton").requires_grad_(False)
        outs.append(fast.train()(x))
    assert torch.equal(*outs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_training_step_standardised_ahead_gives_the_same_bits(dtype, monkeypatch):
    """On the GPU, eca_nfnet_l0's training step (batch 2, 64 px, channels_last) with its weights
    standardised ahead gives the bits of the step with one standardisation per conv: the GPU tiles'
    kernels, compiled, and the same tile per weight (at most 5 launches for the 57 weights)."""
    from conftest import counted_work
    from nfnet_fast.kernels import scaled_std_weight as std_kernels
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(2, 3, 64, 64, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (2,), device="cuda", generator=g)
    results = []
    for ahead in (True, False):
        model = nfnet_fast.convert(randomize_(timm.create_model("eca_nfnet_l0", num_classes=10), 9), backend="triton")
        model = model.cuda().train().to(memory_format=torch.channels_last)
        if not ahead:
            model._standardised_ahead = lambda x: contextlib.nullcontext()
        for _ in range(2):  # (the first step tunes the tiles; the second is compared)
            model.zero_grad(set_to_none=True)
            with counted_work(std_kernels) as work, torch.autocast("cuda", dtype=dtype,
                                                                  enabled=dtype != torch.float32):
                out = model(x)
            torch.nn.functional.cross_entropy(out, y).backward()
        launches = dict(work["launches"])
        if ahead:
            assert set(launches) == {"_std_fwd_many_kernel"} and launches["_std_fwd_many_kernel"] <= 5, launches
        else:
            assert launches == {"_std_fwd_kernel": 57}, launches
        results.append([out] + [p.grad for p in model.parameters()])
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), i


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_training_step_with_inputs_from_z(monkeypatch):
    """On the GPU, eca_nfnet_l0's fp32 training step (batch 2, 64 px, channels_last, no TF32) with every
    activated conv keeping z gives, with NormFreeBlock.inputs_from_z (36 links: conv1, conv2, conv2b of each
    of the 12 blocks), the same output bits and every gradient to fp32 rounding: the input that silu_scale
    remakes from z against the one the conv's epilogue wrote."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # (matmul's is off by default)
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(2, 3, 64, 64, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (2,), device="cuda", generator=g)
    links, real_add = [], nfnet_fast.nn._InputsFromZ.add
    monkeypatch.setattr(nfnet_fast.nn._InputsFromZ, "add",
                        lambda self, h, z, gain: (links.append(z is not None), real_add(self, h, z, gain)))
    model = nfnet_fast.convert(randomize_(timm.create_model("eca_nfnet_l0", num_classes=10), 10), backend="triton")
    model = model.cuda().train().to(memory_format=torch.channels_last)
    _all_keep_z(model, monkeypatch)
    results = []
    for from_z in (False, True):
        monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "inputs_from_z", from_z)
        for _ in range(2):  # (the first step tunes the tiles; the second is compared)
            links.clear()
            model.zero_grad(set_to_none=True)
            out = model(x)
            torch.nn.functional.cross_entropy(out, y).backward()
        assert links == [True] * 36 * from_z, links
        results.append([out] + [p.grad for p in model.parameters()])
    assert torch.equal(results[0][0], results[1][0])
    for i, (a, b) in enumerate(zip(*results)):
        assert_rel_close(b, a, 1e-6, f"tensor {i}")


# NormFreeBlock's policies that trade no memory for time (docs/triton-training-step.md sections 16-18)
TIME_POLICIES = ("inputs_from_z", "input_grads_in_conv", "bias_grads_in_eca")


def _gpu_policy_case(monkeypatch, seed):
    """eca_nfnet_l0 (triton, channels_last, randomised) on the GPU, a batch of 2 at 64 px and its labels, with
    deterministic cuDNN and no TF32; and ``step(bf16)``, the second of two training steps (the first tunes the
    tiles): ``[output] + every parameter's gradient``."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # (matmul's is off by default)
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(2, 3, 64, 64, device="cuda", generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (2,), device="cuda", generator=g)
    model = nfnet_fast.convert(randomize_(timm.create_model("eca_nfnet_l0", num_classes=10), seed + 5),
                               backend="triton")
    model = model.cuda().train().to(memory_format=torch.channels_last)

    def step(bf16=False, on_loss=None):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
                loss = torch.nn.functional.cross_entropy(out, y)
            if on_loss is not None:
                on_loss(loss)
            loss.backward()
        return [out] + [p.grad for p in model.parameters()]
    return model, x, step


def _check_policy_on_gpu(results, model, x, step):
    """``results[bf16, policy]`` of _gpu_policy_case's steps without and with a policy: in fp32 the same output
    bits and every gradient the same to fp32 rounding; under bf16 autocast no gradient further from the fp32
    step's than without the policy; and the fp32 step replayed from CUDA graphs (train.graph_training_forward,
    as the report's cudagraph rows run it) the same to fp32 rounding."""
    assert torch.equal(results[False, False][0], results[False, True][0])
    for i, (a, b) in enumerate(zip(results[False, False], results[False, True])):
        assert_rel_close(b, a, 1e-6, f"fp32 tensor {i}")

    def worst(got):  # the largest relative distance of any gradient from the fp32 step's
        return max(((u.double() - r.double()).abs().max() / r.double().abs().max()).item()
                   for u, r in zip(got[1:], results[False, False][1:]))
    assert worst(results[True, True]) <= 1.25 * worst(results[True, False]), (worst(results[True, True]),
                                                                               worst(results[True, False]))
    from nfnet_fast import train
    train.graph_training_forward(model, x, amp=False)
    try:
        graphed = step()
    finally:
        del model.forward
    for i, (a, b) in enumerate(zip(results[False, True], graphed)):
        assert_rel_close(b, a, 1e-6, f"graphed fp32 tensor {i}")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_training_step_with_input_grads_in_conv(monkeypatch):
    """On the GPU, eca_nfnet_l0's training step (batch 2, 64 px, channels_last) with
    NormFreeBlock.input_grads_in_conv: 12 adds fewer in the engine (one a block), and _check_policy_on_gpu's
    checks (fp32: the kernel may fuse the sum into a multiply-add; bf16: the sum is rounded once instead of
    twice)."""
    model, x, step = _gpu_policy_case(monkeypatch, 6)
    results, uses = {}, {}
    for bf16 in (False, True):
        for handing in (False, True):
            monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "input_grads_in_conv", handing)
            results[bf16, handing] = step(bf16, on_loss=lambda loss: uses.__setitem__((bf16, handing),
                                                                                        _input_uses(loss)))
    for bf16 in (False, True):
        assert uses[bf16, True] == uses[bf16, False] - 12, uses
    _check_policy_on_gpu(results, model, x, step)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_training_step_with_bias_grads_in_eca(monkeypatch):
    """On the GPU, eca_nfnet_l0's training step (batch 2, 64 px, channels_last) with
    NormFreeBlock.bias_grads_in_eca: _check_policy_on_gpu's checks (conv3's and the downsample convs' biases
    summed in another order; under bf16 the sums of the unrounded gradients), with input_grads_in_conv too."""
    model, x, step = _gpu_policy_case(monkeypatch, 7)
    for handing in (False, True):
        monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "input_grads_in_conv", handing)
        results = {}
        for bf16 in (False, True):
            for policy in (False, True):
                monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "bias_grads_in_eca", policy)
                results[bf16, policy] = step(bf16)
        _check_policy_on_gpu(results, model, x, step)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_training_step_with_time_policies_together(monkeypatch):
    """On the GPU, eca_nfnet_l0's training step (batch 2, 64 px, channels_last) with every activated conv keeping
    z and the three time policies at once (TIME_POLICIES: the report's combined row), against the same convs
    keeping z without them: _check_policy_on_gpu's checks."""
    model, x, step = _gpu_policy_case(monkeypatch, 8)
    _all_keep_z(model, monkeypatch)
    results = {}
    for bf16 in (False, True):
        for on in (False, True):
            for name in TIME_POLICIES:
                monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, name, on)
            results[bf16, on] = step(bf16)
    _check_policy_on_gpu(results, model, x, step)


@pytest.mark.parametrize("backend", COMPILED)
def test_training_forward_saves_under_0_45x_of_timms_activations(backend):
    """What one training forward of eca_nfnet_l0 holds for its backward, per-sample tensors only
    (timm's standardised weights and their autocast copies, which nfnet_fast does not keep, left
    out): at most 0.45x of timm's (0.44x measured, 0.41x before the 1536-wide convs kept their
    pre-activations; the training issue's memory target is 0.6x of the step's peak). Of the per-sample
    tensors each fused conv saves its input (and the standardised weight it made, which is not
    per-sample), those of a fan-in of 1024 or more with an activation also their pre-activation z
    (nn.KEEP_Z_FAN_IN: the others recompute it), the convs reading silu(x) * beta save x, eca_residual keeps no shortcut
    for an a_next gradient that never comes (the stage's first block's downsample output), and the
    ECA input y is recomputed from conv3's input (0.58x while it was kept)."""
    ref = randomize_(timm.create_model("eca_nfnet_l0", num_classes=10), 12).train()
    fast = nfnet_fast.convert(copy.deepcopy(ref), backend=backend).train()
    # (no weight leads with 2: output channels >= 10, the standardised weights kept in the fused
    # convs' (kh, kw, C_in/groups, C_out) layout with kh 1 or 3; a leading 2 marks a per-sample tensor)
    n = 2
    x = torch.randn(n, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    held = {}
    for name, model in (("timm", ref), ("fast", fast)):
        saved = {}

        def pack(t):
            if t.dim() >= 2 and t.shape[0] == n:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        held[name] = sum(saved.values())
    assert held["fast"] <= 0.45 * held["timm"], (held, held["fast"] / held["timm"])


@pytest.mark.parametrize("backend", COMPILED)
def test_wide_training_convs_keep_their_pre_activation(backend, monkeypatch):
    """A training forward of eca_nfnet_l0 asks the fused op for the pre-activation z (want_z) of exactly the
    convs with an activation and a fan-in of 1536 (nn.KEEP_Z_FAN_IN is 1024): conv1 of the stage-3 blocks
    after the first (5) and of every stage-4 block (3; 1536 -> 384) and the final conv (1536 -> 2304); the
    grouped 3x3s (576) and narrower 1x1s recompute theirs, conv3 and the downsamples have no activation. No
    call asks without gradients to track (no_grad, inference); keep_z on a conv overrides the rule."""
    ref = randomize_(timm.create_model("eca_nfnet_l0", num_classes=10), 5).train()
    fast = nfnet_fast.convert(ref, backend=backend).train()
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)

    def kept():
        with _AtenCounter() as counter:
            fast(x)
        calls = [args for f, args in counter.calls if f.overloadpacket.__name__ == "triton_fused_conv"]
        assert len(calls) == 57, len(calls)
        return sorted(tuple(args[1].shape) for args in calls if len(args) > 18 and args[18])
    assert kept() == [(384, 1536, 1, 1)] * 8 + [(2304, 1536, 1, 1)]
    with torch.no_grad():
        assert kept() == []
    fast.eval()
    with torch.inference_mode():
        assert kept() == []
    fast.train()
    monkeypatch.setattr(fast.stages[2][3].conv1, "keep_z", False)  # (an instance's choice over the rule)
    monkeypatch.setattr(fast.stages[0][0].conv2, "keep_z", True)
    assert kept() == sorted([(384, 1536, 1, 1)] * 7 + [(2304, 1536, 1, 1), (64, 64, 3, 3)])


def _tail_recompute_case(backend, seed):
    """Three blocks of a randomised eca_nfnet_l0 on ``backend`` (the stage-0 block; stage 1's first, with
    its pooled downsample, and second) and an input for them."""
    ref = randomize_(timm.create_model("eca_nfnet_l0", num_classes=10), seed).train()
    fast = nfnet_fast.convert(ref, backend=backend).train()
    blocks = torch.nn.Sequential(*fast.stages[0][:1], *fast.stages[1][:2])
    x = torch.randn(2, blocks[0].conv1.in_channels, 10, 9, generator=torch.Generator().manual_seed(seed))
    return blocks, x.contiguous(memory_format=torch.channels_last)


def _grads(blocks, x, run=None):
    blocks.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    loss = (run or blocks)(xi).square().mean()
    loss.backward()
    return [loss, xi.grad] + [p.grad for p in blocks.parameters()]


@pytest.mark.parametrize("backend", COMPILED)
def test_tail_input_recomputed_in_training(backend, monkeypatch):
    """In eager training each block's ECA input y (conv3's output) is not held for the backward, which
    recomputes it from conv3's input (NormFreeBlock.recompute_tail_input): what a forward saves falls
    by exactly the y tensors' bytes, and the loss and every gradient are the same bits as with y kept."""
    import weakref
    blocks, x = _tail_recompute_case(backend, 41)
    params = list(blocks.parameters())
    results, held, tail_inputs = [], [], []
    real_tail = nfnet_fast.nn.NormFreeBlock._fused_tail_call

    def tail(self, out, *args):
        tail_inputs.append(weakref.ref(out.untyped_storage()))  # (its memory: the hooks save detached views)
        return real_tail(self, out, *args)
    monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "_fused_tail_call", tail)
    for recompute in (False, True):
        monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "recompute_tail_input", recompute)
        blocks.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        tail_inputs.clear()
        nbytes, loss = saved_storage_bytes(lambda: blocks(xi).square().mean(), exclude=params)
        # y's memory alive after the forward while kept for the backward, and freed when recomputed
        gc.collect()  # (the Triton interpreter holds each launch's arguments in a cycle until then)
        assert [r() is not None for r in tail_inputs] == [not recompute] * len(blocks), (recompute, tail_inputs)
        loss.backward()
        held.append(nbytes)
        results.append([loss, xi.grad] + [p.grad for p in params])
    y_bytes, out = 0, x
    with torch.no_grad():
        for blk in blocks:  # (y has its block's output's shape: x_next = y * gate + shortcut)
            out = blk(out)
            y_bytes += out.numel() * out.element_size()
    assert held[0] - held[1] == y_bytes, (held, y_bytes)
    # and without the byte count's saved-tensor hooks, the recompute reads the standardised weight
    # conv3's forward made (fused_conv_std_weight) instead of standardising again: the same bits
    from nfnet_fast import _library
    taken, real_std = [], _library.fused_conv_std_weight
    monkeypatch.setattr(_library, "fused_conv_std_weight", lambda y: taken.append(real_std(y)) or taken[-1])
    results.append(_grads(blocks, x))
    assert len(taken) == len(blocks) and all(t is not None for t in taken), taken
    for i, (kept, recomputed, plain) in enumerate(zip(*results)):
        assert torch.equal(kept, recomputed) and torch.equal(kept, plain), f"{backend} tensor {i}"


@pytest.mark.parametrize("backend", COMPILED)
def test_fused_conv_std_weight_is_the_operand_the_forward_read(backend, monkeypatch):
    """``_library.fused_conv_std_weight`` (what the tail's recompute reads instead of standardising
    again): the standardised weight that an eager training conv made and saved for its backward,
    (kh, kw, C_in/groups, C_out) in the compute dtype, the standalone standardisation's values; None
    for a call autograd did not record, a conv without gain (eval's cached weight), any other
    tensor, and once the backward has freed it."""
    from nfnet_fast import _library
    from nfnet_fast.kernels import fused_conv as fc
    gen = torch.Generator().manual_seed(17)
    conv = nfnet_fast.nn.ScaledStdConv2d(6, 10, 3, padding=1, groups=2, backend=backend).train()
    with torch.no_grad():
        for p in conv.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    x = torch.randn(2, 6, 5, 7, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    written, real_std = [], fc._std.forward

    def std_forward(*args, packed=None, **kwargs):  # (the operand the op's launch standardised into)
        written.append(packed)
        return real_std(*args, packed=packed, **kwargs)
    monkeypatch.setattr(fc._std, "forward", std_forward)
    out = conv.fused(x, act="silu")
    monkeypatch.undo()
    std = _library.fused_conv_std_weight(out)
    assert std.shape == (3, 3, 3, 10) and std.dtype == x.dtype and std.is_contiguous()
    assert len(written) == 1 and std.data_ptr() == written[0].data_ptr()  # that very tensor, not a copy
    expect = nfnet_fast.ops.scaled_std_weight(conv.weight, conv.gain, conv.scale, conv.eps, backend=backend)
    assert_rel_close(std.permute(3, 2, 0, 1), expect, 1e-6, f"{backend} std weight")
    with torch.no_grad():
        assert _library.fused_conv_std_weight(conv.fused(x, act="silu")) is None
    assert _library.fused_conv_std_weight(out * 2) is None
    out.sum().backward()
    assert _library.fused_conv_std_weight(out) is None
    conv.eval().requires_grad_(False)  # (frozen: the cached standardised weight, and no gain, with x's gradient)
    frozen = conv.fused(x, act="silu")
    assert frozen.grad_fn is not None and _library.fused_conv_std_weight(frozen) is None


@pytest.mark.parametrize("backend", COMPILED)
def test_training_forward_dropped_without_backward_frees_everything(backend):
    """A training forward whose loss is dropped unused (a skipped batch, an exception) frees every
    activation: the recompute's saved-tensor hooks hold what they pack detached, since a node that saves
    its own output, held as itself, forms a cycle through C++ that Python's collector never frees."""
    import weakref
    blocks, x = _tail_recompute_case(backend, 43)
    outs = []
    hooks = [blk.register_forward_hook(lambda m, i, o: outs.append(weakref.ref(o))) for blk in blocks]
    blocks(x.clone().requires_grad_()).square().mean()  # (the loss dropped at once)
    for h in hooks:
        h.remove()
    gc.collect()
    assert len(outs) == len(blocks) and [r() for r in outs] == [None] * len(blocks)


@pytest.mark.parametrize("backend", COMPILED)
def test_tail_recompute_under_checkpointing_and_offloading(backend):
    """The recompute composes with the saved-tensor hooks of torch.utils.checkpoint (both kinds) and
    of save_on_cpu, which see every tensor the tail saves but y: the same bits as a plain step. A
    weight changed in place between forward and backward is refused, as autograd refuses a saved one."""
    blocks, x = _tail_recompute_case(backend, 43)
    plain = _grads(blocks, x)
    runs = {"checkpoint": lambda xi: torch.utils.checkpoint.checkpoint(blocks, xi, use_reentrant=False),
            "reentrant checkpoint": lambda xi: torch.utils.checkpoint.checkpoint(blocks, xi, use_reentrant=True)}
    for name, run in runs.items():
        for i, (a, b) in enumerate(zip(plain, _grads(blocks, x, run))):
            assert torch.equal(a, b), f"{backend} {name}: tensor {i}"
    with torch.autograd.graph.save_on_cpu():
        offloaded = _grads(blocks, x)
    for i, (a, b) in enumerate(zip(plain, offloaded)):
        assert torch.equal(a, b), f"{backend} save_on_cpu: tensor {i}"
    loss = blocks(x.clone().requires_grad_()).square().mean()
    with torch.no_grad():
        blocks[1].conv3.weight.mul_(1.5)
    with pytest.raises(RuntimeError, match="recomputes the block's ECA input"):  # (before conv3's own check)
        loss.backward()
    # every other tensor the tail saves through the hooks (ECA's weight, the shortcut) is checked as autograd
    # checks a saved one: without the check, a changed ECA weight gave a silently wrong gradient
    for change in ("eca weight", "shortcut"):
        xi = x.clone().requires_grad_()
        shortcut = []
        hook = blocks[1].register_forward_pre_hook(lambda m, a: shortcut.append(a[0]))
        try:
            loss = blocks(xi).square().mean()
        finally:
            hook.remove()
        with torch.no_grad():
            (blocks[1].attn_last.conv.weight if change == "eca weight" else shortcut[0]).mul_(1.5)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()
        if change == "eca weight":
            with torch.no_grad():
                blocks[1].attn_last.conv.weight.div_(1.5)


@pytest.mark.parametrize("backend", COMPILED)
def test_tail_recompute_uses_the_forwards_tensors(backend, monkeypatch):
    """The recompute calls the op on the tensors the forward's call got, not on what the module holds
    when the backward runs: torch.func.functional_call (weights swapped in for the forward only) and an
    eval-mode block with gradients give the same bits as with y kept, and the eval block's weight cache
    stays empty. Under outer saved-tensor hooks that copy what they save (save_on_cpu's way on a GPU)
    conv3's input is packed through them: the recipe keeps no reference to the original."""
    import weakref
    blocks, x = _tail_recompute_case(backend, 47)
    block = blocks[2]
    x = blocks[:2](x).detach()
    swapped = {n: (p * 1.5 + 0.01).detach().requires_grad_() for n, p in block.named_parameters()}
    results = []
    for recompute in (False, True):
        monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "recompute_tail_input", recompute)
        out = torch.func.functional_call(block, swapped, (x,))
        swapped_grads = torch.autograd.grad(out.square().sum(), list(swapped.values()))
        block.eval()
        try:
            eval_grads = _grads(block, x)
            assert block.conv3._std_cache is None
        finally:
            block.train()
        results.append(list(swapped_grads) + eval_grads)
    for i, (kept, recomputed) in enumerate(zip(*results)):
        assert torch.equal(kept, recomputed), f"{backend} tensor {i}"
    conv3_inputs = []
    real = nfnet_fast.nn._saved_as_recompute
    monkeypatch.setattr(nfnet_fast.nn, "_saved_as_recompute",
                        lambda y, args: (conv3_inputs.append(weakref.ref(args[0])), real(y, args))[1])
    for offload in (False, True):
        conv3_inputs.clear()
        copying = torch.autograd.graph.saved_tensors_hooks(lambda t: t.detach().clone(), lambda t: t)
        with copying if offload else contextlib.nullcontext():
            loss = block(x.clone().requires_grad_()).square().sum()
        assert (conv3_inputs[0]() is None) == offload, offload  # (kept by conv3's backward without hooks)
        loss.backward()


@pytest.mark.parametrize("silu_prologue", [False, True], ids=["", "silu prologue"])
@pytest.mark.parametrize("backend", COMPILED)
def test_compiled_training_step(backend, silu_prologue, rng):
    """torch.compile of a training step of two blocks of eca_nfnet_l0 (a stage's first, with its
    pooled downsample, and the next, reading its pre-activation): AOTAutograd traces the forward
    and its backward graph through the ops' fake kernels (the backward op's included; dynamo breaks
    the graph at .backward() as it does for any model), and the loss and every gradient equal
    eager's (and, with the SiLU prologue, timm's)."""
    ref = randomize_(timm.create_model("eca_nfnet_l0", num_classes=10), 13).train()
    fast = nfnet_fast.convert(copy.deepcopy(ref), backend=backend, silu_prologue=silu_prologue).train()
    blocks = torch.nn.Sequential(*fast.stages[1][:2])
    x = torch.randn(2, blocks[0].conv1.in_channels, 9, 11, generator=rng).contiguous(memory_format=torch.channels_last)

    def step(xi):
        loss = blocks(xi).square().mean()
        loss.backward()
        return loss

    results = []
    for run in (step, torch.compile(step, backend="aot_eager", fullgraph=False)):
        blocks.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        if run is step:  # (the eager run: each block, called on its own, makes its pre-activation)
            with _AtenCounter() as counter:
                loss = run(xi)
            names = [str(f.overloadpacket.__name__) for f, _ in counter.calls]
        else:
            loss = run(xi)
        results.append([loss, xi.grad] + [p.grad for p in blocks.parameters()])
    torch._dynamo.reset()
    if silu_prologue:
        assert not [n for n in names if n.endswith("silu_scale")], names
        timm_blocks = torch.nn.Sequential(*ref.stages[1][:2])
        xi = x.clone().requires_grad_()
        timm_blocks(xi).square().mean().backward()
        results.append([None, xi.grad] + [p.grad for p in timm_blocks.parameters()])
    for i, tensors in enumerate(zip(*results)):
        for got in tensors[1:]:
            if got is not None:
                assert_rel_close(got, tensors[0], 1e-5, f"{backend} compiled training step, tensor {i}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_return_z_is_the_kept_pre_activation(backend, rng):
    """``return_z``: ``(result, z)`` with z the pre-activation ``conv2d(x, w) + bias`` that a tracked call with an
    activation and ``keep_z`` kept (the compiled backends), else None: untracked, no activation, no keep_z, and
    on the reference backend, which keeps none. The result is the call's without ``return_z``."""
    args, kw = _case("3x3 g3 width5 s2", rng)
    x, w, b = _leaves(args)
    expect_z = F.conv2d(x, w, b, kw["stride"], kw["padding"], 1, kw["groups"]).detach()
    plain = ops.fused_conv(x, w, b, backend=backend, keep_z=True, **kw)
    out, z = ops.fused_conv(x, w, b, backend=backend, keep_z=True, return_z=True, **kw)
    assert torch.equal(out, plain)
    if backend == "reference":
        assert z is None
    else:
        assert_rel_close(z, expect_z, 1e-6, f"{backend} z")
        assert not z.requires_grad and z.shape == out.shape
    (out_sums, sums), z_sums = ops.fused_conv(x, w, b, backend=backend, keep_z=True, return_z=True, want_sums=True, **kw)
    assert torch.equal(out_sums, plain) and (z_sums is None) == (backend == "reference")
    with torch.no_grad():
        assert ops.fused_conv(x, w, b, backend=backend, keep_z=True, return_z=True, **kw)[1] is None
    assert ops.fused_conv(x, w, b, backend=backend, return_z=True, **kw)[1] is None
    assert ops.fused_conv(x, w, b, backend=backend, keep_z=True, return_z=True, **dict(kw, act=None))[1] is None


def _all_keep_z(blocks, monkeypatch):
    """Every activated conv of ``blocks`` keeps its pre-activation z (eca_nfnet_l0's first stages keep none by
    the fan-in rule)."""
    for m in blocks.modules():
        if isinstance(m, nfnet_fast.nn._FusedConv):
            monkeypatch.setattr(m, "keep_z", True)


def _spy_conv_outputs(monkeypatch) -> list:
    """A list that gets a weak reference to the storage of each activated conv output a block makes (nn._conv_act;
    conv1's first output where it also returns its input): ``r() is not None`` while something holds it."""
    import weakref
    outputs, real_conv_act = [], nfnet_fast.nn._conv_act

    def conv_act(*args, **kwargs):
        out = real_conv_act(*args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out  # (conv1 returns its input too under input_grads_in_conv)
        outputs.append(weakref.ref(h.untyped_storage()))
        return out
    monkeypatch.setattr(nfnet_fast.nn, "_conv_act", conv_act)
    return outputs


@pytest.mark.parametrize("backend", COMPILED)
def test_inputs_from_kept_z(backend, monkeypatch):
    """NormFreeBlock.inputs_from_z: where conv1, conv2 and conv2b keep z, the conv after each holds z in place of
    its input silu(z) * gain: no conv output of the block is alive after the forward (each is held by the next
    conv's backward without the policy), the loss is the same bits, and every gradient is the same to fp32
    rounding (the input remade by silu_scale; in fp32 the same formula as the conv's epilogue). Where no conv
    keeps z (the fan-in rule, in these stages) the policy changes nothing: the same bits, the outputs held."""
    blocks, x = _tail_recompute_case(backend, 53)
    outputs = _spy_conv_outputs(monkeypatch)

    def step():
        blocks.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        outputs.clear()
        loss = blocks(xi).square().mean()
        gc.collect()  # (the Triton interpreter holds each launch's arguments in a cycle until then)
        alive = [r() is not None for r in outputs]
        loss.backward()
        return alive, [loss, xi.grad] + [p.grad for p in blocks.parameters()]

    for keep in (False, True):
        if keep:
            _all_keep_z(blocks, monkeypatch)
        results = {}
        for from_z in (False, True):
            monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "inputs_from_z", from_z)
            results[from_z] = step()
        assert results[False][0] == [True] * 3 * len(blocks), (keep, results[False][0])
        assert results[True][0] == [not keep] * 3 * len(blocks), (keep, results[True][0])
        plain, linked = results[False][1], results[True][1]
        assert torch.equal(plain[0], linked[0]), (keep, plain[0], linked[0])
        for i, (a, b) in enumerate(zip(plain, linked)):
            if keep:
                assert_rel_close(b, a, 1e-6, f"{backend} tensor {i}")
            else:
                assert torch.equal(a, b), f"{backend} tensor {i}"


@pytest.mark.parametrize("backend", COMPILED)
def test_inputs_from_z_refuses_a_changed_z_and_steps_aside_under_hooks(backend, monkeypatch):
    """A kept z changed in place between forward and backward is refused, as autograd refuses a saved tensor
    changed so, before any gradient uses it. Under other saved-tensor hooks (checkpointing, save_on_cpu) and
    without gradients the policy makes no link, and the step gives the same bits as without it."""
    blocks, x = _tail_recompute_case(backend, 59)
    _all_keep_z(blocks, monkeypatch)
    plain = _grads(blocks, x)
    monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "inputs_from_z", True)
    kept, real_add = [], nfnet_fast.nn._InputsFromZ.add
    monkeypatch.setattr(nfnet_fast.nn._InputsFromZ, "add", lambda self, h, z, g: (kept.append(z), real_add(self, h, z, g)))
    loss = blocks(x.clone().requires_grad_()).square().mean()
    assert len(kept) == 3 * len(blocks) and all(z is not None for z in kept)
    with torch.no_grad():
        kept[-1].mul_(1.5)  # (the last block's conv2b: conv3's input)
    with pytest.raises(RuntimeError, match="recomputes the next conv's input"):
        loss.backward()
    kept.clear()
    runs = {"checkpoint": lambda xi: torch.utils.checkpoint.checkpoint(blocks, xi, use_reentrant=False),
            "save_on_cpu": None}
    for name, run in runs.items():
        with torch.autograd.graph.save_on_cpu() if run is None else contextlib.nullcontext():
            grads = _grads(blocks, x, run)
        for i, (a, b) in enumerate(zip(plain, grads)):
            assert torch.equal(a, b), f"{backend} {name}: tensor {i}"
    with torch.no_grad():
        blocks(x)
    assert kept == []


def _graph_edges(loss):
    """Every edge ``(node, next_node, input_nr)`` of ``loss``'s backward graph, each once."""
    seen, todo = set(), [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, nr in node.next_functions:
            if nxt is not None:
                yield node, nxt, nr
                todo.append(nxt)


def _input_uses(loss):
    """How many gradients autograd's engine sums, in the backward graph of ``loss``: for each input of each node
    (an (node, input_nr) buffer), one add for each edge into it past the first."""
    edges = {}
    for _, nxt, nr in _graph_edges(loss):
        edges[(nxt, nr)] = edges.get((nxt, nr), 0) + 1
    return sum(n - 1 for n in edges.values())


def _blocks_step(blocks, x, out_grad, graph_fact, run):
    """One backward of ``(run(x) * out_grad).sum()`` (``run``: the blocks, or a wrapper of them):
    ``(graph_fact(loss), [loss, x's gradient] + every parameter's gradient)``."""
    blocks.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    loss = (run(xi) * out_grad).sum()
    fact = graph_fact(loss)
    loss.backward()
    return fact, [loss, xi.grad] + [p.grad for p in blocks.parameters()]


def _bias_edges(loss):
    """For each parameter reached from ``loss``'s backward graph, the names of the node classes that send it a
    gradient (the parents of its AccumulateGrad)."""
    parents = {}
    for node, nxt, _ in _graph_edges(loss):
        if hasattr(nxt, "variable"):
            parents.setdefault(id(nxt.variable), []).append(type(node).__name__)
    return parents


@pytest.mark.parametrize("backend", COMPILED)
def test_bias_grads_made_in_eca(backend, monkeypatch):
    """NormFreeBlock.bias_grads_in_eca: conv3's bias and the downsample conv's get their gradients from the ECA
    tail's node (eca_residual's ``biases``), not from their convs' nodes, which sum nothing; the loss and every
    other gradient are the same bits as without the policy, and those biases' gradients agree to the fp32
    contract (the Triton backward sums the shortcut's gradient in its reduction: another order). The same with
    input_grads_in_conv, under checkpointing and save_on_cpu; without gradients nothing changes."""
    blocks, x = _tail_recompute_case(backend, 71)
    with torch.no_grad():
        out_grad = torch.randn(blocks(x).shape, generator=torch.Generator().manual_seed(72))
    out_grad = out_grad.contiguous(memory_format=torch.channels_last)
    moved = {id(b.conv3.bias) for b in blocks} | {id(b.downsample.conv.bias) for b in blocks if b.downsample}
    assert len(moved) == 5

    def step(run=blocks):
        return _blocks_step(blocks, x, out_grad, _bias_edges, run)

    names = ["loss", "x"] + [n for n, _ in blocks.named_parameters()]
    params = [None, None] + list(blocks.parameters())

    def same(plain, got, what):
        for name, p, a, b in zip(names, params, plain, got):
            if p is not None and id(p) in moved:
                assert_rel_close(b, a, 1e-6, f"{backend} {what}: {name}")
            else:
                assert torch.equal(a, b), f"{backend} {what}: {name}"

    for handing in (False, True):
        monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "input_grads_in_conv", handing)
        monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "bias_grads_in_eca", False)
        _, plain = step()
        monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "bias_grads_in_eca", True)
        edges, got = step()
        for p in blocks.parameters():
            senders = edges[id(p)]
            if id(p) in moved:
                assert len(senders) == 1 and senders[0].endswith("eca_residual_autograd_with_biasesBackward"), senders
            elif all(p is not b.attn_last.conv.weight for b in blocks):  # (ECA's own weight: eca's input)
                assert not any("eca_residual" in s for s in senders), senders
        same(plain, got, f"input_grads_in_conv={handing}")
        for p in blocks.parameters():  # (each gradient a tensor of its own, not a row of the op's output)
            assert p.grad.untyped_storage().nbytes() == p.grad.numel() * p.grad.element_size()
        runs = {"checkpoint": lambda xi: torch.utils.checkpoint.checkpoint(blocks, xi, use_reentrant=False),
                "save_on_cpu": blocks}
        for name, run in runs.items():
            with torch.autograd.graph.save_on_cpu() if name == "save_on_cpu" else contextlib.nullcontext():
                same(plain, step(run)[1], f"input_grads_in_conv={handing} {name}")
    with torch.no_grad():
        monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "bias_grads_in_eca", False)
        plain = blocks(x)
        monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "bias_grads_in_eca", True)
        assert torch.equal(plain, blocks(x))
    # an fp32 block input (its shortcut) under bf16 autocast: the tail does not fuse (two dtypes), and the policy
    # steps aside, so that conv3's bias gradient is summed in fp32 by its conv as without it (the same bits)
    block, results = blocks[2], {}
    with torch.no_grad():
        block_input = blocks[:2](x)
    for policy in (False, True):
        monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "bias_grads_in_eca", policy)
        block.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = block(block_input.clone().requires_grad_()).float().square().sum()
        loss.backward()
        results[policy] = [p.grad for p in block.parameters()]
    assert block.downsample is None and all(torch.equal(a, b) for a, b in zip(*results.values()))


@pytest.mark.parametrize("backend", COMPILED)
def test_time_policies_together(backend, monkeypatch):
    """The three NormFreeBlock time policies at once, every activated conv keeping z (as the report's combined
    row runs them, and as they would run if all became the default): each does its part beside the others (no
    conv output held after the forward, one engine add fewer a block, conv3's and the downsample convs' biases
    fed by the ECA node alone), the loss is the same bits as with none of them, and every gradient the same to
    fp32 rounding; the same under checkpointing and save_on_cpu (where inputs_from_z steps aside)."""
    blocks, x = _tail_recompute_case(backend, 73)
    _all_keep_z(blocks, monkeypatch)
    with torch.no_grad():
        out_grad = torch.randn(blocks(x).shape, generator=torch.Generator().manual_seed(74))
    out_grad = out_grad.contiguous(memory_format=torch.channels_last)
    moved = {id(b.conv3.bias) for b in blocks} | {id(b.downsample.conv.bias) for b in blocks if b.downsample}
    outputs = _spy_conv_outputs(monkeypatch)

    def facts(loss):
        gc.collect()  # (the Triton interpreter holds each launch's arguments in a cycle until then)
        return [r() is not None for r in outputs], _input_uses(loss), _bias_edges(loss)

    def step(run=blocks):
        outputs.clear()
        return _blocks_step(blocks, x, out_grad, facts, run)

    def policies(on):
        for name in TIME_POLICIES:
            monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, name, on)

    policies(False)
    (alive, uses, _), plain = step()
    policies(True)
    (alive_all, uses_all, edges), got = step()
    assert alive == [True] * 3 * len(blocks) and alive_all == [False] * 3 * len(blocks), (alive, alive_all)
    assert uses_all == uses - len(blocks), (uses, uses_all)
    for p in blocks.parameters():
        if id(p) in moved:
            assert len(edges[id(p)]) == 1 and "eca_residual_autograd_with_biases" in edges[id(p)][0], edges[id(p)]
    assert torch.equal(plain[0], got[0]), (plain[0], got[0])
    for i, (a, b) in enumerate(zip(plain, got)):
        assert_rel_close(b, a, 1e-6, f"{backend} tensor {i}")
    runs = {"checkpoint": lambda xi: torch.utils.checkpoint.checkpoint(blocks, xi, use_reentrant=False),
            "save_on_cpu": blocks}
    for name, run in runs.items():
        with torch.autograd.graph.save_on_cpu() if name == "save_on_cpu" else contextlib.nullcontext():
            grads = step(run)[1]
        assert torch.equal(plain[0], grads[0]), name
        for i, (a, b) in enumerate(zip(plain, grads)):
            assert_rel_close(b, a, 1e-6, f"{backend} {name}: tensor {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["pre_x", "pre_act", "pool pre_x"])
def test_return_input_sums_the_inputs_gradients_in_the_conv(backend, form, rng, monkeypatch):
    """``return_input``: ``(result, input)``, the input whose gradient the conv makes (pre_x, or x with pre_act).
    On the compiled backends in eager training it is a view of that input whose gradient comes back to the conv's
    node: the engine adds nothing, the SiLU backward's pass adds it (one call with ``add``), and every gradient is
    the same bits as when the caller uses the input itself (fp32 on the CPU: the same two fp32 roundings).
    Elsewhere (the reference backend, no gradients, an input that is neither) it is the given tensor itself."""
    from nfnet_fast.kernels import silu_scale as silu_kernels
    name = "1x1 pool" if form.startswith("pool") else "3x3 g3 width5 s2"
    (p, w, b), kw = _case(name, rng)
    kw["act"] = "silu"
    beta = 0.37 + torch.rand((), generator=rng).item()
    out_weight = torch.randn(ops.fused_conv(ops.silu_scale(p, beta), w, b, **kw).shape, generator=rng)
    shortcut_weight = torch.randn(p.shape, generator=rng)
    adds, real_backward = [], silu_kernels.backward
    monkeypatch.setattr(silu_kernels, "backward",
                        lambda g, x, beta, add=None: (adds.append(add is not None), real_backward(g, x, beta, add))[1])

    def run(returning, use_out=True, use_input=True):
        pl, wl, bl = _leaves((p, w, b))
        if form == "pre_act":
            res = ops.fused_conv(pl, wl, bl, pre_act=True, pre_beta=beta, return_input=returning, backend=backend, **kw)
        else:
            a = ops.silu_scale(pl, beta, backend=backend)
            res = ops.fused_conv(a, wl, bl, pre_x=pl, pre_beta=beta, return_input=returning, backend=backend, **kw)
        out, given = res if returning else (res, pl)
        if returning and backend != "reference":
            assert given is not pl and given.data_ptr() == pl.data_ptr() and given.grad_fn is out.grad_fn
        else:
            assert given is pl
        loss = sum(([(out * out_weight).sum()] if use_out else []) + ([(given * shortcut_weight).sum()] if use_input
                                                                      else []))
        uses = _input_uses(loss)
        adds.clear()
        loss.backward()
        return uses, list(adds), [pl.grad, wl.grad, bl.grad]

    for use_out, use_input in ((True, True), (True, False), (False, True)):
        uses, adds_plain, plain = run(False, use_out, use_input)
        uses_r, adds_r, returned = run(True, use_out, use_input)
        for i, (a, r) in enumerate(zip(plain, returned)):
            assert (a is None and r is None) if a is None else torch.equal(a, r), (form, use_out, use_input, i)
        if backend != "reference" and use_out and use_input:
            assert uses_r == uses - 1, (uses, uses_r)
            assert adds_r == [True] and adds_plain == [False], (adds_plain, adds_r)
    pl = p.clone().requires_grad_()
    with torch.no_grad():
        assert ops.fused_conv(ops.silu_scale(pl, beta), w, b, pre_x=pl, pre_beta=beta, return_input=True,
                              backend=backend, **kw)[1] is pl
    xl = p.clone().requires_grad_()  # (no pre-activation: its gradient comes from the GEMM alone)
    assert ops.fused_conv(xl, w, b, return_input=True, backend=backend, **kw)[1] is xl
    (out, sums), z, given = ops.fused_conv(ops.silu_scale(pl, beta), w, b, pre_x=pl, pre_beta=beta, want_sums=True,
                                           keep_z=True, return_z=True, return_input=True, backend=backend, **kw)
    assert given.data_ptr() == pl.data_ptr() and sums.shape == out.shape[:2]
    assert (z is None) == (backend == "reference")


def test_backward_fake_checks_the_added_input_gradient():
    """Traced (meta tensors, the fake kernel), the backward op refuses a ``grad_x_add`` of another shape than x,
    and the kernel's launcher refuses it too."""
    op = torch.ops.nfnet_fast._triton_fused_conv_backward
    x, w = torch.empty(2, 6, 5, 5, device="meta"), torch.empty(4, 3, 3, 3, device="meta")

    def call(add):
        return op(torch.empty(2, 4, 5, 5, device="meta"), None, x, w, None, 1, [1, 1, 1, 1], 2, 1, 1.0, False, 0.5,
                  None, 1.0, 0.0, True, True, False, False, None, None, None, add)

    assert call(torch.empty(2, 6, 5, 5, device="meta"))[0].shape == x.shape
    with pytest.raises(RuntimeError, match="grad_x_add"):
        call(torch.empty(2, 6, 5, 4, device="meta"))
    from nfnet_fast.kernels import fused_conv as fc
    xs, ws = torch.randn(2, 6, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="grad_x_add"):
        fc.backward(torch.randn(2, 4, 5, 5), None, xs, ws, None, padding=1, groups=2, pre_beta=0.5,
                    grad_x_add=torch.randn(2, 6, 5, 4))


@pytest.mark.parametrize("backend", COMPILED)
def test_input_grads_summed_in_conv(backend, monkeypatch):
    """NormFreeBlock.input_grads_in_conv: each block's input x has one gradient edge (its downsample conv's at a
    stage's first block, conv1's else), whose backward sums x's other gradient in its SiLU pass: the engine makes
    one add fewer a block, and the loss and every gradient are the same bits as without the policy (fp32). The
    same under checkpointing and save_on_cpu; with the SiLU prologue; and without gradients nothing changes.
    (The output's gradient is channels_last, as the model's next conv sends it: the engine's add of two gradients
    in different layouts makes a contiguous sum, whose bias sums round in another order.)"""
    blocks, x = _tail_recompute_case(backend, 61)
    with torch.no_grad():
        out_grad = torch.randn(blocks(x).shape, generator=torch.Generator().manual_seed(62))
    out_grad = out_grad.contiguous(memory_format=torch.channels_last)

    def step(run=blocks):
        return _blocks_step(blocks, x, out_grad, _input_uses, run)

    for prologue in (False, True):
        monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "silu_prologue", prologue)
        results, uses = {}, {}
        for handing in (False, True):
            monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "input_grads_in_conv", handing)
            uses[handing], results[handing] = step()
        assert uses[True] == uses[False] - len(blocks), uses
        for i, (a, b) in enumerate(zip(results[False], results[True])):
            assert torch.equal(a, b), f"{backend} prologue={prologue} tensor {i}"
        runs = {"checkpoint": lambda xi: torch.utils.checkpoint.checkpoint(blocks, xi, use_reentrant=False),
                "save_on_cpu": blocks}
        for name, run in runs.items():
            with torch.autograd.graph.save_on_cpu() if name == "save_on_cpu" else contextlib.nullcontext():
                grads = step(run)[1]
            for i, (a, b) in enumerate(zip(results[False], grads)):
                assert torch.equal(a, b), f"{backend} prologue={prologue} {name}: tensor {i}"
        with torch.no_grad():
            monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "input_grads_in_conv", False)
            plain = blocks(x)
            monkeypatch.setattr(nfnet_fast.nn.NormFreeBlock, "input_grads_in_conv", True)
            assert torch.equal(plain, blocks(x))
