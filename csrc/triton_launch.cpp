// Native launches of memoised Triton binaries (see triton_launch.h and docs/native-launch.md).
//
// nfnet_fast.kernels.launch registers a binary after Triton itself has compiled and launched it for a
// signature; from then on _triton_launch finds it from the arguments alone and calls cuLaunchKernel
// with the parameters Triton's launcher would pass: every parameter that is not a constexpr of the
// binary, in order (pointers as device addresses, i32/i64/u64 ints, fp32 floats, u1 bools), then the
// two scratch pointers (global, profile) every Triton 3.6-3.8 kernel takes, null here (registration
// refuses a binary that needs scratch). The memo key is at least as fine as kernels.launch's own:
// for each positional argument its type and what Triton specialises on (a tensor's dtype and 16-byte
// alignment, an int's value, or for a do_not_specialize int its range), and every keyword's exact
// value. Anything else (another argument type, a tensor keyword, a CPU tensor) is not memoised here:
// the caller then takes Triton's path.
#define PY_SSIZE_T_CLEAN  // (the "#" formats take Py_ssize_t lengths)
#include "triton_launch.h"

#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#ifdef NFNET_FAST_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace nfnet_fast {
namespace {

// how a parameter goes into a binary's launch (from the binary's signature: kernels.launch maps it)
enum Slot : char { kSkip = '-', kPtr = 'p', kI32 = 'i', kI64 = 'l', kU64 = 'u', kF32 = 'f', kU1 = 'b' };

struct Param {
  std::string name;
  PyObject* key = nullptr;  // the name as an interned str, to look it up among the keywords
  bool constexpr_ = false;   // a tl.constexpr parameter: its value is part of the binary
  bool no_specialize = false;  // do_not_specialize: an int's range, not its value, picks the binary
};

struct Binary {
  unsigned long long function = 0;  // the CUfunction
  unsigned num_warps = 4, shared = 0;
  std::string slots;  // one Slot per parameter
  PyObject* compiled = nullptr;  // Triton's CompiledKernel, kept alive (3.8 unloads its module when collected)
};

struct Kernel {
  std::string name;
  std::vector<Param> params;
  std::unordered_map<std::string, Binary> binaries;  // launch signature -> binary
};

// (shared: a call holds its kernel while it runs Python code, a tensor subclass's data_ptr say, during which
// another call may describe the kernel again or clear everything)
std::unordered_map<long long, std::shared_ptr<Kernel>> kernels;
size_t n_binaries = 0;
constexpr size_t kMaxBinaries = 4096;  // (as kernels.launch's memo: bounded unless shapes keep changing)
PyObject* tensor_type = nullptr;
PyObject *dtype_name = nullptr, *is_cuda_name = nullptr, *data_ptr_name = nullptr;  // (interned once)
// a dry run (bench/host_overhead.py and tests on a machine without a GPU): everything a launch does but the
// driver's part (the device is 0, CPU tensors are taken, cuLaunchKernel is not called)
bool dry_run = false;
std::vector<PyObject*> dtypes;  // a pointer argument's dtype code is its index here

struct Value {
  long long i = 0;  // an int, a bool, or a pointer's address
  double f = 0.0;
  bool is_float = false, is_none = false;
};

void put(std::string& key, const void* p, size_t n) { key.append(static_cast<const char*>(p), n); }

// Appends an int's key: its value, or (no_specialize) Triton's range class; false on > 64 bits.
bool int_key(PyObject* v, bool no_specialize, std::string& key, Value& out) {
  int overflow = 0;
  long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
  if (x == -1 && PyErr_Occurred()) return false;
  bool u64 = false;
  if (overflow > 0) {  // (2**63 <= x < 2**64: Triton's u64)
    unsigned long long u = PyLong_AsUnsignedLongLong(v);
    if (PyErr_Occurred()) return false;
    std::memcpy(&x, &u, 8);
    u64 = true;
  } else if (overflow < 0) {
    return false;
  }
  out.i = x;
  if (no_specialize) {
    const char range = static_cast<char>((!u64 && x < -2147483648LL) | ((u64 || x > 2147483647LL) << 1) | (u64 << 2));
    key += 'R';
    key += range;
  } else {
    key += u64 ? 'U' : 'I';
    put(key, &x, 8);
  }
  return true;
}

// A keyword's exact value (kernels.launch keys keywords by value and type); false for other types.
bool exact_key(PyObject* v, std::string& key, Value& out) {
  if (v == Py_None) {
    key += 'N';
    out.is_none = true;
  } else if (PyBool_Check(v)) {
    key += 'B';
    key += v == Py_True ? '1' : '0';
    out.i = v == Py_True;
  } else if (PyLong_CheckExact(v)) {
    return int_key(v, false, key, out);
  } else if (PyFloat_CheckExact(v)) {
    out.f = PyFloat_AsDouble(v);
    out.is_float = true;
    key += 'F';
    put(key, &out.f, 8);
  } else if (PyUnicode_Check(v)) {
    Py_ssize_t n = 0;
    const char* s = PyUnicode_AsUTF8AndSize(v, &n);
    if (s == nullptr) return false;
    key += 'S';
    put(key, &n, sizeof(n));
    key.append(s, n);
  } else {
    return false;
  }
  return true;
}

// A positional argument's key as kernels.launch keys it; false for a type it does not key.
bool arg_key(PyObject* v, const Param& p, bool need_cuda, std::string& key, Value& out) {
  if (v == Py_None) {
    key += 'N';
    out.is_none = true;
    return true;
  }
  if (PyBool_Check(v)) {  // (a bool before an int: True == 1, and Triton compiles them apart)
    key += 'B';
    out.i = v == Py_True;
    return true;
  }
  if (PyLong_CheckExact(v)) return int_key(v, p.no_specialize, key, out);
  if (PyFloat_CheckExact(v)) {
    key += 'f';
    out.f = PyFloat_AsDouble(v);
    out.is_float = true;
    return true;
  }
  if (tensor_type == nullptr || PyObject_IsInstance(v, tensor_type) != 1) {
    PyErr_Clear();
    return false;
  }
  PyObject* dtype = PyObject_GetAttr(v, dtype_name);
  if (dtype == nullptr) return false;
  size_t code = 0;
  while (code < dtypes.size() && dtypes[code] != dtype) ++code;
  Py_DECREF(dtype);
  if (code == dtypes.size()) return false;
  if (need_cuda) {  // (a CPU tensor: Triton's launcher refuses it with its own message)
    PyObject* is_cuda = PyObject_GetAttr(v, is_cuda_name);
    if (is_cuda == nullptr) return false;
    const bool cuda = is_cuda == Py_True;
    Py_DECREF(is_cuda);
    if (!cuda) return false;
  }
  PyObject* ptr = PyObject_CallMethodObjArgs(v, data_ptr_name, nullptr);
  if (ptr == nullptr) return false;
  unsigned long long address = PyLong_AsUnsignedLongLong(ptr);
  Py_DECREF(ptr);
  if (PyErr_Occurred()) return false;
  std::memcpy(&out.i, &address, 8);
  key += 'T';
  key += static_cast<char>(code);
  key += (address & 15) == 0 ? 'a' : 'u';
  return true;
}

// The launch signature of (args, kwargs) for kernel k on device, and each parameter's value; false
// (with no Python error set) where the memo does not key it.
bool signature(const Kernel& k, int device, PyObject* args, PyObject* kwargs, bool need_cuda, std::string& key,
               std::vector<Value>& values) {
  const Py_ssize_t nargs = PyTuple_Size(args);
  if (nargs < 0 || static_cast<size_t>(nargs) > k.params.size()) {
    PyErr_Clear();
    return false;
  }
  put(key, &device, sizeof(device));
  values.assign(k.params.size(), Value{});
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    if (k.params[i].constexpr_ || !arg_key(PyTuple_GetItem(args, i), k.params[i], need_cuda, key, values[i])) {
      PyErr_Clear();
      return false;  // (a constexpr passed positionally: Triton's path, as kernels.launch does)
    }
  }
  key += '|';
  if (kwargs != nullptr && kwargs != Py_None) {
    Py_ssize_t pos = 0;
    PyObject *name, *value;
    while (PyDict_Next(kwargs, &pos, &name, &value)) {  // every keyword, in order, by value
      Py_ssize_t n = 0;
      const char* s = PyUnicode_AsUTF8AndSize(name, &n);
      Value ignored;
      if (s == nullptr || !exact_key(value, key, ignored)) {
        PyErr_Clear();
        return false;
      }
      key.append(s, n);
      key += '=';
    }
  }
  for (size_t i = nargs; i < k.params.size(); ++i) {  // the rest of the parameters come as keywords
    PyObject* v = kwargs != nullptr && kwargs != Py_None ? PyDict_GetItem(kwargs, k.params[i].key) : nullptr;
    std::string unused;
    if (v == nullptr || !exact_key(v, unused, values[i])) {
      PyErr_Clear();
      return false;
    }
  }
  return true;
}

