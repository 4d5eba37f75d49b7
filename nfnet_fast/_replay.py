"""Record an op body's work once per call signature, then replay the record (docs/native-launch.md section 9).

An eager training step is paced by its host (docs/triton-training-step.md): each op body re-runs its
Python (argument checks, layout choices, the tile's memo, the launch's keys) on every call, although for
one call signature it always issues the same work. With ``NFNET_FAST_REPLAY=1`` (off by default: not
yet run on a GPU), :func:`call` runs a body as it is on the first call of a signature, records the calls
after it until two records in a row agree (at most four), and from then on replays that record on every
call of the signature from C++ (csrc/replay.cpp, through the op ``nfnet_fast::_replay``): the aten ops
(allocations, views, casts, cuDNN's convolution backward) through the dispatcher, the Triton launches with
cuLaunchKernel, each with this call's tensors in place of the recorded ones. A record the native replayer
cannot run (a binary the native launcher refuses, an argument it does not encode) leaves its signature to
the body. :meth:`_Record.replay` runs a record in Python: the specification, which tests use
(``PYTHON_REPLAY``); it is slower than the body itself.

What a record is. During a recorded call a ``TorchDispatchMode`` sees every aten op the body makes and
the launch hook sees every Triton launch. Each tensor argument of an op or a launch is named by where it
came from: an input of the call (a tensor argument, or a tensor the op's ``extra_inputs`` names, such as
an operand that :class:`nfnet_fast._triton.standardised_ahead` made), or the result of an earlier step.
Every other argument (an int, a float, a dtype, a grid) is a constant of the signature.

The signature (the key) is everything the body's Python can branch on: each argument's type and value,
a tensor's dtype, device, shape, strides and 16-byte alignment, which arguments are the same tensor, the
extra inputs' (the same), the grad mode and the autocast state. A record is refused, and the body runs
as it is for that signature from then on, when the body:
  - reads a tensor's values on the host (an op whose result is not a tensor: ``item()``, ``equal``);
  - uses a tensor that is neither an input nor a recorded step's result (a cached constant);
  - launches on a device other than its first tensor's;
  - still does different work after four recorded calls.
No call is recorded during a CUDA graph capture (where tuning falls back; replaying in one is fine: the same
ops on the same stream), nor inside another body's recording.
Replaying is refused (the body runs) where recording would be: under any dispatch or torch-function
mode, functorch, tracing (``_library._direct`` already sends those calls to the op).

What it assumes: the body's choices for a signature do not change later in the process, as
:mod:`nfnet_fast.kernels`' memos already assume (the tuning's pick, the launch cache). :func:`clear`
forgets every record (after changing ``NFNET_FAST_AUTOTUNE`` or the tuning cache, say).
"""
from __future__ import annotations

import math
import os
import threading
import weakref
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

ENABLED = os.environ.get("NFNET_FAST_REPLAY", "0") == "1"
# tests: a record the native replayer cannot run replays in Python (the specification, slower than the body)
# instead of leaving the signature to the body
PYTHON_REPLAY = False
_MAX_SIGNATURES = 4096  # records per body: beyond them (shapes that keep changing) calls run the body, unrecorded
_MAX_RECORDINGS = 4  # a signature whose records still differ after this many recorded calls is refused

# qualname -> callable(args) -> tuple of tensors (or None) the body reads besides its arguments
EXTRA_INPUTS: Dict[str, Callable] = {}


class _Table:
    __slots__ = ("body", "records", "seen")

    def __init__(self, body):
        self.body = body
        self.records: dict = {}  # key -> _Record, or _REFUSED
        self.seen: dict = {}     # key -> _FIRST after its first call, then (its last record, records made)


_REFUSED = object()
_FIRST = object()  # a signature's first call ran (unrecorded)
_tables: Dict[str, _Table] = {}
_node_ops: list = []  # every NodeOp (call_node's tables)


def clear() -> None:
    """Forget every record and node: each signature is recorded again (twice) before it replays."""
    _tables.clear()
    for op in _node_ops:
        op.nodes.clear()
    _native_records.clear()
    native = _native_module()
    if native:
        native._replay_clear()


def _key_of(value, inputs: list):
    """The key of one argument of a type the generated keys do not spell out (a list, say), in one walk that
    also appends its tensors to ``inputs``."""
    if isinstance(value, Tensor):
        inputs.append(value)
        return (value.dtype, value.device, value.shape, value.stride(), value.data_ptr() & 15)
    t = type(value)
    if t is float:  # (-0.0 == 0.0, but a recorded constant keeps its sign)
        return (float, value, math.copysign(1.0, value))
    if t is list or t is tuple:
        return (t, tuple([_key_of(v, inputs) for v in value]))
    return (t, value)


