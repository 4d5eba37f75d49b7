"""Kernel time of one forward (or, with --train, one training step), by kind, for timm eager,
nfnet_fast eager and timm compiled.

    python bench/profile_kernels.py --out DIR [--batch 256 --size 288] [--no-compile | --only-compiled]
    python bench/profile_kernels.py --out DIR --train [--batch 128 --size 224]

Runs each contender (bf16 autocast, channels_last, eca_nfnet_l0 with random weights) under
``torch.profiler``, attributes every GPU kernel to the op that launched it (and that op's callers),
and sums kernel time per kind: convolutions, the conv bias pass, pooling, SiLU, ECA, nfnet_fast's
own kernels, inductor's kernels, layout copies... (docs/design.md section 10 explains why this table is the
one that says where the time goes). Writes DIR/kernel_kinds.md and .json, and prints the table; a run
with --only-compiled adds its column to what an earlier run wrote there (the report profiles the eager
contenders on a quiet GPU first, and timm compiled once its compile caches are warm).

With --train it profiles ``nfnet_fast.benchmark.train_step`` (SGD + AGC, the training benchmark's step)
for the eager contenders and writes DIR/kernel_kinds_train.md and .json: the kinds, then the kernel
time of each phase (forward, backward, AGC + optimizer) beside the step's wall time, which says
whether the GPU or the host sets the step's pace.

On a machine without a GPU (the report's dry run) it profiles CPU op self-time instead, at a small
size, so the classification code runs in CI.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from collections import defaultdict
from typing import Dict, Iterable, List, Sequence, Tuple

import torch

# The kinds, in table order. A kernel takes the first kind whose rule matches.
KINDS = ("convolutions", "conv bias pass", "layout copies", "dtype casts", "pooling", "SiLU", "ECA",
         "weight standardisation", "nfnet_fast kernels", "inductor kernels", "classifier (linear)",
         "other elementwise", "AGC + optimizer", "memcpy/memset", "other")
PHASES = ("forward", "backward", "AGC + optimizer")  # a training step's, as train_step's profiler ranges

_CONV_KERNEL = re.compile(r"conv|xmma|gemm|implicit|cutlass|nvjet|cudnn|fprop|dgrad|wgrad|sm\d\d_|winograd|fft",
                          re.I)
_LAYOUT_KERNEL = re.compile(r"nchwToNhwc|nhwcToNchw|transpose|permute|copy", re.I)


@functools.lru_cache(maxsize=None)
def _own_kernels() -> Dict[str, str]:
    """The names of nfnet_fast's Triton kernels (a GPU profile names a kernel after its function), each
    with its kind."""
    import triton

    from nfnet_fast.kernels import eca_residual, fused_conv, scaled_std_weight, silu_scale
    kinds = {eca_residual: "ECA", silu_scale: "SiLU", scaled_std_weight: "weight standardisation",
             fused_conv: "nfnet_fast kernels"}
    return {name: kind for module, kind in kinds.items() for name, f in vars(module).items()
            if isinstance(f, triton.runtime.jit.JITFunction)}


def classify(kernel: str, chain: Sequence[str]) -> str:
    """The kind of one kernel, from its name and the names of the ops that launched it (innermost
    first: ``chain[0]`` launched it, ``chain[1]`` called ``chain[0]``, ...)."""
    ops = " ".join(chain)
    if re.search(r"^(memcpy|memset)", kernel, re.I):  # (cuDNN clears its workspace inside a conv op)
        return "memcpy/memset"
    if phase(chain) == "AGC + optimizer":
        return "AGC + optimizer"
    if "nfnet_fast::" in ops:  # our ops first: they may call aten inside (reference math, fallbacks)
        if re.search(r"eca", ops):
            return "ECA"
        if "silu_scale" in ops:
            return "SiLU"
        if "scaled_std_weight" in ops:
            return "weight standardisation"
        return "nfnet_fast kernels"
    if kernel in _own_kernels():  # (one of ours the profile linked to no op: by its name)
        return _own_kernels()[kernel]
    if kernel.startswith("triton_tem_") or kernel.startswith("triton_") and re.search(r"conv|mm", kernel):
        return "convolutions"  # inductor's conv/GEMM templates
    if kernel.startswith("triton_"):
        return "inductor kernels"
    if re.search(r"aten::_to_copy", ops):  # autocast's casts, also those it makes inside conv2d
        return "dtype casts"
    if re.search(r"aten::conv1d", ops):  # timm's ECA gate is a conv1d
        return "ECA"
    if re.search(r"aten::(_?convolution|conv2d|cudnn_convolution|mkldnn_convolution|_slow_conv|thnn_conv)", ops):
        if _LAYOUT_KERNEL.search(kernel):
            return "layout copies"
        if _CONV_KERNEL.search(kernel) or kernel.startswith("aten::"):
            return "convolutions" if not re.search(r"\badd|bias", kernel) else "conv bias pass"
        return "conv bias pass"  # an elementwise kernel under a convolution op: its bias broadcast
    if re.search(r"aten::(addmm|linear|mm|bmm|matmul)", ops):
        return "classifier (linear)"
    if re.search(r"avg_pool|adaptive_avg|max_pool", ops):
        return "pooling"
    if re.search(r"aten::(sigmoid|mean)\b", ops):
        return "ECA"  # timm's ECA: mean over HW, conv1d, sigmoid (then a mul: "other elementwise")
    if re.search(r"silu", ops):
        return "SiLU"
    if re.search(r"batch_norm", ops):
        return "weight standardisation"  # timm standardises with F.batch_norm
    if re.search(r"aten::(copy_|contiguous|clone)", ops) or _LAYOUT_KERNEL.search(kernel):
        return "layout copies"
    if re.search(r"aten::(add|mul|div|sub|addcmul)", ops) or re.search(r"elementwise", kernel):
        return "other elementwise"
    return "other"


def phase(chain: Sequence[str]) -> str:
    """The training-step phase of a kernel from its launching op chain: train_step's "agc" and
    "optimizer" ranges; the backward's ops (on a GPU they run on autograd's device thread, outside the
    "backward" range, under its ``autograd::engine::evaluate_function`` events); else the forward.
    A kernel no op launched (an empty chain) is "unattributed"."""
    if not chain:
        return "unattributed"
    if any(n in ("agc", "optimizer") or n.startswith("Optimizer.") for n in chain):
        return "AGC + optimizer"
    if any(n == "backward" or n.startswith("autograd::engine") or "Backward" in n for n in chain):
        return "backward"
    return "forward"


def _chain(evt) -> List[str]:
    names = []
    while evt is not None:
        names.append(evt.name)
        evt = evt.cpu_parent
    return names


def kernel_times(prof, on_gpu: bool) -> Iterable[Tuple[str, List[str], float]]:
    """(kernel name, launching op chain, microseconds) for every kernel in a finished profile; on the
    CPU, every op's self time stands in for a kernel."""
    from torch.autograd import DeviceType

    events = prof.events()
    if not on_gpu:
        for e in events:
            if e.device_type == DeviceType.CPU and e.self_cpu_time_total > 0 and e.name.startswith(("aten::", "nfnet")):
                yield e.name, _chain(e), e.self_cpu_time_total
        return
    attributed = defaultdict(float)
    for e in events:
        if e.device_type == DeviceType.CPU:
            for k in e.kernels:
                attributed[k.name] += k.duration
                yield k.name, _chain(e), k.duration
    # Kernels no op launched (inductor launches its Triton kernels from Python): by name alone. Not the
    # device-side copies of record_function ranges (the training step's phases, the ops' ranges): they
    # span kernels counted already (the H100 profile of 2026-11-27 counted 136 ms of "kernels" in a
    # 93 ms step, most of it under the names "agc", "forward" and the ops')
    device = defaultdict(float)
    for e in events:
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False):
            device[e.name] += e.time_range.end - e.time_range.start
    for name, us in device.items():
        rest = us - attributed.get(name, 0.0)
        if rest > 1e-3:
            yield name, [], rest