// The parameter buffer of one launch: one 8-byte slot per kept parameter, its value in the low bytes (the
// GPUs are little-endian), then the two scratch pointers. With ``bytes``, also each slot's bytes at the
// parameter's own size (the tests compare them with the PTX's parameters): the launch's buffer itself.
// false where a value does not fit its slot (never for a signature the binary was registered with).
bool fill(const Binary& b, const std::vector<Value>& values, std::vector<unsigned long long>& storage,
          std::string* bytes) {
  storage.clear();
  for (size_t i = 0; i < b.slots.size(); ++i) {
    if (b.slots[i] == kSkip) continue;
    const Value& v = values[i];
    unsigned long long slot = 0;
    size_t size = 8;
    if (!triton_pack_param(b.slots[i], v.i, v.f, v.is_float, v.is_none, &slot, &size)) return false;
    storage.push_back(slot);
    if (bytes) put(*bytes, &storage.back(), size);
  }
  storage.push_back(0);  // global scratch
  storage.push_back(0);  // profile scratch
  if (bytes) put(*bytes, &storage[storage.size() - 2], 16);
  return true;
}

std::shared_ptr<Kernel> find_kernel(long long id) {
  auto it = kernels.find(id);
  return it == kernels.end() ? nullptr : it->second;
}

void clear_all() {
  for (auto& entry : kernels)
    for (auto& b : entry.second->binaries) Py_XDECREF(b.second.compiled);
  kernels.clear();
  n_binaries = 0;
}