_keyers: dict = {}  # (argument types, extra input types) -> generated key function


def _keyer(arg_types: tuple, extra_types: tuple) -> Callable:
    """``f(args, extra) -> (key, inputs)`` for arguments of exactly these types: the key's values (the types
    are in the key too) and the call's tensors in slot order, spelled out in one generated function (a
    generic walk over a conv's 18 arguments cost ~8 us a call on the build machine)."""
    lines, parts = ["def keyer(a, e):", "    inputs = []"], []
    for src, types in (("a", arg_types), ("e", extra_types)):
        for i, t in enumerate(types):
            v = f"{src}[{i}]"
            if issubclass(t, Tensor):
                lines.append(f"    inputs.append({v})")
                parts.append(f"({v}.dtype, {v}.device, {v}.shape, {v}.stride(), {v}.data_ptr() & 15)")
            elif t is float:
                parts.append(f"{v}, _copysign(1.0, {v})")
            elif t in (int, bool, str, type(None)) or t is torch.dtype:
                parts.append(v)
            else:  # (lists and the rest: the generic walk)
                lines.append(f"    k{src}{i} = _key_of({v}, inputs)")
                parts.append(f"k{src}{i}")
    lines.append(f"    return ({', '.join(parts)}{',' if parts else ''}), inputs")
    namespace = {"_key_of": _key_of, "_copysign": math.copysign}
    exec("\n".join(lines), namespace)  # noqa: S102 (our source)
    return namespace["keyer"]


def _signature(qualname: str, args: tuple, grad: bool):
    """``(key, inputs)`` of a call of ``qualname`` with ``args`` in grad mode ``grad``: the signature (module
    docstring) and the call's tensors in slot order (its arguments', then its extra inputs')."""
    extra_fn = EXTRA_INPUTS.get(qualname)
    extra = extra_fn(args) if extra_fn is not None else ()
    types = (tuple(map(type, args)), tuple(map(type, extra)))
    keyer = _keyers.get(types)
    if keyer is None:
        keyer = _keyers[types] = _keyer(*types)
    values, inputs = keyer(args, extra)
    key = (types, values, grad, _any_autocast() and _autocast_state())
    if len(inputs) > 1 and len(set(map(id, inputs))) != len(inputs):  # (the same tensor twice: the body may
        ids = [id(t) for t in inputs]  # read either: which arguments are one tensor)
        key = key + (tuple(ids.index(i) for i in ids),)
    return key, inputs


def call(qualname: str, body: Callable, args: tuple):
    """``body(*args)``, replayed from its record where this call's signature has one (module docstring)."""
    table = _tables.get(qualname)
    if table is None or table.body is not body:
        table = _tables[qualname] = _Table(body)
    key, inputs = _signature(qualname, args, torch.is_grad_enabled())
    record = table.records.get(key)
    if record is not None:
        if record is _REFUSED:
            return body(*args)
        if record.native is not None:
            results = _replay_op(record.native, inputs)
            output = record.native_output
            # (the usual results, a tuple of the flat list in order or one tensor, without the walk)
            return tuple(results) if output is _IN_ORDER else results[0] if output is _FIRST_RESULT else \
                _fill(output, results)
        return record.replay(inputs)  # (PYTHON_REPLAY: tests)
    if (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()) or _launch_hooked():
        # (a capture, where tuning falls back, is not a signature's first call either; a recording already)
        return body(*args)
    first = table.seen.get(key)
    if first is None:  # the first call compiles, tunes and fills the memos: not what later calls do
        if len(table.records) >= _MAX_SIGNATURES:  # (shapes that keep changing: the bodies run, unrecorded)
            return body(*args)
        if len(table.seen) >= _MAX_SIGNATURES:  # (signatures called once or twice: forget them, start again)
            table.seen.clear()
        table.seen[key] = _FIRST
        return body(*args)
    record, out = _record(body, args, inputs)
    if key in table.records:  # (another thread settled it meanwhile)
        return out
    if record is None:
        table.records[key] = _REFUSED
        table.seen.pop(key, None)  # (pop: another thread may have popped it too)
    elif first is _FIRST:
        table.seen[key] = (record, 1)
    elif record == first[0]:  # two calls in a row did the same work: the body has settled
        _register_native(record)
        table.records[key] = record if record.native is not None or PYTHON_REPLAY else _REFUSED
        table.seen.pop(key, None)
    elif first[1] < _MAX_RECORDINGS:  # (a call tuned or compiled still, a capture's fallback tile, ...)
        table.seen[key] = (record, first[1] + 1)
    else:
        table.records[key] = _REFUSED
        table.seen.pop(key, None)
    return out


