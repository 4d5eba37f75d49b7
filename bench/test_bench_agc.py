"""Adaptive gradient clipping of a training step: nfnet_fast.adaptive_clip_grad_ against timm's adaptive_clip_grad,
same process, same parameters and gradients (issue 12, item 3).

The parameters are the model's (eca_nfnet_l0: 183 tensors, 24M values without the classifier, which training
leaves unclipped), channels_last as the training benchmark has them, fp32 (bf16 autocast keeps fp32 weights and
gradients), with random gradients of which some units are clipped and some not. Each timed call clips the same
gradients again: the work does not depend on how many units are clipped. extra_info: impl, tensors, values,
ms (median), ops (aten ops dispatched by one call: views excluded; on a GPU each is a kernel launch, a multi-tensor
op one launch per chunk of tensors) and max_rel_err (against timm's result on the same gradients).
"""
import pytest
import torch
from timm.utils import adaptive_clip_grad

from conftest import DEVICE, MODEL, cached
from nfnet_fast import benchmark as B
from nfnet_fast.train import adaptive_clip_grad_, agc_parameters

CLIP = 0.015  # eca_nfnet_l0's fine-tuning clip factor
# nfnet_fast issues its ops from C++ where the extension is built; "nfnet_fast python" is its Python twin (what
# torch.compile traces): the same ops, more host time
IMPLS = {"timm": adaptive_clip_grad, "nfnet_fast": adaptive_clip_grad_,
         "nfnet_fast python": lambda ps, c: adaptive_clip_grad_(ps, c, _native=False)}


def _case():
    """(parameters without the classifier, their gradients): one model for every contender."""
    def make():
        torch.manual_seed(0)
        model = B.build_reference(MODEL, DEVICE).train()
        params = agc_parameters(model)
        g = torch.Generator(device=DEVICE).manual_seed(0)
        grads = [(torch.randn(p.shape, device=DEVICE, generator=g) * 10 ** -(4 * torch.rand((), device=DEVICE,
                                                                                             generator=g)))
                 .contiguous(memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)
                 for p in params]
        return params, grads
    return cached(("agc", MODEL), make)


def _set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone(memory_format=torch.preserve_format)


def _dispatched_ops(fn) -> int:
    """aten ops one call dispatches, views and detach excluded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += not any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
            return func(*args, **(kwargs or {}))

    with Count() as mode:
        fn()
    return mode.n


@pytest.mark.parametrize("impl", IMPLS)
def test_agc(benchmark, run_timed, impl):
    params, grads = _case()
    clip = IMPLS[impl]
    _set_grads(params, grads)
    adaptive_clip_grad(params, CLIP)
    ref = [p.grad.clone() for p in params]
    _set_grads(params, grads)
    clip(params, CLIP)
    err = max(B.max_rel_err(p.grad, r) for p, r in zip(params, ref))
    ops = _dispatched_ops(lambda: clip(params, CLIP))
    median = run_timed(lambda: clip(params, CLIP))
    benchmark.extra_info.update(kind="agc", impl=impl, model=MODEL, tensors=len(params),
                                values=sum(p.numel() for p in params), ms=1e3 * median, ops=ops, max_rel_err=err,
                                clip_factor=CLIP)
    assert err <= 1e-6, f"{impl}: {err:.2e} from timm's result"