#ifdef NFNET_FAST_WITH_CUDA
using LaunchFn = int (*)(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**,
                         void**);
using ErrorNameFn = int (*)(int, const char**);
using CurrentContextFn = int (*)(void**);
LaunchFn cu_launch = nullptr;
ErrorNameFn cu_error_name = nullptr;
CurrentContextFn cu_current_context = nullptr;

// cuLaunchKernel from the driver library, as Triton finds it (dlopen of libcuda.so.1): no link dependency
// (once per process: the native replayer calls it without the GIL, from any thread)
bool load_driver() {
  static std::once_flag once;
  std::call_once(once, [] {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) return;
    auto launch = reinterpret_cast<LaunchFn>(dlsym(lib, "cuLaunchKernel"));
    cu_error_name = reinterpret_cast<ErrorNameFn>(dlsym(lib, "cuGetErrorName"));
    cu_current_context = reinterpret_cast<CurrentContextFn>(dlsym(lib, "cuCtxGetCurrent"));
    cu_launch = cu_current_context != nullptr ? launch : nullptr;
  });
  return cu_launch != nullptr;
}
#endif

}  // namespace

bool triton_pack_param(char kind, long long i, double f, bool is_float, bool is_none, unsigned long long* slot,
                       size_t* size) {
  *slot = 0;
  *size = 8;
  switch (kind) {
    case kPtr:
      if (is_float) return false;
      *slot = is_none ? 0 : static_cast<unsigned long long>(i);
      return true;
    case kI32: {
      if (is_float || is_none || i < -2147483648LL || i > 2147483647LL) return false;
      const int x = static_cast<int>(i);
      std::memcpy(slot, &x, 4);
      *size = 4;
      return true;
    }
    case kI64:
    case kU64:
      if (is_float || is_none) return false;
      std::memcpy(slot, &i, 8);
      return true;
    case kF32: {  // (Triton's launcher: a Python float's double, as a C float)
      if (!is_float) return false;
      const float x = static_cast<float>(f);
      std::memcpy(slot, &x, 4);
      *size = 4;
      return true;
    }
    case kU1:  // (zero-extended: a 1- or 4-byte parameter reads the same value)
      if (is_float || is_none) return false;
      *slot = i != 0;
      *size = 1;
      return true;
    default:
      return false;
  }
}

bool triton_dry_run() { return dry_run; }

bool triton_has_context() {
#ifdef NFNET_FAST_WITH_CUDA
  void* context = nullptr;
  return load_driver() && cu_current_context(&context) == 0 && context != nullptr;
#else
  return false;
#endif
}

std::string triton_cu_launch(unsigned long long function, unsigned gx, unsigned gy, unsigned gz, unsigned num_warps,
                             unsigned shared, void* stream, void** params) {
#ifdef NFNET_FAST_WITH_CUDA
  if (!load_driver()) return "no CUDA driver (libcuda.so.1)";
  const int err = cu_launch(reinterpret_cast<void*>(function), gx, gy, gz, 32 * num_warps, 1, 1, shared, stream,
                            params, nullptr);
  if (err == 0) return std::string();
  const char* what = nullptr;
  if (cu_error_name == nullptr || cu_error_name(err, &what) != 0 || what == nullptr) what = "unknown error";
  return std::string("cuLaunchKernel failed with ") + what + " (" + std::to_string(err) + ")";
#else
  (void)function, (void)gx, (void)gy, (void)gz, (void)num_warps, (void)shared, (void)stream, (void)params;
  return "a build without CUDA launches nothing";
#endif
}