def _launch_hooked() -> bool:
    """Whether this thread's launches are hooked already (a body recording, or a test's hook)."""
    from . import kernels

    return bool(kernels.RECORDERS) and threading.get_ident() in kernels.RECORDERS


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)


def _autocast_state():
    return (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))


def status(qualname: str) -> Dict[str, int]:
    """How many signatures of ``qualname`` replay, are refused, and are still being recorded (tests)."""
    table = _tables.get(qualname)
    records = list(table.records.values()) if table else []
    refused = sum(r is _REFUSED for r in records)
    return {"replayed": len(records) - refused, "refused": refused, "recording": len(table.seen) if table else 0}


def records(qualname: str) -> List["_Record"]:
    """The records of ``qualname`` that replay (tests and the native replayer's checks)."""
    table = _tables.get(qualname)
    return [r for r in table.records.values() if r is not _REFUSED] if table else []


# ---------------------------------------------------------------------------------------------
# recording

class _Unresolved(Exception):
    """The body used a tensor the record cannot name, or a host value it cannot keep."""


class _Tensor:  # a tensor argument of a step: the value in slot ``slot`` (inputs first, then results)
    __slots__ = ("slot",)

    def __init__(self, slot: int):
        self.slot = slot

    def __eq__(self, other):
        return type(other) is _Tensor and other.slot == self.slot

    def __repr__(self):
        return f"%{self.slot}"


class _Recorder(TorchDispatchMode):
    def __init__(self, inputs: list):
        super().__init__()
        self.slots = {id(t): i for i, t in enumerate(inputs)}  # (the inputs outlive the call)
        self.count = len(inputs)
        self.refs: list = []  # weak references to the results: a result the body drops is freed as it would be
        self.steps: list = []
        self.why: Optional[str] = None
        self.thread = threading.get_ident()

    def name(self, value):
        """A step's argument as the record keeps it: tensors by slot, lists elementwise, the rest as it is."""
        if isinstance(value, Tensor):
            slot = self.slots.get(id(value))
            if slot is None:
                raise _Unresolved("a tensor that is neither an input nor a recorded result")
            return _Tensor(slot)
        if type(value) is list or type(value) is tuple:
            return type(value)(self.name(v) for v in value)
        if isinstance(value, dict):
            return {k: self.name(v) for k, v in value.items()}
        if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            raise _Unresolved("a symbolic value")
        return value

    def results(self, out):
        """Slots for an op's results (a tensor, or a list or tuple of tensors and Nones)."""
        flat = [out] if isinstance(out, Tensor) else list(out) if type(out) in (list, tuple) else None
        if flat is None or not all(t is None or isinstance(t, Tensor) for t in flat):
            raise _Unresolved(f"a host value ({type(out).__name__}) read from a tensor")
        slots = []
        for t in flat:
            if t is None:
                slots.append(None)
                continue
            self.slots[id(t)] = self.count
            # (when it dies its id is free for another tensor: forget it first, so no later tensor takes its slot)
            self.refs.append(weakref.ref(t, lambda _, i=id(t), slot=self.count: self.forget(i, slot)))
            slots.append(self.count)
            self.count += 1
        return isinstance(out, Tensor), tuple(slots)

    def forget(self, tensor_id: int, slot: int) -> None:
        if self.slots.get(tensor_id) == slot:
            del self.slots[tensor_id]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from . import kernels

        kwargs = kwargs or {}
        hook = kernels.RECORDERS.pop(self.thread, None)  # (an op that launches, another custom op: one step)
        try:
            out = func(*args, **kwargs)
        finally:
            if hook is not None:
                kernels.RECORDERS[self.thread] = hook
        if self.why is None:
            try:
                step = ("op", func, self.name(args), self.name(kwargs))
                self.steps.append(step + self.results(out))
            except _Unresolved as e:
                self.why = f"{func}: {e}"
        return out

    def launch(self, kernel, grid, args, kwargs):
        """The launch hook (nfnet_fast.kernels.RECORDERS, this thread's): record the launch, then make it."""
        from . import kernels

        if self.why is None:
            try:
                first = next((a for a in args if isinstance(a, Tensor)), None)
                if first is not None and first.is_cuda and first.get_device() != torch.cuda.current_device():
                    raise _Unresolved("a launch on a device other than its first tensor's")
                step = ["launch", kernel, tuple(grid), self.name(args), self.name(kwargs),
                        tuple(a.data_ptr() & 15 == 0 if isinstance(a, Tensor) else None for a in args),
                        first.get_device() if first is not None and first.is_cuda else 0, None]
                self.steps.append(step)
            except _Unresolved as e:
                self.why = f"launch of {getattr(kernel, '__name__', kernel)}: {e}"
                step = None
        else:
            step = None
        del kernels.RECORDERS[self.thread]
        try:
            with _disable_current_modes():  # (Triton's own tensor work, the interpreter's copies: not the body's)
                compiled = kernels.launch(kernel, grid, *args, **kwargs)
        finally:
            kernels.RECORDERS[self.thread] = self.launch
        if step is not None:
            step[-1] = compiled  # (the binary Triton launched: what a native replay launches)
        return compiled


