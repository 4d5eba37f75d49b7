"""nfnet_fast: timm's NFNet family rebuilt from fused kernels, as drop-in modules.

Quick start::

    import nfnet_fast
    model = nfnet_fast.create_model("eca_nfnet_l0", pretrained=False).eval()
    logits = model(images)             # same numbers as timm.create_model("eca_nfnet_l0")

    nfnet_fast.convert(timm_model)     # or swap the modules of a live timm model in place
    nfnet_fast.backends()              # which kernel backends run here, and why not the others
"""
from . import ops  # noqa: F401
from ._backends import BackendInfo, backends
from .model import convert, create_model, list_models
from . import nn  # noqa: F401  (after model: nn imports nothing of model, model imports nn)

# The backends, imported here, outside any compiled region (dynamo cannot trace an import): each
# enters its op table in the registry (_backends.register_ops), which nfnet_fast.ops dispatches
# through; the compiled ones also register their fake kernels and autograd (_library.py).
from . import _reference  # noqa: F401,E402
if backends()["cuda"].available:
    from . import _cuda  # noqa: F401
if backends()["triton"].available:  # imports triton (about a second)
    from . import _triton  # noqa: F401

__version__ = "0.1.0"
__all__ = ["create_model", "convert", "list_models", "backends", "BackendInfo", "ops", "nn"]