PyObject* triton_init_py(PyObject*, PyObject* args) {
  PyObject *tensor, *dtype_seq;
  int dry = 0;
  if (!PyArg_ParseTuple(args, "OO|p", &tensor, &dtype_seq, &dry)) return nullptr;
  dry_run = dry != 0;
  if (dtype_name == nullptr) {
    dtype_name = PyUnicode_InternFromString("dtype");
    is_cuda_name = PyUnicode_InternFromString("is_cuda");
    data_ptr_name = PyUnicode_InternFromString("data_ptr");
    if (dtype_name == nullptr || is_cuda_name == nullptr || data_ptr_name == nullptr) return nullptr;
  }
  PyObject* seq = PySequence_Tuple(dtype_seq);
  if (seq == nullptr) return nullptr;
  clear_all();
  for (PyObject* d : dtypes) Py_DECREF(d);
  dtypes.clear();
  for (Py_ssize_t i = 0; i < PyTuple_Size(seq); ++i) {
    PyObject* d = PyTuple_GetItem(seq, i);
    Py_INCREF(d);
    dtypes.push_back(d);
  }
  Py_DECREF(seq);
  Py_XDECREF(tensor_type);
  Py_INCREF(tensor);
  tensor_type = tensor;
  Py_RETURN_NONE;
}

PyObject* triton_describe_py(PyObject*, PyObject* args) {
  long long id;
  const char* name;
  PyObject* names;
  const char *constexprs, *no_specialize;
  Py_ssize_t n_constexprs, n_no_specialize;
  if (!PyArg_ParseTuple(args, "LsOs#s#", &id, &name, &names, &constexprs, &n_constexprs, &no_specialize,
                        &n_no_specialize))
    return nullptr;
  const Py_ssize_t n = PySequence_Size(names);
  if (n < 0) return nullptr;
  if (n != n_constexprs || n != n_no_specialize) {
    PyErr_SetString(PyExc_ValueError, "_triton_describe: one constexpr and one no_specialize flag per name");
    return nullptr;
  }
  Kernel k;
  k.name = name;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PySequence_GetItem(names, i);
    if (item == nullptr) return nullptr;
    const char* s = PyUnicode_AsUTF8AndSize(item, nullptr);
    if (s == nullptr) {
      Py_DECREF(item);
      return nullptr;
    }
    PyObject* key = PyUnicode_InternFromString(s);  // (kept for the process: a kernel's few names)
    if (key != nullptr) k.params.push_back(Param{s, key, constexprs[i] == '1', no_specialize[i] == '1'});
    Py_DECREF(item);
    if (key == nullptr) return nullptr;
  }
  auto it = kernels.find(id);
  if (it != kernels.end()) {
    for (auto& b : it->second->binaries) Py_XDECREF(b.second.compiled);
    n_binaries -= it->second->binaries.size();
    it->second->binaries.clear();  // (a call holding the old entry finds nothing in it)
  }
  kernels[id] = std::make_shared<Kernel>(std::move(k));
  Py_RETURN_NONE;
}

PyObject* triton_register_py(PyObject*, PyObject* args) {
  long long id;
  int device;
  PyObject *call_args, *kwargs, *compiled;
  const char* slots;
  Py_ssize_t n_slots;
  unsigned long long function;
  unsigned num_warps, shared;
  if (!PyArg_ParseTuple(args, "LiO!Os#KIIO", &id, &device, &PyTuple_Type, &call_args, &kwargs, &slots, &n_slots,
                        &function, &num_warps, &shared, &compiled))
    return nullptr;
  std::shared_ptr<Kernel> k = find_kernel(id);
  if (k == nullptr) Py_RETURN_NONE;  // (not described, or the registry was reset: the caller describes it)
  if (static_cast<size_t>(n_slots) != k->params.size()) {
    PyErr_SetString(PyExc_ValueError, "_triton_register: one slot per parameter");
    return nullptr;
  }
  std::string key;
  std::vector<Value> values;
  if (!signature(*k, device, call_args, kwargs, false, key, values)) Py_RETURN_FALSE;
  Binary b;
  b.function = function;
  b.num_warps = num_warps;
  b.shared = shared;
  b.slots.assign(slots, n_slots);
  std::vector<unsigned long long> storage;
  if (!fill(b, values, storage, nullptr)) Py_RETURN_FALSE;  // (a value its slot cannot hold: not memoised)
  if (n_binaries >= kMaxBinaries) {
    for (auto& entry : kernels) {
      for (auto& old : entry.second->binaries) Py_XDECREF(old.second.compiled);
      entry.second->binaries.clear();
    }
    n_binaries = 0;
  }
  auto found = k->binaries.find(key);
  if (found != k->binaries.end()) {
    Py_XDECREF(found->second.compiled);
    --n_binaries;
  }
  Py_INCREF(compiled);
  b.compiled = compiled;
  k->binaries[key] = std::move(b);
  ++n_binaries;
  Py_RETURN_TRUE;
}

