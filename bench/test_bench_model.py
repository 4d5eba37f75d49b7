"""Whole-model throughput: every contender, same process, same input (docs/design.md section 8).

extra_info of each benchmark holds img_per_s, max_rel_err (against timm eager fp32 on the same
input), peak_mem_mb (CUDA), batch and size, and for eager training steps saved_mb: what one
forward saves for the backward (on any device: the activation memory a step holds at its peak
besides parameters, gradients and optimizer state); bench/report.py turns the JSON into ratios."""
import copy
import math

import pytest
import torch

import nfnet_fast
from conftest import COMPILE, CUDA, DEVICE, INFER_CASES, MAX_AUTOTUNE, MODEL, TRAIN_CASES, cached
import peak_memory
from nfnet_fast import _replay, kernels
from nfnet_fast import benchmark as B


def _inference_case(batch, size):
    def make():
        torch.manual_seed(0)
        ref = B.build_reference(MODEL, DEVICE)
        x = torch.randn(batch, 3, size, size, device=DEVICE).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ref_out = ref(x).float()
        contenders = {c.name: c for c in B.inference_contenders(ref, DEVICE, x, compile=COMPILE,
                                                                 max_autotune=MAX_AUTOTUNE)}
        return ref, x, ref_out, contenders
    return cached(("infer", batch, size), make)


def _inference_params():
    """(name, batch, size) to time. The names depend only on the device, the backends and COMPILE:
    they come from a tiny stand-in model. Compiled contenders run at the largest batch alone (the bar
    to beat; each other batch size is one more compile of minutes), and nfnet_fast compiled on the
    backend "auto" picks there only."""
    ref = torch.nn.Identity()
    names = [c.name for c in B.inference_contenders(ref, DEVICE, None, compile=COMPILE, max_autotune=MAX_AUTOTUNE)]
    auto = nfnet_fast.ops.resolve_backend("auto", DEVICE)
    names = [n for n in names if not (n.startswith("nfnet_fast") and " compile " in n and n.split()[1] != auto)]
    return [pytest.param(n, b, s, id=f"{n}-{b}-{s}") for i, (b, s) in enumerate(INFER_CASES) for n in names
            if i == 0 or " compile " not in n]


@pytest.mark.parametrize("name, batch, size", _inference_params())
def test_inference(benchmark, run_timed, batch, size, name):
    ref, x, ref_out, contenders = _inference_case(batch, size)
    c = contenders[name]
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = c.make()
    err = B.max_rel_err(step(x).float(), ref_out)
    median = run_timed(lambda: step(x))
    benchmark.extra_info.update(kind="inference", contender=name, dtype=c.dtype, batch=batch, size=size,
                                img_per_s=batch / median, max_rel_err=err,
                                peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20 if CUDA else None)


# What a training step keeps for its backward, other than the default: each policy runs as the default's
# graphed row (the same kernels; only what is kept and what recomputed differs), so that one GPU report
# measures each one's time and peak beside the default's (docs/triton-training-step.md sections 9 and 14)
POLICIES = {
    # every lever below that trades no memory for time, at once: keep-z-576-inputs-from-z with the two that follow
    # (the step as it would run if all became the default; its time against the 1.5x-timm-eager budget, 41.7 ms
    # at the H100's last timm eager figure). First: the one row to read against that budget
    "all-time-levers": lambda model: (peak_memory.keep_z(model, 576),
                                      *(peak_memory.block_policy(model, name) for name in
                                        ("inputs_from_z", "input_grads_in_conv", "bias_grads_in_eca"))),
    # each block input's two gradients summed in a conv's SiLU backward pass, not by autograd's engine
    # (NormFreeBlock.input_grads_in_conv): 12 adds, ~2.0 GB of traffic less at batch 128, 224 px (section 17);
    # no memory to trade, so the likeliest single lever to become the default
    "input-grads-in-conv": lambda model: peak_memory.block_policy(model, "input_grads_in_conv"),
    # and conv3's and the downsample convs' bias gradients made by the ECA tail's backward from the sums its
    # reduction takes (NormFreeBlock.bias_grads_in_eca): 16 activation-sized sums less, ~1.5 GB of reads (section
    # 18); no memory to trade either. What the bias policy adds alone is this row less the one above
    "input-grads-and-bias-grads-in-eca": lambda model: (peak_memory.block_policy(model, "input_grads_in_conv"),
                                                        peak_memory.block_policy(model, "bias_grads_in_eca")),
    # no conv keeps its pre-activation z: the backward recomputes every one (as before nn.KEEP_Z_FAN_IN)
    "recompute-z": lambda model: peak_memory.keep_z(model, math.inf),
    # eca_nfnet_l0's grouped 3x3s (fan-in 576) keep z too: 1.05 G MACs an image less, 3.47 MiB a sample more
    "keep-z-576": lambda model: peak_memory.keep_z(model, 576),
    # keep-z-576 with each conv after one that keeps z holding that z in place of its input, remade in the
    # backward by one silu_scale pass (NormFreeBlock.inputs_from_z): the grouped 3x3s' saving at about the
    # default's memory (CPU books 0.465x, the default 0.475x: docs/triton-training-step.md section 16)
    "keep-z-576-inputs-from-z": lambda model: (peak_memory.keep_z(model, 576),
                                               peak_memory.block_policy(model, "inputs_from_z")),
    # the blocks of stages 3-4 (0-based 2-3) keep their ECA input y: 0.78 G MACs less, 3.88 MiB a sample more
    "keep-y-stages-2-3": lambda model: peak_memory.keep_y(model, [2, 3]),
}


