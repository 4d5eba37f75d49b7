"""Drop-in modules for timm's NF layers.

Each class subclasses the timm layer it replaces, takes the same constructor arguments (plus
``backend=``), owns the same parameters under the same names, and computes the same function
through :mod:`nfnet_fast.ops`. The modules know nothing of kernels; ``backend`` is passed
through to the ops (``"auto"``, ``"reference"``, ``"triton"``, ``"cuda"``).

``convert`` (see :func:`nfnet_fast.convert`) turns live timm layers into these in place with
:meth:`from_timm`, keeping parameter identity, so optimizers and hooks stay valid.
"""
from __future__ import annotations

import weakref
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import EcaModule as _TimmEca
from timm.layers import ScaledStdConv2d as _TimmStdConv
from timm.layers import ScaledStdConv2dSame as _TimmStdConvSame
from timm.layers.padding import pad_same
from timm.models.nfnet import NormFreeBlock as _TimmBlock

from . import ops

__all__ = ["ScaledStdConv2d", "ScaledStdConv2dSame", "EcaModule", "NormFreeBlock", "NormFreeStages"]


# The ops as torch.fx leaf functions: torch.fx.symbolic_trace and timm's create_feature_extractor
# record one call_function node per op instead of tracing into its argument checks (which branch
# on shapes and dtypes). The modules call the ops through these names only.
def _std_weight(weight, gain, scale: float, eps: float, backend: str):
    return ops.scaled_std_weight(weight, gain, scale, eps, backend=backend)


def _silu_scale(x, beta: float, backend: str):
    return ops.silu_scale(x, beta, backend=backend)


def _eca(x, weight, gain: float, backend: str):
    return ops.eca(x, weight, gain, backend=backend)


def _eca_residual(y, weight, shortcut, alpha: float, attn_gain: float, beta_next: Optional[float], backend: str):
    return ops.eca_residual(y, weight, shortcut, alpha, attn_gain, beta_next, backend=backend)


for _name in ("_std_weight", "_silu_scale", "_eca", "_eca_residual"):
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

    def standardized_weight(self) -> torch.Tensor:
        """The conv's effective weight: ``(w - mean) / sqrt(var + eps) * gain * scale`` per output channel."""
        w, g = self.weight, self.gain
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or _fx_traced(w):
            return _std_weight(w, g, self.scale, self.eps, self.backend)
        differentiable = torch.is_grad_enabled() and (w.requires_grad or g.requires_grad)
        if self.training or differentiable or not (_plain_tensor(w) and _plain_tensor(g)):
            self._std_cache = None
            return _std_weight(w, g, self.scale, self.eps, self.backend)
        key = (w._version, g._version, w.data_ptr(), g.data_ptr(), w.device, w.dtype, self.scale, self.eps,
               self.backend)
        cache = self._std_cache
        if cache is None or cache[0] != key or cache[1]() is not w or cache[2]() is not g:
            # A normal tensor even inside inference_mode, so it can serve later autograd-free calls anywhere.
            with torch.inference_mode(False), torch.no_grad():
                value = _std_weight(w, g, self.scale, self.eps, self.backend)
            cache = self._std_cache = (key, weakref.ref(w), weakref.ref(g), value)
        return cache[3]


class ScaledStdConv2d(_StdWeightCache, _TimmStdConv):
    """timm's ``ScaledStdConv2d`` (scaled weight standardisation) with a cached standardised weight.

    Args are timm's (in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
    bias, gamma, eps, gain_init, device, dtype), plus ``backend`` for the standardisation op.
    """

    timm_class = _TimmStdConv

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._fast_init(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class ScaledStdConv2dSame(_StdWeightCache, _TimmStdConvSame):
    """timm's ``ScaledStdConv2dSame`` (TF 'SAME' padding) with a cached standardised weight."""

    timm_class = _TimmStdConvSame

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._fast_init(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


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

    def __init__(self, *args, backend: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._fast_init(backend)

    @property
    def silu_preact(self) -> bool:
        """True when the pre-activation is ``silu(x) * beta`` (so it can be fused)."""
        return _is_silu(self.act1)

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
        if a is None:
            a = self.pre_activation(x)
        shortcut = self.downsample(a) if self.downsample is not None else x
        out = self.conv1(a)
        out = self.conv2(self.act2(out))
        if self.conv2b is not None:
            out = self.conv2b(self.act2b(out))
        if self.attn is not None:
            out = self.attn_gain * self.attn(out)
        out = self.conv3(self.act3(out))
        # (a block called on an fp32 input under autocast has a bf16 branch and an fp32 shortcut:
        # timm's tail promotes, the fused op wants one dtype)
        if self._fused_tail() and (_fx_traced(out) or out.dtype == shortcut.dtype):
            res = _eca_residual(out, self.attn_last.conv.weight, shortcut, self.alpha, self.attn_gain, beta_next,
                                self.backend)
            return (res[0], res[1]) if beta_next is not None else (res, None)
        if self.attn_last is not None:
            out = self.attn_gain * self.attn_last(out)
        out = self.drop_path(out)
        if self.skipinit_gain is not None:
            out = out * self.skipinit_gain
        return out * self.alpha + shortcut, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_fused(x)[0]


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
            x, a = blk.forward_fused(x, a, nxt.beta if nxt is not None and nxt.silu_preact else None)
        return x
