"""ops.eca and ops.eca_residual on every CPU backend here, against timm's EcaModule in float64."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers import EcaModule as TimmEca

from conftest import assert_rel_close, check_backward_against_float64, counted_work, cpu_backends, dtype_tol
from nfnet_fast import ops

SHAPES = [(2, 16, 5, 7), (1, 67, 3, 3), (3, 130, 1, 1), (1, 256, 9, 9), (2, 9, 1, 13)]
LAYOUTS = ["contiguous", "channels_last", "strided_view"]


def _make(shape, layout, dtype, g, scale=1.0):
    if layout == "strided_view":  # every other channel of a wider, cropped tensor: no dense layout
        n, c, h, w = shape
        x = (torch.randn(n, 2 * c, h, w + 2, generator=g) * scale)[:, ::2, :, 2:]
    else:
        x = torch.randn(shape, generator=g) * scale
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    return x.to(dtype).detach().requires_grad_()


def _timm_eca(channels, g):
    eca = TimmEca(channels).double()
    with torch.no_grad():
        eca.conv.weight.normal_(0, 0.7, generator=g)
    return eca


def _expect_format(out, x):
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert out.is_contiguous(memory_format=torch.channels_last), "channels_last input must give channels_last"


@pytest.mark.parametrize("backend", cpu_backends("eca"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_eca(backend, dtype, shape, layout, rng):
    x = _make(shape, layout, dtype, rng)
    eca = _timm_eca(shape[1], rng)
    weight = eca.conv.weight.detach().float().requires_grad_()
    gain = float(torch.rand((), generator=rng)) * 2 + 0.5
    out = ops.eca(x, weight.to(dtype) if dtype != torch.float32 else weight, gain, backend=backend)
    xd = x.detach().double().requires_grad_()
    ref = gain * eca(xd)
    assert out.dtype == dtype
    _expect_format(out, x)
    assert_rel_close(out, ref, dtype_tol(dtype), f"{backend} {dtype} forward")
    leaves = [("input", x, xd, None)] + ([("weight", weight, eca.conv.weight, 1e-5)] if dtype == torch.float32 else [])
    check_backward_against_float64([out], [ref], leaves, dtype, rng, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", cpu_backends("eca_residual"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("with_next, with_sums", [(False, False), (True, False), (True, True)],
                         ids=["x", "x+a", "x+a from sums"])
def test_eca_residual(backend, dtype, shape, layout, with_next, with_sums, rng):
    """With ``sums`` (y's channel sums, as conv3's epilogue hands them over) the compiled backends
    skip pooling y; the outputs and y's gradient (through the means too) are the same."""
    y = _make(shape, layout, dtype, rng)
    shortcut = _make(shape, layout, dtype, rng, scale=2.0)
    eca = _timm_eca(shape[1], rng)
    weight = eca.conv.weight.detach().to(dtype).requires_grad_()
    alpha, attn_gain = 0.2 + 0.1 * float(torch.rand((), generator=rng)), 2.0
    beta_next = 1 / (1 + 0.04 * float(torch.randint(1, 6, (), generator=rng))) ** 0.5 if with_next else None
    sums = y.detach().float().sum((2, 3)) if with_sums else None
    out = ops.eca_residual(y, weight, shortcut, alpha, attn_gain, beta_next, sums=sums, backend=backend)

    yd, sd = y.detach().double().requires_grad_(), shortcut.detach().double().requires_grad_()
    x_ref = attn_gain * eca(yd) * alpha + sd  # timm's NormFreeBlock tail, in float64
    refs = (x_ref, F.silu(x_ref) * beta_next) if with_next else (x_ref,)
    outs = out if with_next else (out,)
    assert isinstance(out, tuple) == with_next
    for o, r, name in zip(outs, refs, ("x_next", "a_next")):
        assert o.dtype == dtype
        _expect_format(o, y)
        assert_rel_close(o, r, dtype_tol(dtype), f"{backend} {dtype} {name}")

    check_backward_against_float64(outs, refs, [
        ("y", y, yd, None), ("shortcut", shortcut, sd, None),
        ("weight", weight, eca.conv.weight, 1e-5 if dtype == torch.float32 else 0.05)], dtype, rng, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", cpu_backends("eca_residual"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_next", [False, True], ids=["x", "x+a"])
