"""Drop-in modules for timm's NF layers.

Each class subclasses the timm layer it replaces, takes the same constructor arguments (plus
``backend=``), owns the same parameters under the same names, and computes the same function
through :mod:`nfnet_fast.ops`. The modules know nothing of kernels; ``backend`` is passed
through to the ops (``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"``).

``convert`` (see :func:`nfnet_fast.convert`) turns live timm layers into these in place with
:meth:`from_timm`, keeping parameter identity, so optimizers and hooks stay valid.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd import forward_ad
from timm.layers import EcaModule as _TimmEca
from timm.layers import ScaledStdConv2d as _TimmStdConv
from timm.layers import ScaledStdConv2dSame as _TimmStdConvSame
from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool as _TimmFastAvgPool
from timm.layers.adaptive_avgmax_pool import SelectAdaptivePool2d as _TimmSelectPool
from timm.layers.classifier import ClassifierHead as _TimmHead
from timm.layers.padding import get_same_padding, pad_same
from timm.models._manipulate import checkpoint_seq
from timm.models.nfnet import DownsampleAvg as _TimmDownsampleAvg
from timm.models.nfnet import GammaAct as _TimmGammaAct
from timm.models.nfnet import NormFreeBlock as _TimmBlock
from timm.models.nfnet import NormFreeNet as _TimmNet

from . import _library, ops

__all__ = ["ScaledStdConv2d", "ScaledStdConv2dSame", "EcaModule", "NormFreeBlock", "NormFreeStages", "NormFreeStem",
           "NormFreeNet"]


# The ops as torch.fx leaf functions: torch.fx.symbolic_trace and timm's create_feature_extractor
# record one call_function node per op instead of tracing into its argument checks (which branch
# on shapes and dtypes). The modules call the ops through these names only.
def _std_weight(weight, gain, scale: float, eps: float, backend: str):
    return ops.scaled_std_weight(weight, gain, scale, eps, backend=backend)


def _silu_scale(x, beta: float, backend: str):
    return ops.silu_scale(x, beta, backend=backend)


def _eca(x, weight, gain: float, backend: str):
    return ops.eca(x, weight, gain, backend=backend)


def _eca_residual(y, weight, shortcut, alpha: float, attn_gain: float, beta_next: Optional[float], backend: str,
                  sums=None, biases=None):
    return ops.eca_residual(y, weight, shortcut, alpha, attn_gain, beta_next, sums=sums, biases=biases,
                            backend=backend)


def _fused_conv(x, weight, bias, stride: int, padding, groups: int, act: Optional[str], act_gain: float, pool: bool,
                backend: str, want_sums: bool = False, pre_x=None, pre_beta: float = 1.0, gain=None,
                std_scale: float = 1.0, std_eps: float = 0.0, pre_act: bool = False, want_out: bool = True,
                keep_z: bool = False, return_z: bool = False, return_input: bool = False):
    return ops.fused_conv(x, weight, bias, stride=stride, padding=padding, groups=groups, act=act, act_gain=act_gain,
                          pool=pool, want_sums=want_sums, pre_x=pre_x, pre_beta=pre_beta, gain=gain,
                          std_scale=std_scale, std_eps=std_eps, pre_act=pre_act, want_out=want_out, keep_z=keep_z,
                          return_z=return_z, return_input=return_input, backend=backend)


for _name in ("_std_weight", "_silu_scale", "_eca", "_eca_residual", "_fused_conv"):
    torch.fx.wrap(_name)


def _fx_traced(t) -> bool:
    """Whether ``t`` is a torch.fx Proxy (symbolic tracing): no value, dtype or grad flag to look at."""
    return isinstance(t, torch.fx.Proxy)


_NO_SCRIPT = ("nfnet_fast modules cannot be compiled by torch.jit.script (TorchScript is deprecated in PyTorch); "
              "use torch.compile, torch.export or torch.jit.trace, or script the timm model before convert()")


class _FastModule:
    """What every nfnet_fast module shares: a backend name and in-place conversion from timm."""

    backend: str = "auto"
    timm_class: type = nn.Module  # the timm layer this class replaces

    def _fast_init(self, backend: str) -> None:
        ops.check_backend(backend)
        self.backend = backend

    def __prepare_scriptable__(self):  # torch.jit.script calls this on every submodule first
        raise RuntimeError(_NO_SCRIPT)

    @classmethod
    def can_convert(cls, module: nn.Module) -> bool:
        """Whether ``module`` (a timm layer) computes what this class computes."""
        return True

    @classmethod
    def from_timm(cls, module: nn.Module, backend: str = "auto"):
        """Turn a timm layer into this class in place and return it (same object, same parameters).

        Raises:
            TypeError: ``module`` is not a timm layer this class replaces.
        """
        if not isinstance(module, cls.timm_class) or not cls.can_convert(module):
            raise TypeError(f"{cls.__name__}.from_timm cannot convert {type(module).__name__}")
        # Swapping the class keeps every attribute, parameter, buffer and hook of the live module.
        module.__class__ = cls
        module._fast_init(backend)
        return module


def _plain_tensor(t: torch.Tensor) -> bool:
    """A real parameter whose identity, storage and version counter mean something (not an
    inference tensor, a functorch/DTensor/fake wrapper, or a meta tensor)."""
    return (type(t) in (torch.Tensor, nn.Parameter) and t.device.type != "meta" and not t.is_inference()
            and not torch._C._functorch.is_functorch_wrapped_tensor(t))


class _StdWeightCache(_FastModule):
    """Standardised weights, cached while nothing can differentiate through them.

    The cache serves eval-mode calls with autograd off (or no parameter requiring grad). It is
    keyed on the very weight and gain tensors (identity, storage, version counter, dtype, device)
    and on scale, eps and backend, so in-place edits, ``.to()``, ``load_state_dict`` (also with
    ``assign=True``) and temporary weights (``torch.func.functional_call``, parametrizations)
    are seen. It is dropped by ``.train()``/``.eval()`` and by any call that computes the weights
    afresh (training, a forward with gradients: what may precede an optimizer step, even a fused
    one that leaves the version counter alone). Edits through ``.data`` bypass PyTorch's version
    counter: call ``.eval()`` (or :meth:`clear_cache`) after them. Tracing, compiling and
    functorch transforms never use the cache. It is not pickled or deep-copied.

    The cached weight is laid out as the fused convolution's packed operand (a view
    ``packed.permute(3, 2, 0, 1)`` of a contiguous (kh, kw, C_in/groups, C_out) tensor: same
    values, other strides), and under autocast its cast to the autocast dtype is cached too, so an
    eval forward on the compiled backends neither casts nor packs any weight.
    """

    def _fast_init(self, backend: str) -> None:
        super()._fast_init(backend)
        self._std_cache = None

    def clear_cache(self) -> None:
        """Forget the cached standardised weight."""
        self._std_cache = None

    def train(self, mode: bool = True):
        self.clear_cache()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # pickle and deepcopy: the cache is derived data (and holds weakrefs)
        state = super().__getstate__()
        return {**state, "_std_cache": None}

    def _cache_key(self):
        """The key of the cached weight, or None where no cache may serve (see the class doc)."""
        w, g = self.weight, self.gain
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or _fx_traced(w):
            return None
        differentiable = torch.is_grad_enabled() and (w.requires_grad or g.requires_grad)
        if self.training or differentiable or not (_plain_tensor(w) and _plain_tensor(g)):
            if self._std_cache is not None:  # (Module.__setattr__ costs host time on every training call)
                self._std_cache = None
            return None
        return (w._version, g._version, w.data_ptr(), g.data_ptr(), w.device, w.dtype, self.scale, self.eps,
                self.backend)

    def _cached_weight(self, key, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The cached standardised weight for ``key`` (computed if stale), in ``dtype`` if given."""
        w, g = self.weight, self.gain
        cache = self._std_cache
        if cache is None or cache[0] != key or cache[1]() is not w or cache[2]() is not g:
            # A normal tensor even inside inference_mode, so it can serve later autograd-free calls anywhere.
            with torch.inference_mode(False), torch.no_grad():
                value = _std_weight(w, g, self.scale, self.eps, self.backend)
                if value.dim() == 4:  # the fused conv's packed layout (see the class doc)
                    value = value.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)
            cache = self._std_cache = (key, weakref.ref(w), weakref.ref(g), value, {})
        value, casts = cache[3], cache[4]
        if dtype is None or dtype == value.dtype:
            return value
        if dtype not in casts:
            with torch.inference_mode(False), torch.no_grad():
                casts[dtype] = value.to(dtype)  # (keeps the packed strides)
        return casts[dtype]

    def standardized_weight(self) -> torch.Tensor:
        """The conv's effective weight: ``(w - mean) / sqrt(var + eps) * gain * scale`` per output channel."""
        key = self._cache_key()
        if key is None:
            return _std_weight(self.weight, self.gain, self.scale, self.eps, self.backend)
        return self._cached_weight(key)