def _record(body, args, inputs):
    """``(record or None, body(*args))``: the body run once under the recorder."""
    from . import kernels  # (nfnet_fast.kernels: the launch hook)

    recorder = _Recorder(inputs)
    kernels.RECORDERS[recorder.thread] = recorder.launch
    try:
        with recorder:
            out = body(*args)
    finally:
        del kernels.RECORDERS[recorder.thread]
    if recorder.why is None:
        try:
            output = recorder.name(out)
        except _Unresolved as e:
            recorder.why = f"the result: {e}"
    if recorder.why is not None:
        return None, out
    steps = [tuple(step) for step in recorder.steps]
    return _Record(len(inputs), recorder.count, steps, output), out


# ---------------------------------------------------------------------------------------------
# replaying

def _fill(value, slots):
    t = type(value)
    if t is _Tensor:
        return slots[value.slot]
    if t is list or t is tuple:
        return t(_fill(v, slots) for v in value)
    if t is dict:
        return {k: _fill(v, slots) for k, v in value.items()}
    return value


class _Record:
    """One signature's steps: ``("op", OpOverload, args, kwargs, single, result slots)`` and
    ``("launch", JITFunction, grid, args, kwargs, each argument's 16-byte alignment, device, binary)``,
    with tensors as :class:`_Tensor` slots. ``native``: its id with the native replayer, or None."""

    __slots__ = ("inputs", "size", "steps", "output", "native", "native_output")

    def __init__(self, inputs: int, size: int, steps: list, output):
        self.inputs, self.size, self.steps, self.output = inputs, size, steps, output
        self.native = self.native_output = None

    def __eq__(self, other):
        return (type(other) is _Record and self.inputs == other.inputs and self.size == other.size
                and self.output == other.output and len(self.steps) == len(other.steps)
                and all(_same_step(a, b) for a, b in zip(self.steps, other.steps)))

    def replay(self, inputs: list):
        from . import kernels

        slots = inputs + [None] * (self.size - self.inputs)
        for step in self.steps:
            if step[0] == "op":
                _, func, args, kwargs, single, results = step
                out = func(*_fill(args, slots), **_fill(kwargs, slots))
                if single:
                    slots[results[0]] = out
                else:
                    for slot, t in zip(results, out):
                        if slot is not None:
                            slots[slot] = t
            else:
                _, kernel, grid, args, kwargs = step[:5]
                args = _fill(args, slots)
                first = next((a for a in args if isinstance(a, Tensor)), None)
                with kernels.device_guard(first) if first is not None else kernels._NO_SWITCH:
                    kernels.launch(kernel, grid, *args, **_fill(kwargs, slots))
        return _fill(self.output, slots)


def _same_step(a, b) -> bool:
    """Two recorded steps are the same work: the same op or kernel, and equal arguments (floats by bits); a
    launch also the same binary."""
    if len(a) != len(b) or a[0] != b[0] or a[1] is not b[1]:
        return False
    if a[0] == "launch" and a[-1] is not b[-1]:
        return False
    return all(_same(x, y) for x, y in zip(a[2:7], b[2:7]))


def _same(x, y) -> bool:
    if type(x) is not type(y):
        return False
    if type(x) is float:
        return x == y and math.copysign(1.0, x) == math.copysign(1.0, y) or (x != x and y != y)
    if type(x) in (list, tuple):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    if type(x) is dict:
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    return x == y


# ---------------------------------------------------------------------------------------------
# the native replayer (csrc/replay.cpp): a record encoded once, then replayed by one op call

_IN_ORDER, _FIRST_RESULT = object(), object()  # native_output's usual shapes: the tuple of results, one result
_native_records: Dict[int, _Record] = {}  # native id -> record (tests' launch hook reads its steps)
_kept_binaries: dict = {}  # id -> each binary a native record launches, alive for the process (Triton 3.8
#                            unloads a binary's module when it is collected; a replay may run during a clear)
_op = None

