"""``nfnet-fast``: the command line.

    nfnet-fast bench     parity-and-throughput table of nfnet_fast against timm on this machine
    nfnet-fast predict   classify images with timm's eval transforms and ImageNet labels
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import List, Optional

import torch


def _device(name: Optional[str]) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def cmd_bench(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import benchmark as B

    device = _device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (256 if cuda else 4)
    size = args.size or (288 if cuda else 160)
    iters = args.iters or (20 if cuda else 5)
    torch.manual_seed(0)
    ref = B.build_reference(args.model, device, pretrained=args.pretrained)
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nfnet-fast", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="parity-and-throughput table against timm on this machine")
    b.add_argument("--model", default="eca_nfnet_l0")
    b.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    b.add_argument("--batch", type=int, default=None, help="default 256 on CUDA, 4 on CPU")
    b.add_argument("--size", type=int, default=None, help="input pixels, default 288 on CUDA, 160 on CPU")
    b.add_argument("--iters", type=int, default=None, help="timed calls per contender (median reported)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--backends", default=None, help="comma-separated nfnet_fast backends (default: all that run)")
    b.add_argument("--no-compile", action="store_true", help="skip the torch.compile contenders")
    b.add_argument("--max-autotune", action="store_true", help="add timm under torch.compile max-autotune (slow)")
    b.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (needs them cached or network)")
    b.add_argument("--json", default=None, help="also write the results as JSON here")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
