"""Contenders, timing and parity for the benchmarks (``nfnet-fast bench`` and ``bench/``).

Every contender runs in the same process on the same input (docs/design.md section 8): timm eager
(fp32, bf16 autocast on CUDA), ``torch.compile`` of timm (default, and ``max-autotune`` on CUDA),
nfnet_fast on each backend that runs on the device, and nfnet_fast compiled / CUDA-graphed on CUDA.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.utils import adaptive_clip_grad
from torch.profiler import record_function

from . import _backends, ops
from .model import convert
from .train import adaptive_clip_grad_, agc_parameters, graph_training_forward

Step = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Contender:
    """One way of running the model: ``make()`` builds the callable (compiling, capturing graphs)."""

    name: str
    make: Callable[[], Step]
    dtype: str = "fp32"


@dataclass
class Result:
    name: str
    dtype: str
    img_per_s: float
    median_s: float
    times_s: List[float]
    max_rel_err: Optional[float]
    peak_mem_mb: Optional[float]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_weights_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random values for every parameter (timm zero-initialises conv3's gain, which would make every
    residual branch vanish and hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("gain"):
                r = 1 + 0.2 * r
            elif name.endswith("bias") or p.dim() == 1:
                r = 0.05 * r
            elif p.dim() == 2:  # classifier
                r = 0.01 * r
            p.copy_(r)
    return model


def build_reference(model_name: str, device: torch.device, pretrained: bool = False, **kwargs) -> nn.Module:
    """timm's model on `device`, eval, channels_last; random weights unless `pretrained`."""
    model = timm.create_model(model_name, pretrained=pretrained, **kwargs)
    if not pretrained:
        random_weights_(model)
    return model.eval().to(device=device, memory_format=torch.channels_last)


def backends_for(device: torch.device, ops_needed=_backends.OPS) -> List[str]:
    """nfnet_fast backends worth timing on `device`: those implementing every op in `ops_needed`
    there (the Triton interpreter on a CPU is not worth timing)."""
    names = []
    for name in _backends.NAMES:
        if name == "triton" and device.type == "cpu":
            continue
        try:
            for op in ops_needed:
                ops.resolve_backend(name, device, op)
        except RuntimeError:
            continue
        names.append(name)
    return names


def _autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def graph_for_training(model: nn.Module, example: torch.Tensor, dtype: str) -> nn.Module:
    """:func:`nfnet_fast.train.graph_training_forward` for the training benchmark's "cudagraph" rows
    (bf16 autocast when ``dtype`` is "bf16"): a step paced by its host speeds up so, one paced by its
    kernels does not. Returns ``model``."""
    return graph_training_forward(model, example, amp=dtype == "bf16")


TRAIN_PHASES = ("forward", "backward", "agc", "optimizer")


def is_converted(model: nn.Module) -> bool:
    """Whether nfnet_fast converted ``model`` (any of its modules is nfnet_fast's)."""
    return any(type(m).__module__.startswith("nfnet_fast.") for m in model.modules())


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, target: torch.Tensor,
               dtype: str) -> torch.Tensor:
    """One SGD step as timm trains NFNets: forward under bf16 autocast when ``dtype`` is "bf16",
    backward, adaptive gradient clipping with the classifier excluded, the optimizer's step. Each
    library clips with its own AGC (the same result to fp32 rounding): a model nfnet_fast converted
    with ``nfnet_fast.adaptive_clip_grad_`` (3.5 ms for eca_nfnet_l0 on an H100), timm's (eager or
    compiled) with ``timm.utils.adaptive_clip_grad`` (15.4 ms there: a Python loop of ~10 kernels a
    parameter). Each phase runs in a profiler range named after it (``TRAIN_PHASES``), so a profile
    of the step can be split by phase. Returns the loss."""
    with record_function("forward"), _autocast(x.device, dtype):
        loss = nn.functional.cross_entropy(model(x), target)
    opt.zero_grad(set_to_none=True)
    with record_function("backward"):
        loss.backward()
    with record_function("agc"):
        clip = adaptive_clip_grad_ if is_converted(model) else adaptive_clip_grad
        clip(agc_parameters(model), clip_factor=0.01)
    with record_function("optimizer"):
        opt.step()
    return loss


