"""Build of the nfnet_fast._C extension (torch.utils.cpp_extension).

Environment switches:
  NFNET_FAST_SKIP_EXT=1      build no extension at all (pure Python: reference and triton backends only)
  NFNET_FAST_REQUIRE_CUDA=1  fail the build unless the CUDA kernels can be compiled
  CUDA_HOME                  the CUDA toolkit to use (found from nvcc when unset)
  TORCH_CUDA_ARCH_LIST       target archs (default "8.0;9.0" when no GPU is visible)
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(msg):
    print(f"nfnet_fast setup: {msg}", file=sys.stderr, flush=True)


def _toolkit_from_nvcc():
    """The CUDA toolkit behind the nvcc on PATH, or None.

    The nvcc on PATH may be a wrapper script outside the toolkit, so its parent folder is not
    the toolkit (torch's guess); `nvcc --dryrun` prints the real one as TOP=.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    candidates = []
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", "/dev/null", "-o", "/dev/null"],
                             capture_output=True, text=True, timeout=60)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m:
            candidates.append(m.group(1).strip())
    except (OSError, subprocess.SubprocessError):
        pass
    candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for top in candidates:
        if os.path.isfile(os.path.join(top, "include", "cuda_runtime.h")):
            return os.path.realpath(top)
    return None


def _extensions():
    if _flag("NFNET_FAST_SKIP_EXT"):
        if _flag("NFNET_FAST_REQUIRE_CUDA"):
            raise SystemExit("nfnet_fast setup: NFNET_FAST_SKIP_EXT and NFNET_FAST_REQUIRE_CUDA are both set")
        _say("NFNET_FAST_SKIP_EXT is set: building no extension (reference and triton backends only)")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when imported, so settle it first; a user's setting wins.
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
        top = _toolkit_from_nvcc()
        if top:
            os.environ["CUDA_HOME"] = top
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    with_cuda = CUDA_HOME is not None and torch.version.cuda is not None
    if not with_cuda:
        why = "no CUDA toolkit (nvcc) found" if CUDA_HOME is None else f"torch {torch.__version__} is a CPU build"
        if _flag("NFNET_FAST_REQUIRE_CUDA"):
            raise SystemExit(f"nfnet_fast setup: NFNET_FAST_REQUIRE_CUDA is set but {why}")
        _say(f"{why}: building the C++ (CPU) kernels only; backend='cuda' will run on CPU tensors alone")
    elif not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        _say("no GPU visible: compiling CUDA kernels for TORCH_CUDA_ARCH_LIST=8.0;9.0")

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-DPy_LIMITED_API=0x030a0000"]
    args = dict(extra_compile_args={"cxx": cxx}, py_limited_api=True)
    if with_cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        args["extra_compile_args"]["nvcc"] = ["-O3", "-DNFNET_FAST_WITH_CUDA"]
        args["extra_compile_args"]["cxx"] = cxx + ["-DNFNET_FAST_WITH_CUDA"]
        ext = CUDAExtension("nfnet_fast._C", sources, **args)
    else:
        ext = CppExtension("nfnet_fast._C", sources, **args)
    build = {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}
    if _building():
        n_cpp = sum(s.endswith(".cpp") for s in sources)
        if with_cuda:
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPU's"
            _say(f"building nfnet_fast._C, CPU+CUDA: {n_cpp} C++ and {len(sources) - n_cpp} CUDA sources for "
                 f"TORCH_CUDA_ARCH_LIST={archs} (nvcc takes a few minutes on 2 cores)")
        else:
            _say(f"building nfnet_fast._C, CPU only: {n_cpp} C++ sources")
    return [ext], build


def _building():
    """True when this run of setup.py compiles (not when pip only asks for requirements or metadata)."""
    return any(cmd in sys.argv[1:] for cmd in ("build", "build_ext", "bdist_wheel", "editable_wheel", "develop",
                                               "install"))


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
