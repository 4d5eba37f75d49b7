"""The ``torch.library`` registration shared by the compiled backends (``_cuda`` and ``_triton``).

Each op has one schema, the same for both backends (``<prefix><op>`` and its private backward
``_<prefix><op>_backward`` in the ``nfnet_fast`` namespace: prefix ``""`` for the C++ extension,
``"triton_"`` for the Triton kernels), and so one fake kernel and one autograd formula, registered
here for either backend by :func:`register`. :func:`public_functions` then wraps a backend's ops
with the signatures of :mod:`nfnet_fast.ops`.

The names are the ops' vocabulary everywhere (ops.py, csrc/, kernels/, tests)::

    scaled_std_weight(weight, gain, scale, eps) -> out
        _scaled_std_weight_backward(grad_out, weight, gain, scale, eps) -> (grad_weight, grad_gain)
    silu_scale(x, beta) -> out
        _silu_scale_backward(grad_out, x, beta) -> grad_x
    eca_residual(y, weight, shortcut?, coef, beta_next?, sums?) -> (x_next, a_next, stats)
        _eca_residual_backward(grad_x_next?, grad_a_next?, y, weight, shortcut?, stats, coef, beta_next?,
                               want_bias_sums=False) -> (grad_y, grad_weight, grad_shortcut, bias_sums)

``x_next = coef * y * gate(y) [+ shortcut]``, ``a_next = silu(x_next) * beta_next`` (a (0,) tensor
without ``beta_next``), ``stats`` the backend's saved channel statistics (C++: the (N, C) means;
Triton: (N, S, C) fp32 partial sums; with ``sums``, y's (N, C) channel sums from its producer, no
pooling pass reads y, and the backward differentiates through y alone). ``bias_sums``: with
``want_bias_sums`` the (2, C) sums over (N, H, W) of grad_y and of the shortcut's gradient (fp32; float64
for float64 y), the gradients of biases added last to y and to the shortcut (ops.eca_residual's
``biases``), else (0,). ``ops.eca`` is ``eca_residual`` without a shortcut.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format
from torch.autograd import forward_ad

from . import _replay


KERNEL_OPS = ("scaled_std_weight", "silu_scale", "eca_residual")  # each a schema pair (forward, backward)


def activation_format(t: Tensor) -> torch.memory_format:
    """The layout an activation op runs in and returns: NCHW if ``t`` is contiguous, channels_last
    if it is channels_last-contiguous, else the format its strides resemble (``t`` is then copied).
    The C++ side applies the same rule (csrc/eca_residual.h, eca_format)."""
    if t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return suggest_memory_format(t)


def _empty_act(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=activation_format(t))


def _op(qualname: str):
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def _names(prefix: str, op: str):
    return f"nfnet_fast::{prefix}{op}", f"nfnet_fast::_{prefix}{op}_backward"


# qualname -> the Python function behind a compiled backend's custom op, which an eager call runs
# directly (see _direct)
_BODIES: dict = {}


def custom_op(qualname: str) -> Callable:
    """``torch.library.custom_op(qualname, mutates_args=())`` that also keeps the decorated function,
    the op's body, for eager calls to run without the dispatcher (:func:`_direct`)."""
    def wrap(fn: Callable):
        _BODIES[qualname] = fn
        return torch.library.custom_op(qualname, mutates_args=())(fn)
    return wrap


_PLAIN = (Tensor, torch.nn.Parameter)


def _direct(qualname: str) -> Callable:
    """A call of the op ``qualname`` that runs its Python body directly (:func:`custom_op`) when
    nothing but the body could run: every tensor argument a plain tensor (no FakeTensor or other
    subclass, no meta), no Python dispatch or torch-function mode active (fake tensors,
    FlopCounterMode, tests' op counters), no functorch transform (vmap, grad), forward-AD level or
    torch.jit.trace active, and no gradient to track (a double backward's backward op). Else, and
    for ops without a Python body (the C++ extension's), the op through the dispatcher. Its path through a
    custom op (its autograd key with no grad, the alias checks on the outputs, dynamo's disable
    wrapper) costs ~45 us of host time a call on the 2-core build machine, ~90 us a training conv
    (bench/host_overhead.py): a training step makes two calls per conv, and the H100 step was
    paced by its host (docs/triton-training-step.md). Under the profiler the body runs in a range
    named ``qualname``, where the op's own event would be, so kernels stay attributed to it."""
    op = _op(qualname)

    def call(*args):
        body = _BODIES.get(qualname)  # (looked up per call: tests wrap bodies to see which path ran)
        if body is None or not _plain_call(args, track=torch.is_grad_enabled()):
            return op(*args)
        if torch.autograd._profiler_enabled():
            with torch.profiler.record_function(qualname):
                return _replay.call(qualname, body, args) if _replay.ENABLED else body(*args)
        return _replay.call(qualname, body, args) if _replay.ENABLED else body(*args)
    return call


def _plain_call(args: tuple, track: bool) -> bool:
    """Whether nothing but an op's Python body (and its autograd) could run for a call with ``args``: every
    tensor argument a plain tensor (no FakeTensor or other subclass, no meta), no Python dispatch or
    torch-function mode active, no functorch transform, forward-AD level or torch.jit.trace; and with
    ``track`` (a body called in grad mode, :func:`_direct`) no argument that requires grad."""
    if (torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled()
            or torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0
            or torch._C._get_tracing_state() is not None):
        return False
    for a in args:
        if isinstance(a, Tensor) and (type(a) not in _PLAIN or a.is_meta or (track and a.requires_grad)):
            return False
    return True