# A training conv with an activation keeps its pre-activation z for the backward (ops.fused_conv's keep_z)
# where its fan-in, the multiply-adds per element of z that recomputing z costs, is at least this: then one
# element held saves >= 1024 MACs of the backward's GEMM (eca_nfnet_l0: the 1536-wide 1x1 convs of stages 3-4
# and the final conv, 0.92 of the 2.60 G MACs an image at 224 px that the backward would recompute, for
# 1.2 MiB a sample; the grouped 3x3s, 576, and the narrower 1x1s stay recomputed: docs/design.md section 5).
KEEP_Z_FAN_IN = 1024


class _FusedConv(_StdWeightCache):
    """A standardised conv that runs as ``ops.fused_conv``: its bias in the epilogue, and, when the
    caller fuses them (:meth:`fused`), the activation after it or the 2x2 pool before it.

    ``keep_z``: in training, whether a fused activation's pre-activation is kept for the backward
    instead of recomputed there (``ops.fused_conv``'s ``keep_z``); None (the default) decides by the
    fan-in (``KEEP_Z_FAN_IN``). A class attribute: set it on an instance to override."""

    keep_z: Optional[bool] = None

    @property
    def fan_in(self) -> int:
        """Multiply-adds per output element (``C_in / groups * kh * kw``): what recomputing one element of
        the pre-activation costs the backward (``KEEP_Z_FAN_IN``)."""
        return self.weight.shape[1:].numel()

    def _keeps_z(self) -> bool:
        if self.keep_z is not None:
            return bool(self.keep_z)
        return self.fan_in >= KEEP_Z_FAN_IN

    def _padding4(self, x: torch.Tensor):
        """(top, bottom, left, right), or None where the fused op does not apply (string padding
        modes other than 'same' handled below, dilation, unequal strides, non-zero padding modes)."""
        if self.dilation != (1, 1) or self.stride[0] != self.stride[1] or self.padding_mode != "zeros" \
                or isinstance(self.padding, str):
            return None
        return self.padding[0], self.padding[0], self.padding[1], self.padding[1]

    def fused(self, x: torch.Tensor, act: Optional[str] = None, act_gain: float = 1.0,
              pool: bool = False, want_sums: bool = False, pre: Optional[Tuple[torch.Tensor, float]] = None,
              pre_act: Optional[float] = None, want_out: bool = True, recipe: bool = False,
              links: Optional[_InputsFromZ] = None, return_input: bool = False, bias_elsewhere: bool = False):
        """``act(self(pool(x))) * act_gain`` in one op where it applies, else as timm computes it.
        With ``want_sums``, ``(out, sums)``: the fp32 (N, C) sums of ``out`` over its pixels from
        the op's epilogue, or None where the op does not apply (the caller then pools); with
        ``want_out=False`` too, ``out`` is None where the op applies (it never writes it).
        ``pre``: ``(pre_x, beta)`` when ``x`` is ``silu(pre_x) * beta``; ``pre_act``: ``beta`` when
        the conv's input is ``silu(x) * beta``, applied as the op loads ``x`` (see ``ops.fused_conv``).
        ``recipe``: ``(result, args)``, ``args`` the arguments of the op's call (the exact tensors it
        got: ``_fused_conv(*args)`` recomputes the op's result), or None where the op does not apply.
        ``links``: where the op keeps the SiLU's pre-activation z, ``links.add`` is told that the output
        is ``silu(z) * act_gain`` (NormFreeBlock.inputs_from_z). ``return_input`` (not with ``recipe``):
        ``(result, input)``, the input whose gradient the conv makes (``pre_x``, else ``x``) as
        ``ops.fused_conv``'s ``return_input`` returns it, for the caller's other uses of it
        (NormFreeBlock.input_grads_in_conv). ``bias_elsewhere``: where the op applies (:meth:`bias_fuses`), it adds
        the bias detached, its gradient the caller's to make (NormFreeBlock.bias_grads_in_eca); elsewhere timm's
        forward adds it with its gradient, as always."""
        padding = self._padding4(x)
        given = _input_of(x, pre)
        if padding is None:
            if pre_act is not None:
                x = _silu_scale(x, pre_act, self.backend)
            if pool:
                x = F.avg_pool2d(x, 2, 2, ceil_mode=True, count_include_pad=False)
            out = self._timm_forward(x)
            if act is not None:
                out = ops_act(act)(out)
            out = out * act_gain if act_gain != 1.0 else out
            result = (out, None) if want_sums else out
            return (result, None) if recipe else (result, given) if return_input else result
        pre_x, pre_beta = pre if pre is not None else (None, 1.0 if pre_act is None else pre_act)
        key = self._cache_key()
        bias = self.bias.detach() if bias_elsewhere and self.bias is not None else self.bias
        if key is None:  # training (or tracing): the op standardises the raw weight as it packs it
            args = (x, self.weight, bias, self.stride[0], padding, self.groups, act, act_gain, pool,
                    self.backend, want_sums, pre_x, pre_beta, self.gain, self.scale, self.eps,
                    pre_act is not None, want_out, act is not None and self._keeps_z())
        else:
            weight = self._cached_weight(key, _library.autocast_dtype(x.device.type))
            args = (x, weight, bias, self.stride[0], padding, self.groups, act, act_gain, pool,
                    self.backend, want_sums, pre_x, pre_beta, None, 1.0, 0.0, pre_act is not None, want_out)
        if links is not None and key is None and act == "silu" and args[-1]:  # (args[-1]: keep_z)
            res, z, *returned = _fused_conv(*args, return_z=True, return_input=return_input)
            given = returned[0] if return_input else given
            links.add(res, z, act_gain)
        elif return_input:
            res, given = _fused_conv(*args, return_input=True)
        else:
            res = _fused_conv(*args)
        result = res if want_out else (None, res)
        if return_input:
            return result, given
        return (result, args) if recipe else result  # (args: the same call again recomputes res)

    def bias_fuses(self, x: torch.Tensor) -> bool:
        """Whether :meth:`fused` on ``x`` adds a bias in its op (so that ``bias_elsewhere`` detaches it)."""
        return self.bias is not None and self._padding4(x) is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)