@pytest.mark.parametrize("given", ["both", "y", "shortcut"])
def test_eca_residual_biases_get_the_sums_of_their_tensors_gradients(backend, dtype, layout, with_next, given, rng):
    """``biases``: the per-channel biases that y's and the shortcut's producers added (detached) get the gradients
    those producers would have made, y's and the shortcut's gradients summed over (N, H, W), while the outputs and
    every other gradient are the same bits as without them. On the compiled backends an eager call makes them in
    its own node (the Triton backward from its reduction's sums, before rounding: so within the storage dtype's
    rounding of the plain sum of the stored gradient; in fp32 the fp32 contract)."""
    shape = _random_shape(rng)
    y = _make(shape, layout, dtype, rng)
    shortcut = _make(shape, layout, dtype, rng, scale=2.0)
    weight = torch.randn(1, 1, 5, generator=rng).to(dtype).requires_grad_()
    alpha, attn_gain = 0.2 + 0.1 * float(torch.rand((), generator=rng)), 2.0
    beta_next = 0.9 if with_next else None
    biases = tuple(torch.randn(shape[1], generator=rng).requires_grad_() if given in ("both", name) else None
                   for name in ("y", "shortcut"))
    out_grads = [torch.randn(shape, generator=rng).to(dtype) for _ in range(2 if with_next else 1)]

    def run(with_biases):
        leaves = [t.detach().clone().requires_grad_() for t in (y, shortcut, weight)]
        kwargs = dict(biases=biases) if with_biases else {}
        out = ops.eca_residual(leaves[0], leaves[2], leaves[1], alpha, attn_gain, beta_next, backend=backend,
                               **kwargs)
        outs = out if with_next else (out,)
        if with_biases and backend != "reference":  # (one node: the biases' AccumulateGrads are its next functions)
            nexts = {id(getattr(n, "variable", None)) for n, _ in outs[0].grad_fn.next_functions if n is not None}
            assert {id(b) for b in biases if b is not None} <= nexts, f"{backend}: the biases are not eca's inputs"
        torch.autograd.backward(outs, out_grads)
        return outs, [t.grad for t in leaves]

    outs, grads = run(True)
    plain_outs, plain_grads = run(False)
    for a, b in zip(outs + tuple(grads), plain_outs + tuple(plain_grads)):
        assert torch.equal(a, b)
    tol = 1e-6 if dtype == torch.float32 else dtype_tol(dtype)
    for bias, plain, name in zip(biases, plain_grads[:2], ("y", "shortcut")):
        if bias is not None:
            assert bias.grad.dtype == torch.float32
            assert_rel_close(bias.grad, plain.double().sum((0, 2, 3)), tol, f"{backend} {dtype} {name}'s bias")
            bias.grad = None


def test_eca_residual_biases_elsewhere_through_plain_autograd(rng):
    """Where no eager node of a compiled backend takes them (no gradient asked for, torch.func), ``biases`` change
    nothing in the values, and their gradients still come through plain autograd."""
    shape = (2, 12, 4, 5)
    y, shortcut = (torch.randn(shape, generator=rng) for _ in range(2))
    weight = torch.randn(3, generator=rng)
    biases = (torch.randn(12, generator=rng), torch.randn(12, generator=rng))
    for backend in cpu_backends("eca_residual"):
        plain = ops.eca_residual(y, weight, shortcut, 0.3, 2.0, backend=backend)
        with torch.no_grad():
            assert torch.equal(ops.eca_residual(y, weight, shortcut, 0.3, 2.0, biases=biases, backend=backend), plain)

        def loss(b_y, b_sc):
            return ops.eca_residual(y, weight, shortcut, 0.3, 2.0, biases=(b_y, b_sc), backend=backend).square().sum()
        got = torch.func.grad(loss, argnums=(0, 1))(*biases)
        yy, ss = y.clone().requires_grad_(), shortcut.clone().requires_grad_()
        ops.eca_residual(yy, weight, ss, 0.3, 2.0, backend="reference").square().sum().backward()
        assert_rel_close(got[0], yy.grad.sum((0, 2, 3)), 1e-5, f"{backend} torch.func y's bias")
        assert_rel_close(got[1], ss.grad.sum((0, 2, 3)), 1e-5, f"{backend} torch.func shortcut's bias")