# ---------------------------------------------------------------------------------------------
# fake kernels: shapes, dtypes and devices checked with torch._check, so a wrong call fails where
# it is made (also inside torch.compile) instead of reaching a kernel


def _check_same(t: Tensor, name: str, ref: Tensor, ref_name: str, dtype: bool = True) -> None:
    torch._check(t.device == ref.device, lambda: f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype:
        torch._check(t.dtype == ref.dtype, lambda: f"{name} dtype {t.dtype} must equal {ref_name} dtype {ref.dtype}")


def _check_shape(t: Tensor, name: str, ref: Tensor, ref_name: str) -> None:
    torch._check(t.shape == ref.shape,
                 lambda: f"{name} shape {tuple(t.shape)} must equal {ref_name} shape {tuple(ref.shape)}")


def _check_float(t: Tensor, name: str) -> None:
    torch._check(t.dtype.is_floating_point, lambda: f"{name} must be a floating-point tensor, got {t.dtype}")


def _fake_std(weight, gain, scale, eps):
    _check_float(weight, "weight")
    torch._check(weight.dim() >= 2, lambda: f"weight must be (C_out, ...), got shape {tuple(weight.shape)}")
    torch._check(gain.numel() == weight.shape[0],
                 lambda: f"gain must have one value per output channel ({weight.shape[0]}), got {tuple(gain.shape)}")
    _check_same(gain, "gain", weight, "weight")
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


def _fake_std_backward(grad_out, weight, gain, scale, eps):
    _fake_std(weight, gain, scale, eps)
    _check_shape(grad_out, "grad_out", weight, "weight")
    _check_same(grad_out, "grad_out", weight, "weight", dtype=False)
    return (torch.empty_like(weight, memory_format=torch.contiguous_format),
            torch.empty_like(gain, memory_format=torch.contiguous_format))


def _fake_silu(x, beta):
    _check_float(x, "x")
    return torch.empty_like(x)  # x's strides when dense, else its suggested format: as the kernels


def _fake_silu_backward(grad_out, x, beta):
    _check_float(x, "x")
    _check_shape(grad_out, "grad_out", x, "x")
    _check_same(grad_out, "grad_out", x, "x", dtype=False)
    return torch.empty_like(x)


def _check_eca(y, weight, shortcut, beta_next):
    _check_float(y, "y")
    torch._check(y.dim() == 4, lambda: f"y must be (N, C, H, W), got shape {tuple(y.shape)}")
    torch._check(weight.numel() % 2 == 1, lambda: f"weight must hold an odd number of taps, got {weight.numel()}")
    _check_same(weight, "weight", y, "y", dtype=False)
    if shortcut is not None:
        _check_shape(shortcut, "shortcut", y, "y")
        _check_same(shortcut, "shortcut", y, "y")
    torch._check(beta_next is None or shortcut is not None,
                 lambda: "beta_next needs a shortcut: the next pre-activation belongs to the residual form")


def _fake_eca(stats_like):
    def fake(y, weight, shortcut, coef, beta_next, sums=None):
        _check_eca(y, weight, shortcut, beta_next)
        if sums is not None:
            torch._check(sums.shape == y.shape[:2], lambda: f"sums must be (N, C) = {tuple(y.shape[:2])}, got "
                                                            f"{tuple(sums.shape)}")
            _check_same(sums, "sums", y, "y", dtype=False)
        a_next = _empty_act(y) if beta_next is not None else y.new_empty((0,))
        return _empty_act(y), a_next, stats_like(y, sums)
    return fake


def bias_sums_dtype(y: Tensor) -> torch.dtype:
    """The dtype of _eca_residual_backward's bias_sums: fp32, float64 for a float64 ``y``."""
    return torch.float64 if y.dtype == torch.float64 else torch.float32


def _fake_eca_backward(grad_x_next, grad_a_next, y, weight, shortcut, stats, coef, beta_next, want_bias_sums=False):
    _check_eca(y, weight, shortcut, beta_next)
    torch._check(grad_x_next is not None or grad_a_next is not None,
                 lambda: "the backward needs grad_x_next or grad_a_next")
    for g, name in ((grad_x_next, "grad_x_next"), (grad_a_next, "grad_a_next")):
        if g is not None:
            _check_shape(g, name, y, "y")
            _check_same(g, name, y, "y", dtype=False)
    grad_shortcut = _empty_act(y) if grad_a_next is not None else y.new_empty((0,))
    bias_sums = y.new_empty((2, y.shape[1]) if want_bias_sums else (0,), dtype=bias_sums_dtype(y))
    return _empty_act(y), torch.empty_like(weight, memory_format=torch.contiguous_format), grad_shortcut, bias_sums


# ---------------------------------------------------------------------------------------------
# autograd: each gradient computed only when needs_input_grad asks for it


# Every op's setup turns materialize_grads off, and its backward returns no gradient for an output
# whose gradient never came (None): autograd otherwise hands the backward a zero tensor it allocates
# and fills, and the backward would run its kernels on those zeros for a zero gradient that
# autograd then adds into the input's. It happens in every training step: each NF block's
# pre-activation a = silu_scale(x) feeds convs that send its gradient to x themselves (pre_x), so
# no gradient ever reaches a, yet the silu_scale node is still run, once per block.


def _std_setup(ctx, inputs, output):
    weight, gain, ctx.scale, ctx.eps = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(weight, gain)


def _std_backward(backward_op):
    def backward(ctx, grad):
        if grad is None:
            return None, None, None, None
        weight, gain = ctx.saved_tensors
        need_w, need_gain = ctx.needs_input_grad[:2]
        grad_weight, grad_gain = backward_op(grad, weight, gain, ctx.scale, ctx.eps)  # one kernel makes both
        return grad_weight if need_w else None, grad_gain if need_gain else None, None, None
    return backward


def _silu_setup(ctx, inputs, output):
    x, ctx.beta = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x)