class ScaledStdConv2d(_FusedConv, _TimmStdConv):
    """timm's ``ScaledStdConv2d`` (scaled weight standardisation) with a cached standardised weight,
    run as one fused op (conv and bias; with the neighbouring activation or pool when a block asks).

    Args are timm's (in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
    bias, gamma, eps, gain_init, device, dtype), plus ``backend`` for the ops.
    """

    timm_class = _TimmStdConv

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._fast_init(backend)

    def _timm_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class ScaledStdConv2dSame(_FusedConv, _TimmStdConvSame):
    """timm's ``ScaledStdConv2dSame`` (TF 'SAME' padding) with a cached standardised weight, the
    padding passed to the fused op as (top, bottom, left, right)."""

    timm_class = _TimmStdConvSame

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._fast_init(backend)

    def _padding4(self, x: torch.Tensor):
        if not self.same_pad:
            return super()._padding4(x)
        if self.dilation != (1, 1) or self.stride[0] != self.stride[1] or _fx_traced(x):
            return None  # (symbolic tracing: no sizes to compute the padding from)
        pad_h = get_same_padding(x.shape[-2], self.kernel_size[0], self.stride[0], self.dilation[0])
        pad_w = get_same_padding(x.shape[-1], self.kernel_size[1], self.stride[1], self.dilation[1])
        return pad_h // 2, pad_h - pad_h // 2, pad_w // 2, pad_w - pad_w // 2

    def _timm_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


def ops_act(act: str):
    """The activation function of ``ops.fused_conv``'s ``act`` name."""
    return {"silu": F.silu, "relu": F.relu, "gelu": F.gelu}[act]


def _act_spec(m: Optional[nn.Module]):
    """``(act, act_gain)`` for ops.fused_conv when ``m`` is an activation it computes, else None."""
    if _is_silu(m):
        return "silu", 1.0
    if isinstance(m, nn.ReLU):
        return "relu", 1.0
    if isinstance(m, nn.GELU) and m.approximate == "none" or (type(m).__name__ == "GELU"
                                                             and "timm" in type(m).__module__):
        return "gelu", 1.0
    if isinstance(m, _TimmGammaAct):
        name = getattr(m.act_fn, "__name__", "")
        act = {"silu": "silu", "swish": "silu", "relu": "relu", "gelu": "gelu"}.get(name)
        return (act, float(m.gamma)) if act is not None else None
    return None


def _input_of(x: torch.Tensor, pre) -> torch.Tensor:
    """The input whose gradient a conv reading ``x`` makes: ``pre_x`` where ``pre = (pre_x, beta)`` made x,
    else x (what ``return_input`` returns where no op returns it)."""
    return pre[0] if pre is not None else x


def _conv_act_fuses(conv: nn.Module, act: nn.Module) -> bool:
    """Whether :func:`_conv_act` runs ``act(conv(.))`` as one fused op."""
    return _act_spec(act) is not None and isinstance(conv, _FusedConv) and not _hooked(conv) and not _hooked(act)


def _conv_act(conv: nn.Module, x: torch.Tensor, act: nn.Module, pre=None, pre_act=None, links=None,
              return_input: bool = False):
    """``act(conv(x))``, as one fused op when the conv is ours, the activation one it computes, and
    neither carries hooks (those must see their module called). ``pre``, ``pre_act``, ``links``,
    ``return_input``: see _FusedConv.fused (``pre_act`` only where it fuses; unfused, ``return_input``
    returns the given input itself)."""
    if not _conv_act_fuses(conv, act):
        out = act(conv(x))
        return (out, _input_of(x, pre)) if return_input else out
    spec = _act_spec(act)
    return conv.fused(x, act=spec[0], act_gain=spec[1], pre=pre, pre_act=pre_act, links=links,
                      return_input=return_input)


