"""nfnet-fast: timm's eca_nfnet_l0 (and the other NF models) rebuilt from fused kernels, from the
command line.

    nfnet-fast bench     parity-and-throughput table of nfnet_fast against timm on this machine
    nfnet-fast predict   classify images with timm's eval transforms and ImageNet labels
    nfnet-fast finetune  fine-tune an NF model on an image folder (new head, SGD + AGC, cosine schedule)

Only the standard library is imported at module level: arguments (and ``--help``) are handled
before torch, timm or the rest of nfnet_fast load (several seconds); each command imports them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
from typing import TYPE_CHECKING, List, Optional, Tuple

if TYPE_CHECKING:  # annotations only; never imported at run time here
    import torch

# `predict --backend` choices: "auto" plus nfnet_fast._backends.NAMES, written out so that parsing
# arguments needs no torch (tests/test_cli.py checks the two agree).
BACKEND_CHOICES = ("auto", "reference", "triton", "cuda")

DESCRIPTION = ("timm's eca_nfnet_l0 (and every timm NF model) rebuilt from fused Triton/CUDA kernels: "
               "measure it against timm on this machine, classify images with it, or fine-tune it on yours.")
EPILOG = """examples:
  nfnet-fast bench                                   # CPU: batch 4 @ 160x160, 5 timed calls per contender
  nfnet-fast bench --device cuda --json out.json     # CUDA: batch 256 @ 288x288, 20 timed calls
  nfnet-fast predict cat.jpg dog.png --pretrained    # top-5 ImageNet classes per image
  nfnet-fast finetune --data flowers/ --pretrained --output runs/flowers   # new head, 10 epochs

Run `nfnet-fast <command> --help` for a command's options."""


def _device(name: Optional[str]) -> torch.device:
    """The torch device of --device (default: cuda when present), or a CliError saying why it cannot be used."""
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise CliError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from e
    if device.type not in ("cpu", "cuda"):
        raise CliError(f"--device {name}: nfnet-fast runs on cpu or cuda, not {device.type}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CliError(f"--device {name}: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                           f"use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CliError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def _device_label(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def cmd_bench(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from nfnet_fast import benchmark as B

    device = _device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 4)
    size = args.size or (288 if cuda else 160)
    iters = args.iters or (20 if cuda else 5)
    torch.manual_seed(0)
    try:
        with _hub_quiet(args.pretrained):
            ref = B.build_reference(args.model, device, pretrained=args.pretrained)
    except Exception as e:  # noqa: BLE001 - sorted below: the hub's errors, then the usual ones; the rest re-raised
        if args.pretrained:
            _raise_if_hub_failed(e, args.model, "or run without --pretrained (random weights)")
        if not isinstance(e, (OSError, RuntimeError, ValueError)):
            raise
        raise CliError(f"cannot build {args.model}{' with pretrained weights' if args.pretrained else ''}: "
                       f"{_first_line(e)}") from e
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        ref_out = ref(x).float()
    contenders = B.inference_contenders(ref, device, x, compile=not args.no_compile, max_autotune=args.max_autotune,
                                        backends=args.backends.split(",") if args.backends else None)
    results = []
    weights = "pretrained" if args.pretrained else "random"
    print(f"nfnet-fast bench: {args.model} ({weights} weights), inference, batch {batch} @ {size}x{size}, "
          f"channels_last, on {_device_label(device)}; torch {torch.__version__}", flush=True)
    for c in tqdm(contenders, desc="contenders", unit="model", disable=args.quiet, file=sys.stderr):
        try:
            results.append(B.run_contender(c, x, ref_out, iters, args.warmup, device))
        except Exception as e:  # noqa: BLE001 - one failing contender (e.g. a compile error) must not hide the rest
            print(f"  {c.name}: failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr)
    print(B.format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, device=_device_label(device), batch=batch, size=size,
                           weights=weights, torch=torch.__version__,
                           results=[r.__dict__ for r in results]), f, indent=2)
        print(f"wrote {args.json}")
    return 0