def _silu_backward(backward_op):
    def backward(ctx, grad):
        if grad is None:  # (a block's pre-activation, whose convs took the gradient to x: see above)
            return None, None
        (x,) = ctx.saved_tensors
        return backward_op(grad, x, ctx.beta), None
    return backward


def _eca_setup(ctx, inputs, output):
    # (sums, when given, are y's: their gradient is taken through y, see ops.eca_residual)
    y, weight, shortcut, ctx.coef, ctx.beta_next, _sums = inputs
    # the statistics (saved for the backward only), and without beta_next the (0,) placeholder (one call:
    # a ctx keeps the last call's tensors only)
    ctx.mark_non_differentiable(*([output[2]] if ctx.beta_next is not None else [output[2], output[1]]))
    ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no zeros to read
    # the shortcut matters to the backward only through a_next (which recomputes x_next from it)
    ctx.save_for_backward(y, weight, shortcut if ctx.beta_next is not None else None, output[2])


def _eca_backward(backward_op, with_biases: bool = False):
    """The autograd formula; ``with_biases``: of :func:`_with_biases`' Function, whose inputs 6 and 7 are the
    biases that y's and the shortcut's producers added last (detached there), their gradients the backward
    op's ``bias_sums``."""
    def backward(ctx, grad_x_next, grad_a_next, _grad_stats):
        need_y, need_w, need_shortcut = ctx.needs_input_grad[:3]
        need_biases = ctx.needs_input_grad[6:8] if with_biases else (False, False)
        nothing = (None, None, None) + (None,) * (5 if with_biases else 3)
        if ctx.beta_next is None:
            grad_a_next = None
        if grad_x_next is None and grad_a_next is None:
            return nothing
        if grad_a_next is None and not (need_y or need_w or any(need_biases)):
            # x_next = coef * gate * y + shortcut: the shortcut's gradient is grad_x_next itself
            return (None, None, grad_x_next if need_shortcut else None) + nothing[3:]
        # (unpacked only now: a block's y may be saved as a recipe that recomputes it, nn._saved_as_recompute)
        y, weight, shortcut, stats = ctx.saved_tensors
        want = (True,) if any(need_biases) else ()
        if grad_a_next is None:
            grad_shortcut = grad_x_next if need_shortcut else None
            grad_y, grad_weight, _, bias_sums = backward_op(grad_x_next, None, y, weight, None, stats, ctx.coef, None,
                                                            *want)
        else:
            grad_y, grad_weight, grad_total, bias_sums = backward_op(grad_x_next, grad_a_next, y, weight, shortcut,
                                                                     stats, ctx.coef, ctx.beta_next, *want)
            grad_shortcut = grad_total if need_shortcut else None
        grads = (grad_y if need_y else None, grad_weight if need_w else None, grad_shortcut, None, None, None)
        if not with_biases:
            return grads
        # (copies: each bias's gradient a tensor of its own, not a row of the op's (2, C) output)
        return grads + tuple(bias_sums[i].to(ctx.bias_dtypes[i], copy=True) if need else None
                             for i, need in enumerate(need_biases))
    return backward


def register(prefix: str, eca_stats_like: Callable[[Tensor], Tensor]) -> None:
    """Fake kernels and autograd for one backend's three op pairs (``prefix``: see the module doc);
    ``eca_stats_like(y, sums)`` is the empty ``stats`` tensor that backend's eca_residual returns."""
    fakes = {"scaled_std_weight": (_fake_std, _fake_std_backward), "silu_scale": (_fake_silu, _fake_silu_backward),
             "eca_residual": (_fake_eca(eca_stats_like), _fake_eca_backward)}
    for op, (fake, fake_backward) in fakes.items():
        forward, backward = _names(prefix, op)
        torch.library.register_fake(forward)(fake)
        torch.library.register_fake(backward)(fake_backward)
        setup, make_backward = _AUTOGRAD[op]
        torch.library.register_autograd(forward, make_backward(_op(backward)), setup_context=setup)