@pytest.mark.skipif("triton" not in cpu_backends("eca_residual"), reason="the triton backend does not run here")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("grads", ["x_next", "a_next", "x_next+a_next"])
def test_triton_eca_backward_bias_sums_with_pixel_splits(layout, grads, rng):
    """The Triton backward's ``bias_sums`` in the GPU's launch configuration (the pixels split across programs, so
    the reduce pass's partial sums of the shortcut's gradient are summed again): the float64 sums of grad_y and of
    the shortcut's gradient to the fp32 contract, and every other output the same bits as without them."""
    from nfnet_fast.kernels import eca_residual as eca_kernels
    shape = (2, int(torch.randint(100, 200, (), generator=rng)), 31, 37)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    y, shortcut, grad_x, grad_a = (torch.randn(shape, generator=rng).contiguous(memory_format=fmt) for _ in range(4))
    weight = torch.randn(5, generator=rng)
    assert eca_kernels.plan(shape, layout == "channels_last", y.device, pool=True, gpu_config=True).splits > 1
    has_a = "a_next" in grads
    beta = 0.8 if has_a else None
    *_, stats = eca_kernels.forward(y, weight, shortcut, 0.35, beta, gpu_config=True)
    args = (grad_x if grads != "a_next" else None, grad_a if has_a else None, y, weight, shortcut if has_a else None,
            stats, 0.35, beta)
    grad_y, grad_weight, grad_shortcut, bias_sums = eca_kernels.backward(*args, gpu_config=True, want_bias_sums=True)
    plain = eca_kernels.backward(*args, gpu_config=True)
    assert plain[3] is None
    for a, b in zip((grad_y, grad_weight, grad_shortcut), plain[:3]):
        assert (a is None and b is None) or torch.equal(a, b)
    shortcut_grad = grad_shortcut if has_a else grad_x
    assert bias_sums.shape == (2, shape[1]) and bias_sums.dtype == torch.float32
    assert_rel_close(bias_sums[0], grad_y.double().sum((0, 2, 3)), 1e-6, f"{layout} {grads}: grad_y's sums")
    assert_rel_close(bias_sums[1], shortcut_grad.double().sum((0, 2, 3)), 1e-6, f"{layout} {grads}: shortcut's")


def _random_shape(rng):
    n, c, h, w = (int(torch.randint(lo, hi, (), generator=rng)) for lo, hi in ((1, 4), (8, 80), (2, 10), (2, 10)))
    return n, c, h, w


@pytest.mark.skipif("triton" not in cpu_backends("eca_residual"), reason="the triton backend does not run here")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("with_sums", [False, True], ids=["pooled", "sums"])
@pytest.mark.parametrize("grads", ["x_next", "x_next+a_next"])
def test_triton_eca_residual_step_launches_and_copies(layout, with_sums, grads, rng):
    """The launches and copies of one training step of the triton op are those of the cuda
    backend's plan (csrc/eca_residual.cu): forward 1 launch with conv3's sums (2 without: pool,
    apply), backward 3 (two streaming passes around the small gate-gradient one), and no copy of
    an activation (with sums, one copy of those (N, C) sums, which become the saved statistics)."""
    from nfnet_fast.kernels import eca_residual as eca_kernels

    shape = _random_shape(rng)
    n, c = shape[:2]
    y0 = _make(shape, layout, torch.float32, rng)
    shortcut0 = _make(shape, layout, torch.float32, rng)
    y, shortcut = y0.view_as(y0), shortcut0.view_as(shortcut0)  # not leaves: no gradient accumulated (or copied)
    weight = torch.randn(1, 1, 5, generator=rng).requires_grad_()
    sums = y.detach().float().sum((2, 3)) if with_sums else None
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    grad_x, grad_a = (torch.randn(shape, generator=rng).contiguous(memory_format=fmt) for _ in range(2))
    with counted_work(eca_kernels) as forward:
        x_next, a_next = ops.eca_residual(y, weight, shortcut, 0.3, 2.0, 0.9, sums=sums, backend="triton")
    with counted_work(eca_kernels) as backward:
        if grads == "x_next":  # a model's blocks: conv1 and the downsample recompute a_next (pre_x)
            torch.autograd.backward(x_next, grad_x)
        else:
            torch.autograd.backward([x_next, a_next], [grad_x, grad_a])
    pooled = {} if with_sums else {"_pool_nchw_kernel" if layout == "contiguous" else "_pool_nhwc_kernel": 1}
    suffix = "nchw" if layout == "contiguous" else "nhwc"
    assert forward["launches"] == {**pooled, f"_apply_{suffix}_kernel": 1}
    assert backward["launches"] == {f"_reduce_{suffix}_kernel": 1, "_gate_bwd_kernel": 1, f"_dy_{suffix}_kernel": 1}
    assert forward["copies"] == ([n * c] if with_sums else [])
    assert backward["copies"] == []
    assert y0.grad is not None and shortcut0.grad is not None and weight.grad is not None


