// The native replayer of recorded op bodies (see replay.h; the records: nfnet_fast/_replay.py).
//
// A record is a list of steps over tensor slots (the call's inputs, then each step's results):
//   - an aten op: its OperatorHandle, and its arguments in schema order (every default filled in by
//     Python), each a constant IValue, a tensor slot, or a list of tensor slots;
//   - a Triton launch: the binary (CUfunction, warps, shared memory), the grid, the device, and one
//     parameter per kept parameter of the binary in order (a tensor slot's address or null, or a
//     constant's bits, exactly as triton_launch.cpp's fill() packs them), then the two null scratch
//     pointers.
// nfnet_fast::_replay(record, inputs) runs the steps in order. It checks what the record assumed and the
// key cannot vouch for where that is cheap: a slot holds a tensor where a step reads one, and a pointer the
// binary was specialised as 16-byte aligned is aligned (else it raises: never a launch on a wrong
// assumption).
#define PY_SSIZE_T_CLEAN
#include "replay.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

#include "triton_launch.h"

#ifdef NFNET_FAST_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

namespace nfnet_fast {
namespace {

enum ArgKind { kConstant, kTensor, kTensorList, kOptionalTensorList };

struct Arg {
  ArgKind kind = kConstant;
  c10::IValue value;       // kConstant
  std::vector<int> slots;  // kTensor (one), the lists (-1: None)
};

struct Param {
  char kind = 'p';            // triton_launch.cpp's slot kinds: p, i, l, u, f, b
  int slot = -1;              // a pointer's tensor slot (-1: a constant, or a null pointer)
  bool aligned = false;       // the binary was specialised for a 16-byte aligned pointer here
  unsigned long long bits = 0;  // a constant's 8-byte slot
};

struct Step {
  std::optional<c10::OperatorHandle> op;  // an aten op, or (empty) a launch
  std::vector<Arg> args;
  std::vector<int> results;  // the op's result slots (-1: a result no later step reads)
  unsigned long long function = 0;
  unsigned num_warps = 4, shared = 0, grid[3] = {1, 1, 1};
  int device = 0;
  std::vector<Param> params;
  std::vector<int> release;  // slots no later step reads: dropped after this one (as the body's Python drops
                             // its temporaries: the replay's peak memory is the body's)
};

struct Record {
  size_t inputs = 0, size = 0;
  std::vector<Step> steps;
  std::vector<int> outputs;
};

std::mutex registry_mutex;  // (replays run without the GIL, registrations with it)
// id -> record; ids are never reused, so an id that a clear dropped finds nothing (never another record)
std::unordered_map<int64_t, std::shared_ptr<const Record>> records;
int64_t next_id = 0;
std::atomic<bool> launch_hook{false};

// ---- registration: Python values to C++ (limited API) ----

[[noreturn]] void fail(const std::string& why) { throw std::invalid_argument(why); }

std::string text(PyObject* v) {
  Py_ssize_t n = 0;
  const char* s = v != nullptr ? PyUnicode_AsUTF8AndSize(v, &n) : nullptr;
  if (s == nullptr) {
    PyErr_Clear();
    fail("expected a str");
  }
  return std::string(s, n);
}

long long integer(PyObject* v) {
  if (v == nullptr || !PyLong_Check(v)) fail("expected an int");
  long long x = PyLong_AsLongLong(v);
  if (x == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    fail("an int beyond 64 bits");
  }
  return x;
}

double real(PyObject* v) {
  if (v == nullptr || !PyFloat_Check(v)) fail("expected a float");
  return PyFloat_AsDouble(v);
}

PyObject* item(PyObject* seq, Py_ssize_t i) {  // a borrowed item of a tuple or list
  PyObject* v = PyTuple_Check(seq) ? PyTuple_GetItem(seq, i) : PyList_Check(seq) ? PyList_GetItem(seq, i) : nullptr;
  if (v == nullptr) {
    PyErr_Clear();
    fail("expected a tuple or list with item " + std::to_string(i));
  }
  return v;
}

Py_ssize_t length(PyObject* seq) {
  if (PyTuple_Check(seq)) return PyTuple_Size(seq);
  if (PyList_Check(seq)) return PyList_Size(seq);
  fail("expected a tuple or list");
}

int slot_of(PyObject* v, const Record& r) {
  const long long s = integer(v);
  if (s < -1 || s >= static_cast<long long>(r.size)) fail("a slot out of range");
  return static_cast<int>(s);
}

// One argument of an aten op: (tag, value), the tags of nfnet_fast._replay._encode.
Arg argument(PyObject* spec, const Record& r) {
  const std::string tag = text(item(spec, 0));
  Arg a;
  if (tag == "t") {
    a.kind = kTensor;
    a.slots.push_back(slot_of(item(spec, 1), r));
    if (a.slots[0] < 0) fail("a tensor argument without a slot");
    return a;
  }
  if (tag == "tl" || tag == "otl") {
    a.kind = tag == "tl" ? kTensorList : kOptionalTensorList;
    PyObject* list = item(spec, 1);
    for (Py_ssize_t i = 0; i < length(list); ++i) a.slots.push_back(slot_of(item(list, i), r));
    return a;
  }
  if (tag == "n") {
    a.value = c10::IValue();
  } else if (tag == "i") {
    a.value = c10::IValue(static_cast<int64_t>(integer(item(spec, 1))));
  } else if (tag == "f") {
    a.value = c10::IValue(real(item(spec, 1)));
  } else if (tag == "b") {
    a.value = c10::IValue(item(spec, 1) == Py_True);
  } else if (tag == "s") {
    a.value = c10::IValue(text(item(spec, 1)));
  } else if (tag == "d") {
    a.value = c10::IValue(c10::Device(text(item(spec, 1))));
  } else if (tag == "wf" || tag == "wi" || tag == "wb") {  // (a Python number as a tensor argument: ``t * 2.0``)
    PyObject* v = item(spec, 1);
    at::Tensor t = tag == "wf"   ? at::scalar_tensor(real(v), at::kDouble)
                   : tag == "wi" ? at::scalar_tensor(static_cast<int64_t>(integer(v)), at::kLong)
                                 : at::scalar_tensor(v == Py_True, at::kBool);
    t.unsafeGetTensorImpl()->set_wrapped_number(true);
    a.value = c10::IValue(t);
  } else if (tag == "il" || tag == "bl" || tag == "fl") {
    PyObject* list = item(spec, 1);
    const Py_ssize_t n = length(list);
    if (tag == "il") {
      c10::List<int64_t> values;
      for (Py_ssize_t i = 0; i < n; ++i) values.push_back(integer(item(list, i)));
      a.value = c10::IValue(values);
    } else if (tag == "bl") {
      c10::List<bool> values;
      for (Py_ssize_t i = 0; i < n; ++i) values.push_back(item(list, i) == Py_True);
      a.value = c10::IValue(values);
    } else {
      c10::List<double> values;
      for (Py_ssize_t i = 0; i < n; ++i) values.push_back(real(item(list, i)));
      a.value = c10::IValue(values);
    }
  } else {
    fail("an argument of unknown kind '" + tag + "'");
  }
  return a;
}

Step op_step(PyObject* spec, const Record& r) {
  Step s;
  const std::string name = text(item(spec, 1)), overload = text(item(spec, 2));
  s.op = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), overload.c_str());
  PyObject* args = item(spec, 3);
  const Py_ssize_t n = length(args);
  if (static_cast<size_t>(n) != s.op->schema().arguments().size()) fail(name + ": one argument per schema argument");
  for (Py_ssize_t i = 0; i < n; ++i) s.args.push_back(argument(item(args, i), r));
  PyObject* results = item(spec, 4);
  if (static_cast<size_t>(length(results)) != s.op->schema().returns().size()) fail(name + ": one slot per result");
  for (Py_ssize_t i = 0; i < length(results); ++i) s.results.push_back(slot_of(item(results, i), r));
  return s;
}

