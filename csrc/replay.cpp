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

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/profiler/orchestration/observer.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
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
  int64_t id = -1;  // (the test hook's name for it)
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

// the record with this id, or null (never registered, or cleared)
std::shared_ptr<const Record> lookup_record(int64_t record) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto found = records.find(record);
  return found != records.end() ? found->second : nullptr;
}

std::shared_ptr<const Record> find_record(int64_t record) {
  std::shared_ptr<const Record> r = lookup_record(record);
  TORCH_CHECK(r, "nfnet_fast replay: no record ", record, " (cleared?)");
  return r;
}

std::vector<at::Tensor> run_record(const Record& r, at::TensorList inputs) {
  TORCH_CHECK(inputs.size() == r.inputs, "nfnet_fast replay: ", inputs.size(), " inputs for a record of ",
              r.inputs);
  std::vector<at::Tensor> slots(r.size);
  for (size_t i = 0; i < inputs.size(); ++i) slots[i] = inputs[i];
  for (size_t i = 0; i < r.steps.size(); ++i) {
    const Step& s = r.steps[i];
    if (s.op) {
      run_op(s, slots);
    } else {
      run_launch(s, i, r.id, slots);
    }
    for (int slot : s.release) slots[slot].reset();
  }
  std::vector<at::Tensor> out;
  out.reserve(r.outputs.size());
  for (int slot : r.outputs) out.push_back(tensor_in(slots, slot, "the result"));
  return out;
}

std::vector<at::Tensor> replay(int64_t record, at::TensorList inputs) {
  return run_record(*find_record(record), inputs);
}


// ---- a replayed call with its autograd: one C++ node (nfnet_fast._replay.call_node) ----
//
// An eager training call of an op (nfnet_fast._library._with_eager_autograd) otherwise pays, above its
// replayed body, an autograd.Function: its Python forward, setup_context and backward. A node spec says, for
// one call signature, which record is the forward and what the backward needs: which of the inputs and
// outputs are saved, which outputs are not differentiable. nfnet_fast::_replay_node(node, inputs) runs the
// forward record inside a C++ autograd Function with that spec. Its backward keys the saved tensors and the
// incoming gradients (each one's dtype, device, shape, strides, 16-byte alignment, which are one tensor) with
// the grad mode and the autocast state, and looks up the plan made for that key: the backward body's record
// on some of (saved ++ gradients), and where each input's gradient comes from. Without one it calls the
// Python formula through nfnet_fast::_replay_node_backward (the op's own backward, with a ctx rebuilt from
// the spec), which returns the gradients and, once the backward body's record has settled, the plan.

struct Plan {
  std::shared_ptr<const Record> record;  // null: no body call (the gradients are incoming ones, or none)
  std::vector<int> record_inputs;        // the record's inputs, as indices into saved ++ gradients
  std::vector<int> gradients;            // per input: -1 none, 2j the record's result j, 2i+1 (saved ++ grads)[i]
};

struct NodeSpec {
  int64_t id = -1;
  bool retired = false;  // (by a clear: no new node takes it; nodes in graphs still run their backward)
  std::shared_ptr<const Record> forward;
  size_t inputs = 0;                    // the call's tensors (the forward record's inputs)
  std::vector<int> saved;               // per saved tensor: -1 None, 2i input i, 2j+1 output j
  std::vector<int> non_differentiable;  // output indices
  std::mutex mutex;                     // (plans: backward runs on autograd's device threads)
  std::map<std::vector<int64_t>, Plan> plans;
};

// (under registry_mutex) id -> spec, kept after a clear: a node holds its spec's id (an int in its ctx, which
// compiled autograd can hash), and a graph made before the clear may run its backward after it
std::unordered_map<int64_t, std::shared_ptr<NodeSpec>> nodes;
int64_t next_node = 0;