def profile(step, x, iters: int, on_gpu: bool):
    """Profile `iters` calls of step(x) after a warm-up; returns ({kind: ms per call}, top kernels,
    {phase: kernel ms per call, "wall": ms per call}). The wall time is taken apart, unprofiled."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    def run():
        for _ in range(iters):
            step(x)
        if on_gpu:
            torch.cuda.synchronize()

    for _ in range(3):
        step(x)
    if on_gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    wall_ms = (time.perf_counter() - t0) * 1e3 / iters
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with tprofile(activities=acts) as prof:
        run()
    kinds: Dict[str, float] = defaultdict(float)
    phases: Dict[str, float] = defaultdict(float)
    per_kernel: Dict[Tuple[str, str], float] = defaultdict(float)
    for name, chain, us in kernel_times(prof, on_gpu):
        kind = classify(name, chain)
        kinds[kind] += us / 1e3 / iters
        phases[phase(chain)] += us / 1e3 / iters
        per_kernel[(kind, name)] += us / 1e3 / iters
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:25]
    return dict(kinds), [dict(kind=k, kernel=n[:140], ms=ms) for (k, n), ms in top], dict(phases, wall=wall_ms)


def table(results: Dict[str, Dict[str, float]]) -> List[str]:
    names = list(results)
    head = "| kind | " + " | ".join(names) + " |"
    lines = [head, "|---|" + "---|" * len(names)]
    totals = {n: sum(results[n].values()) for n in names}
    lines.append("| **all kernels** | " + " | ".join(f"**{totals[n]:.2f}**" for n in names) + " |")
    for kind in KINDS:
        if any(results[n].get(kind, 0) > 0 for n in names):
            lines.append(f"| {kind} | " + " | ".join(f"{results[n].get(kind, 0):.2f}" for n in names) + " |")
    return lines


def phase_table(phases: Dict[str, Dict[str, float]], unit: str) -> List[str]:
    """Kernel time per phase of a training step beside the step's wall time."""
    names = list(phases)
    lines = ["| phase | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    shown = PHASES + (("unattributed",) if any(phases[n].get("unattributed", 0) for n in names) else ())
    for ph in shown:
        lines.append(f"| {ph} ({unit}) | " + " | ".join(f"{phases[n].get(ph, 0):.2f}" for n in names) + " |")
    lines.append("| **wall time of a step (ms)** | " + " | ".join(f"**{phases[n]['wall']:.2f}**" for n in names) + " |")
    return lines


def main(argv=None) -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from nfnet_fast import benchmark as B

    on_gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for kernel_kinds.md and kernel_kinds.json")
    p.add_argument("--model", default="eca_nfnet_l0")
    p.add_argument("--train", action="store_true",
                   help="a training step (SGD + AGC) of the eager contenders instead of a forward")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on a GPU (128 with --train), 2 on a CPU")
    p.add_argument("--size", type=int, default=None, help="default: 288 on a GPU (224 with --train), 64 on a CPU")
    p.add_argument("--iters", type=int, default=3 if on_gpu else 1)
    p.add_argument("--no-compile", action="store_true", help="leave out timm compiled")
    p.add_argument("--only-compiled", action="store_true", help="timm compiled alone, added to DIR's tables")
    args = p.parse_args(argv)
    if args.no_compile and args.only_compiled:
        p.error("--no-compile and --only-compiled exclude each other")
    if args.train and args.only_compiled:
        p.error("--train profiles the eager contenders only: leave out --only-compiled")
    batch = args.batch or ((128 if args.train else 256) if on_gpu else 2)
    size = args.size or ((224 if args.train else 288) if on_gpu else 64)

    device = torch.device("cuda" if on_gpu else "cpu")
    dtype = "bf16" if on_gpu else "fp32"
    torch.manual_seed(0)
    ref = B.build_reference(args.model, device)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    wanted = [f"timm eager {dtype}"] + [f"nfnet_fast {b} {dtype}" for b in B.backends_for(device)]
    if args.train:  # (the reference backend's step is timm's math: its forward, aten's backward)
        wanted = [n for n in wanted if n != f"nfnet_fast reference {dtype}"]
        contenders = _train_contenders(ref, wanted, x, dtype)
    else:
        contenders = {c.name: c.make for c in B.inference_contenders(ref, device, x,
                                                                     compile=on_gpu and not args.no_compile)}
        wanted += [f"timm compile {dtype}"] if f"timm compile {dtype}" in contenders else []
    results, tops, phases, seconds = {}, {}, {}, {}
    stem = "kernel_kinds_train" if args.train else "kernel_kinds"
    path = os.path.join(args.out, stem + ".json")
    if args.only_compiled:
        wanted = [n for n in wanted if " compile " in n]
        if not wanted:
            p.error("no compiled contender here (torch.compile contenders are off without CUDA)")
        if os.path.exists(path):
            with open(path) as f:
                earlier = json.load(f)
            if (earlier["batch"], earlier["size"], earlier["dtype"]) == (batch, size, dtype):
                results, tops, seconds = earlier["kinds"], earlier["top"], earlier["seconds"]
                phases = earlier.get("phases", {})
    unit = "ms of GPU kernel time" if on_gpu else "ms of CPU op self-time"
    what = "one training step (SGD + AGC)" if args.train else "one forward"
    os.makedirs(args.out, exist_ok=True)
    for name in wanted:  # (the files are rewritten after each contender: a run cut short keeps what finished)
        t0 = time.perf_counter()
        results[name], tops[name], phases[name] = profile(contenders[name](), x, args.iters, on_gpu)
        seconds[name] = time.perf_counter() - t0
        print(f"profiled {name} in {seconds[name]:.0f}s", flush=True)
        _write(args, stem, path, unit, what, batch, size, dtype, results, tops, phases, seconds)
    print("\n".join(table(results) + ([""] + phase_table(phases, "kernels") if args.train else [])))
    return 0


def _write(args, stem, path, unit, what, batch, size, dtype, results, tops, phases, seconds):
    md = [f"### kernel time of {what} by kind ({unit}; {args.model}, batch {batch}, {size} px, "
          f"{dtype}, channels_last)", ""] + table(results) + [""]
    if args.train:
        md += [f"Phases of the step ({unit}) and its wall time (ms, unprofiled, the mean of "
               f"{args.iters}):", ""] + phase_table(phases, "kernels") + [""]
    for name in results:
        md += [f"<details><summary>{name}: top kernels</summary>", "", "| kind | kernel | ms |", "|---|---|---|"]
        md += [f"| {t['kind']} | `{t['kernel']}` | {t['ms']:.3f} |" for t in tops[name]] + ["", "</details>", ""]
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(path, "w") as f:
        json.dump(dict(unit=unit, batch=batch, size=size, dtype=dtype, kinds=results, top=tops, phases=phases,
                       seconds=seconds), f, indent=2)


def _train_contenders(ref, names: Sequence[str], x, dtype: str):
    """name -> a maker of ``step(x)``: one training step of that contender (its own copy of the model,
    an SGD optimizer with momentum, fixed targets), as bench/test_bench_model.py's training rows."""
    import copy

    import nfnet_fast
    from nfnet_fast import benchmark as B

    target = torch.randint(0, ref.num_classes, (x.shape[0],), device=x.device,
                           generator=torch.Generator(device=x.device).manual_seed(0))

    def maker(name):
        def make():
            model = copy.deepcopy(ref).train()
            if name.startswith("nfnet_fast"):
                nfnet_fast.convert(model, backend=name.split()[1])
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            return lambda x: B.train_step(model, opt, x, target, dtype)
        return make
    return {name: maker(name) for name in names}


if __name__ == "__main__":
    sys.exit(main())
