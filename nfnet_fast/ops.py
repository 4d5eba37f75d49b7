"""Functional ops of nfnet_fast: argument checks, backend choice, dispatch.

Every op takes ``backend=``: ``"auto"`` (default), ``"reference"``, ``"triton"`` or ``"cuda"``
(see :func:`nfnet_fast.backends`). ``"auto"`` picks, per tensor device, the first backend of
:data:`AUTO_ORDER` that runs there. Tensors may be NCHW or channels_last (or any strides);
outputs keep the input's memory format. Math is fp32, storage in the input's dtype.

The compiled backends are registered through ``torch.library`` (schema, fake kernel, autograd),
so they work under ``torch.compile(fullgraph=True)`` and ``torch.library.opcheck``.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Optional, Tuple, Union

import torch
from torch.autograd import forward_ad

from . import _backends, _library

__all__ = ["scaled_std_weight", "eca", "eca_residual", "silu_scale", "fused_conv", "resolve_backend",
           "check_backend", "AUTO_ORDER", "ACTIVATIONS"]

ACTIVATIONS = _library.ACTIVATIONS  # fused_conv's act: gelu is the exact (erf) form

# Per device type, the order in which backend="auto" tries backends. On CUDA, set by the first H200
# run (docs/design.md section 10): cuda equals triton in inference (8267 vs 8216 img/s, eca_nfnet_l0 bs 256
# 288 px bf16) and is 1.6x faster in training (2274 vs 1421 img/s), so it goes first. On the CPU the
# reference (vectorised ATen) beats the single-purpose CPU twins.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("reference",)}

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_resolved: dict = {}


def _check_name(backend) -> None:
    if not isinstance(backend, str) or backend not in ("auto",) + _backends.NAMES:
        names = ", ".join(repr(n) for n in ("auto",) + _backends.NAMES)
        raise ValueError(f"backend must be one of {names}; got {backend!r}")


def _backend_impl(op: str, backend: str, device: torch.device):
    """The function implementing `op` on `backend` for tensors on `device` (checked, cached)."""
    _check_name(backend)
    key = (op, backend, device.type)
    found = _resolved.get(key)
    if found is None:
        found = _resolved[key] = _find_impl(op, backend, device.type)
    return found[1]


def _find_impl(op: str, backend: str, device_type: str):
    """(backend name, function) for `op`, from the backend registry (filled by _reference.py,
    _triton.py and _cuda.py at import); raises with the reason when none fits."""
    infos = _backends.backends()
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ("reference",)):
            if infos[name].runs_on(device_type):
                fn = _backends.op_function(name, op)
                if fn is not None:
                    return name, fn
        raise RuntimeError(f"no backend implements {op} for {device_type} tensors")  # unreachable: reference does
    info = infos[backend]
    if not info.runs_on(device_type):
        why = info.reason or f"it runs on {', '.join(info.devices) or 'no device'} only"
        raise RuntimeError(f"backend={backend!r} cannot run {op} on {device_type} tensors here: {why}")
    fn = _backends.op_function(backend, op)
    if fn is None:
        raise RuntimeError(f"backend={backend!r} does not implement {op} yet")
    return backend, fn


def _needs_reference(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether this call must run the reference math (plain aten ops) whatever backend was asked:

    * exporting (``torch.export``, hence the dynamo ONNX exporter) or ``torch.jit.trace`` (hence the
      legacy ONNX exporter): the exported graph records plain aten ops, so it runs and loads
      anywhere without nfnet_fast, and ONNX needs no translation of our ops;
    * forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) and the functorch
      transforms (``grad``, ``vjp``, ``jacrev``, ``vmap``): the compiled ops define no jvp rule and
      no batching rule, and would give a silently wrong tangent.
    """
    if torch.compiler.is_exporting() or torch.jit.is_tracing():
        return True
    if torch.compiler.is_compiling():  # torch.compile of plain tensors: the compiled ops trace as single nodes
        return False
    level = forward_ad._current_level
    for t in tensors:
        if t is None:
            continue
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return True
        if level >= 0 and forward_ad.unpack_dual(t).tangent is not None:
            return True
    return False


def _implementation(op: str, backend: str, *tensors: Optional[torch.Tensor]):
    """The function running `op` for these tensors (the first one's device decides), after
    :func:`_needs_reference`."""
    impl = _backend_impl(op, backend, tensors[0].device)
    if backend != "reference" and _needs_reference(*tensors):
        return _backend_impl(op, "reference", tensors[0].device)
    return impl