void key_of(const std::vector<at::Tensor>& tensors, std::vector<int64_t>& key) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (!t.defined()) {
      key.push_back(-1);
      continue;
    }
    int64_t same = static_cast<int64_t>(i);  // (the first of these tensors that is this one)
    for (size_t j = 0; j < i; ++j) {
      if (tensors[j].defined() && tensors[j].unsafeGetTensorImpl() == t.unsafeGetTensorImpl()) {
        same = static_cast<int64_t>(j);
        break;
      }
    }
    key.push_back(same);
    key.push_back(static_cast<int64_t>(t.scalar_type()));
    key.push_back(static_cast<int64_t>(t.device().type()));
    key.push_back(t.device().index());
    key.push_back(t.dim());
    for (int64_t d = 0; d < t.dim(); ++d) {
      key.push_back(t.size(d));
      key.push_back(t.stride(d));
    }
    key.push_back(static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr()) & 15));
  }
}

std::shared_ptr<NodeSpec> find_node(int64_t node, bool live) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto found = nodes.find(node);
  TORCH_CHECK(found != nodes.end() && !(live && found->second->retired), "nfnet_fast replay: no node ", node,
              " (cleared?)");
  return found->second;
}

// Whether a tensor is one whose data a replay may read as it is: no subclass or fake tensor (the Python key),
// a storage, no lazy conjugate or negation. Else the node's backward runs the Python formula, as the op's own
// path would (nfnet_fast._library._plain_call).
bool plain(const at::Tensor& t) {
  return !t.defined() || (t.has_storage() && !t.key_set().has(c10::DispatchKey::Python) && !t.is_conj() &&
                          !t.is_neg());
}

c10::List<std::optional<at::Tensor>> optional_list(const std::vector<at::Tensor>& tensors, size_t from, size_t to) {
  c10::List<std::optional<at::Tensor>> list;
  for (size_t i = from; i < to; ++i) {
    if (tensors[i].defined()) {
      list.push_back(tensors[i]);
    } else {
      list.push_back(std::nullopt);
    }
  }
  return list;
}

}  // namespace

