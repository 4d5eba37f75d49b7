"""Training: adaptive gradient clipping in a few batched kernels, and the fine-tuning loop behind
``nfnet-fast finetune`` (the command line itself, its arguments and one-line errors, is nfnet_fast/cli.py).

    import nfnet_fast
    loss.backward()
    nfnet_fast.adaptive_clip_grad_(params_without_head, clip_factor=0.015)   # = timm.utils.adaptive_clip_grad
    optimizer.step()
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

_TensorOrTensors = Union[torch.Tensor, Iterable[torch.Tensor]]


# --- adaptive gradient clipping ----------------------------------------------------------------------------

class _Plan(NamedTuple):
    """How one (device, dtype) group of tensors splits into AGC's units: a tensor with ndim <= 1 is one row of
    all its elements, one with ndim > 1 a row per index of its first dimension. Tensors with rows of the same
    length go together, so that their rows reduce in one kernel; ``groups`` lists them, ``rows`` the number of
    rows (units) of each group, the order of the units is the groups' one."""
    groups: Tuple[Tuple[int, Tuple[int, ...]], ...]  # (row length, indices of the tensors with rows of that length)
    rows: Tuple[int, ...]                            # units per group


@functools.lru_cache(maxsize=64)
def _plan(shapes: Tuple[Tuple[int, ...], ...]) -> _Plan:
    """The unit layout of tensors of these shapes (cached: a training loop clips the same shapes every step)."""
    groups = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(_row_length(shape), []).append(i)
    return _Plan(tuple((row, tuple(idx)) for row, idx in groups.items()),
                 tuple(sum(_row_count(shapes[i]) for i in idx) for idx in groups.values()))


def _row_count(shape: Tuple[int, ...]) -> int:
    return shape[0] if len(shape) > 1 else 1


def _row_length(shape: Tuple[int, ...]) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a (units, row length) matrix whose row i holds the elements of unit i (``t[i]``, or all of a
    tensor with ndim <= 1): a view in memory order for a contiguous or channels_last ``t`` (a norm does not
    depend on the order), else a copy in logical order."""
    if _channels_last(t):
        t = t.permute(0, 2, 3, 1)
    return t.reshape(_row_count(t.shape), _row_length(t.shape))


def _unrows(rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`_rows`: ``rows`` (t's units as rows, in the order ``_rows(t)`` gives) viewed with
    t's shape and, for a channels_last ``t``, its strides (so that a multi-tensor copy keeps its fast path)."""
    if _channels_last(t):
        n, c, h, w = t.shape
        return rows.view(n, h, w, c).permute(0, 3, 1, 2)
    return rows.view(t.shape)


def _group_rows(tensors: List[torch.Tensor]) -> torch.Tensor:
    """The rows of ``tensors`` (of one row length) stacked: one matrix, one kernel to reduce."""
    mats = [_rows(t) for t in tensors]
    return mats[0] if len(mats) == 1 else torch.cat(mats)


def _apply_batched(grads: List[torch.Tensor], plan: _Plan, grad_rows: List[torch.Tensor],
                   scale: torch.Tensor) -> None:
    """Scale the units of ``grads`` on an accelerator: one multiply per group of stacked rows, then one
    multi-tensor copy back into the gradients whose rows were a copy (stacked, or not a view)."""
    dst, src = [], []
    for (_, idx), rows, s in zip(plan.groups, grad_rows, scale.split(plan.rows)):
        rows.mul_(s[:, None])
        start = 0
        for i in idx:
            n = _row_count(grads[i].shape)
            # (a view where _rows could view the gradient: contiguous, channels_last, or another layout with
            # rows in it, a transposed 1x1 conv's; copying a view back onto itself would be refused as overlap)
            if len(idx) > 1 or not torch._C._is_alias_of(rows, grads[i]):
                dst.append(grads[i])
                src.append(_unrows(rows.narrow(0, start, n), grads[i]))
            start += n
    if dst:
        torch._foreach_copy_(dst, src)


def _apply_per_tensor(grads: List[torch.Tensor], plan: _Plan, scale: torch.Tensor) -> None:
    """Scale the units of ``grads`` on the CPU: one multi-tensor multiply by each tensor's unit scales
    broadcast (no copy of the gradients)."""
    tensors, factors = [], []
    for (_, idx), s in zip(plan.groups, scale.split(plan.rows)):
        start = 0
        for i in idx:
            g, n = grads[i], _row_count(grads[i].shape)
            tensors.append(g)
            factors.append(s.narrow(0, start, n).view((n,) + (1,) * (g.dim() - 1)) if g.dim() > 1 else s[start])
            start += n
    torch._foreach_mul_(tensors, factors)


def agc_parameters(model: torch.nn.Module) -> List[torch.Tensor]:
    """The parameters AGC clips, as NFNets train: all but the classifier's (``get_classifier()``, which a
    ``torch.compile`` wrapper passes through to its model)."""
    head = {id(p) for p in model.get_classifier().parameters()}
    return [p for p in model.parameters() if id(p) not in head]


