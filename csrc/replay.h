// The native replayer of recorded op bodies (nfnet_fast._replay; docs/native-launch.md section 9).
//
// nfnet_fast._replay records what an op body does for one call signature: aten ops, each with its
// arguments, and Triton launches, each with its binary and parameters, every tensor named by a slot (the
// call's inputs first, then each step's results). _replay_register hands such a record to C++ once; from
// then on the op nfnet_fast::_replay(record, inputs) runs it: the aten ops through the dispatcher with this
// call's tensors in their slots, the launches with cuLaunchKernel on the current stream, with no Python.
// Only the limited Python API is used here (the module is abi3); tensors reach C++ through the op.
#pragma once
#include <Python.h>

namespace nfnet_fast {

// _replay_register(inputs, size, steps, outputs) -> record id (int), or raises ValueError for a step the
// replayer cannot run. steps: ("op", name, overload, args, results) and
// ("launch", function, num_warps, shared, (gx, gy, gz), device, params); see csrc/replay.cpp.
PyObject* replay_register_py(PyObject*, PyObject* args);
// _replay_hook(on): tests without a GPU: each launch calls the op nfnet_fast::_replay_launch_hook (which a
// test implements in Python) with the launch's tensors and parameter values, instead of the driver
PyObject* replay_hook_py(PyObject*, PyObject* args);
// _replay_node_register(forward record, inputs, saved, non_differentiable) -> node id: a call signature's
// forward record run inside a C++ autograd node by the op nfnet_fast::_replay_node. saved: per tensor the
// backward reads, -1 (None), 2i (input i) or 2j+1 (output j); non_differentiable: output indices.
PyObject* replay_node_register_py(PyObject*, PyObject* args);
// _replay_clear(): forget every record and node
PyObject* replay_clear_py(PyObject*, PyObject*);

}  // namespace nfnet_fast