Step launch_step(PyObject* spec, const Record& r) {
  Step s;
  s.function = static_cast<unsigned long long>(integer(item(spec, 1)));
  s.num_warps = static_cast<unsigned>(integer(item(spec, 2)));
  s.shared = static_cast<unsigned>(integer(item(spec, 3)));
  PyObject* grid = item(spec, 4);
  if (length(grid) != 3) fail("a grid of three");
  for (int i = 0; i < 3; ++i) {
    const long long g = integer(item(grid, i));
    if (g < 0 || g > (i == 0 ? 2147483647LL : 65535LL)) fail("a grid dimension out of range");
    s.grid[i] = static_cast<unsigned>(g);
  }
  s.device = static_cast<int>(integer(item(spec, 5)));
  PyObject* params = item(spec, 6);
  for (Py_ssize_t i = 0; i < length(params); ++i) {
    PyObject* p = item(params, i);
    Param param;
    const std::string kind = text(item(p, 0));
    if (kind.size() != 1 || std::string("pilufb").find(kind[0]) == std::string::npos) fail("a parameter kind");
    param.kind = kind[0];
    PyObject* v = item(p, 1);
    if (param.kind == 'p') {
      param.slot = slot_of(v, r);  // (-1: a null pointer, a None argument)
      param.aligned = item(p, 2) == Py_True;
    } else {  // (packed as triton_launch.cpp packs a launch's values)
      const bool is_float = param.kind == 'f';
      size_t size = 0;
      if (!triton_pack_param(param.kind, is_float ? 0 : integer(v), is_float ? real(v) : 0.0, is_float, false,
                             &param.bits, &size))
        fail(std::string("a '") + param.kind + "' parameter whose value does not fit it (an i32 parameter out of "
             "range, say)");
    }
    s.params.push_back(param);
  }
  return s;
}

