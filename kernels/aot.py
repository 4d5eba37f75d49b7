"""Ahead-of-time compilation of every Triton kernel configuration, for GPUs this machine need not have.

Each op file's ``AOT`` list names its kernels, argument types and every constexpr set its launcher
can pass; this module compiles each of them, for each activation dtype, for sm_90 and sm_80, with
and without Triton's 16-divisibility specialisation, through ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``, and reads the register, spill (STACK/LOCAL) and shared
memory use off the cubin with the ``cuobjdump`` that ships with Triton.

Compilation runs in worker processes started with ``TRITON_INTERPRET=0``: under the interpreter
``@triton.jit`` builds interpreted functions, which cannot be compiled.

Usage: ``python -m nfnet_fast.kernels.aot [--arch 90 80] [--jobs N] [--json FILE]``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterable, List, Optional, Sequence

OPS = ("silu_scale", "scaled_std_weight", "eca_residual")  # compiled whole by tests/test_triton.py (~600 compiles)
# fused_conv's matrix (~890 compiles of GEMM kernels, tens of minutes on 2 cores) is compiled whole by
# bench/triton_resources.py and in a 3-way subset by tests/test_fused_conv_kernels.py
ALL_OPS = OPS + ("fused_conv",)
DTYPES = ("fp32", "fp16", "bf16")
ARCHS = (90, 80)
# Shared memory a block may use: 228 KB on sm_90 (H100), 164 KB on sm_80 (A100).
SMEM_LIMIT = {90: 228 * 1024, 80: 164 * 1024}


def jobs(archs: Iterable[int] = ARCHS, ops: Iterable[str] = OPS) -> List[dict]:
    """Every (op, kernel, spec, config, dtype, arch, aligned) to compile; ``spec_index`` is the
    spec's position in its op's ``AOT`` (a kernel may have several, e.g. for other argument
    types). Kernels with no pointer to the activation dtype are compiled once per arch (dtype "-")."""
    out = []
    for op in ops:
        mod = importlib.import_module(f"nfnet_fast.kernels.{op}")
        for si, spec in enumerate(mod.AOT):
            name = spec.kernel.__name__
            # arg_names: also there on the interpreter's functions (this runs in the caller's process)
            generic = any(_arg_type(spec, a) == "*T" for a in spec.kernel.arg_names if a not in spec.configs[0])
            for ci, _ in enumerate(spec.configs):
                for dtype in ((spec.dtypes or DTYPES) if generic else ("-",)):
                    for arch in archs:
                        for aligned in (True, False):
                            out.append(dict(op=op, kernel=name, spec_index=si, config_index=ci, dtype=dtype,
                                            arch=arch, aligned=aligned))
    return out


def _arg_type(spec, name: str) -> str:
    if name in spec.types:
        return spec.types[name]
    return "*T" if name.endswith("_ptr") else "i32"


def _cuobjdump() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else (shutil.which("cuobjdump") or path)


def compile_one(job: dict) -> dict:
    """Compile one job; returns the job with its resource use (or ``error``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(f"nfnet_fast.kernels.{job['op']}")
    spec = mod.AOT[job["spec_index"]]  # (by position: a kernel may have several specs, e.g. other types)
    config = dict(spec.configs[job["config_index"]])
    num_warps = config.pop("num_warps")
    fn = spec.kernel
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            constexprs[p.name] = config[p.name]
            continue
        ty = _arg_type(spec, p.name)
        signature[p.name] = ty.replace("*T", "*" + job["dtype"])
        if job["aligned"] and p.name in spec.aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    row = dict(job, config=", ".join(f"{k}={v}" for k, v in spec.configs[job["config_index"]].items()))
    t0 = time.time()
    try:
        k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", job["arch"], 32),
                           options=dict(num_warps=num_warps))
    except Exception as e:  # noqa: BLE001 - reported per job, the caller decides
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    row["seconds"] = round(time.time() - t0, 2)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        res = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True)
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
    if m is None:
        row["error"] = f"cuobjdump gave no resource line: {res.stdout[-500:]} {res.stderr[-500:]}"
        return row
    row.update(registers=int(m.group(1)), stack=int(m.group(2)), shared=int(m.group(3)), local=int(m.group(4)))
    row["triton_shared"] = int(k.metadata.shared)
    # widest global load in bits (vectorisation check): ld.global[.nc][.v2|.v4].b32 / .b16 / ...
    widths = [(int(v or 1)) * int(b) for v, b in re.findall(r"ld\.global(?:\.\w+)*?(?:\.v(\d))?\.[bfu](\d+)",
                                                             k.asm["ptx"])]
    row["widest_load_bits"] = max(widths, default=0)
    return row


def _init_worker():  # pragma: no cover - runs in the worker processes
    os.environ["TRITON_INTERPRET"] = "0"


def compile_all(archs: Iterable[int] = ARCHS, ops: Iterable[str] = OPS, workers: Optional[int] = None) -> List[dict]:
    """Compile every job in fresh worker processes (TRITON_INTERPRET=0); rows in job order."""
    todo = jobs(archs, ops)
    return map_compiling(compile_one, todo, workers or max(1, min(len(todo), os.cpu_count() or 1)), chunksize=4)


def map_compiling(fn: Callable, items: Sequence, workers: int, chunksize: int = 1) -> list:
    """``[fn(item) for item in items]`` in ``workers`` fresh spawned processes with TRITON_INTERPRET=0, so
    that ``fn`` compiles with Triton's real compiler even from a process that imported triton as the
    interpreter (the tests); ``fn`` must be importable by name (a module-level function)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"  # spawned workers inherit it before they import triton
    try:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker) as pool:
            return list(pool.map(fn, items, chunksize=chunksize))
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def problems(rows: List[dict], spills: bool = True) -> List[str]:
    """What is wrong in the rows: compile errors, spills (unless ``spills`` is False: another Triton's
    compile, bench/gpu_stack_check.sh), shared memory over the arch's limit."""
    out = []
    for r in rows:
        what = (f"{r['kernel']} (spec {r.get('spec_index', 0)}) [{r['config']}] {r['dtype']} sm_{r['arch']} "
                f"aligned={r['aligned']}")
        if "error" in r:
            out.append(f"{what}: {r['error']}")
        elif spills and (r["stack"] or r["local"]):
            out.append(f"{what}: spills (STACK {r['stack']}, LOCAL {r['local']})")
        elif max(r["shared"], r["triton_shared"]) > SMEM_LIMIT[r["arch"]]:
            out.append(f"{what}: shared memory {r['shared']} B > {SMEM_LIMIT[r['arch']]} B")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    ap.add_argument("--op", nargs="+", default=list(ALL_OPS))
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    rows = compile_all(args.arch, args.op, args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = problems(rows)
    for line in bad:
        print(line, file=sys.stderr)
    print(f"{len(rows)} compiled, {len(bad)} problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