def public_functions(prefix: str, float64=None) -> dict:
    """The functions of :mod:`nfnet_fast.ops`' signatures over one backend's ops (arguments already
    validated by ``ops``), for the backend registry. ``float64``: a module whose functions take
    float64 inputs (a dtype the ops accept for checks) when the backend's kernels do not."""
    std, silu, eca_res = (_with_eager_autograd(prefix, op) for op in KERNEL_OPS)

    def wide(t: Tensor) -> bool:
        return float64 is not None and t.dtype == torch.float64

    def scaled_std_weight(weight: Tensor, gain: Tensor, scale: float, eps: float) -> Tensor:
        if wide(weight):
            return float64.scaled_std_weight(weight, gain, scale, eps)
        return std(weight, gain, scale, eps)

    def silu_scale(x: Tensor, beta: float) -> Tensor:
        if wide(x):
            return float64.silu_scale(x, beta)
        return silu(x, beta)

    def eca(x: Tensor, weight: Tensor, gain: float) -> Tensor:
        if wide(x):
            return float64.eca(x, weight, gain)
        return eca_res(x, weight, None, gain, None, None)[0]

    def eca_residual(y: Tensor, weight: Tensor, shortcut: Tensor, alpha: float, attn_gain: float,
                     beta_next: Optional[float], sums: Optional[Tensor] = None, biases=None):
        if wide(y):
            return float64.eca_residual(y, weight, shortcut, alpha, attn_gain, beta_next, biases=biases)
        # the reference multiplies the gate by the Python float alpha * attn_gain: the same product here
        args = (y, weight, shortcut, alpha * attn_gain, beta_next, sums)
        if biases is not None and _takes_biases(args, biases):
            x_next, a_next, _ = eca_res.with_biases(*args, *biases)
        else:
            if biases is not None:
                args = (through_bias(y, biases[0]), weight, through_bias(shortcut, biases[1]), *args[3:])
            x_next, a_next, _ = eca_res(*args)
        return x_next if beta_next is None else (x_next, a_next)

    return dict(scaled_std_weight=scaled_std_weight, eca=eca, eca_residual=eca_residual, silu_scale=silu_scale)


# ---------------------------------------------------------------------------------------------
# fused_conv: one op per compiled backend that has the kernels (the Triton one today; the cuda
# backend routes to it), with this fake kernel and this autograd:
#
#   <prefix>fused_conv(x, weight, bias?, stride, padding[4], groups, act, act_gain, pool, want_sums,
#                      pre_x?, pre_beta, gain?, std_scale, std_eps, pre_act, want_out, compute_dtype?, want_z)
#       -> (out, sums, std_weight, z)   act: index into ops.ACTIVATIONS; sums (N, C_out) fp32, or (0,);
#                                       std_weight: with gain, the standardised weight, else (0,);
#                                       z: with want_z and an activation, the pre-activation, else (0,)
#
# With compute_dtype (autocast's, given by fused_conv_function for an input of another dtype that
# needs no gradient: the batch of images at the stem) the op casts x itself, so the autograd saves
# x as the caller holds it anyway, not a cast copy (0.29 MiB a sample of bf16 images at 224 px);
# the backward casts it again, with the same rounding, when it needs it.
#
# With want_out False (and want_sums) only the sums are made: out is a (0,) placeholder in the
# output's dtype, never differentiable, and the kernel never writes (or allocates) the output. The
# model's final conv runs so, since the head uses only its global average pool.
#
# With gain, weight is a ScaledStdConv2d's raw weight (any float dtype, fp32 under autocast) and the
# op standardises it itself (scaled_std_weight(weight, gain, std_scale, std_eps), written straight
# into the kernels' packed operand, (kh, kw, C_in/groups, C_out) in x's dtype); the op returns that
# operand as std_weight (not differentiable), which the autograd saves for the backward: a training
# conv standardises once a step, not again in its backward (a launch and its host time per conv, for
# the standardised weights held from forward to backward: 41.5 MiB in bf16 for eca_nfnet_l0). The
# backward turns the conv's weight gradient into the weight's and the gain's with
# scaled_std_weight's backward kernel.
#
# With pre_x (x = silu(pre_x) * pre_beta, an NF block's pre-activation) the autograd saves pre_x,
# which the block keeps anyway as its shortcut, instead of x, recomputes x in the backward, and
# sends x's gradient through the SiLU to pre_x: one activation less held per block in training.
# With pre_act, x itself is that pre_x: the kernel applies silu(x) * pre_beta as it loads x (the
# activated input is never written), and the autograd saves x and treats it as pre_x.
#
#   _<prefix>fused_conv_backward(grad_out?, grad_sums?, x, weight, bias?, stride, padding[4], groups, act,
#                                act_gain, pool, pre_beta?, gain?, std_scale, std_eps, need_x, need_weight,
#                                need_bias, need_gain, compute_dtype?, std_weight?, z?, grad_x_add?)
#       -> (grad_x, grad_weight, grad_bias, grad_gain)     (0,) where not needed
#
# (x, weight: the saved pre_x and raw weight where the forward had them; std_weight: the forward's;
# the backward op recomputes silu(pre_x) * pre_beta (and the standardised weight, where no
# std_weight is given) itself and returns pre_x's, the raw weight's and the gain's gradients: one op
# call per conv. grad_x_add: x's (pre_x's) gradient from its other uses, which an eager call with
# return_input hands its backward (_returning_input): grad_x is the sum, made in the SiLU backward's pass)
#
# The backward op recomputes the pre-activation z = conv(x) + bias in the forward kernel, whose
# epilogue turns the incoming gradients into z's, (grad_out + grad_sums) * act_gain * act'(z), and
# sums it per channel (the bias gradient): one launch where aten needed a conv and about ten fp32
# passes (kernels/fused_conv.py, "backward"); cuDNN/cuBLAS do the data and weight gradients.
#
# With want_z (ops.fused_conv's keep_z, asked for in training only) the forward's epilogue also stores
# z, rounded to the output's dtype as timm's conv output is (the fp32 contract: the same bits), the
# autograd saves it, and the backward reads it in one elementwise launch instead of that GEMM: one
# activation more held, one convolution less run. Worth it where the conv is costly per element of z
# (nn._FusedConv.keep_z's rule: a fan-in of 1024 or more).

