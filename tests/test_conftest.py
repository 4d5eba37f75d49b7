"""The shared test helpers do what the GPU tests rely on; these run on the CPU, where the bugs the
first GPU run found (a CPU generator filling a CUDA tensor, TF32 left on) can be caught too."""
import pytest
import torch

from conftest import TF32_SWITCHES, ieee_fp32_switches, random_like


def test_random_like_follows_the_tensor_device_and_dtype():
    """Upstream gradients land on the output's device. `meta` stands in for CUDA here: autograd
    refuses a CPU gradient for a meta output exactly as it refused one for a CUDA output on the GPU
    ("invalid gradient at index 0 - expected device ..."). (The other GPU failure, a CPU generator
    passed with device="cuda" to torch.randn, raises on CUDA only; random_like never does that.)"""
    x = torch.randn(3, 5, device="meta", dtype=torch.float16, requires_grad=True)
    out = x * 2
    with pytest.raises(RuntimeError, match="expected device meta"):
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(4)), retain_graph=True)
    g = random_like(out, seed=4)
    assert g.device.type == "meta" and g.dtype == torch.float16 and g.shape == out.shape
    out.backward(g)
    assert x.grad.device.type == "meta"
    a, b = random_like(torch.empty(7, 2), 4), random_like(torch.empty(7, 2), 4)
    assert torch.equal(a, b) and not torch.equal(a, random_like(torch.empty(7, 2), 5))


def test_every_test_runs_with_tf32_off():
    """The autouse `ieee_fp32` fixture: cuDNN's TF32 switch is on by default in PyTorch."""
    assert [m.allow_tf32 for m in TF32_SWITCHES] == [False, False]


def test_tf32_switches_are_restored():
    for before in ([True, False], [False, True], [True, True]):
        for m, v in zip(TF32_SWITCHES, before):
            m.allow_tf32 = v
        with ieee_fp32_switches():
            assert [m.allow_tf32 for m in TF32_SWITCHES] == [False, False]
        assert [m.allow_tf32 for m in TF32_SWITCHES] == before
        try:
            with ieee_fp32_switches():
                raise KeyError
        except KeyError:
            pass
        assert [m.allow_tf32 for m in TF32_SWITCHES] == before