def check_backend(backend) -> None:
    """Raise unless `backend` names a backend that is available here (``"auto"`` always is).

    Raises:
        ValueError: unknown name. RuntimeError: the backend runs on no device here (says why).
    """
    _check_name(backend)
    if backend != "auto":
        info = _backends.backends()[backend]
        if not info.available:
            raise RuntimeError(f"backend={backend!r} is not available here: {info.reason}")


def resolve_backend(backend: str, device: Union[str, torch.device], op: str = "silu_scale") -> str:
    """Name of the backend that ``backend`` (maybe ``"auto"``) runs ``op`` with on ``device``.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: the backend cannot run on that device here (the message says why).
    """
    device = torch.device(device)
    _backend_impl(op, backend, device)
    return _resolved[(op, backend, device.type)][0]


# ---------------------------------------------------------------------------------------------
# argument checks: each error names the argument


def _check_tensor(t, name: str, ndim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 (float64 for checks), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def _check_activation(t, name: str) -> None:
    """A 4-D (N, C, H, W) activation with a non-empty batch and spatial extent."""
    _check_tensor(t, name, ndim=4)
    n, c, h, w = t.shape
    if n == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}): nothing to compute")
    if c == 0 or h * w == 0:
        raise ValueError(f"{name} has no channels or no pixels (shape {tuple(t.shape)})")


def _check_same(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str, dtype: bool = True) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")


# (each check first tries the exact built-in types, what the modules pass: an isinstance against an ABC of
# numbers is several times slower, and a training step checks a few hundred arguments on its host)

def _check_number(v, name: str, optional: bool = False) -> None:
    if type(v) is float or type(v) is int or (optional and v is None):
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"{name} must be a Python float, got {type(v).__name__}")