ACTIVATIONS = (None, "silu", "relu", "gelu")  # ops.ACTIVATIONS (the op takes the index)


def conv_out_size(size: int, before: int, after: int, k: int, stride: int) -> int:
    return (size + before + after - k) // stride + 1


def empty_out(x: Tensor, weight: Tensor, stride: int, padding, pool: bool) -> Tensor:
    """An empty channels_last tensor of fused_conv's output shape in ``x``'s dtype: for the output, or its
    pre-activation z."""
    n, _, h, w = x.shape
    if pool:
        h, w = (h + 1) // 2, (w + 1) // 2
    ho = conv_out_size(h, padding[0], padding[1], weight.shape[2], stride)
    wo = conv_out_size(w, padding[2], padding[3], weight.shape[3], stride)
    return torch.empty((n, weight.shape[0], ho, wo), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _fake_fused_conv(x, weight, bias, stride, padding, groups, act, act_gain, pool, want_sums, pre_x=None,
                     pre_beta=1.0, gain=None, std_scale=1.0, std_eps=0.0, pre_act=False, want_out=True,
                     compute_dtype=None, want_z=False):
    _check_float(x, "x")
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "x and weight must be 4-D")
    if compute_dtype is not None:  # (x is cast to it first: the rest is checked against the cast x)
        torch._check(not pre_act and pre_x is None, lambda: "compute_dtype excludes pre_act and pre_x")
        x = x.to(compute_dtype)
    _check_same(weight, "weight", x, "x", dtype=gain is None)  # (a raw weight to standardise: any float dtype)
    if gain is not None:
        _check_float(weight, "weight")
        _check_same(gain, "gain", x, "x", dtype=False)
        torch._check(gain.numel() == weight.shape[0], lambda: "gain must have one value per output channel")
    torch._check(x.shape[1] == weight.shape[1] * groups,
                 lambda: f"weight shape {tuple(weight.shape)} and groups={groups} do not fit x {tuple(x.shape)}")
    torch._check(len(padding) == 4, lambda: "padding must be (top, bottom, left, right)")
    torch._check(not (pre_act and pre_x is not None), lambda: "pre_act and pre_x exclude each other")
    torch._check(want_out or want_sums, lambda: "want_out=False needs want_sums=True")
    if pre_x is not None:
        torch._check(pre_x.shape == x.shape, lambda: f"pre_x shape {tuple(pre_x.shape)} must equal x shape "
                                                     f"{tuple(x.shape)}")
        _check_same(pre_x, "pre_x", x, "x", dtype=False)
    if bias is not None:
        torch._check(bias.numel() == weight.shape[0], lambda: "bias must have one value per output channel")
        _check_same(bias, "bias", x, "x", dtype=False)
    out = empty_out(x, weight, stride, padding, pool) if want_out else x.new_empty((0,))
    sums = x.new_empty((x.shape[0], weight.shape[0]) if want_sums else (0,), dtype=torch.float32)
    std_weight = (x.new_empty((weight.shape[2], weight.shape[3], weight.shape[1], weight.shape[0]))
                  if gain is not None else x.new_empty((0,)))
    z = empty_out(x, weight, stride, padding, pool) if want_z and act else x.new_empty((0,))
    return out, sums, std_weight, z


def _fused_conv_setup(ctx, inputs, output):
    (x, weight, bias, ctx.stride, ctx.padding, ctx.groups, ctx.act, ctx.act_gain, ctx.pool, want_sums, pre_x,
     ctx.pre_beta, gain, ctx.std_scale, ctx.std_eps, *flags) = inputs  # (pre_act, want_out, compute_dtype, want_z)
    pre_act, want_out, ctx.compute_dtype = (flags + [False, True, None][len(flags):])[:3]
    # the standardised weight (the backward's, not the caller's), the kept z, and the (0,) placeholders of the
    # results not asked for (one call: a ctx keeps the last call's tensors only)
    ctx.mark_non_differentiable(output[2], output[3], *([] if want_sums else [output[1]]),
                                *([] if want_out else [output[0]]))
    ctx.set_materialize_grads(False)
    ctx.has_bias = bias is not None
    ctx.pre_x = pre_x is not None  # (x's gradient then goes to pre_x, argument 10)
    ctx.pre = ctx.pre_x or bool(pre_act)  # the saved tensor is a pre-activation
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(pre_x if ctx.pre_x else x, weight, bias, gain, output[2] if gain is not None else None,
                          output[3] if output[3].dim() == 4 else None)