def _downsample_pool(ds: nn.Module) -> Optional[bool]:
    """For a timm DownsampleAvg that fuses into one op: whether it pools first; else None."""
    pool = ds.pool
    pooled = (isinstance(pool, nn.AvgPool2d) and pool.kernel_size in (2, (2, 2)) and pool.stride in (2, (2, 2))
              and pool.ceil_mode and not pool.count_include_pad and pool.padding in (0, (0, 0))
              and pool.divisor_override is None)
    fusable = (isinstance(ds, _TimmDownsampleAvg) and isinstance(ds.conv, _FusedConv) and ds.conv.kernel_size == (1, 1)
               and (pooled or isinstance(pool, nn.Identity)) and not any(_hooked(m) for m in (ds, pool, ds.conv)))
    return pooled if fusable else None


def _downsample(ds: nn.Module, x: torch.Tensor, pre=None, pre_act=None, return_input: bool = False,
                bias_elsewhere: bool = False) -> torch.Tensor:
    """timm's DownsampleAvg (2x2 ceil-mode average pool, then a 1x1 conv) as one fused op
    (``pre_act`` only where it fuses; ``return_input``, ``bias_elsewhere``: see _FusedConv.fused)."""
    pooled = _downsample_pool(ds)
    if pooled is not None:
        return ds.conv.fused(x, pool=pooled, pre=pre, pre_act=pre_act, return_input=return_input,
                             bias_elsewhere=bias_elsewhere)
    return (ds(x), _input_of(x, pre)) if return_input else ds(x)


def _is_sigmoid(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.Sigmoid) or (type(m).__name__ == "Sigmoid" and "timm" in type(m).__module__)


def _is_silu(m: Optional[nn.Module]) -> bool:
    return isinstance(m, nn.SiLU) or (type(m).__name__ in ("Swish", "SwishMe") and "timm" in type(m).__module__)


