"""Peak memory of an eca_nfnet_l0 training step, timm eager against nfnet_fast: the training issue's
memory target (at most 0.6x timm eager's peak at batch 128, 224 px).

The step is bench/test_bench_model.py's (forward under autocast when bf16, zero_grad(set_to_none),
backward, timm's adaptive_clip_grad without the classifier, SGD with momentum); one untimed step
first makes the momentum buffers and fills the caches, the second is measured.

- On CUDA: ``torch.cuda.max_memory_allocated`` over the second step, at the size asked.
- On a CPU: the allocator's own events (``torch.profiler`` with ``profile_memory=True``: every
  allocation and free of the step, the compiled backends' kernels included, which run through the
  Triton interpreter with ``TRITON_INTERPRET=1``; the interpreter's numpy tiles are not torch
  allocations, as registers are not on a GPU). The peak is what was live when the step began
  (parameters, the previous step's gradients, momentum, the batch) plus the highest running sum of
  the step's allocations less its frees. A CPU cannot run batch 128 at 224 px through the
  interpreter, so it measures two small batches and extrapolates: peak = fixed + per-sample bytes x
  batch, the per-sample part scaled with the pixel count (activations are); the fixed part
  (weights, gradients, momentum, timm's standardised weights) does not grow with the batch.
  Caveat: on eca_nfnet_l0 the CPU figures for nfnet_fast came out below the bytes its forward saves
  for the backward (README, training memory), so the events miss some allocations of the
  interpreted path: treat a CPU result as unverified until a GPU run agrees.

    TRITON_INTERPRET=1 python bench/peak_memory.py [--backend triton] [--dtype fp32|bf16]
        [--batches 2 4] [--size 96] [--target-batch 128 --target-size 224]
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F
from timm.utils import adaptive_clip_grad

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _step(model, opt, x, target, dtype):
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        loss = F.cross_entropy(model(x), target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    adaptive_clip_grad([p for n, p in model.named_parameters() if not n.startswith("head.fc")], clip_factor=0.01)
    opt.step()


def _live_bytes(model, opt, x, target) -> int:
    """Bytes of the step's own tensors live before it starts (each storage once)."""
    tensors = [x, target] + [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def step_peak(model, batch: int, size: int, dtype: str, device: torch.device) -> int:
    """Peak bytes allocated during the second of two training steps of ``model`` (see the module)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (batch,), generator=gen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    _step(model, opt, x, target, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        _step(model, opt, x, target, dtype)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    from torch.profiler import ProfilerActivity, profile

    start = _live_bytes(model, opt, x, target)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, opt, x, target, dtype)
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return start + peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="eca_nfnet_l0")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--batches", type=int, nargs="+", default=None,
                    help="batch sizes to measure (default: the target batch on CUDA, 2 and 4 on a CPU)")
    ap.add_argument("--size", type=int, default=None, help="image size (default: the target size on CUDA, 96 on a CPU)")
    ap.add_argument("--target-batch", type=int, default=128)
    ap.add_argument("--target-size", type=int, default=224)
    ap.add_argument("--silu-prologue", action="store_true", help="nfnet_fast with convert(silu_prologue=True)")
    args = ap.parse_args(argv)
    import timm

    import nfnet_fast

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    batches = args.batches or ([args.target_batch] if cuda else [2, 4])
    size = args.size or (args.target_size if cuda else 96)
    torch.manual_seed(0)
    ref = timm.create_model(args.model, num_classes=10).to(device).train()
    fast = nfnet_fast.convert(copy.deepcopy(ref), backend=args.backend, silu_prologue=args.silu_prologue).train()
    print(f"{args.model}, {args.dtype}, training step (SGD momentum + AGC), {device.type}, size {size}, "
          f"nfnet_fast backend {args.backend}{' with the SiLU prologue' if args.silu_prologue else ''}")
    peaks = {}
    for name, model in (("timm eager", ref), ("nfnet_fast", fast)):
        for b in batches:
            peaks[name, b] = step_peak(model, b, size, args.dtype, device)
            print(f"  {name:10s} batch {b:4d}: peak {peaks[name, b] / 2**20:9.1f} MiB", flush=True)
    for b in batches:
        print(f"  ratio at batch {b}: {peaks['nfnet_fast', b] / peaks['timm eager', b]:.3f}")
    if len(batches) >= 2 and (batches[-1], size) != (args.target_batch, args.target_size):
        b0, b1 = batches[0], batches[-1]
        scale = (args.target_size / size) ** 2
        target = {}
        for name in ("timm eager", "nfnet_fast"):
            per_sample = (peaks[name, b1] - peaks[name, b0]) / (b1 - b0)
            fixed = peaks[name, b0] - per_sample * b0
            target[name] = fixed + per_sample * scale * args.target_batch
            print(f"  {name:10s}: fixed {fixed / 2**20:8.1f} MiB + {per_sample / 2**20:7.2f} MiB a sample at {size} px "
                  f"-> batch {args.target_batch} at {args.target_size} px: {target[name] / 2**30:6.2f} GiB")
        print(f"  extrapolated ratio at batch {args.target_batch}, {args.target_size} px: "
              f"{target['nfnet_fast'] / target['timm eager']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