# c10's enums, as an IValue holds them
_SCALAR_TYPES = {torch.uint8: 0, torch.int8: 1, torch.int16: 2, torch.int32: 3, torch.int64: 4, torch.float16: 5,
                 torch.float32: 6, torch.float64: 7, torch.bool: 11, torch.bfloat16: 15}
_MEMORY_FORMATS = {torch.contiguous_format: 0, torch.preserve_format: 1, torch.channels_last: 2,
                   torch.channels_last_3d: 3}
_LAYOUTS = {torch.strided: 0}


def _native_module():
    from . import kernels

    native = kernels._native_module()
    return native if native and hasattr(native, "_replay_register") else None


def _replay_op(native_id: int, inputs: list):
    global _op
    if _op is None:
        _op = torch.ops.nfnet_fast._replay.default
    return _op(native_id, inputs)


def _binary(kernel, compiled, args, kwargs):
    """``(parameter names, slots, CUfunction, warps, shared memory)`` of the binary ``compiled`` that a launch
    of ``kernel`` with ``args`` and ``kwargs`` ran, or None where the native launchers cannot launch it
    (tests replace it: the interpreter's launches have no binary)."""
    from . import kernels

    slots = kernels.native_slots(kernel, compiled)
    if slots is None:
        return None
    num_warps, _, shared = compiled.packed_metadata
    return [p.name for p in kernel.params], slots, int(compiled.function), int(num_warps), int(shared)


def _encode(value, jit_type):
    """An aten op's argument for csrc/replay.cpp: ``(tag, value)`` by the schema's type."""
    if value is None:
        return ("n",)
    if type(value) is _Tensor:
        return ("t", value.slot)
    kind = jit_type.kind()
    if kind == "OptionalType":
        return _encode(value, jit_type.getElementType())
    if kind == "TensorType":  # (a Python number where the op takes a tensor: ``t * 2.0``'s wrapped number)
        tag = {float: "wf", int: "wi", bool: "wb"}.get(type(value))
        if tag is None:
            raise _Unresolved(f"a {type(value).__name__} for a tensor")
        return (tag, value)
    if kind == "ListType":
        element = jit_type.getElementType()
        inner = element.kind()
        if type(value) not in (list, tuple):
            raise _Unresolved(f"a {type(value).__name__} for a list")
        if inner == "OptionalType" and element.getElementType().kind() == "TensorType":
            if not all(v is None or type(v) is _Tensor for v in value):
                raise _Unresolved("a tensor list of other values")
            return ("otl", [-1 if v is None else v.slot for v in value])
        if inner == "TensorType":
            if not all(type(v) is _Tensor for v in value):
                raise _Unresolved("a tensor list of other values")
            return ("tl", [v.slot for v in value])
        tag, types = {"IntType": ("il", (int,)), "SymIntType": ("il", (int,)), "BoolType": ("bl", (bool,)),
                      "FloatType": ("fl", (float, int))}.get(inner, (None, ()))
        if tag is None or not all(type(v) in types for v in value):
            raise _Unresolved(f"a list of {inner}")
        return (tag, [float(v) for v in value] if tag == "fl" else list(value))
    try:
        if isinstance(value, torch.dtype):
            return ("i", _SCALAR_TYPES[value])
        if isinstance(value, torch.memory_format):
            return ("i", _MEMORY_FORMATS[value])
        if isinstance(value, torch.layout):
            return ("i", _LAYOUTS[value])
    except KeyError:
        raise _Unresolved(f"{value}, which the replayer does not encode") from None
    if isinstance(value, torch.device):
        return ("d", str(value))
    t = type(value)
    if t is bool:
        return ("b", value)
    if t is int:
        return ("f", float(value)) if kind == "FloatType" else ("i", value)
    if t is float and kind != "IntType" and kind != "SymIntType":
        return ("f", value)
    if t is str:
        return ("s", value)
    raise _Unresolved(f"an argument of type {t.__name__} for {jit_type}")


def _encode_op(step):
    _, func, args, kwargs, single, results = step
    schema = func._schema
    values = []
    for i, argument in enumerate(schema.arguments):
        if i < len(args):
            value = args[i]
        elif argument.name in kwargs:
            value = kwargs[argument.name]
        elif argument.has_default_value():
            value = argument.default_value
        else:
            raise _Unresolved(f"{func}: argument {argument.name} missing")
        values.append(_encode(value, argument.type))
    returns = schema.returns
    if len(returns) != len(results) or not all(
            r.type.kind() == "TensorType" or (r.type.kind() == "OptionalType"
                                              and r.type.getElementType().kind() == "TensorType") for r in returns):
        raise _Unresolved(f"{func}: results other than tensors")
    return ("op", schema.name, schema.overload_name, values, [-1 if r is None else r for r in results])