class CliError(Exception):
    """A failure reported as one line on stderr, without a traceback."""


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _exception_chain(e: BaseException) -> List[BaseException]:
    """`e`, then what caused it (``raise ... from``), then what that came from, and so on."""
    chain: List[BaseException] = []
    while e is not None and all(e is not seen for seen in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _network_error_types() -> tuple:
    """The exceptions that mean "could not reach the server" in the HTTP clients huggingface_hub has used
    (httpx2, httpx, requests) and the standard library."""
    import socket
    import urllib.error

    types = [ConnectionError, TimeoutError, socket.timeout, socket.gaierror, urllib.error.URLError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout"))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        types += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(types)


def _raise_if_hub_failed(e: BaseException, model: str, alternative: str) -> None:
    """Raise a one-line CliError when `e` (or what caused it) says the pretrained weights could not come from
    the Hugging Face Hub: huggingface_hub's offline mode (HF_HUB_OFFLINE) with nothing cached, the hub
    (or HF_ENDPOINT's mirror, through the proxies huggingface_hub uses) unreachable or timing out, or an HTTP
    error from it. Return for any other error. Every network decision (endpoint, offline switch, proxies,
    timeouts, retries) is huggingface_hub's: this only reports its outcome."""
    from huggingface_hub import constants as hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    chain = _exception_chain(e)
    if any(isinstance(x, OfflineModeIsEnabled) for x in chain) or (
            hub.HF_HUB_OFFLINE and any(isinstance(x, LocalEntryNotFoundError) for x in chain)):
        raise CliError(f"the pretrained weights of {model} are not in the local Hugging Face cache "
                       f"({hub.HF_HUB_CACHE}) and HF_HUB_OFFLINE is set; unset it to download them, "
                       f"{alternative}") from e
    network = [x for x in chain if isinstance(x, _network_error_types())]
    http = [x for x in chain if isinstance(x, HfHubHTTPError)]
    if network:  # the HTTP client's, e.g. "ConnectError: [Errno -2] Name or service not known"
        reason = f"{type(network[0]).__name__}: {_first_line(network[0])}"
    elif http:
        reason = _first_line(http[0])
    elif any(isinstance(x, LocalEntryNotFoundError) for x in chain):
        reason = "not in the local cache, and the hub could not be reached"
    else:
        return
    raise CliError(f"cannot download the pretrained weights of {model} from the Hugging Face Hub at "
                   f"{hub.ENDPOINT} ({reason}); set HF_ENDPOINT for a mirror, {alternative}") from e


@contextlib.contextmanager
def _hub_quiet(pretrained: bool):
    """While the pretrained weights load, huggingface_hub logs only errors, not a warning per retry of an
    unreachable hub, so that a failure reads as one line; HF_HUB_VERBOSITY, when set, wins."""
    if not pretrained or os.environ.get("HF_HUB_VERBOSITY"):
        yield
        return
    from huggingface_hub.utils import logging as hub_logging

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


# The first bytes of a file torch.save wrote: a zip archive (torch >= 1.6), or the legacy format, which starts
# with a pickled magic number.
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _unreadable_because(path: str, e: Exception) -> str:
    """Why timm could not read the checkpoint file `path` (it raised `e`), in a few words."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not head:
        return "the file is empty"
    if path.endswith(".safetensors"):
        return f"not a valid safetensors file ({_first_line(e)})"
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            return "the file is truncated or damaged (its zip archive has no central directory)"
        import torch

        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - only a better reason; the generic one follows
            unsafe = []
        if unsafe:
            return (f"it pickles Python objects, not just tensors ({', '.join(unsafe[:3])}), which torch.load"
                    f"(weights_only=True) refuses; save the model's state_dict() instead")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - as above
            obj = {}
        if not isinstance(obj, dict):
            return f"it holds a {type(obj).__name__}, not a state_dict (a dict of tensors)"
        return f"{type(e).__name__}: {_first_line(e)}"
    if head.startswith(_LEGACY_MAGIC):
        return f"the file is truncated or damaged ({type(e).__name__}: {_first_line(e)})"
    return "it is neither a PyTorch (torch.save) nor a safetensors file"


def _read_checkpoint(path: str, model: str) -> dict:
    """The state_dict in checkpoint file `path`, read as timm reads it (safetensors, or torch.load with
    weights_only; a 'state_dict', 'model' or EMA entry unwrapped; 'module.' prefixes stripped)."""
    from timm.models import load_state_dict

    if os.path.isdir(path):
        raise CliError(f"checkpoint is a directory, not a file: {path}")
    if not os.path.exists(path):
        raise CliError(f"checkpoint not found: {path}")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise CliError(f"cannot read checkpoint {path}: {e.strerror or _first_line(e)}") from e
    try:
        state_dict = load_state_dict(path)
    except Exception as e:  # noqa: BLE001 - torch.load raises anything for a damaged file (a KeyError, EOFError...)
        raise CliError(f"{path} is not a loadable checkpoint of {model}: {_unreadable_because(path, e)}") from e
    if not isinstance(state_dict, dict):
        raise CliError(f"{path} is not a loadable checkpoint of {model}: it holds a {type(state_dict).__name__}, "
                       f"not a state_dict")
    return state_dict


def _load_checkpoint(model_obj, state_dict: dict, path: str, model: str) -> None:
    """Load `state_dict` into the model strictly (as timm's checkpoint_path does), or say in a few words which
    tensors do not fit."""
    import torch

    own = model_obj.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    other = [k for k in own if k in state_dict and not (isinstance(state_dict[k], torch.Tensor)
                                                          and state_dict[k].shape == own[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} of the model's {len(own)} tensors missing (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})")
    if other:
        k, v = other[0], state_dict[other[0]]
        got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        parts.append(f"{len(other)} tensors of another shape (e.g. {k!r}: {got}, the model's {list(own[k].shape)})")
    if parts:
        raise CliError(f"{path} is not a loadable checkpoint of {model}: " + ", ".join(parts))
    try:
        model_obj.load_state_dict(state_dict)
    except (RuntimeError, TypeError, ValueError) as e:
        raise CliError(f"{path} is not a loadable checkpoint of {model}: {_first_line(e)}") from e


def _create_model(args: argparse.Namespace, alternative: str, **kwargs):
    """nfnet_fast.create_model(args.model, pretrained=args.pretrained, backend=args.backend, **kwargs), with the
    hub's failures and the usual build errors as one-line CliErrors (`alternative`: what else the user can do
    when the pretrained weights cannot be had)."""
    from nfnet_fast import create_model

    try:
        with _hub_quiet(args.pretrained):
            return create_model(args.model, pretrained=args.pretrained, backend=args.backend, **kwargs)
    except Exception as e:  # noqa: BLE001 - sorted below: the hub's errors, then the usual ones; the rest re-raised
        if args.pretrained:
            _raise_if_hub_failed(e, args.model, alternative)
        if not isinstance(e, (OSError, RuntimeError, ValueError, KeyError)):
            raise
        if args.pretrained:
            raise CliError(f"cannot load pretrained weights for {args.model}: {_first_line(e)}") from e
        raise CliError(f"cannot create {args.model}: {_first_line(e)}") from e


def _load_model(args: argparse.Namespace, device: torch.device):
    import torch

    # The checkpoint is read before the model is built: a bad file fails in a moment, not after the build.
    state_dict = _read_checkpoint(args.checkpoint, args.model) if args.checkpoint else None
    model = _create_model(args, "or pass --checkpoint FILE")
    if state_dict is not None:
        # a fine-tuned checkpoint (nfnet-fast finetune) has its own number of classes: take the head's from it
        head = state_dict.get(f"{model.pretrained_cfg.get('classifier', '')}.weight")
        if (isinstance(head, torch.Tensor) and head.dim() == 2 and head.shape[1] == model.num_features
                and head.shape[0] != model.num_classes):
            model.reset_classifier(head.shape[0])
        _load_checkpoint(model, state_dict, args.checkpoint, args.model)
    return model.eval().to(device=device, memory_format=torch.channels_last)


def _json_beside(checkpoint: Optional[str], name: str):
    """The JSON file ``name`` that nfnet-fast finetune writes beside its checkpoints, parsed, or None when
    there is no checkpoint or no such readable file."""
    if not checkpoint:
        return None
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(checkpoint)), name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _class_names(checkpoint: Optional[str], num_classes: int) -> Optional[List[str]]:
    """The class names nfnet-fast finetune writes beside its checkpoints (classes.json), when there are as many
    as the model has classes; else None."""
    names = _json_beside(checkpoint, "classes.json")
    if isinstance(names, list) and len(names) == num_classes and all(isinstance(n, str) for n in names):
        return names
    return None


def _trained_size(checkpoint: Optional[str], model: str) -> Optional[int]:
    """The image size of a checkpoint nfnet-fast finetune wrote (summary.json's input_size, beside it, for this
    model), else None."""
    summary = _json_beside(checkpoint, "summary.json")
    try:
        size = summary["input_size"][-1] if summary.get("model") == model else None
    except (KeyError, IndexError, TypeError, AttributeError):  # (no summary, or one of another shape)
        return None
    return size if isinstance(size, int) and size > 0 else None


def cmd_predict(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image, UnidentifiedImageError
    from timm.data import ImageNetInfo, create_transform, resolve_data_config
    from tqdm import tqdm

    device = _device(args.device)
    if not (args.pretrained or args.checkpoint):
        print("nfnet-fast predict: warning: no --pretrained or --checkpoint, the weights are random and so are "
              "the predictions", file=sys.stderr)
    model = _load_model(args, device)
    topk = args.topk if args.topk is not None else min(5, model.num_classes)
    if topk > model.num_classes:
        raise CliError(f"--topk {topk} is more than the {model.num_classes} classes of {args.model}")
    size = args.img_size or _trained_size(args.checkpoint, args.model)
    transform = create_transform(**resolve_data_config({"input_size": (3, size, size)} if size else {}, model=model))
    names = _class_names(args.checkpoint, model.num_classes)
    labels = ImageNetInfo() if model.num_classes == 1000 and names is None else None
    failed, results = 0, []

    def flush(paths, batch):
        x = torch.stack(batch).to(device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            probs = model(x).float().softmax(-1)
        top = probs.topk(topk, dim=-1)
        for path, p, i in zip(paths, top.values.tolist(), top.indices.tolist()):
            texts = [labels.index_to_description(k) if labels else names[k] if names else str(k) for k in i]
            results.append(dict(image=path, topk=[dict(index=k, label=n, prob=v) for k, n, v in zip(i, texts, p)]))

    paths, batch = [], []
    for path in tqdm(args.images, desc="images", unit="img", file=sys.stderr,
                     disable=args.quiet or len(args.images) < 2 * args.batch_size):
        try:
            with Image.open(path) as im:
                batch.append(transform(im.convert("RGB")))
        except (OSError, UnidentifiedImageError, ValueError) as e:
            failed += 1
            why = "no such file" if isinstance(e, FileNotFoundError) else f"not a readable image ({type(e).__name__})"
            print(f"nfnet-fast predict: skipping {path}: {why}", file=sys.stderr)
            continue
        paths.append(path)
        if len(batch) == args.batch_size:
            flush(paths, batch)
            paths, batch = [], []
    if batch:
        flush(paths, batch)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['image']}: " + " | ".join(f"{t['label']} {100 * t['prob']:.1f}%" for t in r["topk"]))
    return 1 if failed else 0


def _read_resume(path: str, model: str) -> dict:
    """The checkpoint --resume names, read with torch.load(weights_only=True), or a one-line CliError saying why
    it cannot be read (whether it continues this run is nfnet_fast.train.check_resume's to say)."""
    import torch

    if os.path.isdir(path):
        raise CliError(f"--resume {path} is a directory, not a checkpoint file")
    if not os.path.exists(path):
        raise CliError(f"--resume checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch.load raises anything for a damaged file
        raise CliError(f"{path} is not a loadable checkpoint of {model}: {_unreadable_because(path, e)}") from e


def _finetune_output(args: argparse.Namespace) -> str:
    """The --output folder (default: the --resume file's folder, else finetune-<model>), or a CliError when it is
    a file, cannot be made or written, or holds another run that --resume does not continue."""
    from nfnet_fast import train as T

    output = args.output or ((os.path.dirname(args.resume) or ".") if args.resume else f"finetune-{args.model}")
    if os.path.exists(output) and not os.path.isdir(output):
        raise CliError(f"--output {output} is a file, not a folder")
    # the folder is made when the first epoch ends: find out now whether it can be, not after that epoch
    parent = os.path.abspath(output)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise CliError(f"--output {output}: {parent} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=".nfnet-fast-probe-"))
    except OSError as e:
        raise CliError(f"--output {output}: cannot write in {parent} ({e.strerror or type(e).__name__})") from e
    held = [f for f in (T.RESUME_FILE, T.FINAL_FILE) if os.path.exists(os.path.join(output, f))]
    resumed_here = args.resume and os.path.realpath(os.path.dirname(os.path.abspath(args.resume))) == \
        os.path.realpath(output)
    if held and not resumed_here:
        raise CliError(f"--output {output} already holds a fine-tuning run ({held[0]}); continue it with --resume "
                       f"{os.path.join(output, T.RESUME_FILE)}, or pass another --output")
    return output


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _check_aa(aa: str) -> None:
    """A CliError unless timm makes a training transform of the --aa spec (before any image is checked)."""
    from timm.data import create_transform

    try:
        create_transform(32, is_training=True, auto_augment=aa)
    except Exception as e:  # noqa: BLE001 - timm asserts, or fails parsing, in many ways
        raise CliError(f"--aa {aa}: not an augmentation timm knows ({_first_line(e) or type(e).__name__}); e.g. "
                       f"rand-m9-mstd0.5 (RandAugment), augmix-m5, original (AutoAugment), or none") from e


class _Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, ``timeout``, a batch scheduler) raised as an exception where the run is, as Ctrl-C is:
    an atomic save under way removes its temporary file, and the run says where to resume."""


def _interrupted(e: KeyboardInterrupt) -> Tuple[str, int]:
    """What to say and the exit status: 143 for SIGTERM (128 + 15), 130 for Ctrl-C (128 + 2), as a shell does."""
    return ("terminated", 143) if isinstance(e, _Terminated) else ("interrupted", 130)


def _raise_terminated(signum, frame):
    raise _Terminated


def cmd_finetune(args: argparse.Namespace) -> int:
    import signal
    import threading

    # (a signal handler can be set from the main thread only: a caller's thread keeps SIGTERM's own action)
    handles = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if handles else None
    try:
        return _finetune_command(args)
    except KeyboardInterrupt as e:  # before training (checking images, loading weights): nothing written yet
        what, status = _interrupted(e)
        print(f"nfnet-fast finetune: {what}", file=sys.stderr)
        return status
    finally:
        if handles:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _finetune_command(args: argparse.Namespace) -> int:
    import nfnet_fast
    from nfnet_fast import train as T

    device = _device(args.device)
    if args.cuda_graph and device.type != "cuda":
        raise CliError(f"--cuda-graph needs a CUDA device, not {device.type}")
    if not (args.data or args.dataset):
        raise CliError("no data: pass --data DIR (an image folder, one subfolder per class, or train/ and val/ "
                       "folders of them) or --dataset NAME (a timm dataset)")
    if args.dataset and args.val_split is not None and args.eval_split:
        raise CliError(f"--eval-split {args.eval_split} and --val-split {args.val_split:g}: use one of them "
                       f"(--val-split holds out part of the training split instead)")
    if not args.dataset:
        given = [flag for flag, value in (("--train-split", args.train_split), ("--eval-split", args.eval_split),
                                          ("--download", args.download or None)) if value is not None]
        if given:
            raise CliError(f"{given[0]} applies to --dataset only; an image folder's splits are its train/ and val/ "
                           f"folders, or --val-split")
    aa = None if args.aa.lower() in ("", "none") else args.aa
    if aa is not None:
        _check_aa(aa)
    output = _finetune_output(args)
    resume = _read_resume(args.resume, args.model) if args.resume else None
    try:
        if args.dataset:
            eval_split = "validation" if args.eval_split is None else args.eval_split or None
            data = T.timm_dataset_data(args.dataset, args.data, train_split=args.train_split or "train",
                                       eval_split=eval_split, val_split=args.val_split,
                                       download=args.download, seed=args.seed)
        else:
            data = T.image_folder_data(args.data, val_split=args.val_split, seed=args.seed, progress=not args.quiet)
        if resume is not None:
            T.check_resume(resume, args.resume, args.model, data.classes, args.epochs, held_out=data.held_out)
    except T.FinetuneError as e:
        raise CliError(str(e)) from e
    from timm.utils import random_seed

    random_seed(args.seed)  # the new head's (and, without --pretrained, every layer's) initial weights
    if resume is not None:  # its checkpoint holds every weight: no download needed (an offline node resumes)
        args = argparse.Namespace(**{**vars(args), "pretrained": False})
    model = _create_model(args, "or run without --pretrained (random weights)", num_classes=len(data.classes),
                          drop_rate=args.drop_rate, drop_path_rate=args.drop_path_rate)
    if resume is not None:
        _load_checkpoint(model, resume["state_dict"], args.resume, args.model)
    config = T.FinetuneConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, warmup_epochs=args.warmup_epochs,
        weight_decay=args.weight_decay, clip_grad=args.clip_grad, smoothing=args.smoothing,
        aa=aa, img_size=args.img_size, ema_decay=args.ema_decay,
        amp=not args.no_amp, channels_last=not args.no_channels_last, cuda_graph=args.cuda_graph,
        workers=args.workers, seed=args.seed)
    cuda = device.type == "cuda"
    precision = ("bf16 autocast" if config.amp and cuda else "fp32") + (", CUDA graphs" if config.cuda_graph else "")
    weights = "resumed" if resume is not None else "pretrained" if args.pretrained else "random"
    backend = args.backend if args.backend != "auto" else f"auto: {nfnet_fast.ops.resolve_backend('auto', device)}"
    head = f"{'' if resume is not None else 'new '}{len(data.classes)}-class head"
    print(f"nfnet-fast finetune: {args.model} ({weights} weights, {head}, backend {backend}) on {data.describe()}; "
          f"{_device_label(device)}, {precision}, batch {config.batch_size}, {_count(config.epochs, 'epoch')}, "
          f"SGD nesterov lr {config.lr:g} (cosine, {_count(config.warmup_epochs, 'warm-up epoch')}), "
          f"{f'AGC {config.clip_grad:g} (head excluded)' if config.clip_grad else 'no AGC'}, "
          f"smoothing {config.smoothing:g}, aa {config.aa}"
          f"{f', EMA {config.ema_decay:g}' if config.ema_decay else ''} -> {output}", flush=True)
    if resume is not None:
        print(f"resuming from {args.resume} after epoch {int(resume['epoch']) + 1}", flush=True)
    try:
        summary = T.finetune(model, data, config, output, model_name=args.model, device=device, resume=resume,
                             progress=not args.quiet, log=lambda line: print(line, flush=True))
    except T.FinetuneError as e:
        raise CliError(str(e)) from e
    except KeyboardInterrupt as e:
        what, status = _interrupted(e)
        last = os.path.join(output, T.RESUME_FILE)
        print(f"nfnet-fast finetune: {what}{f'; continue with --resume {last}' if os.path.exists(last) else ''}",
              file=sys.stderr)
        return status
    final = os.path.join(output, T.FINAL_FILE)
    best = summary["best"]
    if best:
        print(f"best: epoch {best['epoch']}, top-1 {best['top1']:.1f}%{' (EMA)' if best['ema'] else ''} -> "
              f"{os.path.join(output, T.BEST_FILE)}")
    print(f"wrote {final} ({'EMA ' if config.ema_decay else ''}weights after epoch {config.epochs}); load it with "
          f"timm.create_model({args.model!r}, num_classes={len(data.classes)}, checkpoint_path={final!r}) or "
          f"nfnet-fast predict IMAGE --model {args.model} --checkpoint {final}")
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Fills each paragraph of a description or epilog to the terminal width, but keeps the lines of
    a paragraph with indented lines (the command list, the examples) as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        paras = []
        for para in text.strip("\n").split("\n\n"):
            if any(line[:1].isspace() for line in para.splitlines()):
                paras.append("\n".join(indent + line for line in para.splitlines()))
            else:
                paras.append(textwrap.fill(" ".join(para.split()), width, initial_indent=indent,
                                           subsequent_indent=indent))
        return "\n\n".join(paras)


def _topk(text: str) -> int:
    """argparse type of --topk: an integer >= 1 (checked against the model's number of classes once loaded)."""
    try:
        k = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"topk must be an integer >= 1, not {text!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"topk must be >= 1, got {k}")
    return k


def _number(kind: type, low: float, high: Optional[float] = None, low_open: bool = False, high_open: bool = True):
    """argparse type: a `kind` (int or float) in [low, high) (or (low, ...) with low_open, ..., high] without
    high_open), refused while parsing with the range in the message."""
    lo, hi = "(" if low_open else "[", "]" if not high_open else ")"
    show = str if kind is int else "{:g}".format
    top = "inf" if high is None else show(high)
    what = f"{'an integer' if kind is int else 'a number'} in {lo}{show(low)}, {top}{hi}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}") from None
        if (value <= low if low_open else value < low) or (high is not None and (
                value >= high if high_open else value > high)) or value != value:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``nfnet-fast``; builds without importing torch, timm or nfnet_fast."""
    p = argparse.ArgumentParser(prog="nfnet-fast", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=_HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    bench_help = "parity-and-throughput table of nfnet_fast against timm on this machine"
    b = sub.add_parser(
        "bench", help=bench_help, formatter_class=_HelpFormatter,
        description=f"{bench_help[0].upper()}{bench_help[1:]}.\n\n"
                    "Builds the model once with random (or --pretrained) weights, then runs each contender in "
                    "one process on the same channels_last input: timm eager, torch.compile(timm), and nfnet_fast "
                    "on every backend that runs here, eager and compiled (on CUDA also bf16 autocast and CUDA "
                    "graphs). Each contender makes one call checked against timm fp32, --warmup untimed calls, "
                    "then about --iters timed samples (torch.utils.benchmark on a CPU, triton's do_bench on CUDA), "
                    "of which the table reports the median.\n\n"
                    "Table columns: contender | max err / max abs (vs timm fp32) | img/s | peak MiB (CUDA only, "
                    "'-' on a CPU) | vs <each timm contender> (speed-up).")
    b.add_argument("--model", default="eca_nfnet_l0",
                   help="timm NF model name, e.g. nfnet_f0, nf_resnet50 (default: %(default)s)")
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    b.add_argument("--batch", type=int, default=None, help="images per call (default: 256 on CUDA, 4 on CPU)")
    b.add_argument("--size", type=int, default=None,
                   help="input height and width in pixels (default: 288 on CUDA, 160 on CPU)")
    b.add_argument("--iters", type=int, default=None,
                   help="timed samples per contender, median reported (default: 20 on CUDA, 5 on CPU)")
    b.add_argument("--warmup", type=int, default=2,
                   help="untimed calls per contender before the timed ones (default: %(default)s)")
    b.add_argument("--backends", default=None, metavar="LIST",
                   help="comma-separated nfnet_fast backends, e.g. reference,cuda (default: all that run here)")
    b.add_argument("--no-compile", action="store_true",
                   help="skip the torch.compile contenders (compiling them takes minutes on a small CPU)")
    b.add_argument("--max-autotune", action="store_true", help="add timm under torch.compile max-autotune (slow)")
    b.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs them cached or network)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON to FILE")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)

    predict_help = "classify images with timm's eval transforms and ImageNet labels"
    q = sub.add_parser(
        "predict", help=predict_help, formatter_class=_HelpFormatter,
        description=f"{predict_help[0].upper()}{predict_help[1:]}.\n\n"
                    "Prints one line per image with its top-k classes and probabilities (or JSON with --json). "
                    "Without --pretrained or --checkpoint the weights are random, and so are the predictions.\n\n"
                    "Exit status: 0; 1 when an image could not be read (it is skipped, the others are classified); "
                    "2 on a usage or model-loading error.")
    q.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any format PIL reads)")
    w = q.add_mutually_exclusive_group()
    w.add_argument("--pretrained", action="store_true",
                   help="timm's pretrained weights (Hugging Face Hub or local cache; huggingface_hub's settings apply: "
                        "HF_ENDPOINT, HF_HUB_OFFLINE, proxies, timeouts)")
    w.add_argument("--checkpoint", metavar="FILE",
                   help="a timm-format checkpoint of the model (its number of classes is the checkpoint's; the class "
                        "names of a checkpoint nfnet-fast finetune wrote come from classes.json beside it)")
    q.add_argument("--model", default="eca_nfnet_l0",
                   help="timm NF model name, e.g. nfnet_f0, nf_resnet50 (default: %(default)s)")
    q.add_argument("--topk", type=_topk, default=None, metavar="K",
                   help="classes printed per image, most probable first (default: 5, or all the classes of a model "
                        "with fewer)")
    q.add_argument("--batch-size", type=_number(int, 1), default=32, metavar="N",
                   help="images per forward pass (default: %(default)s)")
    q.add_argument("--img-size", type=_number(int, 8), default=None, metavar="PX",
                   help="input image size (default: the size a checkpoint of nfnet-fast finetune was trained at, "
                        "from summary.json beside it; else the model's, e.g. 224 for eca_nfnet_l0)")
    q.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    q.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="nfnet_fast kernel backend: %(choices)s (default: %(default)s, the fastest that runs on "
                        "the device)")
    q.add_argument("--json", action="store_true", help="print the predictions as JSON")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_predict)

    finetune_help = "fine-tune an NF model on an image folder, the way the NFNet model cards train"
    f = sub.add_parser(
        "finetune", help=finetune_help, formatter_class=_HelpFormatter,
        description=f"{finetune_help[0].upper()}{finetune_help[1:]}.\n\n"
                    "A new head for the data's classes (the other pretrained weights kept, as timm does with "
                    "num_classes); SGD with Nesterov momentum and a cosine schedule with warm-up, stepped per update "
                    "(timm's optimizer and scheduler factories); adaptive gradient clipping of every parameter but "
                    "the head's (nfnet_fast.adaptive_clip_grad_); label smoothing; timm's training transforms with "
                    "RandAugment; dropout and stochastic depth; optionally an EMA of the weights; bf16 autocast and "
                    "channels_last on a GPU. Each epoch ends with top-1 (and, with 5 classes or more, top-5) "
                    "validation and checkpoints written atomically in --output: last.pth (resumable with --resume), "
                    "model_best.pth (best validation top-1), model.pth at the end, summary.json, classes.json. "
                    "model.pth and model_best.pth are plain state_dicts: timm.create_model(MODEL, num_classes=K, "
                    "checkpoint_path=...) loads them, and so does nfnet-fast predict --checkpoint.\n\n"
                    "Data: --data DIR with DIR/train/<class>/*.jpg and optionally DIR/val/<class>/ (or "
                    "DIR/<class>/ alone, with --val-split to hold out a fraction per class), or --dataset NAME (a "
                    "timm.data.create_dataset name such as torch/cifar10, with --data its root folder). Every image "
                    "of a folder is opened and decoded before training starts; an image's class is the folder "
                    "directly under DIR (or DIR/train), so images in deeper folders are refused.\n\n"
                    "Exit status: 0; 2 on bad input (no images, a single class, an unreadable image, nested, "
                    "hidden or empty class folders, an unknown --dataset or --aa, a --resume checkpoint of another "
                    "model, other classes or another --val-split hold-out, an --output that is a file, cannot be "
                    "written or holds another run), said in one line, with nothing written; 130 when interrupted "
                    "(Ctrl-C), 143 when terminated (SIGTERM), last.pth of the last finished epoch kept and no "
                    "half-written file left. A run stopped after its last epoch but before it wrote model.pth "
                    "finishes with --resume: it writes model.pth and trains nothing.",
        epilog="example:\n"
               "  nfnet-fast finetune --data flowers/ --model eca_nfnet_l0 --pretrained --epochs 10 --batch-size 64 "
               "--lr 0.01 --output runs/flowers")
    f.add_argument("--data", metavar="DIR",
                   help="image folder: DIR/train/<class>/ (and optionally DIR/val/<class>/), or DIR/<class>/; with "
                        "--dataset, that dataset's root folder")
    f.add_argument("--dataset", metavar="NAME",
                   help="a timm dataset instead of an image folder (timm.data.create_dataset), e.g. torch/cifar10")
    f.add_argument("--download", action="store_true", help="let --dataset download its data into --data")
    f.add_argument("--train-split", default=None, metavar="SPLIT",
                   help="--dataset split to train on (default: train)")
    f.add_argument("--eval-split", default=None, metavar="SPLIT",
                   help="--dataset split to validate on, '' for none (default: validation)")
    f.add_argument("--val-split", type=_number(float, 0, 1, low_open=True), default=None, metavar="F",
                   help="hold out this fraction of each class's training images for validation (when there is no "
                        "val/ folder or --eval-split)")
    f.add_argument("--model", default="eca_nfnet_l0",
                   help="timm NF model name, e.g. nfnet_f0, nf_resnet50 (default: %(default)s)")
    f.add_argument("--pretrained", action="store_true",
                   help="start from timm's pretrained weights (Hugging Face Hub or local cache; huggingface_hub's "
                        "settings apply: HF_ENDPOINT, HF_HUB_OFFLINE, proxies, timeouts); the head is new")
    f.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="nfnet_fast kernel backend: %(choices)s (default: %(default)s, the fastest that runs on "
                        "the device)")
    f.add_argument("--epochs", type=_number(int, 1), default=10, help="epochs in all (default: %(default)s)")
    f.add_argument("--batch-size", type=_number(int, 1), default=32, metavar="N",
                   help="images per training step (default: %(default)s)")
    f.add_argument("--lr", type=_number(float, 0, low_open=True), default=0.01,
                   help="peak learning rate after the warm-up (default: %(default)s)")
    f.add_argument("--warmup-epochs", type=_number(int, 0), default=1, metavar="N",
                   help="epochs of linear warm-up from 1e-5, per update (default: %(default)s)")
    f.add_argument("--weight-decay", type=_number(float, 0), default=2e-5, metavar="WD",
                   help="SGD weight decay, not on biases and 1-D gains (default: %(default)s)")
    f.add_argument("--clip-grad", type=_number(float, 0), default=0.015, metavar="F",
                   help="adaptive gradient clipping factor, the head excluded; 0 for none (default: %(default)s)")
    f.add_argument("--smoothing", type=_number(float, 0, 1), default=0.1,
                   help="label smoothing (default: %(default)s)")
    f.add_argument("--aa", default="rand-m9-mstd0.5", metavar="SPEC",
                   help="timm auto-augment spec of the training transform, 'none' for none (default: %(default)s, "
                        "RandAugment)")
    f.add_argument("--drop-rate", type=_number(float, 0, 1), default=0.0, metavar="P",
                   help="dropout before the classifier (default: %(default)s)")
    f.add_argument("--drop-path-rate", type=_number(float, 0, 1), default=0.0, metavar="P",
                   help="stochastic depth: the last block's drop probability (default: %(default)s)")
    f.add_argument("--ema-decay", type=_number(float, 0, 1, low_open=True), default=None, metavar="D",
                   help="keep an EMA of the weights with this decay, e.g. 0.9998 (timm's ModelEmaV3 with warm-up), "
                        "validated beside the model; model.pth and model_best.pth are then the EMA's (default: none)")
    f.add_argument("--img-size", type=_number(int, 8), default=None, metavar="PX",
                   help="training and validation image size (default: the model's, e.g. 224 for eca_nfnet_l0)")
    f.add_argument("--workers", type=_number(int, 0), default=4, metavar="N",
                   help="data loading processes, 0 to load in this one (default: %(default)s)")
    f.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    f.add_argument("--no-amp", action="store_true", help="on a GPU, train in fp32 instead of bf16 autocast")
    f.add_argument("--no-channels-last", action="store_true", help="on a GPU, keep NCHW instead of channels_last")
    f.add_argument("--cuda-graph", action="store_true",
                   help="on a GPU, replay each training forward and backward from CUDA graphs captured on the first "
                        "batch (the benchmark's eca_nfnet_l0 step on an H100: 2.2x the eager one, whose pace is the "
                        "host's); an epoch's last, smaller batch and validation run eagerly")
    f.add_argument("--seed", type=_number(int, 0, 2**32), default=0, metavar="N",
                   help="seed of the weights, shuffling and augmentation, 0 to 2^32 - 1 (default: %(default)s)")
    f.add_argument("--output", metavar="DIR", default=None,
                   help="folder for the checkpoints (default: the --resume file's folder, else finetune-MODEL)")
    f.add_argument("--resume", metavar="FILE",
                   help="continue the run whose last.pth this is (same model and classes; --epochs counts all "
                        "epochs, those done included)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_finetune)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as e:
        print(f"nfnet-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
