// Native launches of Triton binaries that nfnet_fast.kernels.launch memoised (NFNET_FAST_NATIVE_LAUNCH=1):
// per kernel and launch signature, C++ keeps the CUfunction and how each parameter goes into the launch,
// and a later launch with the same signature runs without Triton's Python or its launcher
// (docs/native-launch.md). Only the limited Python API is used (the module is abi3).
#pragma once
#include <Python.h>

#include <cstddef>
#include <string>

namespace nfnet_fast {

// _triton_init(tensor_type, dtypes, dry_run=False): torch.Tensor and the dtypes a pointer argument may have
// (their index is the dtype's code in a launch signature); forgets every registration. dry_run: launches do
// all but the driver's part, on device 0 and CPU tensors too (host-time measurements and tests without a GPU)
PyObject* triton_init_py(PyObject*, PyObject* args);
// _triton_describe(kernel_id, names, constexprs, no_specialize): a kernel's parameters, in order
PyObject* triton_describe_py(PyObject*, PyObject* args);
// _triton_register(kernel_id, device, args, kwargs, slots, function, num_warps, shared, binary) -> bool
PyObject* triton_register_py(PyObject*, PyObject* args);
// _triton_launch(kernel_id, gx, gy, gz, args, kwargs) -> the binary launched, or None (not memoised)
PyObject* triton_launch_py(PyObject*, PyObject* const* args, Py_ssize_t nargs);
// _triton_pack(kernel_id, device, args, kwargs) -> the launch's parameter bytes, or None (tests: no launch)
PyObject* triton_pack_py(PyObject*, PyObject* args);
// _triton_clear(): forget every kernel and signature
PyObject* triton_clear_py(PyObject*, PyObject*);

// For the native replayer (csrc/replay.cpp), which launches the binaries of its records itself:
// whether launches run dry (_triton_init's dry_run), and one cuLaunchKernel of a binary on a stream
// (an empty message, or why it failed; nothing launches without a CUDA build or the driver).
bool triton_dry_run();
// One parameter's 8-byte launch slot as Triton's launcher passes it, for a slot kind of triton_launch.cpp
// (p, i, l, u, f, b) and a value (an int, or with is_float a double, or None); *size: the parameter's own
// size in bytes. False where the value does not fit the kind (an i32 out of range, a float for an int).
bool triton_pack_param(char kind, long long i, double f, bool is_float, bool is_none, unsigned long long* slot,
                       size_t* size);
// whether this thread has a current CUDA context (false without the driver)
bool triton_has_context();
std::string triton_cu_launch(unsigned long long function, unsigned gx, unsigned gy, unsigned gz, unsigned num_warps,
                             unsigned shared, void* stream, void** params);

}  // namespace nfnet_fast