PyObject* triton_launch_py(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 6 || !PyTuple_Check(args[4])) {
    PyErr_SetString(PyExc_TypeError, "_triton_launch(kernel_id, gx, gy, gz, args: tuple, kwargs)");
    return nullptr;
  }
  const long long id = PyLong_AsLongLong(args[0]);
  const long long gx = PyLong_AsLongLong(args[1]), gy = PyLong_AsLongLong(args[2]), gz = PyLong_AsLongLong(args[3]);
  if (PyErr_Occurred()) return nullptr;
  std::shared_ptr<Kernel> k = find_kernel(id);
  if (k == nullptr || k->binaries.empty()) Py_RETURN_NONE;
  int device = 0;  // (a dry run's: the device its registrations name)
  void* stream = nullptr;
  if (!dry_run) {
#ifdef NFNET_FAST_WITH_CUDA
    if (!load_driver()) Py_RETURN_NONE;
    try {  // (c10 throws where CUDA cannot start: then Triton's path says why)
      device = c10::cuda::current_device();
      stream = c10::cuda::getCurrentCUDAStream(device).stream();
    } catch (const std::exception&) {
      Py_RETURN_NONE;
    }
    // no current context on this thread (Triton's launcher makes the device's primary context current first):
    // Triton's path this once, which leaves it current
    void* context = nullptr;
    if (cu_current_context(&context) != 0 || context == nullptr) Py_RETURN_NONE;
#else
    Py_RETURN_NONE;  // (a build without CUDA launches nothing natively)
#endif
  }
  std::string key;
  std::vector<Value> values;
  if (!signature(*k, device, args[4], args[5], !dry_run, key, values)) Py_RETURN_NONE;
  auto it = k->binaries.find(key);
  if (it == k->binaries.end()) Py_RETURN_NONE;
  const Binary& b = it->second;
  if (gx < 0 || gy < 0 || gz < 0 || gx > 2147483647LL || gy > 65535 || gz > 65535) Py_RETURN_NONE;
  std::vector<unsigned long long> storage;
  if (!fill(b, values, storage, nullptr)) Py_RETURN_NONE;
  if (gx * gy * gz > 0 && !dry_run) {  // (Triton launches nothing for an empty grid)
    std::vector<void*> params(storage.size());
    for (size_t i = 0; i < storage.size(); ++i) params[i] = &storage[i];
    const std::string error = triton_cu_launch(b.function, static_cast<unsigned>(gx), static_cast<unsigned>(gy),
                                               static_cast<unsigned>(gz), b.num_warps, b.shared, stream, params.data());
    if (!error.empty()) {
      PyErr_Format(PyExc_RuntimeError, "nfnet_fast native launch of %s: %s", k->name.c_str(), error.c_str());
      return nullptr;
    }
  }
  Py_INCREF(b.compiled);
  return b.compiled;
}

PyObject* triton_pack_py(PyObject*, PyObject* args) {
  long long id;
  int device;
  PyObject *call_args, *kwargs;
  if (!PyArg_ParseTuple(args, "LiO!O", &id, &device, &PyTuple_Type, &call_args, &kwargs)) return nullptr;
  std::shared_ptr<Kernel> k = find_kernel(id);
  if (k == nullptr) Py_RETURN_NONE;
  std::string key;
  std::vector<Value> values;
  if (!signature(*k, device, call_args, kwargs, false, key, values)) Py_RETURN_NONE;
  auto it = k->binaries.find(key);
  if (it == k->binaries.end()) Py_RETURN_NONE;
  std::vector<unsigned long long> storage;
  std::string bytes;
  if (!fill(it->second, values, storage, &bytes)) Py_RETURN_NONE;
  return Py_BuildValue("(y#KII)", bytes.data(), static_cast<Py_ssize_t>(bytes.size()), it->second.function,
                       it->second.num_warps, it->second.shared);
}

PyObject* triton_clear_py(PyObject*, PyObject*) {
  clear_all();
  Py_RETURN_NONE;
}

}  // namespace nfnet_fast
