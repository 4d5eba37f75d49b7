"""Turn pytest-benchmark JSON from bench/ into the results report (Markdown + JSON).

    python bench/report.py BENCH.json [--tables bench/triton_resources.md ...] --out bench/results/NAME

Writes NAME.md and NAME.json: device, driver, torch/triton/CUDA versions, commit, date; inference
and training tables with img/s, error against timm, peak memory and the ratio to each timm
contender; per-op GB/s with the fraction of a device-to-device copy of the same tensor measured in
the same run (bench/test_bench_ops.py::test_copy).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nfnet_fast.benchmark import Result, format_table  # noqa: E402

def environment() -> dict:
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda)
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    import timm
    env["timm"] = timm.__version__
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        env["commit"] = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        if dirty and env["commit"]:
            env["commit"] += " (with uncommitted changes)"
    except OSError:
        env["commit"] = None
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            env["driver"] = None
    else:
        env["device"] = f"CPU {platform.machine()} ({torch.get_num_threads()} threads), no GPU"
        env["driver"] = None
    return env


def model_tables(benches, kind: str) -> list:
    cases = {}
    for b in benches:
        info = b["extra_info"]
        if info.get("kind") == kind and "img_per_s" in info:  # (a row cut short has no result)
            cases.setdefault((info["batch"], info["size"]), []).append(
                Result(info["contender"], info["dtype"], info["img_per_s"], b["stats"]["median"], [],
                       info.get("max_rel_err"), info.get("peak_mem_mb")))
    out = []
    for (batch, size), results in sorted(cases.items(), reverse=True):
        out += [f"### {kind}: batch {batch} @ {size}x{size}, channels_last", "", format_table(results), ""]
        for key, what in (("saved_mb", "Saved for the backward by one forward (MiB; the activation memory of a "
                                        "step's peak, any device)"),
                          ("peak_mem_mb", "Peak memory (MiB, max_memory_allocated over the timed steps; the cudagraph "
                                           "rows' from their capture on)"),
                          ("warmup_peak_mb", "Peak memory of the untimed warm-up steps before them (MiB; the first "
                                             "step's kernel tuning and optimizer state included)")):
            mbs = {b["extra_info"]["contender"]: b["extra_info"][key] for b in benches
                   if kind == "train" and b["extra_info"].get("kind") == kind and b["extra_info"].get(key) is not None
                   and (b["extra_info"]["batch"], b["extra_info"]["size"]) == (batch, size)}
            if mbs:
                out += [f"{what}: " + ", ".join(f"{name} {mb:.0f}" + (f" ({mb / mbs[base]:.2f}x of {base})"
                                                                      if (base := f"timm eager {name.split()[-1]}") in mbs
                                                                      and name != base else "")
                                                for name, mb in mbs.items()), ""]
    return out


def policy_table(benches) -> list:
    """The graphed training rows that change one saving policy (bench/test_bench_model.py's POLICIES:
    what the step keeps for its backward) against the same backend's default graphed row: step time and
    peak, and what each policy changes of them (docs/triton-training-step.md section 15); and each row's speed
    against timm eager's step of the same case and dtype in the same run, where there is one (issue 12's
    target: 1.5x)."""
    rows = {}  # (batch, size, backend, policy, dtype) -> (median s, peak MiB)
    timm_eager = {}  # (batch, size, dtype) -> median s
    for b in benches:
        info = b["extra_info"]
        words = info.get("contender", "").split()
        if info.get("kind") == "train" and words[:2] == ["timm", "eager"] and len(words) == 3:
            timm_eager[info["batch"], info["size"], words[-1]] = b["stats"]["median"]
        if (info.get("kind") == "train" and "img_per_s" in info and len(words) >= 4 and words[0] == "nfnet_fast"
                and words[2] == "cudagraph"):
            rows[info["batch"], info["size"], words[1], " ".join(words[3:-1]), words[-1]] = (
                b["stats"]["median"], info.get("peak_mem_mb"))
    lines = []
    for (batch, size, backend, policy, dtype), (median, peak) in sorted(rows.items()):
        base = rows.get((batch, size, backend, "", dtype))
        if not policy or base is None:
            continue
        peaks = "- | -" if peak is None or base[1] is None else f"{peak:.0f} | {peak - base[1]:+.0f}"
        timm = timm_eager.get((batch, size, dtype))
        lines.append(f"| {backend} {dtype}, batch {batch} @ {size} | {policy} | {median * 1e3:.2f} | "
                     f"{(median - base[0]) * 1e3:+.2f} | {peaks} | {'-' if timm is None else f'{timm / median:.2f}x'} |")
    if not lines:
        return []
    return ["## saving policies (graphed training step, against the default's)", "",
            "| step | policy | ms | vs default, ms | peak MiB | vs default, MiB | vs timm eager |",
            "|---|---|---|---|---|---|---|", *lines, ""]


def agc_table(benches) -> list:
    """Adaptive gradient clipping over the model's parameters: each implementation's time, the aten
    ops it dispatches, and its difference from timm's result."""
    rows = [b["extra_info"] for b in benches if b["extra_info"].get("kind") == "agc"]
    if not rows:
        return []
    lines = [f"### adaptive gradient clipping ({rows[0]['model']}: {rows[0]['tensors']} tensors, "
             f"{rows[0]['values'] / 1e6:.1f}M values, clip {rows[0]['clip_factor']})", "",
             "| impl | ms | aten ops | max err / max abs (vs timm) |", "|---|---|---|---|"]
    lines += [f"| {r['impl']} | {r['ms']:.3f} | {r['ops']} | {r['max_rel_err']:.1e} |" for r in rows]
    return lines + [""]