def _encode_launch(step):
    _, kernel, grid, args, kwargs, aligned, device, compiled = step
    binary = _binary(kernel, compiled, args, kwargs)
    if binary is None:
        raise _Unresolved(f"a binary of {getattr(kernel, '__name__', kernel)} the native launcher cannot launch")
    names, slots, function, num_warps, shared = binary
    params = []
    for i, (name, kind) in enumerate(zip(names, slots)):
        if kind == "-":
            continue
        if i < len(args):
            value = args[i]
        elif name in kwargs:
            value = kwargs[name]
        else:
            raise _Unresolved(f"parameter {name} left to its default")
        if kind == "p":
            if value is not None and (type(value) is not _Tensor or i >= len(args)):
                raise _Unresolved(f"pointer parameter {name}: not a positional tensor")
            params.append(("p", -1, False) if value is None else ("p", value.slot, bool(aligned[i])))
        elif kind == "f":
            if type(value) is not float:
                raise _Unresolved(f"fp32 parameter {name}: a {type(value).__name__}")
            params.append(("f", value))
        else:
            if type(value) not in (int, bool):
                raise _Unresolved(f"integer parameter {name}: a {type(value).__name__}")
            params.append((kind, int(value)))
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    return ("launch", function, num_warps, shared, grid3, device, params)


def _index_output(value, flat: list):
    """The result's structure with each tensor as its index in the native replay's flat list of results."""
    if type(value) is _Tensor:
        flat.append(value.slot)
        return _Tensor(len(flat) - 1)
    if type(value) in (list, tuple):
        return type(value)(_index_output(v, flat) for v in value)
    if type(value) is dict:
        return {k: _index_output(v, flat) for k, v in value.items()}
    return value


def _register_native(record: _Record) -> None:
    """Hand the record to the native replayer (record.native: its id), where it can run every step."""
    native = _native_module()
    if native is None:
        return
    try:
        steps = [_encode_op(s) if s[0] == "op" else _encode_launch(s) for s in record.steps]
    except _Unresolved:
        return
    flat: list = []
    output = _index_output(record.output, flat)
    try:
        record.native = native._replay_register(record.inputs, record.size, steps, flat)
    except ValueError:  # (a step the replayer refuses: an op it does not find, say)
        return
    in_order = type(output) is tuple and all(type(t) is _Tensor and t.slot == i for i, t in enumerate(output))
    record.native_output = (_IN_ORDER if in_order else _FIRST_RESULT if type(output) is _Tensor else output)
    _native_records[record.native] = record
    _kept_binaries.update((id(s[-1]), s[-1]) for s in record.steps if s[0] == "launch" and s[-1] is not None)


# ---------------------------------------------------------------------------------------------
# a replayed call with its autograd: one C++ node (csrc/replay.cpp, ReplayNode)
#
# An eager training call (``_library._with_eager_autograd``) runs an autograd.Function around its body: its
# Python forward, setup_context and backward cost more host time than the replayed body itself. Once the
# body's record for a call signature (without grad, as the Function's forward runs it) replays natively,
# :func:`call_node` hands C++ a node spec for the signature, read off the op's setup_context run on a probe
# ctx: which inputs and outputs it saves, which outputs are not differentiable. Later calls of the signature
# (the key: the body's, with grad, and each tensor's requires_grad) are one op call, nfnet_fast::_replay_node,
# which replays the forward record inside a C++ autograd node. That node's backward keys what it gets (the
# saved tensors and incoming gradients) and replays a plan for the key: the backward body's record on some of
# them. Without a plan it calls :func:`_node_backward` (through nfnet_fast::_replay_node_backward), which
# runs the op's Python formula on a ctx rebuilt from the spec and, once the backward body's record for that
# call has settled, returns the plan: which of the tensors the body got, and where each gradient came from.
#
# What the plan assumes: the formula's work is at most one call of the backward op on tensors it was given,
# and each gradient it returns is None, a result of that call, or a tensor it was given (the formulas of
# _library do just this: they choose, they compute nothing themselves). A formula that makes more calls, or
# returns anything else, gets no plan: its node calls the formula every time.