class EcaModule(_FastModule, _TimmEca):
    """timm's ``EcaModule`` (sigmoid gate, no MLP): ``x * sigmoid(conv1d(mean_hw(x)))`` as one op.

    Args are timm's (channels, kernel_size, gamma, beta, ...), plus ``backend``. The MLP variant
    and other gates are not fused: ``from_timm`` refuses them and ``convert`` leaves them as they are.
    """

    timm_class = _TimmEca

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        if not self.can_convert(self):
            raise ValueError("nfnet_fast.nn.EcaModule supports the sigmoid gate without MLP only")
        self._fast_init(backend)

    @classmethod
    def can_convert(cls, module: nn.Module) -> bool:
        return module.conv2 is None and module.conv.bias is None and _is_sigmoid(module.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _eca(x, self.conv.weight, 1.0, self.backend)


class NormFreeBlock(_FastModule, _TimmBlock):
    """timm's ``NormFreeBlock`` with fused pre-activation and fused ECA-residual tail.

    ``silu(x) * beta`` runs as one op (when the activation is SiLU); when the block ends in ECA with
    no skipinit and no active drop-path, the tail ``alpha * attn_gain * eca(y) + shortcut`` runs as
    one op, which can also emit the next block's pre-activation (see :class:`NormFreeStages`).
    Any other configuration runs timm's own computation with nfnet_fast's convs.
    """

    timm_class = _TimmBlock
    # The SiLU prologue (``nfnet_fast.convert(..., silu_prologue=True)``): conv1 and the downsample
    # conv read ``silu(x) * beta`` as they load the block input x, so no pass writes the
    # pre-activation (the previous block's eca_residual writes x_next only). Off by default: it
    # trades one activation write per block for a SiLU per element and column tile, a trade only
    # a GPU measurement decides (docs/design.md section 5).
    silu_prologue = False
    # In eager training the tail's input y (conv3's output, the block's widest activation) is not
    # kept for eca_residual's backward: that backward recomputes it from conv3's input, which conv3's
    # own backward keeps anyway (_saved_as_recompute). eca_nfnet_l0 at batch 128, 224 px, bf16: 931 MB
    # a step less held, for one more conv3 forward per block in the backward (22% of the forward's
    # conv MACs: 0.93 of 4.24 G an image at 224 px). False keeps y.
    recompute_tail_input = True
    # A policy for a GPU measurement to choose (docs/triton-training-step.md section 16), off by default:
    # in eager training, where conv1, conv2 or conv2b keeps its pre-activation z (keep_z), the conv after
    # it holds that z for its backward in place of its own input silu(z) * gain, and its backward makes
    # the input again (one silu_scale pass) where it needs it: the link costs no memory, so the grouped
    # 3x3s can keep z (no recompute GEMM in their backward) at about today's peak (_InputsFromZ).
    inputs_from_z = False
    # A policy for a GPU measurement to choose (docs/triton-training-step.md section 17), off by default: the
    # block input x's two gradients (from conv1 and from the shortcut; at a stage's first block from conv1 and
    # the downsample conv) are summed in a conv's backward, in the SiLU backward's pass that makes x's gradient
    # (one more read), instead of by autograd's engine (a pass of its own: a read of each and a write).
    # eca_nfnet_l0 at batch 128, 224 px, bf16: 12 adds, ~2.0 GB of traffic a step less. In eager autograd only
    # (fused_conv's return_input); the same gradients (in fp32 the same bits).
    input_grads_in_conv = False
    # A policy for a GPU measurement to choose (docs/triton-training-step.md section 18), off by default: in eager
    # training the biases of conv3 and of the downsample conv, added last to the ECA tail's inputs y and shortcut,
    # get their gradients from eca_residual's backward (ops.eca_residual's ``biases``), whose reduction reads the
    # shortcut's gradient anyway, instead of a sum over each gradient in the convs' backwards (activation-sized
    # passes: eca_nfnet_l0 at batch 128, 224 px, bf16, 16 of them, ~1.5 GB of reads a step).
    bias_grads_in_eca = False

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._fast_init(backend)

    @property
    def silu_preact(self) -> bool:
        """True when the pre-activation is ``silu(x) * beta`` (so it can be fused)."""
        return _is_silu(self.act1)

    def prologue_fuses(self) -> bool:
        """Whether this block's convs apply its pre-activation as they load x (the SiLU prologue is
        on, the pre-activation is ``silu(x) * beta`` and every conv reading it fuses)."""
        return (self.silu_prologue and self.silu_preact and _conv_act_fuses(self.conv1, self.act2)
                and (self.downsample is None or _downsample_pool(self.downsample) is not None))

    def _fused_tail(self) -> bool:
        return (isinstance(self.attn_last, EcaModule) and self.skipinit_gain is None
                and (isinstance(self.drop_path, nn.Identity) or not self.training))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """``act1(x) * beta``, the input of conv1 and of the downsample shortcut."""
        if self.silu_preact:
            return _silu_scale(x, self.beta, self.backend)
        return self.act1(x) * self.beta

    def forward_fused(self, x: torch.Tensor, a: Optional[torch.Tensor] = None,
                      beta_next: Optional[float] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The block on ``x``, given its pre-activation ``a`` when already computed.

        Args:
            x: block input.
            a: ``self.pre_activation(x)`` if the previous op already produced it, else None.
            beta_next: the next block's beta when its pre-activation is ``silu(x) * beta``.

        Returns:
            ``(x_next, a_next)``: ``a_next = silu(x_next) * beta_next`` when it came out of the fused
            tail, else None (the next block then computes its own).
        """
        pre_act = None
        if a is None and not _fx_traced(x) and self.prologue_fuses():
            a, pre, pre_act = x, None, self.beta  # the convs read silu(x) * beta as they load x
        else:
            if a is None:
                a = self.pre_activation(x)
            # a = silu(x) * beta: the convs reading a save x (kept anyway as the shortcut or the
            # downsample's input) for their backward instead of a, and recompute a there
            pre = (x, self.beta) if self.silu_preact and not _fx_traced(x) else None
        # input_grads_in_conv: the conv that reads x (as pre_x, or with pre_act) first returns it through its
        # node (ops.fused_conv's return_input), and the block's other use of x takes that tensor: the downsample
        # conv's backward sums conv1's gradient of x into its own, or conv1's the shortcut's
        handing = self.input_grads_in_conv and (pre is not None or pre_act is not None) and not _fx_traced(x)
        # bias_grads_in_eca: the biases whose gradients eca_residual makes, (conv3's, the downsample conv's) where
        # their ops add them (detached), else None
        biases = self._biases_to_eca(x, a)
        ds_bias_elsewhere = biases is not None and biases[1] is not None
        shortcut = x
        if self.downsample is not None and handing:
            shortcut, given = _downsample(self.downsample, a, pre, pre_act, return_input=True,
                                          bias_elsewhere=ds_bias_elsewhere)
            a, pre = (given, None) if pre is None else (a, (given, pre[1]))
        elif self.downsample is not None:
            shortcut = _downsample(self.downsample, a, pre, pre_act, bias_elsewhere=ds_bias_elsewhere)
        links = _InputsFromZ.for_block(self, x)
        # timm: conv2(act2(conv1(a))), then conv2b(act2b(.)), attn, conv3(act3(.)); each activation
        # runs in the epilogue of the conv before it
        out = _conv_act(self.conv1, a, self.act2, pre, pre_act, links,
                        return_input=handing and self.downsample is None)
        if handing and self.downsample is None:
            out, shortcut = out
        with links.hooks() if links is not None else contextlib.nullcontext():
            return self._forward_after_conv1(out, shortcut, beta_next, links, biases)

    def _biases_to_eca(self, x: torch.Tensor, a: torch.Tensor):
        """For bias_grads_in_eca, ``(conv3's bias, the downsample conv's bias or None)``, the biases whose ops add
        them detached in this call and whose gradients eca_residual makes, or None where the policy is off or
        does not apply: the fused tail with conv3's sums (an eager training call on a compiled backend, conv3
        tracked, its bias added by its op). Not where the tail will not fuse for want of one dtype (an fp32 block
        input, which is the shortcut, under autocast): plain autograd would then sum the bias's gradient in the
        autocast dtype."""
        if not (self.bias_grads_in_eca and self._fused_tail() and isinstance(self.conv3, _FusedConv)
                and not _hooked(self.conv3) and not _fx_traced(x) and self.conv3.bias is not None
                and self.conv3.bias.requires_grad and self.conv3.bias_fuses(x)
                and (self.downsample is not None or _library.conv_out_dtype(x) == x.dtype)
                and _eager_saving_hooks_apply(x.device, self.backend, "eca_residual")):
            return None
        ds = self.downsample
        ds_fuses = (ds is not None and _downsample_pool(ds) is not None and ds.conv.bias_fuses(a)
                    and ds.conv.bias.requires_grad)
        return self.conv3.bias, ds.conv.bias if ds_fuses else None

    def _forward_after_conv1(self, out, shortcut, beta_next, links, biases=None):
        """forward_fused from conv1's output ``out`` on (see there)."""
        if self.conv2b is not None:
            out = _conv_act(self.conv2, out, self.act2b, links=links)
        last = self.conv2b if self.conv2b is not None else self.conv2
        if self.attn is not None:
            out = self.act3(self.attn_gain * self.attn(last(out)))
        else:
            out = _conv_act(last, out, self.act3, links=links)
        sums, saving = None, contextlib.nullcontext()
        if (self._fused_tail() and isinstance(self.conv3, _FusedConv) and not _hooked(self.conv3)
                and not _fx_traced(out)):
            # conv3's epilogue also sums its output per channel: ECA's pooling without reading it again
            (out, sums), args = self.conv3.fused(out, want_sums=True, recipe=True, bias_elsewhere=biases is not None)
            if args is None and biases is not None:  # (timm's forward ran: it added the bias with its gradient)
                biases = (None, biases[1])
            if args is not None and self.recompute_tail_input and _may_recompute(out, self.backend):
                saving = _saved_as_recompute(out, args)
        else:
            out = self.conv3(out)
        # (a block called on an fp32 input under autocast has a bf16 branch and an fp32 shortcut:
        # timm's tail promotes, the fused op wants one dtype)
        if self._fused_tail() and (_fx_traced(out) or out.dtype == shortcut.dtype):
            with saving:
                return self._fused_tail_call(out, shortcut, sums, beta_next, biases)
        if biases is not None:  # (the detached biases' gradients through plain autograd, as eca_residual's fallback)
            out, shortcut = _library.through_bias(out, biases[0]), _library.through_bias(shortcut, biases[1])
        if self.attn_last is not None:
            out = self.attn_gain * self.attn_last(out)
        out = self.drop_path(out)
        if self.skipinit_gain is not None:
            out = out * self.skipinit_gain
        return out * self.alpha + shortcut, None

    def _fused_tail_call(self, out, shortcut, sums, beta_next, biases=None):
        """``(x_next, a_next)`` of the fused tail, eca_residual on conv3's output ``out`` (``biases``: see
        _biases_to_eca)."""
        if beta_next is not None and torch.is_grad_enabled() and not _fx_traced(out) and (
                out.requires_grad or shortcut.requires_grad):
            # Training: the next block's convs send a_next's gradient to x_next themselves
            # (pre_x), so eca_residual must not save the shortcut for an a_next gradient that
            # never comes (a whole activation at each stage's first block: its downsample's
            # output); a_next is one silu_scale pass instead (one more read of x_next).
            x_next = _eca_residual(out, self.attn_last.conv.weight, shortcut, self.alpha, self.attn_gain, None,
                                   self.backend, sums, biases)
            return x_next, _silu_scale(x_next, beta_next, self.backend)
        res = _eca_residual(out, self.attn_last.conv.weight, shortcut, self.alpha, self.attn_gain, beta_next,
                            self.backend, sums, biases)
        return (res[0], res[1]) if beta_next is not None else (res, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fused(x)[0]


def _eager_saving_hooks_apply(device: torch.device, backend: str, op: str) -> bool:
    """Whether the block's own saved-tensor hooks may act in a call on ``device``: eager autograd with
    gradients, saved-tensor hooks enabled, no functorch transform, export or trace (which see plain
    autograd only), and ``op`` on a compiled backend."""
    return (torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not torch.compiler.is_exporting() and not torch.jit.is_tracing()
            and torch._C._functorch.peek_interpreter_stack() is None
            and torch._C._autograd._saved_tensors_hooks_is_enabled()
            and ops.resolve_backend(backend, device, op) != "reference")


def _may_recompute(y: torch.Tensor, backend: str) -> bool:
    """Whether a training forward may save ``y`` as its recipe (_saved_as_recompute)."""
    return y.requires_grad and _eager_saving_hooks_apply(y.device, backend, "eca_residual")


class _VersionedSave(NamedTuple):
    """A tensor saved through :func:`_saved_as_recompute`'s or :class:`_InputsFromZ`'s hooks, and its
    version when saved."""
    tensor: torch.Tensor
    version: int


def _unpack_versioned(saved: _VersionedSave, who: str) -> torch.Tensor:
    """``saved.tensor``, refused as autograd refuses a saved tensor changed in place since."""
    if saved.tensor._version != saved.version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: a {saved.tensor.dtype} tensor of shape {tuple(saved.tensor.shape)} that {who} saved is "
            f"at version {saved.tensor._version}, it was saved at version {saved.version}")
    return saved.tensor


class _FromZ:
    """What autograd holds, under :class:`_InputsFromZ`'s hooks, in place of a conv's input
    ``h = silu(z) * gain``: the pre-activation z, which the conv that made h keeps for its own backward
    anyway, and how to make h again."""

    __slots__ = ("z", "version", "gain", "backend", "packs", "unpacks", "h")

    def __init__(self, z: torch.Tensor, gain: float, backend: str):
        self.z, self.version, self.gain, self.backend = z, z._version, gain, backend
        self.packs, self.unpacks, self.h = 0, 0, None

    def unpack(self) -> torch.Tensor:
        if self.z._version != self.version:
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                               "inplace operation: the pre-activation z from which the backward recomputes the "
                               f"next conv's input (at version {self.z._version}, kept at version {self.version})")
        h = self.h
        if h is None:  # (the forward's autocast state is irrelevant: silu_scale keeps z's dtype)
            with torch.no_grad():
                h = _silu_scale(self.z, self.gain, self.backend)
        # Each tensor that saved h unpacks it once a backward (conv3's input: conv3's backward, and the ECA
        # tail's recompute of y just before it): h is made once and held until the last of them.
        self.unpacks += 1
        if self.unpacks >= self.packs:
            self.h, self.unpacks = None, 0
        else:
            self.h = h
        return h


