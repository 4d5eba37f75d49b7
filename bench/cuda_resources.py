"""Per-kernel registers, spills and shared memory of the CUDA kernels in csrc/*.cu.

Compiles every csrc/*.cu to a cubin per architecture with the flags setup.py's build uses
(torch.utils.cpp_extension's nvcc flags, include paths, -O3, -DNFNET_FAST_WITH_CUDA), reads each
kernel's resource usage with ``cuobjdump --dump-resource-usage`` (the system toolkit's, else the
one triton ships) and ptxas's spill report (``-Xptxas -v``), and writes a Markdown table.

    python bench/cuda_resources.py                 # sm_90 and sm_80 -> bench/cuda_resources.md
    python bench/cuda_resources.py --arch 90 --out -   # print only

A kernel spills when ptxas reports spill stores/loads, or cuobjdump shows LOCAL or STACK > 0
(a stack frame here only comes from spilled registers or local arrays, both slow).
tests/test_cuda_ext.py::test_no_register_spills fails on any.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_ARCHS = ("90", "80")


@dataclass
class Kernel:
    arch: str
    source: str
    name: str  # demangled
    regs: int
    stack: int
    shared: int
    local: int
    spill_stores: int = 0
    spill_loads: int = 0

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0 or self.local > 0 or self.stack > 0


def nvcc_path() -> str | None:
    return shutil.which("nvcc")


def cuobjdump_path() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME") or _toolkit()
    if cuda_home and os.path.isfile(os.path.join(cuda_home, "bin", "cuobjdump")):
        return os.path.join(cuda_home, "bin", "cuobjdump")
    try:
        import triton
        cand = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.isfile(cand):
            return cand
    except Exception:  # noqa: BLE001 - triton missing or broken: no fallback
        pass
    return None


def _toolkit() -> str | None:
    """The toolkit behind the nvcc on PATH, found by setup.py's own helper (the nvcc on PATH may be
    a wrapper outside the toolkit, where torch's guess fails)."""
    path = os.path.join(ROOT, "setup.py")
    with open(path) as f:
        helpers = f.read().split("def _extensions", 1)[0]  # the helpers only, not the setup() call
    ns: dict = {"__file__": path, "__name__": "_nff_setup_helpers"}
    exec(compile(helpers, path, "exec"), ns)
    return ns["_toolkit_from_nvcc"]()


