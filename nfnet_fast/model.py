"""Model factory: timm builds the model (configs, pretrained weights, checkpoints), then its NF
layers are swapped for nfnet_fast's in place."""
from __future__ import annotations

import fnmatch
from typing import List

import timm
import torch.nn as nn
from timm.models.nfnet import NormFreeNet

from . import ops
from . import nn as fnn



def list_models(pattern: str = "*", pretrained: bool = False) -> List[str]:
    """Names of the timm NF models nfnet_fast builds (all of timm's ``nfnet`` module).

    Args:
        pattern: shell-style wildcard, e.g. ``"eca_nfnet_*"``.
        pretrained: only models with pretrained weights in timm.

    Returns:
        Sorted model names, as given to :func:`create_model`.
    """
    names = timm.list_models(module="nfnet", pretrained=pretrained)
    if pretrained:  # timm then lists name.tag entries
        names = sorted({n.split(".")[0] for n in names})
    return [n for n in names if fnmatch.fnmatch(n, pattern)]


def convert(model: nn.Module, backend: str = "auto", silu_prologue: bool = False) -> nn.Module:
    """Swap the NF layers of a live timm model for nfnet_fast's, in place, keeping its weights.

    Converted: ``ScaledStdConv2d``, ``ScaledStdConv2dSame``, ``EcaModule`` (sigmoid gate),
    ``NormFreeBlock``, and a ``NormFreeNet``'s ``stem``, ``stages`` and class (:class:`nfnet_fast.nn.NormFreeNet`,
    a subclass: final conv and head pooling fused). Parameters stay the same objects, so
    optimizers, hooks and state_dict keys are untouched. Converting twice only changes the backend
    (and ``silu_prologue``).

    Args:
        model: a timm NF model (``NormFreeNet``, or any module holding timm NF layers, e.g. a
            ``features_only`` model).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``, used by every converted layer.
        silu_prologue: each block's conv1 and downsample conv compute the block's pre-activation
            ``silu(x) * beta`` as they load x, instead of reading it from memory: no pass writes it
            (one activation write less per block), at the cost of a SiLU per element and output
            column tile in the conv. Off by default until a GPU measures the trade (README); the
            numbers are timm's either way.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or holds no timm NF layer.
        ValueError / RuntimeError: unknown or unavailable backend.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    ops.check_backend(backend)
    if not isinstance(silu_prologue, bool):
        raise TypeError(f"silu_prologue must be a bool, got {silu_prologue!r}")
    found = False
    for module in model.modules():
        cls = fnn.REPLACEMENTS.get(type(module))
        if cls is not None and cls.can_convert(module):
            cls.from_timm(module, backend)
        if isinstance(module, fnn._FastModule):
            module.backend = backend
            found = True
        if isinstance(module, fnn.NormFreeBlock):
            module.silu_prologue = silu_prologue
    if isinstance(model, NormFreeNet) and type(model.stages) is nn.Sequential:
        model.stages.__class__ = fnn.NormFreeStages
    if isinstance(model, NormFreeNet) and type(model.stem) is nn.Sequential:
        model.stem.__class__ = fnn.NormFreeStem
    if type(model) is NormFreeNet:
        model.__class__ = fnn.NormFreeNet
    if not found:
        raise TypeError(f"{type(model).__name__} holds no timm NF layer (ScaledStdConv2d, EcaModule, NormFreeBlock)")
    return model


def create_model(model_name: str, pretrained: bool = False, backend: str = "auto", silu_prologue: bool = False,
                 **kwargs) -> nn.Module:
    """Create a timm NF model with nfnet_fast's layers: same API, same state_dict, same numbers.

    timm builds the model, so every timm argument and the pretrained machinery work as in timm:
    ``num_classes``, ``in_chans``, ``drop_rate``, ``drop_path_rate``, ``features_only``,
    ``checkpoint_path``, ``pretrained_cfg_overlay=dict(file=...)`` (a local checkpoint), the hub.

    Args:
        model_name: one of :func:`list_models`, optionally with a pretrained tag
            (``"eca_nfnet_l0.ra2_in1k"``), or a timm ``"hf-hub:..."`` / ``"local-dir:..."`` name of
            an NF model (a model without NF layers raises TypeError).
        pretrained: load timm's pretrained weights.
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cuda"``.
        silu_prologue: see :func:`convert`.
        **kwargs: passed to ``timm.create_model``.

    Returns:
        The model (a timm ``NormFreeNet`` whose layers are nfnet_fast's).

    Example:
        >>> model = nfnet_fast.create_model("eca_nfnet_l0", num_classes=10)  # doctest: +SKIP
    """
    hub = isinstance(model_name, str) and model_name.startswith(("hf-hub:", "local-dir:"))
    if not hub and (not isinstance(model_name, str) or model_name.split(".")[0] not in list_models()):
        raise ValueError(f"unknown model {model_name!r}: nfnet_fast builds the timm NF models of "
                         f"nfnet_fast.list_models(), e.g. 'eca_nfnet_l0'")
    ops.check_backend(backend)
    return convert(timm.create_model(model_name, pretrained=pretrained, **kwargs), backend, silu_prologue)
