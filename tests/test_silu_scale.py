"""ops.silu_scale on every backend that runs on the CPU here, against float64 math."""
import pytest
import torch

from conftest import DropsGradient, assert_rel_close, counted_work, cpu_backends, dtype_tol
from nfnet_fast import ops

BACKENDS = cpu_backends("silu_scale")


def _layouts(shape, g):
    x = torch.randn(shape, generator=g) * 3
    yield "contiguous", x
    if x.dim() == 4:
        yield "channels_last", x.to(memory_format=torch.channels_last)
        yield "strided_view", torch.randn(shape[0], shape[1] * 2, shape[2], shape[3] + 1, generator=g)[:, ::2, :, 1:]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 1, 1, 1), (3, 130, 1, 1), (1, 67, 9, 11), (1000,)])
def test_forward_backward(backend, dtype, shape, rng):
    beta = float(torch.rand((), generator=rng)) + 0.3
    for layout, x0 in _layouts(shape, rng):
        x = x0.to(dtype).detach().requires_grad_()  # a fresh leaf, strides kept
        out = ops.silu_scale(x, beta, backend=backend)
        xd = x.detach().double()
        ref = xd * torch.sigmoid(xd) * beta
        assert out.dtype == dtype and out.shape == x.shape
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
            assert out.is_contiguous(memory_format=torch.channels_last), "channels_last input must give channels_last"
        assert_rel_close(out, ref, dtype_tol(dtype), f"{backend} {dtype} {layout} forward")

        grad = torch.randn(shape, generator=rng).to(dtype)
        out.backward(grad)
        s = torch.sigmoid(xd)
        ref_grad = grad.double() * beta * s * (1 + xd * (1 - s))
        assert_rel_close(x.grad, ref_grad, 2 * dtype_tol(dtype), f"{backend} {dtype} {layout} grad")


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not run here")
@pytest.mark.parametrize("grad_layout", ["same", "other"])
def test_triton_step_launches_and_copies(grad_layout, rng):
    """One launch each way; a gradient in x's layout is used as it is, one in the other layout is
    copied to x's once (the cuda backend's rule too), nothing else is copied."""
    from nfnet_fast.kernels import silu_scale as silu_kernels

    shape = tuple(int(torch.randint(lo, hi, (), generator=rng)) for lo, hi in ((1, 4), (2, 40), (2, 9), (2, 9)))
    x0 = torch.randn(shape, generator=rng).contiguous(memory_format=torch.channels_last).requires_grad_()
    x = x0.view_as(x0)  # not a leaf: no gradient accumulated (or copied)
    fmt = torch.channels_last if grad_layout == "same" else torch.contiguous_format
    grad = torch.randn(shape, generator=rng).contiguous(memory_format=fmt)
    with counted_work(silu_kernels) as forward:
        out = ops.silu_scale(x, 0.8, backend="triton")
    with counted_work(silu_kernels) as backward:
        out.backward(grad)
    assert forward["launches"] == {"_silu_scale_fwd_kernel": 1} and forward["copies"] == []
    assert backward["launches"] == {"_silu_scale_bwd_kernel": 1}
    assert backward["copies"] == ([x.numel()] if grad_layout == "other" else [])
    assert x0.grad is not None


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_no_backward_work_without_a_gradient(backend, rng):
    """An output no gradient reaches (an NF block's pre-activation in training: its convs send the gradient
    to the block input themselves) costs its backward nothing: no zero gradient made, no backward op, nothing
    added to x's gradient. (Autograd made a zero tensor for it, and the op's backward ran its kernel on it,
    once per block and step: about 9 activation volumes of memory traffic a block.)"""
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(2, 8, 5, 5, generator=rng).contiguous(memory_format=torch.channels_last).requires_grad_()
    a = ops.silu_scale(x, 1.3, backend=backend)
    out = DropsGradient.apply(a, x * 2.0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out.backward(torch.ones_like(out))
    names = [e.name for e in prof.events()]
    assert not [n for n in names if "silu_scale_backward" in n or n in ("aten::zeros", "aten::zero_")], names
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


def test_matches_timm_preactivation(rng):
    """The NF block's pre-activation `act1(x) * beta` with timm's SiLU."""
    x = torch.randn(2, 16, 5, 5, generator=rng)
    assert_rel_close(ops.silu_scale(x, 0.7), torch.nn.SiLU()(x) * 0.7, 1e-6)


@pytest.mark.parametrize("args, err, match", [
    (([1.0, 2.0], 1.0), TypeError, "x must be a torch.Tensor"),
    ((torch.ones(2, 3, dtype=torch.int32), 1.0), TypeError, "x must be float32"),
    ((torch.ones(2, 3), "1"), TypeError, "beta must be a Python float"),
    ((torch.ones(2, 3), torch.tensor(1.0)), TypeError, "beta must be a Python float"),
    ((torch.ones(0, 3, 4, 4), 1.0), ValueError, "x is empty"),
    ((torch.ones(2, 3).to_sparse(), 1.0), ValueError, "x must be a dense"),
])
def test_bad_input(args, err, match):
    with pytest.raises(err, match=match):
        ops.silu_scale(*args)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.silu_scale(torch.ones(2), 1.0, backend="cudnn")


@pytest.mark.skipif("triton" not in BACKENDS, reason="the triton backend does not run here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("add_form", ["same", "other layout", "other dtype"])
def test_triton_backward_adds_the_other_gradient(dtype, add_form, rng):
    """The SiLU backward's ``add`` (x's gradient from its other uses, which a fused conv's backward hands it):
    ``grad * beta * silu'(x) + add`` in one launch, summed in fp32 and rounded once; an ``add`` in another
    layout or dtype is copied into x's first; one of another shape is refused."""
    from nfnet_fast.kernels import silu_scale as silu_kernels

    shape = tuple(int(torch.randint(lo, hi, (), generator=rng)) for lo, hi in ((1, 4), (2, 40), (2, 9), (2, 9)))
    beta = float(torch.rand((), generator=rng)) + 0.3
    x = (3 * torch.randn(shape, generator=rng)).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, generator=rng).to(dtype).contiguous(memory_format=torch.channels_last)
    add = torch.randn(shape, generator=rng).to(dtype).contiguous(memory_format=torch.channels_last)
    if add_form == "other layout":
        add = add.contiguous()
    elif add_form == "other dtype":
        add = add.double()
    with counted_work(silu_kernels) as work:
        got = silu_kernels.backward(grad, x, beta, add=add)
    assert work["launches"] == {"_silu_scale_bwd_kernel": 1}
    assert work["copies"] == ([] if add_form == "same" else [x.numel()])
    assert got.dtype == dtype and got.stride() == x.stride()
    xd, s = x.double(), torch.sigmoid(x.double())
    ref = grad.double() * beta * s * (1 + xd * (1 - s)) + add.to(dtype).double()
    assert_rel_close(got, ref, dtype_tol(dtype), f"{dtype} {add_form}")
    if dtype == torch.float32:  # (one fp32 sum of the two fp32 gradients: what autograd's add of them gives)
        assert torch.equal(got, silu_kernels.backward(grad, x, beta) + add.float())
    with pytest.raises(ValueError, match="add must have"):
        silu_kernels.backward(grad, x, beta, add=add[:, :, 1:])