def saved_storage_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> Tuple[int, Any]:
    """Run ``fn()`` and return (bytes of the distinct storages autograd saved for the backward
    meanwhile, each storage once and those of ``exclude`` left out; ``fn``'s result)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        # detached, not t itself: a node that saves its own output would hold that output, and the
        # output holds the node (its grad_fn), a cycle through C++ that Python's collector never frees
        # (the whole graph leaked: in the H100 report of 2026-11-27 09:54 each eager training row
        # peaked 2.1-10.7 GiB above the row before it)
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved.values()), out


def saved_bytes(model: nn.Module, x: torch.Tensor, target: torch.Tensor, dtype: str) -> int:
    """Bytes of the tensors one training forward of ``model`` saves for its backward (autograd's
    saved-tensor hooks; each storage once; parameters excluded, autocast's weight copies included)."""
    def forward():
        with _autocast(x.device, dtype):
            return nn.functional.cross_entropy(model(x), target)
    return saved_storage_bytes(forward, exclude=model.parameters())[0]


def _inference(model: nn.Module, device: torch.device, dtype: str) -> Step:
    def step(x):
        with torch.inference_mode(), _autocast(device, dtype):
            return model(x)
    return step


def _cuda_graphed(step: Step, example: torch.Tensor) -> Step:
    """Capture `step` on a static input once; replays copy the new input in and rerun the graph."""
    static_in = example.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up kernels and caches outside the capture
            step(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_in)

    def replay(x):
        static_in.copy_(x)
        graph.replay()
        return static_out
    return replay


def inference_contenders(ref: nn.Module, device: torch.device, example: torch.Tensor, compile: bool = True,
                         max_autotune: bool = False, backends: Optional[List[str]] = None) -> List[Contender]:
    """Contenders for inference on `device`, sharing `ref`'s weights (nfnet_fast gets its own copy).

    Eager contenders run in fp32 and (on CUDA) bf16 autocast; compiled ones in the device's fastest
    dtype only (bf16 on CUDA), which is the bar to beat; ``max_autotune`` adds timm under
    ``torch.compile(mode="max-autotune")`` (minutes of autotuning). Each backend also runs eager
    in that dtype with the SiLU prologue (``convert(..., silu_prologue=True)``), the trade the
    README asks a GPU to measure.
    """
    cuda = device.type == "cuda"
    dtypes = ["fp32", "bf16"] if cuda else ["fp32"]
    fastest = dtypes[-1]
    out: List[Contender] = []
    for dt in dtypes:
        out.append(Contender(f"timm eager {dt}", lambda dt=dt: _inference(ref, device, dt), dt))
    if compile:
        out.append(Contender(f"timm compile {fastest}", lambda: _inference(torch.compile(ref), device, fastest),
                             fastest))
    if max_autotune:
        out.append(Contender(f"timm compile max-autotune {fastest}", lambda: _inference(
            torch.compile(ref, mode="max-autotune"), device, fastest), fastest))
    copies: Dict[tuple, nn.Module] = {}

    def fast(backend: str, silu_prologue: bool = False) -> nn.Module:  # one copy per variant, made when first timed
        if (backend, silu_prologue) not in copies:
            copies[backend, silu_prologue] = convert(copy.deepcopy(ref), backend=backend, silu_prologue=silu_prologue)
        return copies[backend, silu_prologue]

    for backend in backends if backends is not None else backends_for(device):
        for dt in dtypes:
            out.append(Contender(f"nfnet_fast {backend} {dt}", lambda b=backend, dt=dt: _inference(fast(b), device, dt),
                                 dt))
            if cuda:
                out.append(Contender(f"nfnet_fast {backend} cudagraph {dt}", lambda b=backend, dt=dt: _cuda_graphed(
                    _inference(fast(b), device, dt), example), dt))
        out.append(Contender(f"nfnet_fast {backend} silu-prologue {fastest}", lambda b=backend: _inference(
            fast(b, True), device, fastest), fastest))
        if compile:
            out.append(Contender(f"nfnet_fast {backend} compile {fastest}", lambda b=backend: _inference(
                torch.compile(fast(b)), device, fastest), fastest))
    return out


def max_rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max|out - ref| / max|ref|, the measure of the contract in docs/design.md section 3."""
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def measure(step: Step, x: torch.Tensor, iters: int, warmup: int, device: torch.device) -> List[float]:
    """Seconds per call of ``step(x)`` (about ``iters`` samples), after ``warmup`` calls.

    CUDA: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, every sample
    returned); elsewhere ``torch.utils.benchmark.Timer``, one call a sample."""
    for _ in range(warmup):
        step(x)
    synchronize(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        t0 = time.perf_counter()
        step(x)
        synchronize(device)
        per_call_ms = (time.perf_counter() - t0) * 1e3
        # do_bench's rep is a time budget (ms), from which it derives the number of calls
        times_ms = do_bench(lambda: step(x), warmup=0, rep=max(per_call_ms * iters, 1e-3), return_mode="all")
        return [t / 1e3 for t in times_ms]
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="step(x)", globals={"step": step, "x": x}, num_threads=torch.get_num_threads())
    return [timer.timeit(1).mean for _ in range(iters)]


def run_contender(c: Contender, x: torch.Tensor, ref_out: Optional[torch.Tensor], iters: int, warmup: int,
                  device: torch.device) -> Result:
    """Build, check against `ref_out`, and time one contender."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    step = c.make()
    out = step(x).float()
    err = None if ref_out is None else max_rel_err(out, ref_out)
    times = measure(step, x, iters, warmup, device)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return Result(c.name, c.dtype, x.shape[0] / med, med, times, err, peak)


TIMM_BASELINES = ("timm eager fp32", "timm eager bf16", "timm compile fp32", "timm compile bf16",
                  "timm compile max-autotune fp32", "timm compile max-autotune bf16")


def format_table(results) -> str:
    """Markdown table: error against timm fp32, img/s, and speedup over the timm contenders."""
    base = {r.name: r.img_per_s for r in results if r.name.startswith("timm")}
    cols = [n for n in TIMM_BASELINES if n in base]
    head = ["contender", "max err / max abs (vs timm fp32)", "img/s", "peak MiB"] + [f"vs {c}" for c in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        err = "-" if r.max_rel_err is None else f"{r.max_rel_err:.1e}"
        mem = "-" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.0f}"
        row = [r.name, err, f"{r.img_per_s:.1f}", mem] + [f"{r.img_per_s / base[c]:.2f}x" for c in cols]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