def _check_eca_weight(weight, x: torch.Tensor, name: str = "weight") -> None:
    _check_tensor(weight, name)
    k = weight.numel()
    if weight.dim() not in (1, 3) or (weight.dim() == 3 and weight.shape[:2] != (1, 1)) or k % 2 == 0:
        raise ValueError(f"{name} must be the ECA conv1d kernel, shape (k,) or (1, 1, k) with k odd; "
                         f"got shape {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"{name} is on {weight.device} but the activation is on {x.device}")


# ---------------------------------------------------------------------------------------------
# public ops


def scaled_std_weight(weight: torch.Tensor, gain: torch.Tensor, scale: float, eps: float, *,
                      backend: str = "auto") -> torch.Tensor:
    """Scaled weight standardisation, as timm's ``ScaledStdConv2d`` computes it.

    ``w_hat[o] = (w[o] - mean(w[o])) / sqrt(var(w[o]) + eps) * gain[o] * scale``, with mean and
    biased variance over the fan-in of output channel ``o``, in fp32.

    Args:
        weight: conv weight, shape (C_out, C_in/groups, kh, kw) (any shape with C_out first).
        gain: per-output-channel gain, C_out elements (timm: shape (C_out, 1, 1, 1)), weight's dtype.
        scale: ``gamma * fan_in ** -0.5``.
        eps: added to the variance.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        The standardised weight: same shape and dtype as ``weight``, contiguous.
    """
    _check_tensor(weight, "weight")
    if weight.dim() < 2 or weight.numel() == 0:
        raise ValueError(f"weight must be a non-empty conv weight (C_out, ...), got shape {tuple(weight.shape)}")
    if weight.numel() == weight.shape[0]:  # a fan-in of 1; timm's batch_norm refuses it too
        raise ValueError(f"weight has a fan-in of 1 (shape {tuple(weight.shape)}): standardisation would zero it")
    _check_tensor(gain, "gain")
    _check_same(gain, "gain", weight, "weight")
    if gain.numel() != weight.shape[0]:
        raise ValueError(f"gain must have one value per output channel ({weight.shape[0]}), "
                         f"got shape {tuple(gain.shape)}")
    _check_number(scale, "scale")
    _check_number(eps, "eps")
    if not eps > 0:  # eps = 0 divides by zero on a constant row (timm's batch_norm refuses it too)
        raise ValueError(f"eps must be > 0, got {eps}")
    return _implementation("scaled_std_weight", backend, weight, gain)(weight, gain, float(scale), float(eps))


def eca(x: torch.Tensor, weight: torch.Tensor, gain: float = 1.0, *, backend: str = "auto") -> torch.Tensor:
    """Efficient channel attention: ``gain * x * sigmoid(conv1d(mean_hw(x), weight))``.

    The conv1d runs over the channel axis with zero padding ``(k - 1) // 2`` and no bias
    (timm's ``EcaModule`` with its default sigmoid gate).

    Args:
        x: activation (N, C, H, W), NCHW or channels_last.
        weight: conv1d kernel, shape (1, 1, k) or (k,), k odd.
        gain: multiplies the output (the NF block's ``attn_gain``).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        Tensor like ``x``.
    """
    _check_activation(x, "x")
    _check_eca_weight(weight, x)
    _check_number(gain, "gain")
    return _implementation("eca", backend, x, weight)(x, weight, float(gain))


def eca_residual(y: torch.Tensor, weight: torch.Tensor, shortcut: torch.Tensor, alpha: float, attn_gain: float,
                 beta_next: Optional[float] = None, *, sums: Optional[torch.Tensor] = None,
                 biases: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None,
                 backend: str = "auto") -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """The tail of an NF block: ECA, residual scaling and add, and optionally the next pre-activation.

    ``x_next = alpha * attn_gain * y * sigmoid(conv1d(mean_hw(y), weight)) + shortcut``; with
    ``beta_next`` also ``a_next = silu(x_next) * beta_next``, from the same pass.

    Args:
        y: the block's conv3 output (N, C, H, W).
        weight: ECA conv1d kernel, (1, 1, k) or (k,), k odd.
        shortcut: same shape, dtype and device as ``y``.
        alpha: residual branch scale.
        attn_gain: attention gain.
        beta_next: the next block's pre-activation scale, or None.
        sums: ``y``'s fp32 (N, C) channel sums over its pixels, from the op that produced ``y``
            (``fused_conv(..., want_sums=True)``), so that the compiled backends need not read ``y``
            to pool it; None to pool here. They are a function of ``y``, not an input of their own:
            the gradient reaches ``y`` (through the means too) and none is returned for ``sums``,
            and the reference backend (the specification) pools ``y`` itself. Passing sums of
            anything else than ``y`` makes the compiled backends' gate wrong.
        biases: ``(y_bias, shortcut_bias)``, each None or a (C,) tensor: the per-channel biases that
            ``y``'s and the shortcut's producers added last and gave no gradient (they added them
            detached). Nothing is added here: the values are the same with or without them. Their
            gradients are made here instead, the sums over (N, H, W) of ``y``'s and the shortcut's
            gradients: in an eager call of the compiled backends from the sums the backward's reduction
            takes anyway (the Triton kernels; the C++ op sums with aten), elsewhere through plain autograd
            (one elementwise pass more). ``NormFreeBlock.bias_grads_in_eca`` passes conv3's and the
            downsample conv's, so that their backwards sum nothing.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``x_next``, or ``(x_next, a_next)`` when ``beta_next`` is given.
    """
    _check_activation(y, "y")
    _check_eca_weight(weight, y)
    _check_tensor(shortcut, "shortcut", ndim=4)
    _check_same(shortcut, "shortcut", y, "y")
    if shortcut.shape != y.shape:
        raise ValueError(f"shortcut shape {tuple(shortcut.shape)} must equal y shape {tuple(y.shape)}")
    _check_number(alpha, "alpha")
    _check_number(attn_gain, "attn_gain")
    _check_number(beta_next, "beta_next", optional=True)
    if sums is not None:
        _check_tensor(sums, "sums", ndim=2)
        _check_same(sums, "sums", y, "y", dtype=False)
        if sums.dtype != torch.float32 or tuple(sums.shape) != tuple(y.shape[:2]):
            raise ValueError(f"sums must be y's fp32 (N, C) = {tuple(y.shape[:2])} channel sums, got "
                             f"{sums.dtype} of shape {tuple(sums.shape)}")
    if biases is not None:
        if not isinstance(biases, (tuple, list)) or len(biases) != 2:
            raise TypeError("biases must be a pair (y_bias, shortcut_bias), each None or a (C,) tensor")
        for bias, name in zip(biases, ("y_bias", "shortcut_bias")):
            if bias is not None:
                _check_tensor(bias, name, ndim=1)
                _check_same(bias, name, y, "y", dtype=False)
                if bias.shape[0] != y.shape[1]:
                    raise ValueError(f"{name} must have one value per channel of y ({y.shape[1]}), got shape "
                                     f"{tuple(bias.shape)}")
        biases = tuple(biases) if any(b is not None for b in biases) else None
    tensors = (y, weight, shortcut, sums) + (biases if biases is not None else ())
    return _implementation("eca_residual", backend, *tensors)(
        y, weight, shortcut, float(alpha), float(attn_gain), None if beta_next is None else float(beta_next), sums,
        **({} if biases is None else {"biases": biases}))


def silu_scale(x: torch.Tensor, beta: float, *, backend: str = "auto") -> torch.Tensor:
    """``silu(x) * beta``: the NF block's scaled pre-activation.

    Args:
        x: any non-empty floating tensor (the model passes (N, C, H, W) activations).
        beta: scale, ``1 / sqrt(expected_var)`` in the NF block.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        Tensor like ``x``.
    """
    _check_tensor(x, "x")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)}): nothing to compute")
    _check_number(beta, "beta")
    return _implementation("silu_scale", backend, x)(x, float(beta))