// (outside the anonymous namespace: autograd names a node by its type, grad_fn.name())
struct ReplayNode : torch::autograd::Function<ReplayNode> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, int64_t node,
                                                at::TensorList inputs) {
    std::shared_ptr<NodeSpec> spec = find_node(node, true);
    TORCH_CHECK(inputs.size() == spec->inputs, "nfnet_fast replay: ", inputs.size(), " inputs for a node of ",
                spec->inputs);
    std::vector<at::Tensor> outputs = run_record(*spec->forward, inputs);
    std::vector<at::Tensor> saved;
    saved.reserve(spec->saved.size());
    for (int code : spec->saved) {
      saved.push_back(code < 0 ? at::Tensor() : code % 2 == 0 ? inputs[code / 2] : outputs[code / 2]);
    }
    ctx->save_for_backward(std::move(saved));
    std::vector<at::Tensor> fixed;
    for (int j : spec->non_differentiable) fixed.push_back(outputs[j]);
    ctx->mark_non_differentiable(fixed);
    ctx->set_materialize_grads(false);  // (as the ops' formulas: no zeros made for a gradient that never came)
    ctx->saved_data["node"] = node;
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto spec = find_node(ctx->saved_data["node"].toInt(), false);
    torch::autograd::variable_list result(1 + spec->inputs);  // (the node's id first: not a tensor)
    // no gradient came: none goes (every formula returns so), and no saved tensor is unpacked (hooks that
    // recompute or reload it would do that work for nothing)
    if (std::all_of(grads.begin(), grads.end(), [](const at::Tensor& g) { return !g.defined(); })) return result;
    std::vector<at::Tensor> both = ctx->get_saved_variables();
    const size_t n_saved = both.size();
    both.insert(both.end(), grads.begin(), grads.end());
    // the formula, never a plan, in a double backward, for a subclass or fake tensor, or under what would see
    // the op's own calls (dispatch and torch-function modes, the profiler)
    const bool formula_only = at::GradMode::is_enabled() || !std::all_of(both.begin(), both.end(), plain) ||
                              c10::impl::TorchDispatchModeTLS::any_modes_set() ||
                              at::impl::torch_function_mode_enabled() || torch::profiler::impl::profilerEnabled();
    std::vector<int64_t> key;
    Plan plan;
    bool found = false;
    if (!formula_only) {
      key = {at::autocast::is_autocast_enabled(at::kCUDA),
             static_cast<int64_t>(at::autocast::get_autocast_dtype(at::kCUDA)),
             at::autocast::is_autocast_enabled(at::kCPU),
             static_cast<int64_t>(at::autocast::get_autocast_dtype(at::kCPU))};
      key_of(both, key);
      std::lock_guard<std::mutex> lock(spec->mutex);
      auto it = spec->plans.find(key);
      if (it != spec->plans.end()) {
        plan = it->second;
        found = true;
      }
    }
    if (found) {
      std::vector<at::Tensor> results;
      if (plan.record) {
        std::vector<at::Tensor> record_inputs;
        record_inputs.reserve(plan.record_inputs.size());
        for (int i : plan.record_inputs) record_inputs.push_back(both[i]);
        results = run_record(*plan.record, record_inputs);
      }
      for (size_t k = 0; k < spec->inputs; ++k) {
        const int code = plan.gradients[k];
        if (code >= 0) result[1 + k] = code % 2 == 0 ? results[code / 2] : both[code / 2];
      }
      return result;
    }
    static const auto formula =
        c10::Dispatcher::singleton().findSchemaOrThrow("nfnet_fast::_replay_node_backward", "");
    torch::jit::Stack stack;
    stack.emplace_back(spec->id);
    stack.emplace_back(optional_list(both, 0, n_saved));
    stack.emplace_back(optional_list(both, n_saved, both.size()));
    formula.callBoxed(stack);
    TORCH_CHECK(stack.size() == 2, "nfnet_fast replay: _replay_node_backward returned ", stack.size(), " values");
    const auto gradients = stack[0].toListRef();
    TORCH_CHECK(gradients.size() == spec->inputs, "nfnet_fast replay: ", gradients.size(),
                " gradients for a node of ", spec->inputs, " inputs");
    for (size_t k = 0; k < spec->inputs; ++k) {
      if (!gradients[k].isNone()) result[1 + k] = gradients[k].toTensor();
    }
    // the plan, once there is one: [record (-1: none), n, n indices into saved ++ grads, one code per input]
    const std::vector<int64_t> code = stack[1].toIntVector();
    if (formula_only || code.empty()) return result;
    // (a plan that does not fit, or whose record a clear dropped meanwhile, is not kept: these gradients are
    // the formula's, right either way)
    const int64_t n = code.size() >= 2 ? code[1] : -1;
    if (n < 0 || code.size() != 2 + static_cast<size_t>(n) + spec->inputs) return result;
    Plan made;
    if (code[0] >= 0 && !(made.record = lookup_record(code[0]))) return result;
    const int64_t limit = static_cast<int64_t>(both.size());
    for (int64_t i = 0; i < n; ++i) {
      if (code[2 + i] < 0 || code[2 + i] >= limit) return result;
      made.record_inputs.push_back(static_cast<int>(code[2 + i]));
    }
    if (made.record ? made.record_inputs.size() != made.record->inputs : n != 0) return result;
    const int64_t results = made.record ? static_cast<int64_t>(made.record->outputs.size()) : 0;
    for (size_t k = 0; k < spec->inputs; ++k) {
      const int64_t c = code[2 + n + k];
      if (c < -1 || (c >= 0 && (c % 2 == 0 ? c / 2 >= results : c / 2 >= limit))) return result;
      made.gradients.push_back(static_cast<int>(c));
    }
    std::lock_guard<std::mutex> lock(spec->mutex);
    spec->plans.emplace(std::move(key), std::move(made));
    return result;
  }
};

