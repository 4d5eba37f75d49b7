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


def clear() -> None:
    """Forget every record: each signature is recorded again (twice) before it replays."""
    _tables.clear()
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


def call(qualname: str, body: Callable, args: tuple):
    """``body(*args)``, replayed from its record where this call's signature has one (module docstring)."""
    table = _tables.get(qualname)
    if table is None or table.body is not body:
        table = _tables[qualname] = _Table(body)
    extra_fn = EXTRA_INPUTS.get(qualname)
    extra = extra_fn(args) if extra_fn is not None else ()
    types = (tuple(map(type, args)), tuple(map(type, extra)))
    keyer = _keyers.get(types)
    if keyer is None:
        keyer = _keyers[types] = _keyer(*types)
    values, inputs = keyer(args, extra)
    key = (types, values, torch.is_grad_enabled(), _any_autocast() and _autocast_state())
    if len(inputs) > 1 and len(set(map(id, inputs))) != len(inputs):  # (the same tensor twice: the body may
        ids = [id(t) for t in inputs]  # read either: which arguments are one tensor)
        key = key + (tuple(ids.index(i) for i in ids),)
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