class Capture:
    """The backward op as a node's formula calls it: ``direct(*args)``, also noted for :func:`_node_backward`
    (the formula's calls on this thread)."""

    def __init__(self, qualname: str, direct: Callable):
        self.qualname, self.direct = qualname, direct

    def __call__(self, *args):
        out = self.direct(*args)
        calls = getattr(_capturing, "calls", None)
        if calls is not None:
            calls.append((self, args, out))
        return out


_capturing = threading.local()


class NodeOp:
    """An op's eager autograd calls, as :func:`call_node` runs them: ``forward`` (qualname) runs inside
    ``function`` (its autograd.Function), whose ``setup_context`` and backward ``formula`` are the op's
    (the formula calling its backward op through a :class:`Capture`)."""

    __slots__ = ("forward", "function", "setup_context", "formula", "bodies", "nodes")

    def __init__(self, forward: str, function, setup_context: Callable, formula: Callable, bodies: Callable):
        self.forward, self.function, self.setup_context, self.formula = forward, function, setup_context, formula
        self.bodies = bodies  # () -> the op's (forward, backward) bodies now: a node made for others is dropped
        self.nodes: dict = {}  # key -> _Node, or _REFUSED
        _node_ops.append(self)


class _Node:
    """The Python half of a registered node: what its formula's ctx holds, and each node input's argument."""

    __slots__ = ("id", "op", "attrs", "needs_input_grad", "positions", "in_order", "bodies")


class _Probe:
    """A ctx for setup_context that notes what it is told (saved tensors, non-differentiable outputs)."""

    def __init__(self):
        self.__dict__["_noted"] = {"saved": (), "fixed": (), "materialize": True}

    def save_for_backward(self, *tensors):
        self._noted["saved"] = tensors

    def mark_non_differentiable(self, *tensors):
        self._noted["fixed"] = tensors  # (as FunctionCtx: the last call's tensors)

    def set_materialize_grads(self, value: bool):
        self._noted["materialize"] = value


class _Ctx:
    """A node's formula's ctx: the spec's attributes, and this call's saved tensors."""


_nodes: Dict[int, _Node] = {}  # native id -> node (kept by clear(): a graph made before it still runs backward)
_node_op = None


def call_node(op: NodeOp, inputs: tuple):
    """``op.function.apply(*inputs)``, run as one C++ autograd node where this call's signature has one
    (see above). The caller has checked that nothing but the body and its autograd could run (_library)."""
    global _node_op
    key, tensors = _signature(op.forward, inputs, True)
    key = key + (tuple([t.requires_grad for t in tensors]),)
    node = op.nodes.get(key)
    if node is not None and node is not _REFUSED and node.bodies != op.bodies():  # (a body replaced since)
        op.nodes.clear()
        node = None
    if node is not None:
        if node is _REFUSED:
            return op.function.apply(*inputs)
        if _node_op is None:
            _node_op = torch.ops.nfnet_fast._replay_node.default
        results = _node_op(node.id, tensors)
        return tuple(results) if node.in_order else results[0]
    out = op.function.apply(*inputs)
    if len(op.nodes) < _MAX_SIGNATURES:
        node = _make_node(op, inputs, tensors, out)
        if node is not None:
            op.nodes[key] = node
    return out


def _settled(qualname: str, args: tuple, grad: bool):
    """``(record, inputs)``: the record that a call of ``qualname`` with ``args`` replays natively with results in
    one of the usual shapes (a tuple in order, one tensor), ``_REFUSED`` where there is none, or None (not settled
    yet); and the call's tensors in slot order."""
    key, inputs = _signature(qualname, args, grad)
    table = _tables.get(qualname)
    record = table.records.get(key) if table is not None else None
    if record is not None and (record is _REFUSED or record.native is None
                               or record.native_output not in (_IN_ORDER, _FIRST_RESULT)):
        record = _REFUSED
    return record, inputs


def _results(record: "_Record", out) -> list:
    """The flat results of a call that ``record`` replays (``_settled``), from what the call returned."""
    return list(out) if record.native_output is _IN_ORDER else [out]


def _position(t: Tensor, among: list) -> Optional[int]:
    """Where ``t`` itself (not an equal tensor) is in ``among``, or None."""
    return next((i for i, u in enumerate(among) if u is t), None)