def _fake_fused_conv_backward(grad_out, grad_sums, x, weight, bias, stride, padding, groups, act, act_gain, pool,
                              pre_beta, gain, std_scale, std_eps, need_x, need_weight, need_bias, need_gain,
                              compute_dtype=None, std_weight=None, z=None, grad_x_add=None):
    if grad_x_add is not None:  # x's gradient from its other uses (fused_conv's return_input), which grad_x sums
        torch._check(grad_x_add.shape == x.shape,
                     lambda: f"grad_x_add {tuple(grad_x_add.shape)} must have x's shape {tuple(x.shape)}")
    if std_weight is not None:  # the forward's third output, which the backward reads as its GEMM operand
        wshape = (weight.shape[2], weight.shape[3], weight.shape[1], weight.shape[0])
        torch._check(gain is not None and std_weight.shape == wshape,
                     lambda: f"std_weight {tuple(std_weight.shape)} must be the standardised weight {wshape} of a "
                             "conv with gain")
        torch._check(std_weight.dtype == (x.dtype if compute_dtype is None else compute_dtype),
                     lambda: f"std_weight dtype {std_weight.dtype} must be the conv's compute dtype")
    if z is not None:  # the forward's fourth output: the pre-activation, the output's shape
        torch._check(act != 0 and z.dim() == 4 and z.shape[:2] == (x.shape[0], weight.shape[0])
                     and z.dtype == (x.dtype if compute_dtype is None else compute_dtype),
                     lambda: f"z {tuple(z.shape)} {z.dtype} must be the pre-activation the forward kept")
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device,
                         memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    return (grad_x if need_x else x.new_empty((0,)),
            torch.empty_like(weight, memory_format=weight_grad_format(weight)) if need_weight else x.new_empty((0,)),
            bias.new_empty(bias.shape) if need_bias and bias is not None else x.new_empty((0,)),
            gain.new_empty(gain.shape) if need_gain and gain is not None else x.new_empty((0,)))


def weight_grad_format(weight: Tensor) -> torch.memory_format:
    """The layout of fused_conv's weight gradient: the weight's own, channels_last where it is
    channels_last-contiguous and not contiguous (a channels_last model's kxk weight), else contiguous,
    so that AccumulateGrad takes it as it is (kernels/fused_conv.py, ``backward``, has the same rule)."""
    cl = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _fused_conv_backward(backward_op):
    """The autograd formula: one call of the backend's backward op, which recomputes what the
    forward did not keep (the pre-activation x from pre_x), takes the standardised weight the
    forward returned, and returns every gradient, so a conv's backward pays one op's host overhead.
    ``grad_x_add``: the gradient of the input that an eager call with ``return_input`` returned
    (:func:`_with_eager_autograd`), summed into x's (pre_x's) gradient by the backward op."""
    def backward(ctx, grad_out, grad_sums, _grad_std_weight, _grad_z, grad_x_add=None):
        x, weight, bias, gain, std_weight, z = ctx.saved_tensors
        # (under AOT dispatch needs_input_grad covers only the arguments the caller passed)
        needs = ctx.needs_input_grad
        need_x = needs[10] if ctx.pre_x else needs[0]  # with pre_x, x's gradient goes to pre_x
        need_w, need_b = needs[1], needs[2] and bias is not None
        need_gain = gain is not None and needs[12]
        if grad_sums is not None and grad_sums.dim() != 2:  # the (0,) placeholder of an op without sums
            grad_sums = None
        if grad_out is not None and grad_out.dim() != 4:  # the (0,) placeholder of an op without an output
            grad_out = None
        if grad_x_add is not None and not need_x:
            grad_x_add = None
        if (grad_out is None and grad_sums is None) or not (need_x or need_w or need_b or need_gain):
            # (no backward op to run: the input's other uses' gradient alone, or nothing)
            grad_x, grad_w, grad_b, grad_gain = grad_x_add, None, None, None
        else:
            grad_x, grad_w, grad_b, grad_gain = backward_op(
                grad_out, grad_sums, x, weight, bias, ctx.stride, ctx.padding, ctx.groups, ctx.act, ctx.act_gain,
                ctx.pool, ctx.pre_beta if ctx.pre else None, gain, ctx.std_scale, ctx.std_eps, need_x, need_w,
                need_b, need_gain, ctx.compute_dtype, std_weight, z, *(() if grad_x_add is None else (grad_x_add,)))
            grad_x, grad_w = (grad_x if need_x else None), (grad_w if need_w else None)
            grad_b, grad_gain = (grad_b if need_b else None), (grad_gain if need_gain else None)
        return ((None if ctx.pre_x else grad_x, grad_w, grad_b) + (None,) * 7
                + (grad_x if ctx.pre_x else None, None, grad_gain, None, None, None, None, None, None))
    return backward


def register_fused_conv(prefix: str) -> None:
    """Fake kernels and autograd of ``nfnet_fast::<prefix>fused_conv`` and its backward."""
    name, backward = _names(prefix, "fused_conv")
    torch.library.register_fake(name)(_fake_fused_conv)
    torch.library.register_fake(backward)(_fake_fused_conv_backward)
    setup, make_backward = _AUTOGRAD["fused_conv"]
    torch.library.register_autograd(name, make_backward(_op(backward)), setup_context=setup)


# Each op's autograd formula, (setup_context, backward maker): registered with the op, which is what
# tracing (torch.compile, export) sees, and run by eager calls through _with_eager_autograd.
_AUTOGRAD = {"scaled_std_weight": (_std_setup, _std_backward), "silu_scale": (_silu_setup, _silu_backward),
             "eca_residual": (_eca_setup, _eca_backward), "fused_conv": (_fused_conv_setup, _fused_conv_backward)}


# op -> the autograd node classes of its eager calls (one per backend prefix): see fused_conv_std_weight
_EAGER_NODES: Dict[str, set] = {}


