"""nfnet-fast: timm's eca_nfnet_l0 (and the other NF models) rebuilt from fused kernels, from the
command line.

    nfnet-fast bench     parity-and-throughput table of nfnet_fast against timm on this machine
    nfnet-fast predict   classify images with timm's eval transforms and ImageNet labels

Only the standard library is imported at module level: arguments (and ``--help``) are handled
before torch, timm or the rest of nfnet_fast load (several seconds); each command imports them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import TYPE_CHECKING, List, Optional

if TYPE_CHECKING:  # annotations only; never imported at run time here
    import torch

# `predict --backend` choices: "auto" plus nfnet_fast._backends.NAMES, written out so that parsing
# arguments needs no torch (tests/test_cli.py checks the two agree).
BACKEND_CHOICES = ("auto", "reference", "triton", "cuda")

DESCRIPTION = ("timm's eca_nfnet_l0 (and every timm NF model) rebuilt from fused Triton/CUDA kernels: "
               "measure it against timm on this machine, or classify images with it.")
EPILOG = """examples:
  nfnet-fast bench                                   # CPU: batch 4 @ 160x160, 5 timed calls per contender
  nfnet-fast bench --device cuda --json out.json     # CUDA: batch 256 @ 288x288, 20 timed calls
  nfnet-fast predict cat.jpg dog.png --pretrained    # top-5 ImageNet classes per image

Run `nfnet-fast <command> --help` for a command's options."""


def _device(name: Optional[str]) -> torch.device:
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    if args.pretrained:
        _offline_unless_hub_reachable()
    try:
        ref = B.build_reference(args.model, device, pretrained=args.pretrained)
    except (OSError, RuntimeError, ValueError) as e:
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


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    import socket
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_unless_hub_reachable() -> None:
    """Without network, make huggingface_hub look in the local cache only: it would otherwise retry
    for about a minute, logging each try, before failing."""
    if not _hub_reachable():
        import huggingface_hub.constants
        huggingface_hub.constants.HF_HUB_OFFLINE = True


def _load_model(args: argparse.Namespace, device: torch.device):
    import torch

    from nfnet_fast import create_model

    kwargs = {}
    if args.checkpoint:
        if not os.path.isfile(args.checkpoint):
            raise CliError(f"checkpoint not found: {args.checkpoint}")
        kwargs["checkpoint_path"] = args.checkpoint
    if args.pretrained:
        _offline_unless_hub_reachable()
    try:
        model = create_model(args.model, pretrained=args.pretrained, backend=args.backend, **kwargs)
    except (OSError, RuntimeError, ValueError, KeyError) as e:
        first = _first_line(e)
        if args.pretrained:
            raise CliError(f"cannot load pretrained weights for {args.model} (no network, and not in the local "
                           f"cache?): {first}") from e
        raise CliError(f"cannot create {args.model}: {first}") from e
    return model.eval().to(device=device, memory_format=torch.channels_last)


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
    transform = create_transform(**resolve_data_config({}, model=model))
    labels = ImageNetInfo() if model.num_classes == 1000 else None
    failed, results = 0, []

    def flush(paths, batch):
        x = torch.stack(batch).to(device).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            probs = model(x).float().softmax(-1)
        top = probs.topk(min(args.topk, probs.shape[-1]), dim=-1)
        for path, p, i in zip(paths, top.values.tolist(), top.indices.tolist()):
            names = [labels.index_to_description(k) if labels else str(k) for k in i]
            results.append(dict(image=path, topk=[dict(index=k, label=n, prob=v) for k, n, v in zip(i, names, p)]))

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
    w.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (hub or local cache)")
    w.add_argument("--checkpoint", metavar="FILE", help="a timm-format checkpoint of the model")
    q.add_argument("--model", default="eca_nfnet_l0",
                   help="timm NF model name, e.g. nfnet_f0, nf_resnet50 (default: %(default)s)")
    q.add_argument("--topk", type=int, default=5, metavar="K",
                   help="classes printed per image, most probable first (default: %(default)s)")
    q.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="images per forward pass (default: %(default)s)")
    q.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    q.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="nfnet_fast kernel backend: %(choices)s (default: %(default)s, the fastest that runs on "
                        "the device)")
    q.add_argument("--json", action="store_true", help="print the predictions as JSON")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_predict)
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