@torch.no_grad()
def adaptive_clip_grad_(parameters: _TensorOrTensors, clip_factor: float = 0.01, eps: float = 1e-3,
                        norm_type: float = 2.0, *, _batched: Optional[bool] = None,
                        _native: Optional[bool] = None) -> None:
    """Adaptive gradient clipping (AGC, Brock et al. 2021), in place: ``timm.utils.adaptive_clip_grad`` in a few
    batched kernels instead of about ten small ones per parameter.

    Unit-wise, as timm: a parameter with ndim <= 1 is one unit, one with ndim > 1 has a unit per index of its
    first dimension (an output channel of a conv or linear weight; a conv's (C, 1, 1, 1) gain has one element
    per unit). For each unit, ``max_norm = max(||p||, eps) * clip_factor``; when ``||grad|| >= max_norm`` the
    unit's gradient is scaled by ``max_norm / max(||grad||, 1e-6)``, otherwise it is left as it is. Norms are
    ``torch.linalg.vector_norm`` with ``ord=norm_type`` (2, inf, 1, any float, as timm's ``Tensor.norm``).

    How: the parameters with a gradient are grouped by (device, dtype), as ``torch.nn.utils.clip_grad_norm_``
    groups them (here in order of first appearance), and their units by length (eca_nfnet_l0 without its
    classifier: 15 lengths). On an accelerator each length's rows are stacked (one concatenation) and reduced
    in one row-wise norm, for the parameters and for the gradients; the per-unit scale is a few elementwise ops on one vector; each stack of gradient rows is
    multiplied by it, and one multi-tensor copy writes them back: 73 aten ops (kernel launches) for
    eca_nfnet_l0, where timm's loop dispatches 1830, ten per parameter. On the CPU, where an op costs no launch
    but a copy costs memory traffic, the norms are taken per tensor and one ``torch._foreach_mul_`` applies the
    scales broadcast, without copying: four passes over the gradients' memory to timm's nine. The ops are
    issued from C++ (the extension's ``nfnet_fast::adaptive_clip_grad_``) where it is built, from Python
    otherwise and under ``torch.compile`` or tracing: the same ops in the same order, so the same bits, for
    a fraction of the host time (the Python walks ~180 tensors a step).

    Numerics: for fp32 (and fp64) the norms are the same reductions as timm's (on a CPU the result is
    bit-identical to timm's for eca_nfnet_l0's parameters), so the result equals timm's up to fp32 rounding.
    For fp16/bf16 tensors the norms accumulate in fp32 and stay in fp32 (timm rounds each norm to the
    tensor's dtype); the scale is rounded to the gradient's dtype before the multiply, as in timm.

    Args:
        parameters: a tensor or an iterable of tensors (e.g. ``model.parameters()``); those whose ``.grad``
            is None are skipped, a tensor given twice is clipped once.
        clip_factor: the largest ratio of a unit's gradient norm to its parameter norm (timm's default 0.01;
            the NFNet paper fine-tunes with 0.01 to 0.16 depending on the batch size, 0.015 for L0).
        eps: the smallest parameter norm used, so that zero-initialised units still get a gradient.
        norm_type: the order of the norm (2.0, ``float('inf')``, ...).

    Returns:
        None: the gradients are changed in place.

    Example:
        >>> loss.backward()  # doctest: +SKIP
        >>> head = {id(p) for p in model.get_classifier().parameters()}  # doctest: +SKIP
        >>> adaptive_clip_grad_([p for p in model.parameters() if id(p) not in head], 0.015)  # doctest: +SKIP
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    seen, params, grads = set(), [], []
    for p in parameters:
        g = p.grad
        if g is None or id(p) in seen:
            continue
        if g.is_sparse:
            raise RuntimeError("adaptive_clip_grad_ does not support sparse gradients")
        seen.add(id(p))
        params.append(p)
        grads.append(g)
    if not params:
        return
    # (tracing first: torch.compile must not trace _native_agc's first call, which imports the extension)
    if not (torch.compiler.is_compiling() or torch.jit.is_tracing()) and _native is not False:
        if _native_agc():
            torch.ops.nfnet_fast.adaptive_clip_grad_(params, grads, float(clip_factor), float(eps),
                                                     float(norm_type), _batched)
            return
        if _native:
            raise RuntimeError("adaptive_clip_grad_(_native=True): nfnet_fast._C has no adaptive_clip_grad_ op")
    groups: Dict[tuple, Tuple[list, list]] = {}  # (device, dtype) -> (params, grads), in order of first appearance
    for p, g in zip(params, grads):
        if p.numel():
            ps, gs = groups.setdefault((p.device, p.dtype), ([], []))
            ps.append(p.detach())
            gs.append(g.detach())
    for (device, _), (ps, gs) in groups.items():
        _clip_group(ps, gs, float(clip_factor), float(eps), float(norm_type),
                    _batched if _batched is not None else device.type != "cpu")


@functools.lru_cache(maxsize=None)
def _native_agc() -> bool:
    """Whether the compiled extension has the adaptive_clip_grad_ op (csrc/adaptive_clip_grad.cpp): the same aten
    ops as :func:`_clip_group`, issued from C++ (a fraction of the host time; the same bits)."""
    from . import _backends

    return _backends.extension() is not None and hasattr(torch.ops.nfnet_fast, "adaptive_clip_grad_")


def _clip_group(ps: List[torch.Tensor], gs: List[torch.Tensor], clip_factor: float, eps: float, norm_type: float,
                batched: bool) -> None:
    """AGC of one (device, dtype) group of parameters ``ps`` and their gradients ``gs`` (none empty): the Python
    twin of csrc/adaptive_clip_grad.cpp, which must issue the same ops in the same order."""
    plan = _plan(tuple(tuple(p.shape) for p in ps))
    acc = torch.float64 if ps[0].dtype == torch.float64 else torch.float32

    def norms(rows):
        return torch.linalg.vector_norm(rows, norm_type, dim=1, dtype=acc)

    max_norm, grad_norm, grad_rows = [], [], []
    for _, idx in plan.groups:
        if batched:
            max_norm.append(norms(_group_rows([ps[i] for i in idx])))
            grad_rows.append(_group_rows([gs[i] for i in idx]))
            grad_norm.append(norms(grad_rows[-1]))
        else:
            max_norm += [norms(_rows(ps[i])) for i in idx]
            grad_norm += [norms(_rows(gs[i])) for i in idx]
    max_norm = torch.cat(max_norm).clamp_(min=eps).mul_(clip_factor)
    grad_norm = torch.cat(grad_norm)
    scale = torch.where(grad_norm < max_norm, 1.0, max_norm / grad_norm.clamp(min=1e-6)).to(ps[0].dtype)
    if batched:
        _apply_batched(gs, plan, grad_rows, scale)
    else:
        _apply_per_tensor(gs, plan, scale)


# --- fine-tuning ------------------------------------------------------------------------------------------

class FinetuneError(Exception):
    """Bad input to :func:`finetune` (data, checkpoint, output folder), said in one line; nothing was written."""


@dataclass
class FinetuneConfig:
    """The hyperparameters of :func:`finetune` (the ``nfnet-fast finetune`` flags of the same names).

    The defaults follow the NFNet recipe for fine-tuning (SGD with Nesterov momentum, a cosine schedule with
    warm-up, AGC 0.015 with the classifier excluded, RandAugment, label smoothing)."""
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01                       # peak learning rate, after the warm-up
    warmup_epochs: int = 1                 # linear warm-up from warmup_lr, per update
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    momentum: float = 0.9
    weight_decay: float = 2e-5             # not on biases and 1-D gains (timm's filter_bias_and_bn)
    clip_grad: float = 0.015               # AGC clip factor (0: no clipping); the classifier is never clipped
    smoothing: float = 0.1                 # label smoothing of the training loss
    aa: Optional[str] = "rand-m9-mstd0.5"  # timm auto-augment spec (RandAugment), None for none
    img_size: Optional[int] = None         # None: the model's default input size
    ema_decay: Optional[float] = None      # EMA of the weights (timm's ModelEmaV3, with warm-up), None for none
    amp: bool = True                       # bf16 autocast, on CUDA only
    channels_last: bool = True             # channels_last model and input, on CUDA only
    cuda_graph: bool = False               # replay the training forward and backward from CUDA graphs (CUDA only)
    workers: int = 4
    seed: int = 0

    def schedule(self) -> dict:
        """The settings the learning-rate schedule depends on (a resumed run keeps its schedule if they match)."""
        return dict(epochs=self.epochs, lr=self.lr, warmup_epochs=self.warmup_epochs, warmup_lr=self.warmup_lr,
                    min_lr=self.min_lr)


@dataclass
class FinetuneData:
    """The training (and validation) images of a fine-tuning run, checked, without transforms yet: those
    depend on the model (its mean, std and crop) and come in :func:`finetune`."""
    classes: List[str]
    make_train: Callable[[Callable], Dataset]              # transform -> training dataset
    make_val: Optional[Callable[[Callable], Dataset]]      # transform -> validation dataset, or None
    num_train: int
    num_val: int
    source: str                                            # where the images come from, for messages
    held_out: Optional[Tuple[float, int]] = None           # (val_split, seed) of a held-out validation split

    def describe(self) -> str:
        val = f", {self.num_val} validation" if self.make_val else ", no validation"
        return f"{self.num_train} training{val} images of {len(self.classes)} classes from {self.source}"


def _find_images(root: str, class_to_idx: Optional[Dict[str, int]] = None) -> Tuple[List[Tuple[str, int]],
                                                                                     Dict[str, int]]:
    """timm's folder scan (the one timm.data.ImageDataset makes): (path, class index) sorted by path, and the
    class-to-index map (classes in natural order of their folder names)."""
    from timm.data.readers.reader_image_folder import find_images_and_targets

    return find_images_and_targets(root, class_to_idx=class_to_idx)


def _scan_folder(root: str, what: str) -> Tuple[List[Tuple[str, int]], Dict[str, int]]:
    """The images and classes of ImageFolder ``root`` (one subfolder per class), or a FinetuneError saying what
    is wrong with it."""
    from timm.data.readers.img_extensions import get_img_extensions

    samples, class_to_idx = _find_images(root)
    if not samples:
        raise FinetuneError(f"no images in {what} {root}: expected one subfolder per class holding "
                            f"{'/'.join(sorted(get_img_extensions()))} files")
    if "" in class_to_idx:
        loose = next(p for p, c in samples if c == class_to_idx[""])
        raise FinetuneError(f"{what} {root} holds images outside any class subfolder (e.g. {loose}): put each "
                            f"class's images in a subfolder named after the class")
    # timm names a class after the folder holding the image, so cat/2019/ and dog/2019/ would both be class 2019
    nested = next((p for p, _ in samples if len(os.path.relpath(p, root).split(os.sep)) != 2), None)
    if nested is not None:
        raise FinetuneError(f"{what} {root} holds images in nested folders (e.g. {nested}): each image's class is "
                            f"the folder directly under {root}; move them up into their class folder")
    hidden = sorted(c for c in class_to_idx if c.startswith("."))
    if hidden:
        raise FinetuneError(f"{what} {root} has a hidden folder of images, {hidden[0]}, that would be a class: "
                            f"remove or rename it")
    empty = sorted(d for d in os.listdir(root) if not d.startswith(".") and d not in class_to_idx
                   and os.path.isdir(os.path.join(root, d)))
    if empty:  # (timm's scan would drop the class without a word)
        raise FinetuneError(f"{what} {root} has a class folder without images, {os.path.join(root, empty[0])}: add "
                            f"its images or remove it")
    return samples, class_to_idx


def _check_images(paths: Sequence[str], progress: bool) -> None:
    """Open and decode every image before anything is trained or written (a JPEG at 1/8 scale, which still
    reads all its data), and raise a FinetuneError naming the first that PIL cannot read. (PIL's verify alone
    decodes no JPEG data: a truncated JPEG would pass, and timm's dataset then silently serves the next
    image in its place.)"""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image
    from tqdm import tqdm

    def why(path: str) -> Optional[str]:
        try:
            with Image.open(path) as im:
                im.verify()  # (PNG: the chunks' checksums)
            with Image.open(path) as im:
                im.draft("RGB", (1, 1))  # (JPEG: decode at the smallest scale; other formats ignore it)
                im.load()
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds for a damaged file
            return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}".rstrip(": ")
        return None

    pool = ThreadPoolExecutor(max_workers=8)
    try:
        for path, err in tqdm(zip(paths, pool.map(why, paths)), total=len(paths), desc="checking images",
                              unit="img", file=sys.stderr, disable=not progress or len(paths) < 1000, leave=False):
            if err is not None:
                raise FinetuneError(f"cannot read image {path}: {err}")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _stratified_split(samples: List[Tuple[str, int]], fraction: float, seed: int) -> Tuple[List[int], List[int]]:
    """Indices of ``samples`` for training and for validation: ``fraction`` of each class's images (rounded,
    at least one image of every class with two or more left for training), drawn with ``seed``."""
    rng = random.Random(seed)
    by_class: Dict[int, List[int]] = {}
    for i, (_, c) in enumerate(samples):
        by_class.setdefault(c, []).append(i)
    train, val = [], []
    for c in sorted(by_class):
        idx = by_class[c]
        rng.shuffle(idx)
        n_val = min(int(round(len(idx) * fraction)), len(idx) - 1)
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


def image_folder_data(data: str, val_split: Optional[float] = None, seed: int = 0,
                      check_images: bool = True, progress: bool = True) -> FinetuneData:
    """The images of an ImageFolder tree, checked: ``data/train/<class>/*.jpg`` with an optional
    ``data/val/`` (or ``validation/``) of the same classes, or ``data/<class>/*.jpg`` alone. Without a
    validation folder, ``val_split`` holds out that fraction of each class's images (seeded).

    Raises:
        FinetuneError: no such folder, no images, images outside a class folder, a single class, validation
            classes the training images lack, a val_split with a validation folder too or leaving no
            validation image, an image PIL cannot open.
    """
    from timm.data import ImageDataset

    if not os.path.isdir(data):
        raise FinetuneError(f"--data {data}: {'not a directory' if os.path.exists(data) else 'no such directory'}")
    train_root = os.path.join(data, "train") if os.path.isdir(os.path.join(data, "train")) else data
    val_root = next((os.path.join(data, v) for v in ("val", "validation")
                     if train_root != data and os.path.isdir(os.path.join(data, v))), None)
    samples, class_to_idx = _scan_folder(train_root, "training folder")
    classes = sorted(class_to_idx, key=class_to_idx.get)
    if len(classes) < 2:
        raise FinetuneError(f"training folder {train_root} has a single class ({classes[0]}): fine-tuning a "
                            f"classifier needs at least two class subfolders")
    if val_root is not None and val_split is not None:
        raise FinetuneError(f"--val-split {val_split:g} and a validation folder {val_root}: use one of them")
    val_samples: List[Tuple[str, int]] = []
    if val_root is not None:
        found, val_classes = _scan_folder(val_root, "validation folder")
        unknown = sorted(set(val_classes) - set(class_to_idx))
        if unknown:
            raise FinetuneError(f"validation folder {val_root} has classes that {train_root} lacks: "
                                f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}")
        val_samples, _ = _find_images(val_root, class_to_idx)
    train_idx, val_idx = list(range(len(samples))), []
    if val_split is not None:
        train_idx, val_idx = _stratified_split(samples, val_split, seed)
        if not val_idx:
            raise FinetuneError(f"--val-split {val_split:g} of {len(samples)} images leaves no validation image")
    if check_images:
        _check_images([p for p, _ in samples] + [p for p, _ in val_samples], progress)

    def make_train(transform):
        return Subset(ImageDataset(train_root, class_map=class_to_idx, transform=transform), train_idx)

    def make_val(transform):
        if val_root is not None:
            return ImageDataset(val_root, class_map=class_to_idx, transform=transform)
        return Subset(ImageDataset(train_root, class_map=class_to_idx, transform=transform), val_idx)

    has_val = val_root is not None or bool(val_idx)
    return FinetuneData(classes, make_train, make_val if has_val else None, len(train_idx),
                        len(val_samples) + len(val_idx), train_root if val_root is None else data,
                        held_out=None if val_split is None else (val_split, seed))


def _dataset_classes(ds, name: str) -> List[str]:
    """The class names of a dataset timm.data.create_dataset made (timm's folder/tar readers, torchvision's)."""
    reader = getattr(ds, "reader", None)
    class_to_idx = getattr(reader, "class_to_idx", None) or getattr(ds, "class_to_idx", None)
    if class_to_idx:
        return [str(c) for c in sorted(class_to_idx, key=class_to_idx.get)]
    classes = getattr(ds, "classes", None)
    if classes:
        return [str(c) for c in classes]
    raise FinetuneError(f"dataset {name}: cannot tell its classes (no class_to_idx or classes attribute); use an "
                        f"image folder (--data DIR) instead")


DATASET_PREFIXES = ("torch", "hfds", "hfids", "tfds", "wds")  # timm.data.create_dataset's readers


def timm_dataset_data(name: str, root: Optional[str], train_split: str = "train",
                      eval_split: Optional[str] = "validation", val_split: Optional[float] = None,
                      download: bool = False, seed: int = 0) -> FinetuneData:
    """A dataset of ``timm.data.create_dataset`` (e.g. ``torch/cifar10``, with ``root`` its folder): its
    ``train_split`` for training and its ``eval_split`` (or, with ``val_split``, a held-out fraction of the
    training split) for validation.

    Raises:
        FinetuneError: a name without one of timm's reader prefixes (``DATASET_PREFIXES``), timm cannot create
            the dataset (with its reason), it is empty, has a single class, or its classes cannot be told.
    """
    from timm.data import create_dataset

    prefix = name.partition("/")[0].lower() if "/" in name else ""
    if prefix not in DATASET_PREFIXES:  # (timm would read any other name as an image folder at root)
        names = ", ".join(p + "/NAME" for p in DATASET_PREFIXES)
        raise FinetuneError(f"--dataset {name}: not a timm dataset name ({names}); for an image folder pass --data "
                            f"DIR without --dataset")
    if name.lower() in ("torch/folder", "torch/image_folder"):
        # (torchvision's ImageFolder unchecked: timm's split search falls back to the root, so validation would
        # be the training images, a val/ folder of other classes is labelled silently wrong, and an unreadable
        # image fails mid-epoch; image_folder_data checks all three)
        raise FinetuneError(f"--dataset {name}: an image folder is read with --data DIR (without --dataset), which "
                            f"checks its images, its classes and its val/ folder")

    def make(split, is_training, transform=None):
        try:
            ds = create_dataset(name, root=root, split=split, is_training=is_training, download=download)
        except Exception as e:  # noqa: BLE001 - torchvision, datasets, the filesystem: anything; reported in a line
            text = str(e).strip()
            raise FinetuneError(f"cannot load dataset {name} (split {split!r}, root {root}): "
                                f"{text.splitlines()[0] if text else type(e).__name__}") from e
        if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
            raise FinetuneError(f"dataset {name} is iterable-only: fine-tuning needs a map-style dataset "
                                f"(an image folder, a torch/ or hfds/ dataset)")
        if transform is not None:
            ds.transform = transform
        return ds

    train = make(train_split, True)
    classes = _dataset_classes(train, name)
    if len(train) == 0:
        raise FinetuneError(f"dataset {name} (split {train_split!r}) is empty")
    if len(classes) < 2:
        raise FinetuneError(f"dataset {name} has a single class ({classes[0]}): fine-tuning needs at least two")
    train_idx, val_idx = list(range(len(train))), []
    if val_split is not None:
        targets = getattr(train, "targets", None)
        if targets is None:
            raise FinetuneError(f"--val-split: dataset {name} has no targets list to split by class; use "
                                f"--eval-split instead")
        train_idx, val_idx = _stratified_split([("", int(t)) for t in targets], val_split, seed)
        if not val_idx:
            raise FinetuneError(f"--val-split {val_split:g} of {len(train)} images leaves no validation image")
        eval_split = None
    val = make(eval_split, False) if eval_split else None
    num_val = len(val) if val is not None else len(val_idx)

    def make_train(transform):
        train.transform = transform
        return train if val_split is None else Subset(train, train_idx)

    def make_val(transform):
        if val is not None:
            val.transform = transform
            return val
        return Subset(make(train_split, False, transform), val_idx)

    return FinetuneData(classes, make_train, make_val if num_val else None, len(train_idx), num_val,
                        f"{name} ({root})" if root else name, held_out=None if val_split is None else (val_split, seed))


# --- checkpoints ------------------------------------------------------------------------------------------

CHECKPOINT_KIND = "nfnet_fast.finetune"  # the marker of a resumable checkpoint (``last.pth``)
RESUME_FILE, FINAL_FILE, BEST_FILE, SUMMARY_FILE, CLASSES_FILE = (
    "last.pth", "model.pth", "model_best.pth", "summary.json", "classes.json")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomic(obj, path: str) -> None:
    """Write ``obj`` to ``path`` (``torch.save``, or JSON for a ``.json`` path) through a temporary file in the
    same folder and ``os.replace``: a reader, or a run killed mid-write, sees the old file or the new one,
    never half of one."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if path.endswith(".json"):
                f.write(json.dumps(obj, indent=2).encode())
            else:
                torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file gets the mode open() would give it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def check_resume(checkpoint: dict, path: str, model: str, classes: Sequence[str], epochs: int,
                 held_out: Optional[Tuple[float, int]] = None) -> int:
    """Check that ``checkpoint`` (a ``last.pth`` that :func:`finetune` wrote, read with torch.load) continues
    this run: same model, same classes, the same held-out validation images (``held_out``:
    :attr:`FinetuneData.held_out`), epochs left, or all ``epochs`` done by a run stopped before it wrote its
    final weights (no ``model.pth`` beside ``path``: :func:`finetune` then trains nothing and writes them).
    Returns the number of epochs it completed.

    Raises:
        FinetuneError: not a resumable checkpoint (e.g. a plain state_dict such as ``model.pth``), another
            model, other classes, another held-out split, or no epoch left to train (and final weights written).
    """
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != CHECKPOINT_KIND:
        raise FinetuneError(f"{path} is not a resumable checkpoint of nfnet-fast finetune (no optimizer and "
                            f"schedule state); resume from the {RESUME_FILE} that finetune writes in its --output")
    missing = [k for k in ("epoch", "state_dict", "optimizer", "scheduler", "classes") if k not in checkpoint]
    if missing:
        raise FinetuneError(f"{path} is a damaged checkpoint of nfnet-fast finetune: it has no {missing[0]!r}")
    if checkpoint.get("arch") != model:
        raise FinetuneError(f"{path} is a checkpoint of {checkpoint.get('arch')}, not of {model} (--model)")
    saved = list(checkpoint.get("classes", []))
    if saved != list(classes):
        def show(names):
            return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise FinetuneError(f"{path} was trained on {len(saved)} classes ({show(saved)}), this data has "
                            f"{len(classes)} ({show(list(classes))})")
    if "held_out" in checkpoint:  # (checkpoints before version 3 did not record it)
        saved_split = tuple(checkpoint["held_out"]) if checkpoint["held_out"] is not None else None
        if saved_split != (tuple(held_out) if held_out is not None else None):
            def flags(split):
                return f"--val-split {split[0]:g} --seed {split[1]}" if split else "no --val-split"
            raise FinetuneError(f"{path} held out its validation images with {flags(saved_split)}, this run has "
                                f"{flags(held_out)}: resume with the same, or images it validated on would be "
                                f"trained on (or the reverse)")
    done = int(checkpoint["epoch"]) + 1
    if done == epochs and not os.path.exists(os.path.join(os.path.dirname(os.path.abspath(path)), FINAL_FILE)):
        return done  # (stopped while, or before, writing model.pth: resuming writes it)
    if done >= epochs:
        raise FinetuneError(f"{path} has completed {done} epochs, --epochs is {epochs}: nothing left to train "
                            f"(pass a larger --epochs to train on)")
    return done


def _state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The model's state_dict on the CPU: timm's keys (nfnet_fast keeps them), loadable by
    ``timm.create_model(name, num_classes=K, checkpoint_path=...)``."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


# --- the loop ---------------------------------------------------------------------------------------------

def _validate(model: torch.nn.Module, loader, device: torch.device, amp: bool, channels_last: bool,
              num_classes: int) -> Dict[str, Optional[float]]:
    """Mean cross-entropy, top-1 and (with 5 classes or more) top-5 accuracy in percent over ``loader``."""
    from timm.utils import accuracy

    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top = torch.zeros(2, dtype=torch.float64, device=device)
    count = 0
    ks = (1, 5) if num_classes >= 5 else (1,)
    with torch.inference_mode():
        for x, y in loader:
            x, y = _to_device(x, y, device, channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x)
            out = out.float()
            loss_sum += torch.nn.functional.cross_entropy(out, y, reduction="sum")
            for j, acc in enumerate(accuracy(out, y, topk=ks)):
                top[j] += acc * y.shape[0] / 100
            count += y.shape[0]
    loss, top1, top5 = (loss_sum / count).item(), *(100 * top / count).tolist()
    return dict(loss=loss, top1=top1, top5=top5 if num_classes >= 5 else None)


def graph_training_forward(model: torch.nn.Module, example: torch.Tensor, amp: bool) -> torch.nn.Module:
    """Capture ``model``'s training forward and backward for batches shaped like ``example`` in CUDA
    graphs (``torch.cuda.make_graphed_callables``: warm-up passes on a side stream, then one graph for
    the forward and one for the backward), under bf16 autocast with its cast cache off when ``amp``.
    A training step then replays two graphs instead of issuing each kernel from Python: on an H100,
    the benchmark's eca_nfnet_l0 step at batch 128, 224 px took 42.7 ms so against 94.8 eagerly,
    whose time is the host's (bench/results/2026-11-27-h100-session-2.md). The parameters stay the model's own (the
    optimizer, AGC, EMA and checkpoints see no difference); the loss is computed outside the graphs.

    Replaces ``model.forward``: in training mode a batch of ``example``'s shape and dtype replays the
    graphs (its values copied into the captured input); another batch (an epoch's last, smaller one,
    or one whose requires_grad differs) and every call in eval mode run the model eagerly. The
    warm-up passes draw random numbers (dropout, stochastic depth) that an eager run would not. The
    graphs read the parameters and buffers at their addresses at capture: moving the model, changing
    its dtype or assigning new parameter tensors afterwards needs ``del model.forward`` first (which
    also frees the graphs). Returns ``model``."""
    if not example.is_cuda:
        raise ValueError(f"CUDA graphs need a CUDA input, got one on {example.device}")
    eager_forward = model.forward
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
        torch.cuda.make_graphed_callables(model, (example,))
    graphed_forward = model.forward  # (itself eager outside the mode it was captured in)
    shape, dtype, grad = example.shape, example.dtype, example.requires_grad

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.shape == shape and x.dtype == dtype and x.device == example.device and x.requires_grad == grad:
            return graphed_forward(x)
        return eager_forward(x)
    model.forward = forward
    return model


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _format_metrics(m: Optional[Dict[str, Optional[float]]]) -> str:
    if m is None:
        return "-"
    top5 = f"  top-5 {m['top5']:.1f}%" if m.get("top5") is not None else ""
    return f"loss {m['loss']:.4f}  top-1 {m['top1']:.1f}%{top5}"


def finetune(model: torch.nn.Module, data: FinetuneData, config: FinetuneConfig, output: str, *, model_name: str,
             device: Union[str, torch.device] = "cpu", resume: Optional[dict] = None, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    """Fine-tune ``model`` (an NF model built with ``num_classes=len(data.classes)``) on ``data``, the way the
    NFNet model cards train: SGD with Nesterov momentum (``timm.optim.create_optimizer_v2``), a cosine schedule
    with linear warm-up stepped per update (``timm.scheduler.create_scheduler_v2``), adaptive gradient clipping
    (:func:`adaptive_clip_grad_`) of every parameter but the classifier's, label smoothing, timm's training
    transforms with RandAugment (``timm.data.create_transform``), optionally an EMA of the weights
    (``timm.utils.ModelEmaV3``); on CUDA bf16 autocast and channels_last, and with ``config.cuda_graph`` the
    training forward and backward replayed from CUDA graphs (:func:`graph_training_forward`; the model is
    eager again when this returns). After each epoch: validation (top-1,
    top-5 with 5 classes or more) of the model and of its EMA, and atomic checkpoints in ``output``.

    Files in ``output`` (created when the first epoch ends): ``last.pth`` after every epoch (model, optimizer,
    scheduler, EMA, epoch, classes, history: what ``resume`` takes; its ``state_dict``/``state_dict_ema`` keys
    also load in timm), ``model_best.pth`` (plain state_dict of the best validation top-1 epoch, the EMA's when
    there is one), ``model.pth`` at the end (plain state_dict of the final weights, the EMA's when there is
    one), ``summary.json`` (classes, input size, per-epoch history, best epoch) and ``classes.json`` (class
    names by index; ``nfnet-fast predict`` reads both beside a checkpoint). A resumed run that trains on
    removes the ``model.pth`` of the run it extends once its first epoch is saved. The plain state_dicts load with
    ``timm.create_model(model_name, num_classes=len(classes), checkpoint_path=...)``.

    Args:
        model: the model to train (moved to ``device``), nfnet_fast's or timm's.
        data: the training and validation images (:func:`image_folder_data`, :func:`timm_dataset_data`).
        config: the hyperparameters.
        output: the folder for the checkpoints.
        model_name: the timm name of ``model``, kept in the checkpoints.
        device: where to train.
        resume: a ``last.pth`` checkpoint (already checked with :func:`check_resume` and loaded into
            ``model``): the optimizer, scheduler, EMA and history continue from it.
        progress: show a tqdm bar per epoch (loss, accuracy, img/s) on stderr.
        log: where the per-epoch lines go.

    Returns:
        The summary written to ``summary.json``: classes, input size, history (one dict per epoch), best epoch,
        files.

    Raises:
        FinetuneError: the training loss became NaN or infinite (lower the learning rate).
    """
    from timm.data import create_transform, resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3, random_seed
    from tqdm import tqdm

    device = torch.device(device)
    cuda = device.type == "cuda"
    amp, channels_last = config.amp and cuda, config.channels_last and cuda
    if config.cuda_graph and not cuda:
        raise FinetuneError(f"CUDA graphs (--cuda-graph) need a CUDA device, not {device.type}")
    num_classes = len(data.classes)
    random_seed(config.seed)

    # data: timm's transforms, torch's DataLoader
    size = {"input_size": (3, config.img_size, config.img_size)} if config.img_size else {}
    data_config = resolve_data_config(size, model=model)
    train_tf = create_transform(data_config["input_size"], is_training=True, auto_augment=config.aa,
                                interpolation=data_config["interpolation"], mean=data_config["mean"],
                                std=data_config["std"])
    eval_tf = create_transform(**data_config)
    train_set = data.make_train(train_tf)
    val_set = data.make_val(eval_tf) if data.make_val else None
    shuffle = torch.Generator().manual_seed(config.seed)
    # (worker processes start afresh each epoch, seeded from the epoch's generator: persistent ones would
    # carry an epoch's augmentation draws into the next, which a resumed run's new workers would not)
    workers = dict(num_workers=config.workers, pin_memory=cuda)
    train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, generator=shuffle, **workers)
    val_loader = DataLoader(val_set, batch_size=config.batch_size, **workers) if val_set is not None else None

    # model, optimizer, schedule, EMA
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(model, opt="sgd", lr=config.lr, momentum=config.momentum,
                                    weight_decay=config.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched="cosine", num_epochs=config.epochs,
                                       warmup_epochs=config.warmup_epochs, warmup_lr=config.warmup_lr,
                                       min_lr=config.min_lr, step_on_epochs=False,
                                       updates_per_epoch=len(train_loader))
    ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=True) if config.ema_decay else None
    clipped = agc_parameters(model)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=config.smoothing)

    start, history, best = 0, [], None
    if resume is not None:
        start = int(resume["epoch"]) + 1
        history, best = list(resume.get("history", [])), resume.get("best")
        optimizer.load_state_dict(resume["optimizer"])
        if resume.get("schedule") == config.schedule() and resume.get("updates_per_epoch") == len(train_loader):
            scheduler.load_state_dict(resume["scheduler"])
        else:
            log(f"note: the schedule changed since {RESUME_FILE} (epochs, lr, warm-up or batches per epoch): the "
                f"cosine now spans {config.epochs} epochs of {len(train_loader)} updates")
        if ema is not None and resume.get("state_dict_ema") is not None:
            ema.module.load_state_dict(resume["state_dict_ema"])
        elif resume.get("state_dict_ema") is not None:
            log(f"note: no --ema-decay: the EMA of {RESUME_FILE} is not continued, model.pth will be the weights")
    if best is not None and not os.path.exists(os.path.join(output, BEST_FILE)):
        log(f"note: {output} holds no {BEST_FILE} of epoch {best['epoch']} (resumed from another folder): the "
            f"best is judged again from epoch {start + 1} on")
        best = None
    num_updates = start * len(train_loader)
    scheduler.step_update(num_updates)
    def summary_now() -> dict:
        return dict(model=model_name, classes=list(data.classes), input_size=list(data_config["input_size"]),
                    history=history, best=best, files=dict(last=RESUME_FILE, final=None,
                                                            best=BEST_FILE if best else None))
    summary = summary_now()

    graphed = False
    for epoch in range(start, config.epochs):
        # each epoch's randomness from (seed, epoch): a resumed run draws what the uninterrupted one would
        random_seed((config.seed + epoch) % 2**32)
        shuffle.manual_seed((config.seed + epoch) % 2**32)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        seen, t0 = 0, time.perf_counter()
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", file=sys.stderr,
                   disable=not progress, leave=False, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar):
            x, y = _to_device(x, y, device, channels_last)
            if config.cuda_graph and not graphed:  # captured on the run's first batch
                graph_training_forward(model, x, amp)
                graphed = True
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x)
                loss = criterion(out, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.clip_grad:
                adaptive_clip_grad_(clipped, clip_factor=config.clip_grad)
            optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates)
            if ema is not None:
                ema.update(model, step=num_updates)
            loss_sum += loss.detach().double() * y.shape[0]
            correct += (out.detach().argmax(-1) == y).sum()
            seen += y.shape[0]
            if progress and (step % 10 == 0 or step == len(train_loader) - 1):  # one sync per 10 steps
                bar.set_postfix_str(f"loss {loss_sum.item() / seen:.4f}, acc {100 * correct.item() / seen:.1f}%, "
                                    f"{seen / (time.perf_counter() - t0):.1f} img/s", refresh=False)
        bar.close()
        train_loss = loss_sum.item() / seen
        img_s = seen / (time.perf_counter() - t0)
        if not math.isfinite(train_loss):
            raise FinetuneError(f"the training loss became {train_loss} in epoch {epoch + 1}: lower --lr (the last "
                                f"good checkpoint is {os.path.join(output, RESUME_FILE)} if an epoch completed)")
        record = dict(epoch=epoch + 1, train_loss=train_loss, train_acc=100 * correct.item() / seen,
                      lr=optimizer.param_groups[0]["lr"], img_per_s=img_s, val=None, val_ema=None)
        if val_loader is not None:
            record["val"] = _validate(model, val_loader, device, amp, channels_last, num_classes)
            if ema is not None:
                record["val_ema"] = _validate(ema.module, val_loader, device, amp, channels_last, num_classes)
        history.append(record)
        ema_line = f"  |  EMA val {_format_metrics(record['val_ema'])}" if ema is not None and val_loader else ""
        log(f"epoch {epoch + 1}/{config.epochs}  train loss {train_loss:.4f}  acc {record['train_acc']:.1f}%  |  "
            f"val {_format_metrics(record['val'])}{ema_line}  |  lr {record['lr']:.3g}  |  {img_s:.1f} img/s")

        os.makedirs(output, exist_ok=True)
        if epoch == start:
            save_atomic(list(data.classes), os.path.join(output, CLASSES_FILE))
        deployed = ema.module if ema is not None else model
        judged = record["val_ema"] if ema is not None else record["val"]
        if judged is not None and (best is None or judged["top1"] > best["top1"]):
            best = dict(epoch=epoch + 1, top1=judged["top1"], top5=judged["top5"], ema=ema is not None)
            save_atomic(_state_dict(deployed), os.path.join(output, BEST_FILE))
        save_atomic(dict(kind=CHECKPOINT_KIND, version=3, arch=model_name, epoch=epoch, classes=list(data.classes),
                         held_out=list(data.held_out) if data.held_out is not None else None,
                         num_classes=num_classes, state_dict=_state_dict(model),
                         state_dict_ema=_state_dict(ema.module) if ema is not None else None,
                         optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                         schedule=config.schedule(), updates_per_epoch=len(train_loader), num_updates=num_updates,
                         config=asdict(config), history=history, best=best),
                    os.path.join(output, RESUME_FILE))
        if epoch == start and os.path.exists(os.path.join(output, FINAL_FILE)):
            os.remove(os.path.join(output, FINAL_FILE))  # a resumed finished run's: no longer this run's weights
        summary = summary_now()
        save_atomic(summary, os.path.join(output, SUMMARY_FILE))

    if graphed:  # (the caller gets its model back eager: the graphs and their memory go)
        del model.forward
    if start >= config.epochs:  # (a resumed run whose epochs were all done: only its final files are written)
        log(f"no epoch left to train (--epochs {config.epochs}): writing the final weights")
        os.makedirs(output, exist_ok=True)
        if not os.path.exists(os.path.join(output, CLASSES_FILE)):
            save_atomic(list(data.classes), os.path.join(output, CLASSES_FILE))
    save_atomic(_state_dict(ema.module if ema is not None else model), os.path.join(output, FINAL_FILE))
    summary["files"]["final"] = FINAL_FILE
    save_atomic(summary, os.path.join(output, SUMMARY_FILE))
    return summary