def fused_conv_std_weight(out: Tensor) -> Optional[Tensor]:
    """The standardised weight (the packed GEMM operand, in the conv's compute dtype) that the eager
    fused_conv call which returned ``out`` made and saved for its backward, or None: a conv without
    gain, a call autograd did not record through :func:`_with_eager_autograd`'s Function (or its replayed
    node), or saved tensors already freed. Read in the forward, while no saved-tensor hooks are set (it unpacks the
    node's saved tensors, which such hooks would have to unpack too)."""
    node = out.grad_fn
    if node is None:
        return None
    if type(node) in _EAGER_NODES.get("fused_conv", ()):
        try:
            saved = node.saved_tensors
        except RuntimeError:  # (freed by a backward already)
            return None
    else:  # (the call's C++ node, where its replay made it: nfnet_fast._replay.call_node)
        saved = _replay.node_saved(out, "fused_conv")
        if saved is None:
            return None
    _, weight, _, gain, std, _ = saved  # (_fused_conv_setup's save order)
    if gain is None or std is None or std.shape != (*weight.shape[2:], weight.shape[1], weight.shape[0]):
        return None
    return std


def _with_eager_autograd(prefix: str, op: str) -> Callable:
    """``nfnet_fast::<prefix><op>`` as a function of all its arguments (positional, none left to a
    default) that runs an eager call with autograd through an ``autograd.Function`` with the op's
    registered formula: the same saved tensors and gradients, without the host work of torch's
    custom-op autograd wrapper. That wrapper refills the schema's defaults on every call in a loop
    quadratic in the arity (pytorch#195110): 62 us a call for fused_conv's 18 arguments on the 2-core
    build machine (the measurement: docs/design.md section 4). The Function's forward and backward,
    and calls with no gradient to track, run the ops' Python bodies where they can (:func:`_direct`);
    calls while tracing or compiling call the op itself, with its registered autograd."""
    forward_name, backward_name = _names(prefix, op)
    forward_op = _direct(forward_name)
    setup_context, make_backward = _AUTOGRAD[op]

    def forward(ctx, *inputs):
        output = forward_op(*inputs)  # (autograd.Function runs forward without grad: no autograd in the op)
        setup_context(ctx, inputs, output)
        return output
    backward = make_backward(_direct(backward_name))
    function = type(f"{prefix}{op}_autograd", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward)})
    _EAGER_NODES.setdefault(op, set()).add(function._backward_cls)
    traced_op = _op(forward_name)
    # with replay on, the same calls as one C++ autograd node each (nfnet_fast._replay.call_node)
    node_op = _replay.NodeOp(forward_name, function, setup_context,
                             make_backward(_replay.Capture(backward_name, _direct(backward_name))),
                             lambda: (_BODIES.get(forward_name), _BODIES.get(backward_name)))

    def call(*inputs):
        if torch.compiler.is_compiling():
            return traced_op(*inputs)
        if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs):
            if (_replay.ENABLED and forward_name in _BODIES and _plain_call(inputs, track=False)
                    and not torch.autograd._profiler_enabled() and not torch.is_anomaly_enabled()):
                return _replay.call_node(node_op, inputs)
            return function.apply(*inputs)
        return forward_op(*inputs)
    if op == "fused_conv":
        call.returning_input = _returning_input(function, forward, backward)
    if op == "eca_residual":
        call.with_biases = _with_biases(function, forward, _eca_backward(_direct(backward_name), with_biases=True))
    return call