def _padding4(padding) -> Tuple[int, int, int, int]:
    if type(padding) is tuple and len(padding) == 4 and all(type(p) is int and p >= 0 for p in padding):
        return padding
    if isinstance(padding, numbers.Integral) and not isinstance(padding, bool):
        padding = (int(padding),) * 4
    elif isinstance(padding, (tuple, list)) and len(padding) == 2:
        padding = (padding[0], padding[0], padding[1], padding[1])
    if not (isinstance(padding, (tuple, list)) and len(padding) == 4
            and all(isinstance(p, numbers.Integral) and not isinstance(p, bool) and p >= 0 for p in padding)):
        raise ValueError(f"padding must be an int >= 0, (pad_h, pad_w) or (top, bottom, left, right), got {padding!r}")
    return tuple(int(p) for p in padding)


def _check_int(v, name: str, low: int) -> int:
    if type(v) is int and v >= low:
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    return int(v)


def fused_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *, stride: int = 1,
               padding=0, groups: int = 1, act: Optional[str] = None, act_gain: float = 1.0, pool: bool = False,
               want_sums: bool = False, pre_x: Optional[torch.Tensor] = None, pre_beta: float = 1.0,
               gain: Optional[torch.Tensor] = None, std_scale: float = 1.0, std_eps: float = 0.0,
               pre_act: bool = False, want_out: bool = True, keep_z: bool = False, return_z: bool = False,
               return_input: bool = False, backend: str = "auto"):
    """A convolution with its neighbours fused: ``act(conv2d(pool(x), weight) + bias) * act_gain``.

    What an NF block does around each convolution, in one pass on the compiled backends: the 2x2
    average pool of the downsample shortcut on load (``pool``), the bias and the activation in the
    epilogue, and optionally the per-(sample, channel) sums of the output that ECA and the head's
    global pool need. On the reference backend it is timm's own sequence of calls.

    Args:
        x: activation (N, C_in, H, W), NCHW or channels_last (the compiled backends compute and
            return channels_last).
        weight: (C_out, C_in / groups, kh, kw), in ``x``'s dtype (under autocast both are cast to the
            autocast dtype, as ``F.conv2d`` does; an ``x`` that needs no gradient, such as the batch
            of images, the compiled backends cast inside the op, so that a training step keeps
            ``x`` itself rather than a cast copy); with ``gain``, the raw weight to standardise, in
            any float dtype (its gradient comes back in that dtype).
        bias: (C_out,) or None.
        stride: the convolution's stride.
        padding: zero padding: an int, ``(pad_h, pad_w)`` or ``(top, bottom, left, right)`` (TF
            'same' padding of the ``dm_`` models).
        groups: the convolution's groups.
        act: None, ``"silu"``, ``"relu"`` or ``"gelu"`` (exact erf form), after the bias.
        act_gain: multiplies the activation (timm's ``GammaAct``).
        pool: first a 2x2, stride-2 average pool with ceil_mode and count_include_pad=False (timm's
            ``DownsampleAvg``); needs a 1x1 kernel, stride 1, no padding and groups 1.
        want_sums: also return the fp32 (N, C_out) sums of the output over its pixels.
        want_out: False (with ``want_sums``): return only those sums; the compiled backends then
            never write the output (nor allocate it), and a training step never holds it. What the
            model's final conv does, whose output the head only averages.
        pre_x: None, or the tensor ``x`` was made from as ``silu(pre_x) * pre_beta`` (an NF block's
            pre-activation, as ``silu_scale`` or ``eca_residual``'s ``a_next`` made it): the compiled
            backends then save ``pre_x`` for the backward instead of ``x`` and recompute ``x`` there,
            so a training step holds one tensor less per block; ``x``'s gradient goes to
            ``pre_x`` (none is returned for ``x``). The reference backend (the specification)
            ignores it. Passing a ``pre_x`` that did not make ``x`` makes the compiled backends'
            gradients wrong.
        pre_beta: the scale of that pre-activation (of ``pre_x``, or of ``x`` with ``pre_act``).
        pre_act: ``x`` is an NF block's input and the conv reads ``silu_scale(x, pre_beta)`` (before
            the pool): the compiled backends apply it as the 1x1 kernel loads ``x``, so the
            pre-activation is never written (other kernel shapes take one ``silu_scale`` pass first),
            and save ``x`` for the backward, which recomputes it. Not with ``pre_x``.
        gain: None, or the conv is a ``ScaledStdConv2d``: the weight used is
            ``scaled_std_weight(weight, gain, std_scale, std_eps)`` (C_out gain values, any shape).
            The compiled backends standardise it in the same launch that packs it for the kernels
            (in training, where no cached standardised weight can serve); gradients reach ``weight``
            and ``gain``.
        std_scale: the standardisation's scale, ``gamma * fan_in ** -0.5``.
        std_eps: added to the variance.
        keep_z: a memory-for-time choice of the compiled backends' training (with ``act``, where
            autograd records the call): the forward also stores the pre-activation
            ``z = conv2d(pool(x), weight) + bias`` (one activation in ``x``'s dtype, held until the
            backward), whose backward then reads it in one elementwise pass instead of recomputing
            it by a second convolution. The same values (in fp32 the same bits; in 16 bits the
            rounded z that timm's own SiLU backward reads). Worth it where the conv costs much per
            output element: ``nfnet_fast.nn`` asks for it where the fan-in is 1024 or more. The
            reference backend ignores it.
        return_z: also return the z that ``keep_z`` kept, as ``(result, z)``: z (not differentiable, the
            tensor the backward reads) where the call kept one, else None (the reference backend, no
            activation, nothing tracked). For a caller that hands z on (``nfnet_fast.nn``'s
            ``NormFreeBlock.inputs_from_z``: the next conv's backward recomputes its input from it).
        return_input: also return the input whose gradient the conv makes (``pre_x`` where given, else
            ``x``), last: ``(result, input)``, or ``(result, z, input)`` with ``return_z``. The same
            values; for a caller that uses the input again (an NF block's shortcut, the next conv's
            ``pre_x``) and uses this tensor there instead. In an eager training call of the compiled
            backends where the input is ``pre_x`` or ``x`` with ``pre_act``, it comes back as a view
            whose gradient, from wherever it is used, returns to this call, whose backward adds it to
            the input's gradient in the SiLU backward's pass: autograd's engine then adds no two
            gradients of the input in a pass of its own (a read of each and a write). Elsewhere it is the
            given tensor itself, and autograd adds its gradients as usual: the same gradients either way
            (in fp32 the same bits; in 16 bits the sum is rounded once instead of twice).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``out`` (N, C_out, H_out, W_out), ``(out, sums)`` with ``want_sums``, or ``sums`` alone
        with ``want_out=False``; with ``return_z``, ``(that, z)``; with ``return_input``, the input
        after them.
    """
    _check_activation(x, "x")
    _check_tensor(weight, "weight", ndim=4)
    _check_same(weight, "weight", x, "x", dtype=gain is None and _library.autocast_dtype(x.device.type) is None)
    cout, cin_g = weight.shape[:2]
    if gain is not None:  # scaled_std_weight's checks
        _check_tensor(gain, "gain")
        _check_same(gain, "gain", weight, "weight")
        if gain.numel() != cout:
            raise ValueError(f"gain must have one value per output channel ({cout}), got shape {tuple(gain.shape)}")
        if weight.numel() == cout:
            raise ValueError(f"weight has a fan-in of 1 (shape {tuple(weight.shape)}): standardisation would zero it")
        _check_number(std_scale, "std_scale")
        _check_number(std_eps, "std_eps")
        if not std_eps > 0:
            raise ValueError(f"std_eps must be > 0, got {std_eps}")
    groups = _check_int(groups, "groups", 1)
    if cout == 0 or x.shape[1] != cin_g * groups or cout % groups:
        raise ValueError(f"weight shape {tuple(weight.shape)} and groups={groups} do not fit x shape {tuple(x.shape)}")
    if bias is not None:
        _check_tensor(bias, "bias", ndim=1)
        _check_same(bias, "bias", x, "x", dtype=False)
        if bias.numel() != cout:
            raise ValueError(f"bias must have one value per output channel ({cout}), got shape {tuple(bias.shape)}")
    stride = _check_int(stride, "stride", 1)
    padding = _padding4(padding)
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    _check_number(act_gain, "act_gain")
    if pool and (weight.shape[2:] != (1, 1) or stride != 1 or any(padding) or groups != 1):
        raise ValueError("pool=True needs a 1x1 kernel, stride 1, no padding and groups 1 (the downsample conv)")
    h, w = x.shape[2:]
    if pool:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h + padding[0] + padding[1] < weight.shape[2] or w + padding[2] + padding[3] < weight.shape[3]:
        raise ValueError(f"x {tuple(x.shape)} is smaller than the kernel {tuple(weight.shape[2:])} with its padding")
    _check_number(pre_beta, "pre_beta")
    if pre_act and pre_x is not None:
        raise ValueError("pre_act=True and pre_x exclude each other: with pre_act, x is the pre-activation's input")
    if not want_out and not want_sums:
        raise ValueError("want_out=False needs want_sums=True: the sums are then the only result")
    if pre_x is not None:
        _check_tensor(pre_x, "pre_x", ndim=4)
        _check_same(pre_x, "pre_x", x, "x", dtype=False)
        if pre_x.shape != x.shape:
            raise ValueError(f"pre_x shape {tuple(pre_x.shape)} must equal x shape {tuple(x.shape)}")
    return _implementation("fused_conv", backend, x, weight, bias, pre_x, gain)(
        x, weight, bias, stride, padding, groups, act, float(act_gain), bool(pool), bool(want_sums), pre_x,
        float(pre_beta), gain, float(std_scale), float(std_eps), bool(pre_act), bool(want_out), bool(keep_z),
        bool(return_z), bool(return_input))


