"""nfnet_fast: timm's NFNet family rebuilt from fused kernels, as drop-in modules.

Quick start::

    import nfnet_fast
    model = nfnet_fast.create_model("eca_nfnet_l0", pretrained=False).eval()
    logits = model(images)             # same numbers as timm.create_model("eca_nfnet_l0")

    nfnet_fast.convert(timm_model)     # or swap the modules of a live timm model in place
    nfnet_fast.backends()              # which kernel backends run here, and why not the others
"""
from typing import TYPE_CHECKING

# Nothing heavy is imported here, so that `nfnet-fast --help` (nfnet_fast.cli) does not pay for torch.
# The public names load on first access (PEP 562); importing nfnet_fast.ops (as nn, model and
# benchmark do) imports the backends, which fill the registry that ops dispatches through.
_PUBLIC = ("create_model", "convert", "list_models", "backends", "BackendInfo", "ops", "nn", "adaptive_clip_grad_")


def __getattr__(name: str):
    # One name at a time, by `import a.b` / `from .mod import x`: this also runs while the package's
    # modules import each other (`from . import ops` in nn.py asks it for `ops`).
    import sys

    if name == "ops":
        import nfnet_fast.ops  # noqa: F401  (which imports the backends)
        return sys.modules[f"{__name__}.ops"]
    if name == "nn":
        import nfnet_fast.nn  # noqa: F401
        return sys.modules[f"{__name__}.nn"]
    if name in ("create_model", "convert", "list_models"):
        from . import model
        return getattr(model, name)
    if name in ("backends", "BackendInfo"):
        from . import _backends
        return getattr(_backends, name)
    if name == "adaptive_clip_grad_":
        from . import train
        return train.adaptive_clip_grad_
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # for type checkers and IDEs
    from . import nn, ops  # noqa: F401
    from ._backends import BackendInfo, backends  # noqa: F401
    from .model import convert, create_model, list_models  # noqa: F401
    from .train import adaptive_clip_grad_  # noqa: F401

__version__ = "0.1.0"
__all__ = list(_PUBLIC)
