"""bench/peak_memory.py's CPU method keeps exact books: every block a measured step frees was
allocated where the profiler saw it, and the forward's growth covers what it saves for the backward.
(Its first version profiled the second step alone: the profiler drops the free of a block allocated
before it started, so the running sum drifted by the gradients zero_grad freed, and the
extrapolation found peaks that shrank as the batch grew.)"""
import copy
import dataclasses

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models import nfnet

import nfnet_fast
import peak_memory
from conftest import CUDA
from nfnet_fast import benchmark as B
from nfnet_fast._backends import triton_interpreted

CPU = torch.device("cpu")


def _small_nfnet():
    """eca_nfnet_l0's structure with one block a stage and narrow channels: every kind of op, fast."""
    cfg = dataclasses.replace(nfnet.model_cfgs["eca_nfnet_l0"], depths=(1, 1, 1, 1), channels=(32, 64, 96, 128),
                              stem_chs=32, group_size=8, num_features=192)
    torch.manual_seed(0)
    return nfnet.NormFreeNet(cfg, num_classes=10).train()


@pytest.mark.skipif(CUDA, reason="the CPU method (CUDA reads max_memory_allocated)")
@pytest.mark.parametrize("backend", ["timm eager", *B.backends_for(CPU), *(["triton"] if triton_interpreted() else [])])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_cpu_step_books_balance(backend, dtype):
    model = _small_nfnet()
    if backend != "timm eager":
        nfnet_fast.convert(model, backend=backend)
    batch, size = 3, 32
    peaks = peak_memory.step_peak(model, batch, size, dtype, CPU)
    assert peaks["unaccounted"] == 0, peaks
    batch_bytes = batch * 3 * size * size * 4 + batch * 8  # the images and labels: saved, but live before the step
    assert peaks["forward end"] - peaks["start"] >= peaks["saved"] - batch_bytes, peaks
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert peaks["start"] >= 3 * params  # parameters, gradients and momentum
    for phase in B.TRAIN_PHASES:
        assert peaks[phase] >= peaks["start"] - params, (phase, peaks)  # (zero_grad frees the gradients)
    assert peaks["forward"] >= peaks["forward end"]
    # the step's result is the model's: a second measurement of the same state agrees
    again = peak_memory.step_peak(copy.deepcopy(model), batch, size, dtype, CPU)
    assert again == peaks


@pytest.mark.skipif(CUDA, reason="the CPU method (CUDA reads max_memory_allocated)")
@pytest.mark.skipif(not triton_interpreted(), reason="the recompute of y runs on the compiled backends only")
def test_keep_y_stages_keeps_each_blocks_y(capsys):
    """--keep-y-stages: the blocks of those stages keep their ECA input y for the backward (one activation of the
    block's output shape each, in the autocast dtype), where by default the backward recomputes it."""
    saved = {}
    for keep in ([], [2]):
        model = nfnet_fast.convert(_small_nfnet(), backend="triton")
        peak_memory.keep_y(model, keep)  # (what peak_memory.main does with --keep-y-stages)
        saved[tuple(keep)] = peak_memory.step_peak(model, 2, 32, "bf16", CPU)["saved"]
    shapes = []  # stage 2's one block: y has the block output's shape, (2, 96, 2, 2) at 32 px
    model.stages[2].register_forward_hook(lambda mod, args, out: shapes.append(out.shape))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert saved[(2,)] - saved[()] == shapes[0].numel() * 2, (saved, shapes)  # (bf16)
    peak_memory.main(["--model", "test_nfnet", "--batches", "1", "2", "--size", "32", "--target-batch", "4",
                      "--target-size", "32", "--dtype", "bf16", "--keep-y-stages", "2", "3"])
    assert "y kept in stages [2, 3]" in capsys.readouterr().out


@pytest.mark.skipif(CUDA, reason="the CPU method (CUDA reads max_memory_allocated)")
@pytest.mark.skipif(not triton_interpreted(), reason="z is kept on the compiled backends only")
def test_keep_z_fan_in_keeps_each_convs_pre_activation(capsys, monkeypatch):
    """--keep-z-fan-in: the convs with a fused activation and at least that fan-in keep their pre-activation z
    for the backward (one tensor of the conv output's shape each, in the autocast dtype); the others, and
    every conv at a fan-in above all of them, recompute it."""
    model = nfnet_fast.convert(_small_nfnet(), backend="triton")
    fan_ins = sorted({m.fan_in for m in model.modules() if isinstance(m, nfnet_fast.nn._FusedConv)})
    threshold = fan_ins[len(fan_ins) // 2]  # (some convs above it, some below)
    kept_shapes = []
    fused = nfnet_fast.nn._FusedConv.fused

    def spy(self, x, act=None, *args, pool=False, **kwargs):  # the z shape of each conv the rule picks
        if act is not None and self.fan_in >= threshold:
            xin = F.avg_pool2d(x, 2, 2, ceil_mode=True) if pool else x
            kept_shapes.append(F.conv2d(xin, self.weight, None, self.stride, self.padding, 1, self.groups).shape)
        return fused(self, x, act, *args, pool=pool, **kwargs)
    with monkeypatch.context() as m, torch.no_grad():
        m.setattr(nfnet_fast.nn._FusedConv, "fused", spy)
        model(torch.randn(2, 3, 32, 32))
    assert kept_shapes and len(kept_shapes) < sum(isinstance(m, nfnet_fast.nn._FusedConv) for m in model.modules())
    saved = {}
    for fan_in in (max(fan_ins) + 1, threshold):
        model = nfnet_fast.convert(_small_nfnet(), backend="triton")
        peak_memory.keep_z(model, fan_in)  # (what peak_memory.main does with --keep-z-fan-in)
        saved[fan_in] = peak_memory.step_peak(model, 2, 32, "bf16", CPU)["saved"]
    assert saved[threshold] - saved[max(fan_ins) + 1] == sum(s.numel() for s in kept_shapes) * 2, (saved, kept_shapes)
    peak_memory.main(["--model", "test_nfnet", "--batches", "1", "2", "--size", "32", "--target-batch", "4",
                      "--target-size", "32", "--dtype", "bf16", "--keep-z-fan-in", "576"])
    assert "z kept from fan-in 576" in capsys.readouterr().out