def _train_names():
    dtypes = ["fp32", "bf16"] if CUDA else ["fp32"]
    names = [f"timm eager {d}" for d in dtypes]
    if COMPILE:  # compiled training in the fastest dtype only: compiling forward + backward takes minutes
        names += [f"timm compile {dtypes[-1]}"]
    names += [f"nfnet_fast {b} {d}" for b in B.backends_for(DEVICE) for d in dtypes]
    if CUDA:  # forward and backward replayed from CUDA graphs (benchmark.graph_for_training): the host's share
        names += [f"timm cudagraph {dtypes[-1]}"] + [f"nfnet_fast {b} cudagraph {dtypes[-1]}"
                                                     for b in B.backends_for(DEVICE) if b != "reference"]
    if CUDA and "triton" in B.backends_for(DEVICE) and _replay._native_module() is not None:
        # eager, with the op bodies replayed from C++ and their launches native (NFNET_FAST_REPLAY=1 and
        # NFNET_FAST_NATIVE_LAUNCH=1; nfnet_fast._replay): the untimed warm-up steps record them
        names += [f"nfnet_fast triton replay {dtypes[-1]}"]
    if CUDA and "triton" in B.backends_for(DEVICE):  # (last: where the report's time runs out, these go first)
        names += [f"nfnet_fast triton cudagraph {policy} {dtypes[-1]}" for policy in POLICIES]
    return names


@pytest.mark.parametrize("batch, size", TRAIN_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("name", _train_names())
def test_train_step(benchmark, run_timed, batch, size, name, monkeypatch):
    if " replay " in name:
        monkeypatch.setattr(kernels, "LAUNCH_CACHE", True)
        monkeypatch.setattr(kernels, "NATIVE_LAUNCH", True)
        monkeypatch.setattr(_replay, "ENABLED", True)
    base = cached(("train-ref",), lambda: B.build_reference(MODEL, DEVICE))
    model = copy.deepcopy(base).train()
    dtype = name.split()[-1]
    if name.startswith("nfnet_fast"):
        nfnet_fast.convert(model, backend=name.split()[1])
        for policy in set(name.split()) & set(POLICIES):
            POLICIES[policy](model)
    fwd = torch.compile(model) if " compile " in name else model
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(batch, 3, size, size, device=DEVICE, generator=g).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (batch,), device=DEVICE, generator=g)
    graphed = " cudagraph " in name
    if graphed:  # one eager step first, untimed, outside the peak: a launch signature that no row before
        # tuned (a policy's z launches, say) is timed there, with its 256 MiB timing buffer and candidates,
        # not in the capture's warm-up passes, which the peak below counts
        B.train_step(model, opt, x, target, dtype)
        opt.zero_grad(set_to_none=True)
    if CUDA:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if graphed:  # (its peak from here: the graphs' memory is allocated by the capture, not by replays)
        B.graph_for_training(model, x, dtype)
    # 5 untimed steps: the first ones build the optimizer state and pick cuDNN's algorithms (with 2,
    # two H200 runs of the same commit differed by up to 50% in some training rows)
    median = run_timed(lambda: B.train_step(fwd, opt, x, target, dtype), warmup=5, reset_peak=not graphed)
    benchmark.extra_info.update(kind="train", contender=name, dtype=dtype, batch=batch, size=size,
                                img_per_s=batch / median,
                                peak_mem_mb=torch.cuda.max_memory_allocated() / 2**20 if CUDA else None)
    if " compile " not in name and not graphed:  # (hooks would see the compiled graph's choices)
        benchmark.extra_info["saved_mb"] = B.saved_bytes(model, x, target, dtype) / 2**20