def ops_table(benches) -> list:
    rows = [b for b in benches if "op" in b["extra_info"] and "gb_per_s" in b["extra_info"]]
    if not rows:
        return []
    copy = {(str(b["extra_info"]["shape"]), b["extra_info"]["dtype"]): b["extra_info"]["gb_per_s"]
            for b in rows if b["extra_info"]["op"] == "copy"}
    head = "| op | shape | dtype | impl | median us | GB/s | of a copy |"
    lines = ["### ops (bytes each op must move / median time; a copy of the same tensor in the same run)", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for b in sorted(rows, key=lambda b: (b["extra_info"]["op"], str(b["extra_info"]["shape"]), b["extra_info"]["impl"])):
        i = b["extra_info"]
        ceiling = copy.get((str(i["shape"]), i["dtype"]))
        frac = "-" if ceiling is None else f"{100 * i['gb_per_s'] / ceiling:.0f}%"
        lines.append(f"| {i['op']} | {'x'.join(map(str, i['shape']))} | {i['dtype'].replace('torch.', '')} | {i['impl']} "
                     f"| {b['stats']['median'] * 1e6:.1f} | {i['gb_per_s']:.1f} | {frac} |")
    return lines + [""]


def _by_conv(benches, key: str):
    """(implementations in order, {conv: {impl: bench}}, the first row's extra_info) of the rows
    whose extra_info has ``key`` (the conv's name)."""
    rows = [b for b in benches if key in b["extra_info"]]
    by_conv = {}
    for b in rows:
        by_conv.setdefault(b["extra_info"][key], {})[b["extra_info"]["impl"]] = b
    return list(dict.fromkeys(b["extra_info"]["impl"] for b in rows)), by_conv, rows[0]["extra_info"] if rows else None


def conv_table(benches) -> list:
    """One row per convolution shape of the model: each implementation's median, the fused one's
    TFLOP/s and fraction of the large GEMM measured in the same run, and the cost model's
    prediction (max of FLOPs / GEMM rate and bytes / copy rate); a last row weighs every shape
    by how often a forward runs it."""
    impls, by_conv, i0 = _by_conv(benches, "conv")
    impls = [m for m in impls if m != PROLOGUE]  # (its own table: prologue_table)
    if not impls:
        return []
    head = ["conv (Cin x H x W - Cout - kernel, runs per forward)"] + [f"{m} ms" for m in impls] + [
        "fused TFLOP/s", "of GEMM", "predicted ms", "fused / conv alone", "fused runs"]
    lines = [f"### convolutions (batch {i0['batch']}, {i0['dtype'].replace('torch.', '')}; GEMM "
             f"{i0['gemm_tflops']:.3g} TFLOP/s, copy {i0['copy_gbps']:.3g} GB/s, both measured in this run)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    totals = dict.fromkeys(impls, 0.0)
    predicted_total = 0.0
    for conv, found in by_conv.items():
        any_row = next(iter(found.values()))["extra_info"]
        runs = any_row["runs_per_forward"]
        ms = {m: found[m]["stats"]["median"] * 1e3 for m in impls if m in found}
        for m, v in ms.items():
            totals[m] += v * runs
        predicted_total += any_row["predicted_s"] * 1e3 * runs
        fused = found.get("fused")
        cells = [f"{ms[m]:.3f}" if m in ms else "-" for m in impls]
        if fused:
            f = fused["extra_info"]
            cells += [f"{f['tflops']:.1f}", f"{100 * f['tflops'] / f['gemm_tflops']:.0f}%",
                      f"{f['predicted_s'] * 1e3:.3f}",
                      f"{ms['fused'] / ms['conv alone']:.2f}" if "conv alone" in ms else "-",
                      f.get("pick", "-")]
        else:
            cells += ["-"] * 5
        lines.append(f"| {conv} | " + " | ".join(cells) + " |")
    lines.append("| **one forward (x runs)** | " + " | ".join(f"**{totals[m]:.2f}**" for m in impls)
                 + f" | | | **{predicted_total:.2f}** | | |")
    return lines + [""]


PROLOGUE = "fused, silu prologue"  # bench/test_bench_conv.py's impl name


def prologue_table(benches) -> list:
    """The SiLU prologue's trade, per 1x1 conv that reads a block's pre-activation: the conv making
    silu(x) * beta as it loads x, against the conv reading it plus the write of it that the
    prologue saves (its bytes at the copy rate measured in this run); weighted by runs per forward."""
    _, by_conv, i0 = _by_conv(benches, "conv")
    rows = [(conv, found) for conv, found in by_conv.items() if PROLOGUE in found and "fused" in found]
    if not rows:
        return []
    lines = ["### SiLU prologue (conv1 and downsample reading silu(x) * beta as they load x)", "",
             "| conv (runs per forward) | fused ms | + write ms | prologue ms | saved ms |", "|---|---|---|---|---|"]
    total = 0.0
    for conv, found in rows:
        f, p = found["fused"], found[PROLOGUE]
        write_ms = p["extra_info"]["saves_bytes"] / p["extra_info"]["copy_gbps"] / 1e6
        saved = f["stats"]["median"] * 1e3 + write_ms - p["stats"]["median"] * 1e3
        total += saved * p["extra_info"]["runs_per_forward"]
        lines.append(f"| {conv} | {f['stats']['median'] * 1e3:.3f} | {write_ms:.3f} | "
                     f"{p['stats']['median'] * 1e3:.3f} | {saved:+.3f} |")
    lines.append(f"| **one forward (x runs)** | | | | **{total:+.2f}** |")
    return lines + [""]


def conv_backward_table(benches) -> list:
    """One row per convolution with an activation: the backward's median per implementation (the
    fused op's against autograd through cuDNN and aten's activation), weighted by runs per forward."""
    impls, by_conv, i0 = _by_conv(benches, "conv_backward")
    if not impls:
        return []
    head = ["conv with activation (runs per forward)"] + [f"{m} ms" for m in impls] + ["fused TFLOP/s (3x forward)",
                                                                                      "fused / unfused"]
    lines = [f"### convolution backward (batch {i0['batch']}, {i0['dtype'].replace('torch.', '')})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    totals = dict.fromkeys(impls, 0.0)
    for conv, found in by_conv.items():
        ms = {m: found[m]["stats"]["median"] * 1e3 for m in impls if m in found}
        runs = next(iter(found.values()))["extra_info"]["runs_per_forward"]
        for m, v in ms.items():
            totals[m] += v * runs
        cells = [f"{ms[m]:.3f}" if m in ms else "-" for m in impls]
        fused = found.get("fused")
        cells.append(f"{fused['extra_info']['tflops']:.1f}" if fused else "-")
        others = [ms[m] for m in impls if m != "fused" and m in ms]
        cells.append(f"{ms['fused'] / others[0]:.2f}" if fused and others else "-")
        lines.append(f"| {conv} | " + " | ".join(cells) + " |")
    lines.append("| **one backward (x runs)** | " + " | ".join(f"**{totals[m]:.2f}**" for m in impls) + " | | |")
    return lines + [""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench_json", nargs="*", help="pytest-benchmark --benchmark-json files (none: a report of the rest)")
    p.add_argument("--out", required=True, help="output path without extension")
    p.add_argument("--tables", nargs="*", default=[], help="static kernel tables (Markdown) to append")
    p.add_argument("--tests", default=None, help="a file with the GPU test run's summary line(s)")
    p.add_argument("--title", default="nfnet_fast benchmark report")
    p.add_argument("--commit", default=None, help="the commit measured (default: the checkout's HEAD now)")
    p.add_argument("--steps", default=None, help="one line: how long each step of the run took")
    p.add_argument("--kernels", nargs="*", default=[],
                   help="bench/profile_kernels.py's kernel_kinds.md (and kernel_kinds_train.md) to include")
    args = p.parse_args(argv)

    benches = []
    for path in args.bench_json:
        if os.path.exists(path):
            with open(path) as f:
                benches += json.load(f).get("benchmarks", [])
    env = environment()
    if args.commit:
        env["commit"] = args.commit
    md = [f"# {args.title}", ""] + ([args.steps, ""] if args.steps else [])
    md += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in env.items()] + [""]
    if args.tests and os.path.exists(args.tests):
        md += ["## tests", "", "```", open(args.tests).read().strip(), "```", ""]
    md += ["## throughput", ""] + (model_tables(benches, "inference") + model_tables(benches, "train")
                                   or ["No benchmark finished: see the notes above.", ""])
    md += policy_table(benches)
    md += ops_table(benches)
    md += conv_table(benches)
    md += prologue_table(benches)
    md += conv_backward_table(benches)
    md += agc_table(benches)
    kernels = [open(k).read().strip() for k in args.kernels if os.path.exists(k)]
    if kernels:
        md += ["## where the time goes", ""] + [k + "\n" for k in kernels]
    for t in args.tables:
        if os.path.exists(t):
            md += [f"## {os.path.basename(t)}", "", open(t).read().strip(), ""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    with open(args.out + ".json", "w") as f:
        json.dump(dict(environment=env, steps=args.steps, benchmarks=[dict(name=b["name"], median_s=b["stats"]["median"],
                                                         **b["extra_info"]) for b in benches]), f, indent=2)
    print(f"report: {args.out}.md and {args.out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