def _unpack_from_z(saved) -> torch.Tensor:
    return saved.unpack() if isinstance(saved, _FromZ) else _unpack_versioned(saved, "a block's conv")


class _InputsFromZ:
    """NormFreeBlock.inputs_from_z for one eager training call of a block: ``add(h, z, gain)`` tells that
    a conv's output ``h`` is ``silu(z) * gain`` with ``z`` the pre-activation that conv kept (keep_z);
    under :meth:`hooks`, autograd then saves a :class:`_FromZ` wherever it would save ``h`` (the next
    conv's input, and the ECA tail's recipe of conv3's output), so that nothing holds ``h`` after the
    forward. In fp32 the remade ``h`` equals the forward's to rounding (the fused conv's epilogue and
    silu_scale compute the same formula); in 16 bits it is made from the rounded z and may differ from
    the forward's rounded ``h`` in the last bit: the next conv's weight gradient reads it."""

    def __init__(self, backend: str):
        self.backend = backend
        self.links = {}  # h.data_ptr() -> (weakref to h, its _FromZ)

    @staticmethod
    def for_block(block: "NormFreeBlock", x) -> Optional["_InputsFromZ"]:
        """The links of one call of ``block`` on ``x``, or None where they do not apply: the block's
        ``inputs_from_z`` is off, or the call is not eager autograd on a compiled backend (a trace,
        export, torch.func, no gradients), or other saved-tensor hooks are set (checkpointing,
        save_on_cpu: z, saved through them, may no longer be the tensor that the conv keeps)."""
        if (block.inputs_from_z and not _fx_traced(x)
                and _eager_saving_hooks_apply(x.device, block.backend, "fused_conv")
                and torch._C._autograd._top_saved_tensors_default_hooks(False) is None):
            return _InputsFromZ(block.backend)
        return None

    def add(self, h: torch.Tensor, z: Optional[torch.Tensor], gain: float) -> None:
        if z is not None and h.requires_grad and h.numel():
            self.links[h.data_ptr()] = (weakref.ref(h), _FromZ(z, gain, self.backend))

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        links = self.links

        def pack(t):
            link = links.get(t.data_ptr()) if t.numel() else None
            if link is not None:
                h = link[0]()
                if (h is not None and t.shape == h.shape and t.stride() == h.stride() and t.dtype == h.dtype
                        and t.device == h.device):
                    link[1].packs += 1
                    return link[1]
            # (detached, with its version: as _saved_as_recompute's pack, for the same reasons)
            return _VersionedSave(t.detach(), t._version)
        return torch.autograd.graph.saved_tensors_hooks(pack, _unpack_from_z)


