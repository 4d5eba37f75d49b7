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
