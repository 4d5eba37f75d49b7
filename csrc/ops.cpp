// Operator schemas of the nfnet_fast namespace, and the module init that loads them.
// Kernels register in their own files with TORCH_LIBRARY_IMPL; fake kernels and autograd are
// registered from Python (nfnet_fast/_cuda.py).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty module: importing nfnet_fast._C loads this .so so the TORCH_LIBRARY initialisers run.
// Only the limited Python API is used, so one abi3 build serves every Python >= 3.10.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(nfnet_fast, m) {
  m.def("scaled_std_weight(Tensor weight, Tensor gain, float scale, float eps) -> Tensor");
  m.def(
      "scaled_std_weight_backward(Tensor grad_out, Tensor weight, Tensor gain, float scale, float eps)"
      " -> (Tensor, Tensor)");
}