def _saved_as_recompute(y: torch.Tensor, args: tuple) -> torch.autograd.graph.saved_tensors_hooks:
    """Saved-tensor hooks under which autograd keeps ``y``, the result of ``_fused_conv(*args)`` (the
    exact tensors that call got), as that call, made again without gradients under the autocast state
    of now when the backward unpacks it: the same kernels on the same inputs, so the same bits where the
    forward's tile choice was final (every call but a first one inside a CUDA graph capture; a shape
    that autotuning gave to cuDNN gets whatever engine cuDNN takes). The conv's input is packed through
    the hooks active before these (torch.utils.checkpoint's, save_on_cpu's, a memory count's), as are
    all other saved tensors, so they free or offload it as they would; without such hooks it is held
    as it is, as the conv's own backward holds it anyway. Like autograd, the unpacking refuses
    tensors of the call modified in place since."""
    device, amp = y.device.type, _library.autocast_dtype(y.device.type)
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)
    outer_pack, outer_unpack = outer if outer is not None else (None, None)
    target = weakref.ref(y)  # (autograd keeps the pack hook with what it packed: no reference to y)
    recipe = object()  # what autograd holds in place of y (one per call: never another scope's)
    x, rest = args[0], args[1:]
    x_packed = x if outer_pack is None else outer_pack(x)
    tensors = [t for t in rest if isinstance(t, torch.Tensor)] + ([x] if outer_pack is None else [])
    versions = [t._version for t in tensors]
    # with a gain, the recompute reads the standardised weight the forward made, which conv3's own
    # node holds for its backward anyway: no standardisation launch, and the GEMM reads the very
    # operand the forward read (the same tile, so the same bits). (Under outer hooks its saved
    # tensors are theirs to unpack: the raw weight is standardised again then.)
    std = _library.fused_conv_std_weight(y) if outer_pack is None and args[13] is not None else None
    if std is not None:  # (_fused_conv's arguments: weight 1, gain 13, its scale and eps 14-15)
        rest = (std.permute(3, 2, 0, 1), *rest[1:12], None, 1.0, 0.0, *rest[15:])

    def pack(t):
        if t is target():
            return recipe
        if outer_pack is not None:
            return outer_pack(t)
        # (detached: a node that saves its own output would otherwise hold it in a cycle through C++
        # that the collector never frees, leaking a forward that is dropped without its backward; with
        # its version, since autograd checks none of what hooks pack, and a detached tensor shares its
        # version counter: an in-place change of, say, ECA's weight before the backward is refused)
        return _VersionedSave(t.detach(), t._version)

    def unpack(saved):
        if saved is not recipe:
            if outer_unpack is not None:
                return outer_unpack(saved)
            return _unpack_versioned(saved, "the block's ECA tail")
        if any(t._version != v for t, v in zip(tensors, versions)):
            raise RuntimeError("one of the variables needed for gradient computation has been modified by an "
                               "inplace operation: conv3's input, weight, gain or bias, from which the backward "
                               "recomputes the block's ECA input")
        xin = x_packed if outer_unpack is None else outer_unpack(x_packed)
        with torch.no_grad(), torch.autocast(device, dtype=amp, enabled=amp is not None):
            return _fused_conv(xin, *rest)[0]
    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _global_hooks() -> bool:
    from torch.nn.modules import module as _m
    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks
                or _m._global_backward_pre_hooks)


# exact timm type -> nfnet_fast replacement, from each class's timm_class (subclasses of timm layers
# are left alone by convert(): they may compute something else)
REPLACEMENTS = {cls.timm_class: cls for cls in (ScaledStdConv2d, ScaledStdConv2dSame, EcaModule, NormFreeBlock)}


class NormFreeStages(nn.Sequential):
    """``model.stages`` (a Sequential of stage Sequentials of blocks), run so that each block's fused
    tail also writes the next block's pre-activation, across stage boundaries too.

    Children and state_dict keys are timm's (``stages.<i>.<j>...``); each stage still runs on its
    own (timm's ``forward_intermediates``, grad checkpointing, ``features_only``). When any stage or
    block carries hooks (or global module hooks are set), or a block is not exactly nfnet_fast's
    (FSDP's wrappers subclass it), or torch.fx traces the model, the stages run module by module, so
    every hook fires and every module call is seen as in timm.
    """

    def __prepare_scriptable__(self):
        raise RuntimeError(_NO_SCRIPT)

    def _fusable(self) -> bool:
        if _global_hooks():
            return False
        for stage in self:
            if type(stage) is not nn.Sequential or _hooked(stage):
                return False
            if any(type(blk) is not NormFreeBlock or _hooked(blk) for blk in stage):
                return False
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (symbolic tracing, too: feature extraction names nodes after the stage modules it sees called)
        if _fx_traced(x) or not self._fusable():
            for stage in self:
                x = stage(x)
            return x
        blocks = [blk for stage in self for blk in stage]
        a = None
        for i, blk in enumerate(blocks):
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            # (a block with the SiLU prologue reads x itself: no a_next written for it)
            wants_a = nxt is not None and nxt.silu_preact and not nxt.prologue_fuses()
            x, a = blk.forward_fused(x, a, nxt.beta if wants_a else None)
        return x


