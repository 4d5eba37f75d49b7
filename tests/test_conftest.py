"""The shared test helpers do what the GPU tests rely on; these run on the CPU, where the bugs the
first GPU run found (a CPU generator filling a CUDA tensor, TF32 left on) can be caught too."""
import os

import pytest
import torch

from conftest import INTERPRETER_ORIGINALS, TF32_SWITCHES, ieee_fp32_switches, random_like

interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="conftest speeds up Triton's interpreter only where it runs")


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


@interpreted
def test_interpreter_scan_of_listed_builtins_patches_what_the_full_scan_patches():
    """conftest's scan of the builtin names listed once patches the same attributes of the same modules, in the
    same order, replacing the same members, as Triton's scan of every member: for a kernel's module (tl) and for
    a helper of triton.language's own (tl.core), outside a launch and inside one (the launch's patch in place)."""
    import triton.language as tl
    import triton.language.standard as standard
    from triton.runtime import interpreter

    from kernels import silu_scale
    fast, original = interpreter._patch_builtin, INTERPRETER_ORIGINALS["_patch_builtin"]
    assert fast is not original

    def changes(fn, patch_builtin):
        interpreter._patch_builtin = patch_builtin
        try:
            scope = interpreter._patch_lang(fn)
        finally:
            interpreter._patch_builtin = fast
        # (a member patched twice in one call, as tl.tensor's __index__ where fn sees both tl and tl.core, is
        # replaced the second time by the first's fresh wrapper: only builtins are compared by identity)
        replaced = [(id(obj), name, id(member) if tl.core.is_builtin(member) else None)
                    for obj, name, member in scope._changes]
        scope.restore()
        return replaced

    kernel, helper = silu_scale._silu_scale_bwd_kernel.fn, standard.sigmoid.fn
    assert len(changes(kernel, fast)) > 100  # (tl's builtins, tl.tensor's, tl.math's: a launch restores them)
    # (Triton's helper calls never restore their patch of tl.core: after the suite's first launch it may hold
    # fewer builtins, the same for both scans)
    for fn in (kernel, helper):
        assert changes(fn, fast) == changes(fn, original)
    launch_scope = interpreter._patch_lang(kernel)  # (as a launch patches, before its helpers' calls)
    try:
        for fn in (kernel, helper):
            assert changes(fn, fast) == changes(fn, original)
    finally:
        launch_scope.restore()


@interpreted
def test_interpreted_launch_from_a_fresh_stack_chunk_computes_the_same_bits(monkeypatch, rng):
    """conftest's launch through a frame larger than a stack chunk runs the kernel as Triton's own launch does:
    ECA's three forward and three backward launches, with their helpers, give the same bits."""
    from triton.runtime import interpreter

    from nfnet_fast import ops
    assert interpreter.GridExecutor.__call__ is not INTERPRETER_ORIGINALS["GridExecutor.__call__"]
    y, shortcut = torch.randn(2, 24, 5, 7, generator=rng), torch.randn(2, 24, 5, 7, generator=rng)
    weight = torch.randn(1, 1, 3, generator=rng)

    def run():
        leaves = [t.detach().clone().requires_grad_() for t in (y, weight, shortcut)]
        x_next, a_next = ops.eca_residual(*leaves[:2], leaves[2], 0.2, 2.0, 1.3, backend="triton")
        torch.autograd.backward((x_next, a_next), (torch.ones_like(x_next), torch.full_like(a_next, 0.5)))
        return [x_next, a_next] + [t.grad for t in leaves]
    padded = run()
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", INTERPRETER_ORIGINALS["GridExecutor.__call__"])
    for a, b in zip(padded, run()):
        assert torch.equal(a, b)
