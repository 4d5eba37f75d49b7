// The Python module nfnet_fast._C: importing it loads this library, whose static initialisers
// register the ops. Each op's schema (TORCH_LIBRARY_FRAGMENT) and CPU kernels live in
// csrc/<op>_cpu.cpp, its CUDA kernels in csrc/<op>.cu; fake kernels and autograd are registered
// from Python (nfnet_fast/_library.py).
#include <Python.h>
#include <torch/library.h>

#include "eca_residual.h"
#include "replay.h"
#include "triton_launch.h"

namespace nfnet_fast {
const char* sources_digest();  // build/generated/sources_digest.cpp, written by setup.py
}

namespace {

// nfnet_fast._C._eca_plan(N, C, HW, elem_size, channels_last, align, cuda, target_blocks) ->
// (vec, tile, ctiles, ct, splits, split_len): the work plan of the ECA kernels, so tests can check
// on any machine the choices the CUDA launcher makes (vector width, scalar fallback, ranges).
PyObject* eca_plan_py(PyObject*, PyObject* args) {
  long long n, c, hw, target;
  int elem, cl, align, cuda;
  if (!PyArg_ParseTuple(args, "LLLiiiiL", &n, &c, &hw, &elem, &cl, &align, &cuda, &target)) return nullptr;
  if (n <= 0 || c <= 0 || hw <= 0 || (elem != 2 && elem != 4 && elem != 8) || align <= 0) {
    PyErr_SetString(PyExc_ValueError, "_eca_plan: N, C, HW, align must be positive and elem_size 2, 4 or 8");
    return nullptr;
  }
  const auto p = nfnet_fast::eca_plan(n, c, hw, elem, cl != 0, align, cuda != 0, target);
  return Py_BuildValue("(iLLiLL)", p.vec, static_cast<long long>(p.tile), static_cast<long long>(p.ctiles), p.ct,
                       static_cast<long long>(p.splits), static_cast<long long>(p.split_len));
}

PyMethodDef methods[] = {
    {"_eca_plan", eca_plan_py, METH_VARARGS, "Work plan of the ECA kernels (for tests)."},
    // native launches of memoised Triton binaries (csrc/triton_launch.h; nfnet_fast.kernels.launch)
    {"_triton_init", nfnet_fast::triton_init_py, METH_VARARGS, "The tensor type and pointer dtypes."},
    {"_triton_describe", nfnet_fast::triton_describe_py, METH_VARARGS, "A kernel's parameters."},
    {"_triton_register", nfnet_fast::triton_register_py, METH_VARARGS, "A binary for a launch signature."},
    {"_triton_launch", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(nfnet_fast::triton_launch_py)),
     METH_FASTCALL, "Launch a registered binary natively; None where none is registered."},
    {"_triton_pack", nfnet_fast::triton_pack_py, METH_VARARGS, "A launch's parameter bytes (tests)."},
    {"_triton_clear", nfnet_fast::triton_clear_py, METH_NOARGS, "Forget every registered binary."},
    // the native replayer of recorded op bodies (csrc/replay.h; nfnet_fast._replay)
    {"_replay_register", nfnet_fast::replay_register_py, METH_VARARGS, "Register a recorded op body."},
    {"_replay_node_register", nfnet_fast::replay_node_register_py, METH_VARARGS,
     "Register a call signature's autograd node."},
    {"_replay_hook", nfnet_fast::replay_hook_py, METH_VARARGS, "Launches call the test hook op (tests)."},
    {"_replay_clear", nfnet_fast::replay_clear_py, METH_NOARGS, "Forget every record."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// Importing nfnet_fast._C loads this .so so the TORCH_LIBRARY initialisers run. Only the limited
// Python API is used, so one abi3 build serves every Python >= 3.10.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  PyObject* module = PyModule_Create(&module_def);
  // the digest of the csrc/ it was built from: nfnet_fast refuses the module where the checkout's differs
  if (module != nullptr && PyModule_AddStringConstant(module, "SOURCES_DIGEST", nfnet_fast::sources_digest()) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