_NOTHING_AHEAD = contextlib.nullcontext()


def _standardised_ahead(convs, x: torch.Tensor):
    """A context for a training forward on ``x`` (nfnet_fast.nn.NormFreeNet): of ``convs``, the
    (weight, gain, scale, eps, backend) of the ScaledStdConv2d layers it is about to run, those whose
    fused_conv runs the Triton kernels on ``x``'s device have their weights standardised now, one
    launch per tile instead of one per conv (nfnet_fast._triton.standardised_ahead: same values).
    A null context where none does, and where the ops would run the reference math anyway."""
    if x.dtype == torch.float64 or torch.compiler.is_compiling() or _needs_reference(x):
        return _NOTHING_AHEAD
    device = x.device
    chosen, triton_runs = [], {}
    for weight, gain, scale, eps, backend in convs:
        runs = triton_runs.get(backend)
        if runs is None:  # (a model's convs share one backend name: resolved once)
            name = resolve_backend(backend, device, "fused_conv")
            # (the cuda backend's fused_conv runs the Triton kernel where triton runs: _cuda.fused_conv)
            runs = triton_runs[backend] = name == "triton" or (
                name == "cuda" and _backends.backends()["triton"].runs_on(device.type))
        if runs:
            chosen.append((weight, gain, scale, eps))
    if not chosen or _backends.op_function("triton", "fused_conv") is None:
        return _NOTHING_AHEAD
    from . import _triton
    return _triton.standardised_ahead(chosen, _library.conv_out_dtype(x))


# The backends, imported here, outside any compiled region (dynamo cannot trace an import): each
# enters its op table in the registry (_backends.register_ops) that this module dispatches
# through; the compiled ones also register their fake kernels and autograd (_library.py).
from . import _reference  # noqa: F401,E402
if _backends.backends()["cuda"].available:
    from . import _cuda  # noqa: F401
if _backends.backends()["triton"].available:  # imports triton (about a second)
    from . import _triton  # noqa: F401