// ---- replaying ----

const at::Tensor& tensor_in(const std::vector<at::Tensor>& slots, int slot, const char* what) {
  TORCH_CHECK(slot >= 0 && slots[slot].defined(), "nfnet_fast replay: ", what,
              " reads a slot that holds no tensor (a record that does not fit this call)");
  return slots[slot];
}

void run_op(const Step& s, std::vector<at::Tensor>& slots) {
  torch::jit::Stack stack;
  stack.reserve(s.args.size());
  for (const Arg& a : s.args) {
    switch (a.kind) {
      case kConstant:
        stack.push_back(a.value);
        break;
      case kTensor:
        stack.emplace_back(tensor_in(slots, a.slots[0], "an op"));
        break;
      case kTensorList: {
        c10::List<at::Tensor> list;
        for (int slot : a.slots) list.push_back(tensor_in(slots, slot, "an op's list"));
        stack.emplace_back(list);
        break;
      }
      case kOptionalTensorList: {
        c10::List<std::optional<at::Tensor>> list;
        for (int slot : a.slots) {
          if (slot < 0) {
            list.push_back(std::nullopt);
          } else {
            list.push_back(tensor_in(slots, slot, "an op's list"));
          }
        }
        stack.emplace_back(list);
        break;
      }
    }
  }
  s.op->callBoxed(stack);
  TORCH_CHECK(stack.size() == s.results.size(), "nfnet_fast replay: ", s.op->schema().name(), " returned ",
              stack.size(), " values, the record ", s.results.size());
  for (size_t i = 0; i < stack.size(); ++i) {
    if (s.results[i] < 0) continue;
    slots[s.results[i]] = stack[i].isNone() ? at::Tensor() : stack[i].toTensor();
  }
}

void run_launch(const Step& s, size_t index, int64_t record, std::vector<at::Tensor>& slots) {
  const bool dry = triton_dry_run(), hook = launch_hook.load();
  std::vector<unsigned long long> storage;
  storage.reserve(s.params.size() + 2);
  std::vector<at::Tensor> hooked;  // (the hook's: the launch's tensors, in parameter order)
  for (const Param& p : s.params) {
    if (p.kind != 'p' || p.slot < 0) {
      storage.push_back(p.bits);
      continue;
    }
    const at::Tensor& t = tensor_in(slots, p.slot, "a launch");
    const auto address = reinterpret_cast<unsigned long long>(t.data_ptr());
    TORCH_CHECK(!p.aligned || address % 16 == 0, "nfnet_fast replay: a launch's binary was specialised for a 16-byte "
                "aligned pointer, and this call's tensor is not (a record that does not fit this call)");
    TORCH_CHECK(dry || hook || (t.is_cuda() && t.get_device() == s.device),
                "nfnet_fast replay: a launch's tensor is not on the record's GPU");
    storage.push_back(address);
    if (hook) hooked.push_back(t);
  }
  storage.push_back(0);  // global scratch
  storage.push_back(0);  // profile scratch
  if (hook) {
    static const auto hook = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("nfnet_fast::_replay_launch_hook", "")
                                 .typed<void(int64_t, int64_t, at::TensorList, at::IntArrayRef)>();
    std::vector<int64_t> bits(storage.size());
    std::memcpy(bits.data(), storage.data(), storage.size() * 8);
    hook.call(record, static_cast<int64_t>(index), hooked, bits);
    return;
  }
  if (dry || static_cast<unsigned long long>(s.grid[0]) * s.grid[1] * s.grid[2] == 0) return;
#ifdef NFNET_FAST_WITH_CUDA
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(s.device));
  if (!triton_has_context()) {  // (Triton's launcher makes the device's primary context current first)
    TORCH_CHECK(cudaSetDevice(s.device) == cudaSuccess, "nfnet_fast replay: cudaSetDevice failed");
  }
  void* stream = c10::cuda::getCurrentCUDAStream(static_cast<c10::DeviceIndex>(s.device)).stream();
  std::vector<void*> params(storage.size());
  for (size_t i = 0; i < storage.size(); ++i) params[i] = &storage[i];
  const std::string error =
      triton_cu_launch(s.function, s.grid[0], s.grid[1], s.grid[2], s.num_warps, s.shared, stream, params.data());
  TORCH_CHECK(error.empty(), "nfnet_fast replay: ", error);