def test_triton_plan_memoised_and_covers_every_tile(rng):
    """The launch plan is computed once per shape (a training step asks for it three times per
    block, and computing it cost more host time than a small layer's kernels run on a GPU), and
    every plan covers each pixel tile exactly once."""
    from nfnet_fast.kernels import eca_residual as eca_kernels

    for _ in range(20):
        shape = _random_shape(rng)
        n, c, h, w = shape
        shape = (n * int(torch.randint(1, 64, (), generator=rng)), c * 8, h * 7, w * 7)  # GPU sizes: splits
        for cl in (False, True):
            for pool in (False, True):
                plan = eca_kernels.plan(shape, cl, torch.device("cpu"), pool=pool, gpu_config=True)
                assert plan is eca_kernels.plan(torch.Size(shape), cl, torch.device("cuda"), pool=pool)
                with pytest.raises(TypeError):
                    plan.tile["num_warps"] = 4  # shared by every launch of the shape: read-only
                pixels = plan.tile["BLOCK_P"] if cl else plan.tile["BLOCK_HW"]
                tiles = -(-shape[2] * shape[3] // pixels)
                assert (plan.splits - 1) * plan.per < tiles <= plan.splits * plan.per
                assert plan.splits <= eca_kernels.MAX_POOL_SPLITS or not pool


def test_weight_shapes_accepted(rng):
    x = torch.randn(2, 12, 4, 4, generator=rng)
    w = torch.randn(1, 1, 5, generator=rng)
    assert torch.equal(ops.eca(x, w), ops.eca(x, w.reshape(5)))


def _good():
    return dict(y=torch.randn(2, 8, 3, 3), weight=torch.randn(1, 1, 3), shortcut=torch.randn(2, 8, 3, 3),
                alpha=0.2, attn_gain=2.0)


@pytest.mark.parametrize("change, err, match", [
    (dict(y=torch.randn(8, 3, 3)), ValueError, "y must be 4-D"),
    (dict(y=torch.randn(0, 8, 3, 3), shortcut=torch.randn(0, 8, 3, 3)), ValueError, "y is an empty batch"),
    (dict(y=torch.randn(2, 8, 0, 3), shortcut=torch.randn(2, 8, 0, 3)), ValueError, "no channels or no pixels"),
    (dict(y=torch.randint(0, 3, (2, 8, 3, 3))), TypeError, "y must be float32"),
    (dict(weight=torch.randn(1, 1, 4)), ValueError, "k odd"),
    (dict(weight=torch.randn(2, 1, 3)), ValueError, "weight must be the ECA conv1d kernel"),
    (dict(weight=torch.randn(1, 1, 3, dtype=torch.float64).to(torch.int8)), TypeError, "weight must be float32"),
    (dict(shortcut=torch.randn(2, 8, 3, 4)), ValueError, "shortcut shape"),
    (dict(shortcut=torch.randn(2, 8, 3, 3, dtype=torch.float16)), TypeError, "shortcut has dtype"),
    (dict(shortcut=torch.randn(2, 8, 3, 3, device="meta")), ValueError, "shortcut is on meta"),
    (dict(weight=torch.randn(1, 1, 3, device="meta")), ValueError, "weight is on meta"),
    (dict(alpha="0.2"), TypeError, "alpha must be a Python float"),
    (dict(attn_gain=None), TypeError, "attn_gain must be a Python float"),
    (dict(beta_next=[1.0]), TypeError, "beta_next must be a Python float"),
    (dict(backend="triton2"), ValueError, "backend must be one of"),
    (dict(sums=torch.randn(2, 9)), ValueError, r"sums must be y's fp32 \(N, C\) = \(2, 8\)"),
    (dict(sums=torch.randn(2, 8, dtype=torch.float16)), ValueError, "sums must be y's fp32"),
    (dict(sums=torch.randn(2, 8, 1, 1)), ValueError, "sums must be 2-D"),
    (dict(sums=torch.randn(2, 8, device="meta")), ValueError, "sums is on meta"),
    (dict(biases=torch.randn(8)), TypeError, r"biases must be a pair \(y_bias, shortcut_bias\)"),
    (dict(biases=(torch.randn(8), None, None)), TypeError, "biases must be a pair"),
    (dict(biases=(torch.randn(9), None)), ValueError, r"y_bias must have one value per channel of y \(8\)"),
    (dict(biases=(None, torch.randn(8, 1))), ValueError, "shortcut_bias must be 1-D"),
    (dict(biases=(None, torch.randn(8, device="meta"))), ValueError, "shortcut_bias is on meta"),
    (dict(biases=(torch.randint(0, 3, (8,)), None)), TypeError, "y_bias must be float32"),
])
def test_eca_residual_bad_input(change, err, match):
    args = _good()
    args.update(change)
    with pytest.raises(err, match=match):
        ops.eca_residual(**args)


@pytest.mark.parametrize("change, err, match", [
    (dict(x=torch.randn(2, 8, 3, 3, 1)), ValueError, "x must be 4-D"),
    (dict(x="image"), TypeError, "x must be a torch.Tensor"),
    (dict(gain=torch.tensor(2.0)), TypeError, "gain must be a Python float"),
    (dict(weight=torch.randn(3, 1, 1)), ValueError, "weight must be the ECA conv1d kernel"),
])
def test_eca_bad_input(change, err, match):
    args = dict(x=torch.randn(2, 8, 3, 3), weight=torch.randn(1, 1, 3), gain=1.0)
    args.update(change)
    with pytest.raises(err, match=match):
        ops.eca(**args)
