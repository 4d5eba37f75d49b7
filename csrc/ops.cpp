// Operator schemas of the nfnet_fast namespace, and the module init that loads them.
// Kernels register in their own files with TORCH_LIBRARY_IMPL; fake kernels and autograd are
// registered from Python (nfnet_fast/_cuda.py).
#include <Python.h>
#include <torch/library.h>

#include "eca.h"

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
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" {
// Importing nfnet_fast._C loads this .so so the TORCH_LIBRARY initialisers run. Only the limited
// Python API is used, so one abi3 build serves every Python >= 3.10.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(nfnet_fast, m) {
  m.def("scaled_std_weight(Tensor weight, Tensor gain, float scale, float eps) -> Tensor");
  m.def(
      "scaled_std_weight_backward(Tensor grad_out, Tensor weight, Tensor gain, float scale, float eps)"
      " -> (Tensor, Tensor)");
  // silu(x) * beta, any shape; the output takes x's strides (x's suggested format if x is not dense).
  m.def("silu_scale(Tensor x, float beta) -> Tensor");
  m.def("silu_scale_backward(Tensor grad_out, Tensor x, float beta) -> Tensor");
  // ECA and the fused NF block tail (eca.h): out = scale * x * gate(x) [+ shortcut],
  // act = silu(out) * beta_next when beta_next is given (else a (0,) tensor), mean = the (N, C)
  // channel means (fp32; fp64 for float64 x) that the backward reuses.
  m.def(
      "eca_forward(Tensor x, Tensor weight, Tensor? shortcut, float scale, float? beta_next)"
      " -> (Tensor out, Tensor act, Tensor mean)");
  // Gradients of x, weight and (when grad_act is given) of out's total, which is the shortcut's
  // gradient; without grad_act the third output is (0,) and the shortcut's gradient is grad_out.
  m.def(
      "eca_backward(Tensor grad_out, Tensor? grad_act, Tensor x, Tensor weight, Tensor? shortcut, Tensor mean,"
      " float scale, float? beta_next) -> (Tensor grad_x, Tensor grad_weight, Tensor grad_shortcut)");
}