#else
  TORCH_CHECK(false, "nfnet_fast replay: a build without CUDA launches nothing");
#endif
}

std::vector<at::Tensor> replay(int64_t record, at::TensorList inputs) {
  std::shared_ptr<const Record> r;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto found = records.find(record);
    TORCH_CHECK(found != records.end(), "nfnet_fast replay: no record ", record, " (cleared?)");
    r = found->second;
  }
  TORCH_CHECK(inputs.size() == r->inputs, "nfnet_fast replay: ", inputs.size(), " inputs for a record of ",
              r->inputs);
  std::vector<at::Tensor> slots(r->size);
  for (size_t i = 0; i < inputs.size(); ++i) slots[i] = inputs[i];
  for (size_t i = 0; i < r->steps.size(); ++i) {
    const Step& s = r->steps[i];
    if (s.op) {
      run_op(s, slots);
    } else {
      run_launch(s, i, record, slots);
    }
    for (int slot : s.release) slots[slot].reset();
  }
  std::vector<at::Tensor> out;
  out.reserve(r->outputs.size());
  for (int slot : r->outputs) out.push_back(tensor_in(slots, slot, "the result"));
  return out;
}

}  // namespace

PyObject* replay_register_py(PyObject*, PyObject* args) {
  long long inputs, size;
  PyObject *steps, *outputs;
  if (!PyArg_ParseTuple(args, "LLOO", &inputs, &size, &steps, &outputs)) return nullptr;
  auto r = std::make_shared<Record>();
  try {
    if (inputs < 0 || size < inputs) fail("slots: inputs first");
    r->inputs = static_cast<size_t>(inputs);
    r->size = static_cast<size_t>(size);
    for (Py_ssize_t i = 0; i < length(steps); ++i) {
      PyObject* spec = item(steps, i);
      const std::string kind = text(item(spec, 0));
      if (kind == "op") {
        r->steps.push_back(op_step(spec, *r));
      } else if (kind == "launch") {
        r->steps.push_back(launch_step(spec, *r));
      } else {
        fail("a step of unknown kind '" + kind + "'");
      }
    }
    for (Py_ssize_t i = 0; i < length(outputs); ++i) {
      const int slot = slot_of(item(outputs, i), *r);
      if (slot < 0) fail("a result without a slot");
      r->outputs.push_back(slot);
    }
    // each slot's last reader (a result nothing reads: the step that made it); the results are kept
    std::vector<int> last(r->size, -1);
    for (size_t i = 0; i < r->steps.size(); ++i) {
      const Step& step = r->steps[i];
      auto use = [&](int slot) {
        if (slot >= 0) last[slot] = static_cast<int>(i);
      };
      for (const Arg& a : step.args)
        for (int slot : a.slots) use(slot);
      for (const Param& p : step.params) use(p.slot);
      for (int slot : step.results) use(slot);
    }
    for (int slot : r->outputs) last[slot] = -1;
    for (size_t slot = 0; slot < last.size(); ++slot)
      if (last[slot] >= 0) r->steps[last[slot]].release.push_back(static_cast<int>(slot));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(registry_mutex);
  const int64_t id = next_id++;
  records[id] = std::move(r);
  return PyLong_FromLongLong(id);
}

PyObject* replay_hook_py(PyObject*, PyObject* args) {
  int on = 0;
  if (!PyArg_ParseTuple(args, "p", &on)) return nullptr;
  launch_hook = on != 0;
  Py_RETURN_NONE;
}

PyObject* replay_clear_py(PyObject*, PyObject*) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  records.clear();  // (a replay running now holds its record: it finishes)
  Py_RETURN_NONE;
}

}  // namespace nfnet_fast

TORCH_LIBRARY_FRAGMENT(nfnet_fast, m) {
  m.def("_replay(int record, Tensor[] inputs) -> Tensor[]");
  // (tests without a GPU implement it in Python: tests/test_replay.py)
  m.def("_replay_launch_hook(int record, int step, Tensor[] tensors, int[] params) -> ()");
}

TORCH_LIBRARY_IMPL(nfnet_fast, CompositeExplicitAutograd, m) { m.impl("_replay", &nfnet_fast::replay); }