def through_bias(t: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``t`` (the values: ``bias - bias`` is zero) through which ``bias``, a per-channel bias that ``t``'s producer
    added last with ``bias`` detached, gets its gradient: that of ``t``, summed over (N, H, W). The plain
    autograd form of ops.eca_residual's ``biases``, for the calls :func:`_with_biases` does not serve (one
    elementwise pass more; the reference backend, tracing, compile, torch.func)."""
    if bias is None or not (bias.requires_grad and torch.is_grad_enabled()):
        return t
    return t + (bias - bias.detach()).to(t.dtype).reshape(1, -1, 1, 1)


def _takes_biases(args: tuple, biases: tuple) -> bool:
    """Whether an eca_residual call with ``biases`` runs :func:`_with_biases`' Function: eager autograd with plain
    tensors, a bias tracked."""
    return (torch.is_grad_enabled() and any(b is not None and b.requires_grad for b in biases)
            and not torch.compiler.is_compiling() and _plain_call(args + tuple(biases), track=False))


def _with_biases(function, forward: Callable, backward: Callable):
    """An eager eca_residual call with autograd that also takes, last, the biases ``(y_bias, shortcut_bias)`` (each
    None or a (C,) tensor) that y's and the shortcut's producers added last, with the bias detached: the call's
    backward op makes their gradients, the sums of grad_y and of the shortcut's gradient over (N, H, W), from the
    sums its reduction takes anyway (Triton; the C++ op sums with aten), so that the producers' backwards sum
    nothing (NormFreeBlock.bias_grads_in_eca). The same forward and outputs. Not replayed (nfnet_fast._replay's
    node takes the op's inputs only): under NFNET_FAST_REPLAY these calls run this Function."""
    def forward_with_biases(ctx, *inputs):
        ctx.bias_dtypes = tuple(None if b is None else b.dtype for b in inputs[6:])
        return forward(ctx, *inputs[:6])
    taking = type(f"{function.__name__}_with_biases", (torch.autograd.Function,),
                  {"forward": staticmethod(forward_with_biases), "backward": staticmethod(backward)})
    _EAGER_NODES["eca_residual"].add(taking._backward_cls)
    return taking.apply


def _returning_input(function, forward: Callable, backward: Callable):
    """An eager fused_conv call with autograd that also returns its differentiable input (pre_x where given,
    else x) as a fifth output: the same values (a view autograd makes of it), whose gradient, from wherever the
    caller uses it, comes back to this call's node and so to the backward op (``grad_x_add``), which sums it
    into the input's gradient in the SiLU backward's pass: autograd's engine no longer adds the input's two
    gradients in a pass of its own (a read of each and a write). Not replayed (nfnet_fast._replay's node
    returns the body's outputs only): under NFNET_FAST_REPLAY these calls run this Function."""
    def forward_returning(ctx, *inputs):  # (the call's own forward, and its input)
        return (*forward(ctx, *inputs), inputs[10] if inputs[10] is not None else inputs[0])
    returning = type(f"{function.__name__}_returning_input", (torch.autograd.Function,),
                     {"forward": staticmethod(forward_returning), "backward": staticmethod(backward)})
    _EAGER_NODES["fused_conv"].add(returning._backward_cls)
    return returning.apply


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype on ``device_type``, or None where autocast is off or does not exist (meta)."""
    # (cuda and cpu are known without asking: torch 2.11's dynamo cannot trace is_autocast_available)
    if ((device_type in ("cuda", "cpu") or torch.amp.is_autocast_available(device_type))
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return None


def conv_out_dtype(x: Tensor) -> torch.dtype:
    """The dtype of fused_conv's output for input ``x`` on every backend: the autocast dtype where
    autocast is on (float64 excepted, which autocast's conv leaves as it is), else ``x``'s."""
    dtype = autocast_dtype(x.device.type)
    return x.dtype if dtype is None or x.dtype == torch.float64 else dtype


def fused_conv_function(prefix: str, float64=None):
    """ops.fused_conv's signature over ``nfnet_fast::<prefix>fused_conv`` (see public_functions):
    under autocast x and weight are cast to the autocast dtype first, as F.conv2d does (a raw weight
    to standardise, with ``gain``, stays as it is: the op standardises it in fp32 and writes the
    result in x's dtype, as timm's fp32 batch_norm and then the conv's cast do). An x that needs no
    gradient (the caller's data, alive anyway) the op casts itself (compute_dtype), so that the
    autograd keeps x and no cast copy."""
    op, silu = _with_eager_autograd(prefix, "fused_conv"), _with_eager_autograd(prefix, "silu_scale")

    def fused_conv(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: int, padding, groups: int,
                   act: Optional[str], act_gain: float, pool: bool, want_sums: bool, pre_x: Optional[Tensor] = None,
                   pre_beta: float = 1.0, gain: Optional[Tensor] = None, std_scale: float = 1.0,
                   std_eps: float = 0.0, pre_act: bool = False, want_out: bool = True, keep_z: bool = False,
                   return_z: bool = False, return_input: bool = False):
        if float64 is not None and x.dtype == torch.float64:
            return float64.fused_conv(x, weight, bias, stride, padding, groups, act, act_gain, pool, want_sums,
                                      gain=gain, std_scale=std_scale, std_eps=std_eps, pre_act=pre_act,
                                      pre_beta=pre_beta, want_out=want_out, return_z=return_z,
                                      return_input=return_input)
        given = pre_x if pre_x is not None else x  # (what return_input returns: the input the caller gave)
        dtype, compute_dtype = autocast_dtype(x.device.type), None
        if dtype is not None:
            if x.dtype != dtype:  # (the cast x is no longer silu(pre_x) * pre_beta as computed: keep x)
                pre_x = None
                if pre_act:  # unfused, as timm: the pre-activation in x's dtype (autocast leaves silu), then the cast
                    x, pre_act = silu(x, pre_beta), False
            if gain is None:
                weight = weight.to(dtype)
            if x.dtype != dtype and not x.requires_grad:
                compute_dtype = dtype  # the caller's data: the op casts it, so its autograd keeps x (no copy)
            else:
                x = x.to(dtype)
        # z only where autograd will keep it: a conv with an activation, tracked
        want_z = bool(keep_z and act is not None and torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, gain, pre_x)))
        args = (x, weight, bias, stride, list(padding), groups, ACTIVATIONS.index(act), act_gain, pool, want_sums,
                pre_x, pre_beta, gain, std_scale, std_eps, pre_act, want_out, compute_dtype, want_z)
        # the input returned through the call's node where the backward sums its gradients in the SiLU backward's
        # pass (the input is pre_x, or x with pre_act): eager autograd with plain tensors, the input tracked
        if (return_input and given.requires_grad and (pre_x is not None or pre_act) and torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and _plain_call(args, track=False)):
            out, sums, _, z, given = op.returning_input(*args)
        else:
            out, sums, _, z = op(*args)
        res = sums if not want_out else (out, sums) if want_sums else out
        res = (res,) + ((z if want_z else None,) if return_z else ()) + ((given,) if return_input else ())
        return res if len(res) > 1 else res[0]

    return fused_conv
