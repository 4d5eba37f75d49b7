"""The shared test helpers do what the GPU tests rely on; these run on the CPU, where the bugs the
first GPU run found (a CPU generator filling a CUDA tensor, TF32 left on) can be caught too."""
import torch

from conftest import TF32_SWITCHES, ieee_fp32_switches, random_like


def test_random_like_follows_the_tensor_device_and_dtype():
    """Upstream gradients land on the output's device: `meta` stands in for a CUDA output here,
    since `torch.randn(..., generator=<CPU generator>, device=<not CPU>)` raises for either."""
    out = torch.empty(3, 5, device="meta", dtype=torch.float16)
    g = random_like(out, seed=4)
    assert g.device.type == "meta" and g.dtype == torch.float16 and g.shape == out.shape
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