class NormFreeStem(nn.Sequential):
    """``model.stem`` (timm's Sequential of convs and activations: conv1, act2, conv2, ... ) run so
    that each activation is the epilogue of the conv before it. Children and state_dict keys are
    timm's; a conv or activation with hooks (or torch.fx tracing) runs as its own module call."""

    def __prepare_scriptable__(self):
        raise RuntimeError(_NO_SCRIPT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = list(self)
        traced = _fx_traced(x) or _global_hooks()
        i = 0
        while i < len(mods):
            m = mods[i]
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            if not traced and nxt is not None and isinstance(m, _FusedConv) and _act_spec(nxt) is not None:
                x = _conv_act(m, x, nxt)
                i += 2
            else:
                x = m(x)
                i += 1
        return x


def _global_avg_pool_flat(pool: nn.Module) -> bool:
    """Whether timm's ``SelectAdaptivePool2d`` ``pool`` is a global average pool to (N, C) over NCHW."""
    if type(pool) is not _TimmSelectPool or _hooked(pool) or _hooked(pool.pool) or _hooked(pool.flatten):
        return False
    inner = pool.pool
    if isinstance(inner, nn.AdaptiveAvgPool2d):
        return inner.output_size in (1, (1, 1)) and isinstance(pool.flatten, nn.Flatten) and pool.flatten.start_dim == 1
    return (type(inner) is _TimmFastAvgPool and inner.flatten and tuple(inner.dim) == (2, 3)
            and isinstance(pool.flatten, nn.Identity))


class NormFreeNet(_TimmNet):
    """timm's ``NormFreeNet`` (the converted model's class) whose final conv runs with its
    activation in the epilogue and whose ``forward`` takes the head's global average pool from that
    conv's per-channel sums: no separate activation or pooling pass over the last feature map.

    Every method but ``forward_features`` and ``forward`` is timm's; ``forward`` falls back to
    timm's ``forward_head`` for any other head (max or cat pooling, a conv classifier, hooks on
    the head's modules, symbolic tracing), and the result is the same either way.
    """

    def __prepare_scriptable__(self):
        raise RuntimeError(_NO_SCRIPT)

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and stages, as timm's ``forward_features`` runs them."""
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.stages, x)
        return self.stages(x)

    def _final(self, x: torch.Tensor, pooled: bool):
        """``final_act(final_conv(x))``, one op where it fuses. With ``pooled``, ``(out, None)``
        where it does not fuse, else ``(None, mean)``: the global average pool of that output, in its
        dtype, from the fp32 channel sums the op's epilogue makes; the output itself is never
        written (nor held by a training step)."""
        spec = _act_spec(self.final_act)
        if (spec is None or not isinstance(self.final_conv, _FusedConv) or _hooked(self.final_conv)
                or _hooked(self.final_act) or _fx_traced(x) or _global_hooks()):
            x = self.final_act(self.final_conv(x))
            return (x, None) if pooled else x
        if not pooled:
            return self.final_conv.fused(x, act=spec[0], act_gain=spec[1])
        out, sums = self.final_conv.fused(x, act=spec[0], act_gain=spec[1], want_sums=True, want_out=False)
        if sums is None:
            return out, None
        # timm's mean over the output's pixels
        conv = self.final_conv
        top, bottom, left, right = conv._padding4(x)
        pixels = (_library.conv_out_size(x.shape[2], top, bottom, conv.kernel_size[0], conv.stride[0])
                  * _library.conv_out_size(x.shape[3], left, right, conv.kernel_size[1], conv.stride[0]))
        return None, (sums / pixels).to(_library.conv_out_dtype(x))

    def _standardised_ahead(self, x: torch.Tensor):
        """A context in which a training forward on ``x`` runs: every conv weight that the forward's
        convs would standardise in their ops is standardised on entry, a few launches in all instead of
        one per conv (``ops._standardised_ahead``: the same bits; a conv whose weight or gain changed
        in place since, or was swapped, standardises its own). A null context where the convs would not
        standardise (no gradients: the cached weights serve), and where the entry cannot see what the
        forward will do: symbolic tracing, compiling, dispatch or function modes, functorch transforms,
        forward-mode AD, module hooks (global, or anywhere in the stem, stages or final conv: a hook may
        change a weight through ``.data``, which no version counter sees). Code of one's own inside
        the trunk that edits a weight through ``.data`` is not seen either (as the eval cache does not
        see such edits: call ``.eval()`` after them)."""
        if (not torch.is_grad_enabled() or _fx_traced(x) or not isinstance(x, torch.Tensor)
                or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._is_torch_function_mode_enabled() or torch._C._functorch.peek_interpreter_stack() is not None
                or forward_ad._current_level >= 0 or _global_hooks()):
            return ops._NOTHING_AHEAD
        convs = []
        for m in self._convs_ahead():
            params = m._parameters
            w, g = params.get("weight"), params.get("gain")
            if (g is not None and type(w) in _library._PLAIN and type(g) in _library._PLAIN
                    and (m.training or w.requires_grad or g.requires_grad)
                    and not w.is_inference() and not g.is_inference()):  # (inference tensors have no version)
                convs.append((w, g, m.scale, m.eps, m.backend))
        return ops._standardised_ahead(convs, x)

    def _convs_ahead(self) -> list:
        """nfnet_fast's convs in the stem, the stages and the final conv, or none where any module
        there carries hooks (see :meth:`_standardised_ahead`). Read from the module dicts, for the
        host time of a training step."""
        convs, todo = [], [self._modules.get("stem"), self._modules.get("stages"), self._modules.get("final_conv")]
        while todo:
            m = todo.pop()
            if m is None:
                continue
            if _hooked(m):
                return []
            if isinstance(m, _FusedConv):
                convs.append(m)
            else:
                todo.extend(m._modules.values())
        return convs

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        with self._standardised_ahead(x):
            return self._final(self._trunk(x), pooled=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        head = self.head
        if (type(head) is not _TimmHead or _hooked(head) or _hooked(head.drop) or _hooked(head.fc)
                or not isinstance(head.fc, (nn.Linear, nn.Identity)) or not _global_avg_pool_flat(head.global_pool)):
            return super().forward(x)  # (timm's: through forward_features, above)
        with self._standardised_ahead(x):
            x, pooled = self._final(self._trunk(x), pooled=True)
        if pooled is None:
            return self.forward_head(x)
        return head.flatten(head.fc(head.drop(pooled)))