def _make_node(op: NodeOp, inputs: tuple, tensors: list, out):
    """A node for this call's signature (registered with C++), ``_REFUSED``, or None (its body has not settled)."""
    native = _native_module()
    if native is None:
        return _REFUSED
    record = _settled(op.forward, inputs, False)[0]  # (the body's record as the Function's forward ran it)
    if record is None or record is _REFUSED:
        return record
    outputs = _results(record, out)
    positions = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
    if len(positions) > len(tensors) or any(tensors[k] is not inputs[p] for k, p in enumerate(positions)):
        return _REFUSED  # (tensors inside a list argument: no argument of their own)
    probe = _Probe()
    try:
        op.setup_context(probe, inputs, out)
    except Exception:  # noqa: BLE001 (a ctx method the probe lacks: the Function serves this signature)
        return _REFUSED
    noted = probe._noted
    if noted["materialize"]:  # (the node gives None for a gradient that never came, as the formulas expect)
        return _REFUSED
    saved = []
    for t in noted["saved"]:
        i, j = (None, None) if t is None else (_position(t, tensors), _position(t, outputs))
        if t is not None and i is None and j is None:
            return _REFUSED  # (a tensor setup_context made: not one the node has)
        saved.append(-1 if t is None else 2 * i if i is not None else 2 * j + 1)
    fixed = [_position(t, outputs) for t in noted["fixed"]]
    if None in fixed:
        return _REFUSED
    _backward_impl()
    try:
        node_id = native._replay_node_register(record.native, len(tensors), saved, fixed)
    except ValueError:
        return _REFUSED
    node = _Node()
    node.id, node.op = node_id, op
    node.attrs = {k: v for k, v in probe.__dict__.items() if k != "_noted"}
    node.needs_input_grad = tuple(isinstance(a, Tensor) and a.requires_grad for a in inputs)
    node.positions = positions + [None] * (len(tensors) - len(positions))  # (extra inputs: no gradient)
    node.in_order = record.native_output is _IN_ORDER
    node.bodies = op.bodies()
    _nodes[node_id] = node
    return node


_saved_op = None


def node_saved(output: Tensor, op: str) -> Optional[tuple]:
    """The saved tensors of the node (of an op named ``..._<op>``) that made ``output``, as its
    setup_context saved them; None where no such node made it, or its saved tensors were freed."""
    global _saved_op
    if not _nodes:
        return None
    if _saved_op is None:
        _saved_op = torch.ops.nfnet_fast._replay_node_saved.default
    node_id, saved = _saved_op(output)
    node = _nodes.get(node_id)
    return tuple(saved) if node is not None and node.op.forward.endswith("_" + op) else None


_backward_lib = None


def _backward_impl() -> None:
    """Implement nfnet_fast::_replay_node_backward (defined by csrc/replay.cpp) with :func:`_node_backward`."""
    global _backward_lib
    if _backward_lib is None:
        lib = torch.library.Library("nfnet_fast", "IMPL")
        # (the module's _node_backward at each call: tests wrap it to count the calls)
        lib.impl("_replay_node_backward", lambda *args: _node_backward(*args), "CompositeImplicitAutograd")
        _backward_lib = lib


def _node_backward(node_id: int, saved: list, grads: list):
    """A node's backward without a plan for its key: the op's formula, and the plan once there is one
    (``[record or -1, n, n indices into saved + grads, one code per node input]``, or ``[]``)."""
    node = _nodes[node_id]
    ctx = _Ctx()
    ctx.__dict__.update(node.attrs)
    ctx.saved_tensors, ctx.needs_input_grad = tuple(saved), node.needs_input_grad
    outer = getattr(_capturing, "calls", None)
    _capturing.calls = calls = []
    try:
        out = node.op.formula(ctx, *grads)
    finally:
        _capturing.calls = outer
    gradients = [None if p is None else out[p] for p in node.positions]
    if torch.is_grad_enabled():  # (a double backward's formula: its work differs, it gets no plan)
        return gradients, []
    return gradients, _plan(saved + grads, calls, gradients)


def _plan(given: list, calls: list, gradients: list) -> list:
    """The plan of one formula call (see :func:`_node_backward`), or ``[]`` where there is none (yet)."""
    record_id, record_inputs, results = -1, [], []
    if len(calls) > 1:
        return []
    if calls:
        capture, args, out = calls[0]
        record, inputs = _settled(capture.qualname, args, False)
        if record is None or record is _REFUSED:
            return []
        record_inputs = [_position(t, given) for t in inputs]
        if None in record_inputs:
            return []  # (a tensor the formula made, or an extra input: not one the node has)
        record_id, results = record.native, _results(record, out)
    codes = []
    for g in gradients:
        j = None if g is None else _position(g, results)
        i = None if g is None or j is not None else _position(g, given)
        if g is not None and j is None and i is None:
            return []
        codes.append(-1 if g is None else 2 * j if j is not None else 2 * i + 1)
    return [record_id, len(record_inputs), *record_inputs, *codes]