def nvcc_flags(arch: str) -> list[str]:
    """The nvcc flags of setup.py's build (torch.utils.cpp_extension) for one architecture."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        top = _toolkit()
        if top:
            os.environ["CUDA_HOME"] = top
    import torch
    from torch.utils import cpp_extension as ce
    try:
        incs = ce.include_paths(device_type="cuda")
    except TypeError:  # older torch: include_paths(cuda=True)
        incs = ce.include_paths(cuda=True)
    flags = ["-I" + os.path.join(ROOT, "csrc")]
    flags += [f"-I{i}" for i in incs]
    flags += list(ce.COMMON_NVCC_FLAGS)
    flags += ["-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              "-O3", "-DNFNET_FAST_WITH_CUDA", f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    return flags


def torch_cxx_std() -> str:
    """The C++ standard torch.utils.cpp_extension appends to nvcc's flags (c++20 in recent torch,
    c++17 before): read off its source, since it is not exposed."""
    import inspect
    from torch.utils import cpp_extension as ce
    return "c++20" if "'-std=c++20'" in inspect.getsource(ce) else "c++17"


def compile_cubin(src: str, arch: str, outdir: str, std: str | None = None) -> tuple[str, str]:
    """(cubin path, ptxas -v report) of one source for one architecture."""
    out = os.path.join(outdir, f"{os.path.splitext(os.path.basename(src))[0]}.sm_{arch}.cubin")
    cmd = [nvcc_path(), "-cubin", "-Xptxas", "-v", *nvcc_flags(arch), src, "-o", out]
    cmd.insert(1, f"-std={std or torch_cxx_std()}")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src} (sm_{arch}):\n{r.stderr[-4000:]}")
    return out, r.stderr


def _demangle(names: list[str]) -> list[str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return names
    r = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    out = r.stdout.splitlines()
    return out if len(out) == len(names) else names


_FUNC = re.compile(r"^\s*Function (\S+):\s*$")
_RES = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")
_PTXAS_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def resources(cubin: str, ptxas_log: str, arch: str, source: str) -> list[Kernel]:
    r = subprocess.run([cuobjdump_path(), "--dump-resource-usage", cubin], capture_output=True, text=True, check=True)
    mangled, rows = [], []
    current = None
    for line in r.stdout.splitlines():
        m = _FUNC.match(line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            vals = {k: int(v) for k, v in _RES.findall(line)}
            mangled.append(current)
            rows.append(vals)
            current = None
    spills: dict[str, tuple[int, int]] = {}
    entry = None
    for line in ptxas_log.splitlines():
        m = _PTXAS_ENTRY.search(line)
        if m:
            entry = m.group(1)
            continue
        m = _PTXAS_SPILL.search(line)
        if m and entry:
            spills[entry] = (int(m.group(1)), int(m.group(2)))
    names = _demangle(mangled)
    out = []
    for mg, name, vals in zip(mangled, names, rows):
        st, ld = spills.get(mg, (0, 0))
        out.append(Kernel(arch, os.path.basename(source), _short(name), vals.get("REG", 0), vals.get("STACK", 0),
                          vals.get("SHARED", 0), vals.get("LOCAL", 0), st, ld))
    return out


def _short(name: str) -> str:
    name = name.replace("nfnet_fast::(anonymous namespace)::", "").replace("c10::", "").replace("(anonymous namespace)::", "")
    name = re.sub(r"\(.*\)$", "", name)  # drop the parameter list, the template arguments say enough
    return name


def collect(archs=DEFAULT_ARCHS, jobs: int = 2, std: str | None = None) -> list[Kernel]:
    """Compile every csrc/*.cu for each arch and return the kernels' resources."""
    if nvcc_path() is None:
        raise FileNotFoundError("nvcc is not on PATH")
    if cuobjdump_path() is None:
        raise FileNotFoundError("no cuobjdump (CUDA toolkit or triton/backends/nvidia/bin)")
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
    with tempfile.TemporaryDirectory() as tmp:
        tasks = [(s, a) for a in archs for s in sources]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
            done = list(ex.map(lambda t: (t, compile_cubin(t[0], t[1], tmp, std)), tasks))
        kernels = []
        for (src, arch), (cubin, log) in done:
            kernels += resources(cubin, log, arch, src)
    return kernels


def markdown(kernels: list[Kernel]) -> str:
    lines = ["# CUDA kernel resources", "",
             "Generated by `python bench/cuda_resources.py` (nvcc -cubin with setup.py's flags, "
             "`cuobjdump --dump-resource-usage`, `ptxas -v` spill counts). Do not edit by hand.", ""]
    for arch in sorted({k.arch for k in kernels}, reverse=True):
        ks = [k for k in kernels if k.arch == arch]
        spilled = [k for k in ks if k.spills]
        lines += [f"## sm_{arch}", "",
                  f"{len(ks)} kernels; max registers {max(k.regs for k in ks)}; "
                  f"max static shared memory {max(k.shared for k in ks)} B; "
                  f"kernels with spills or local memory: {len(spilled)}.", "",
                  "| source | kernel | REG | SHARED (static, B) | STACK | LOCAL | spill st/ld (B) |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        for k in sorted(ks, key=lambda k: (k.source, k.name)):
            lines.append(f"| {k.source} | `{k.name}` | {k.regs} | {k.shared} | {k.stack} | {k.local} | "
                         f"{k.spill_stores}/{k.spill_loads} |")
        lines.append("")
    lines += ["Dynamic shared memory (not in SHARED above) of the ECA kernels: (2 * tile + 2p) values for the "
              "forward apply and the backward reduce with act, (4 * tile + 6p) for the backward apply "
              "(tile <= 256 channels, p = (k - 1) / 2): about 3 KB and 5 KB at k = 5.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", action="append", help="compute capability digits, e.g. 90 (repeatable); "
                    "default 90 and 80")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "cuda_resources.md"), help="'-' prints")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--std", default=None, help="force a C++ standard, e.g. c++17 (torch 2.11's default)")
    args = ap.parse_args(argv)
    kernels = collect(tuple(args.arch or DEFAULT_ARCHS), args.jobs, args.std)
    text = markdown(kernels)
    if args.out == "-":
        print(text)
    else:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}: {len(kernels)} kernels", file=sys.stderr)
    bad = [k for k in kernels if k.spills]
    for k in bad:
        print(f"SPILL sm_{k.arch} {k.name}: stack {k.stack} local {k.local} "
              f"spill st/ld {k.spill_stores}/{k.spill_loads}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