namespace {

std::vector<at::Tensor> replay_node(int64_t node, at::TensorList inputs) { return ReplayNode::apply(node, inputs); }

// (node id, saved tensors) of the ReplayNode that made ``output``, or (-1, []) where another node (or none)
// made it, or its saved tensors were freed by a backward: what nfnet_fast._library.fused_conv_std_weight
// reads of a Python autograd.Function's node
std::tuple<int64_t, std::vector<std::optional<at::Tensor>>> replay_node_saved(const at::Tensor& output) {
  std::vector<std::optional<at::Tensor>> saved;
  auto* node = dynamic_cast<torch::autograd::CppNode<ReplayNode>*>(output.grad_fn().get());
  if (node == nullptr || node->ctx_.saved_data.count("node") == 0) return {-1, saved};
  std::vector<at::Tensor> tensors;
  try {
    tensors = node->ctx_.get_saved_variables();
  } catch (const c10::Error&) {  // (freed)
    return {-1, saved};
  }
  for (const at::Tensor& t : tensors) saved.push_back(t.defined() ? std::optional<at::Tensor>(t) : std::nullopt);
  return {node->ctx_.saved_data["node"].toInt(), saved};
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
  r->id = id;
  records[id] = std::move(r);
  return PyLong_FromLongLong(id);
}

PyObject* replay_hook_py(PyObject*, PyObject* args) {
  int on = 0;
  if (!PyArg_ParseTuple(args, "p", &on)) return nullptr;
  launch_hook = on != 0;
  Py_RETURN_NONE;
}

PyObject* replay_node_register_py(PyObject*, PyObject* args) {
  long long forward, inputs;
  PyObject *saved, *non_differentiable;
  if (!PyArg_ParseTuple(args, "LLOO", &forward, &inputs, &saved, &non_differentiable)) return nullptr;
  auto spec = std::make_shared<NodeSpec>();
  try {
    spec->forward = lookup_record(forward);
    if (!spec->forward) fail("no forward record " + std::to_string(forward));
    if (inputs != static_cast<long long>(spec->forward->inputs)) fail("a node's inputs are its forward record's");
    spec->inputs = static_cast<size_t>(inputs);
    const long long outputs = static_cast<long long>(spec->forward->outputs.size());
    for (Py_ssize_t i = 0; i < length(saved); ++i) {
      const long long code = integer(item(saved, i));
      if (code < -1 || (code >= 0 && (code % 2 == 0 ? code / 2 >= inputs : code / 2 >= outputs)))
        fail("a saved tensor out of range");
      spec->saved.push_back(static_cast<int>(code));
    }
    for (Py_ssize_t i = 0; i < length(non_differentiable); ++i) {
      const long long j = integer(item(non_differentiable, i));
      if (j < 0 || j >= outputs) fail("a non-differentiable output out of range");
      spec->non_differentiable.push_back(static_cast<int>(j));
    }
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  std::lock_guard<std::mutex> lock(registry_mutex);
  spec->id = next_node++;
  nodes[spec->id] = spec;
  return PyLong_FromLongLong(spec->id);
}

PyObject* replay_clear_py(PyObject*, PyObject*) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  records.clear();  // (a replay running now holds its record: it finishes)
  for (auto& entry : nodes) entry.second->retired = true;  // (kept: see nodes)
  Py_RETURN_NONE;
}

}  // namespace nfnet_fast

TORCH_LIBRARY_FRAGMENT(nfnet_fast, m) {
  m.def("_replay(int record, Tensor[] inputs) -> Tensor[]");
  // (tests without a GPU implement it in Python: tests/test_replay.py)
  m.def("_replay_launch_hook(int record, int step, Tensor[] tensors, int[] params) -> ()");
  m.def("_replay_node(int node, Tensor[] inputs) -> Tensor[]");
  // (implemented in Python, nfnet_fast._replay: a node's backward without a plan for its key)
  m.def("_replay_node_backward(int node, Tensor?[] saved, Tensor?[] grads) -> (Tensor?[], int[])");
  m.def("_replay_node_saved(Tensor output) -> (int, Tensor?[])");
}

TORCH_LIBRARY_IMPL(nfnet_fast, CompositeExplicitAutograd, m) { m.impl("_replay", &nfnet_fast::replay); }

// (the node is its own autograd: above the autograd key, as a composite op)
TORCH_LIBRARY_IMPL(nfnet_fast, CompositeImplicitAutograd, m) {
  m.impl("_replay_node", &nfnet_fast::replay_node);
  m.impl("_replay_node_saved", &nfnet_fast::replay_node_saved);
}
