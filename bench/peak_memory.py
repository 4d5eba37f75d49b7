"""Peak memory of an eca_nfnet_l0 training step, timm eager against nfnet_fast: the training issue's
memory target (at most 0.6x timm eager's peak at batch 128, 224 px).

The step is ``nfnet_fast.benchmark.train_step``, bench/test_bench_model.py's (forward under autocast
when bf16, zero_grad(set_to_none), backward, timm's adaptive_clip_grad without the classifier, SGD
with momentum); one step first makes the gradients and momentum buffers, the second is measured.

- On CUDA: ``torch.cuda.max_memory_allocated`` over the second step, at the size asked.
- On a CPU: the allocator's own events (``torch.profiler`` with ``profile_memory=True``), the
  compiled backends' kernels included, which run through the Triton interpreter with
  ``TRITON_INTERPRET=1`` (its numpy tiles are not torch allocations, as registers are not on a
  GPU). The running sum of allocations less frees, from what was live before the first step (the
  parameters and the batch), gives each phase's peak (forward, backward, AGC, optimizer). Three
  things keep the books exact, and ``bench/test_peak_memory.py`` checks that they balance:
  - both steps run under the profiler: it drops the free of a block it did not see allocated, so
    profiling the second step alone lost the frees of the first step's gradients;
  - the interpreter holds each launch's arguments in a reference cycle until Python's collector
    runs; a young-generation collection after each launch frees them when the launch ends, as on a
    GPU (``_interpreter_frees_at_launch_end``);
  - the report prints what the forward added against what it saves for the backward, and what the
    events leave live after the steps beyond the gradients and momentum (0 when nothing is missed).
  A CPU cannot run batch 128 at 224 px through the interpreter, so it measures two small batches
  and extrapolates each phase: peak = fixed + per-sample bytes x batch, the per-sample part scaled
  with the pixel count (activations are); the fixed part (weights, gradients, momentum, timm's
  standardised weights) does not grow with the batch. The phases are extrapolated apart because a
  small batch can peak in another phase than a large one.

    TRITON_INTERPRET=1 python bench/peak_memory.py [--backend triton] [--dtype fp32|bf16]
        [--batches 2 4] [--size 96] [--target-batch 128 --target-size 224]
"""
import argparse
import bisect
import contextlib
import copy
import gc
import itertools
import sys

import torch

import nfnet_fast
from nfnet_fast import benchmark as B
from nfnet_fast._backends import triton_interpreted


def _bytes(tensors) -> int:
    """Bytes of the distinct storages of ``tensors``."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _plan_tables() -> dict:
    """The device tables of ``kernels.scaled_std_weight.forward_many``'s plans, by address: a cache that a
    training forward fills once for its weights and keeps (docs/triton-training-step.md section 11)."""
    try:
        from nfnet_fast.kernels import scaled_std_weight as std_kernels
    except ImportError:  # (no Triton: no plans)
        return {}
    return {t.data_ptr(): t for t in std_kernels.plan_tables()}


@contextlib.contextmanager
def _interpreter_frees_at_launch_end():
    """Under ``TRITON_INTERPRET=1`` the interpreter holds each launch's arguments in a reference
    cycle (a recursive closure over a dict of their storages), so on a CPU a kernel's arguments
    outlive its launch until Python's cycle collector runs, which no GPU run has. A collection of the
    young generations after each launch frees them when the launch ends (milliseconds each)."""
    if not triton_interpreted():
        yield
        return
    from triton.runtime.interpreter import GridExecutor

    launch = GridExecutor.__call__

    def launch_then_collect(self, *args, **kwargs):
        try:
            return launch(self, *args, **kwargs)
        finally:
            gc.collect(1)

    GridExecutor.__call__ = launch_then_collect
    try:
        yield
    finally:
        GridExecutor.__call__ = launch


def step_peak(model, batch: int, size: int, dtype: str, device: torch.device) -> dict:
    """Peak bytes allocated during the second of two training steps of ``model`` (see the module):
    {"step": peak} on CUDA; on a CPU, {phase: peak while that phase ran} for each of B.TRAIN_PHASES,
    with what the step's bookkeeping found (the keys "start", "forward end", "saved", "unaccounted")."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 10, (batch,), generator=gen).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        B.train_step(model, opt, x, target, dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        B.train_step(model, opt, x, target, dtype)
        torch.cuda.synchronize()
        return {"step": torch.cuda.max_memory_allocated()}
    from torch.profiler import ProfilerActivity, profile

    # The profiler records the free of a block only if it saw the block's allocation, so both steps
    # run under it, from a state that holds only the parameters and the batch: every block the
    # steps free was allocated inside the profile.
    gc.collect()
    start = _bytes([x, target, *model.parameters()])
    tables_before = _plan_tables()
    with _interpreter_frees_at_launch_end(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        B.train_step(model, opt, x, target, dtype)
        B.train_step(model, opt, x, target, dtype)
    events = list(prof.profiler.kineto_results.events())
    ranges = {e.name(): (e.start_ns(), e.start_ns() + e.duration_ns())  # (the second step's, which starts later)
              for e in sorted(events, key=lambda e: e.start_ns()) if e.name() in B.TRAIN_PHASES}
    memory = sorted((e.start_ns(), e.nbytes()) for e in events
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    times = [t for t, _ in memory]
    running = list(itertools.accumulate((n for _, n in memory), initial=start))  # running[i]: live before event i
    peaks = {}
    for phase in B.TRAIN_PHASES:
        t0, t1 = ranges[phase]
        first, last = bisect.bisect_left(times, t0), bisect.bisect_right(times, t1)
        peaks[phase] = max(running[first:last + 1])  # what was live as it began, and after each event in it
    peaks["start"] = running[bisect.bisect_left(times, ranges["forward"][0])]  # live as the second step began
    peaks["forward end"] = running[bisect.bisect_right(times, ranges["forward"][1])]
    # Self-check: after the steps, what is live is the parameters, the batch, the gradients, the
    # momentum and the tables of the weights-standardised-ahead plan the first step made (a cache
    # kept across steps, ~1 KB); what the events say more than that (blocks whose free the profiler
    # missed, or the profiler's own) inflates every peak above by as much.
    state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    tables = [t for ptr, t in _plan_tables().items() if ptr not in tables_before]
    peaks["unaccounted"] = running[-1] - start - _bytes([p.grad for p in model.parameters() if p.grad is not None]
                                                        + state + tables)
    peaks["saved"] = B.saved_bytes(model, x, target, dtype)
    return peaks


def keep_y(model, stages) -> None:
    """Let the blocks of ``stages`` (0-based) keep their ECA input y for the backward instead of recomputing it
    (NormFreeBlock.recompute_tail_input; docs/triton-training-step.md section 9)."""
    for stage in stages:
        for block in model.stages[stage]:
            block.recompute_tail_input = False


def keep_z(model, fan_in) -> None:
    """Let the convs of ``model`` with a fused activation and a fan-in of at least ``fan_in`` keep their
    pre-activation z for the backward, and the others recompute it (``_FusedConv.keep_z`` set on each, in place
    of the rule of nn.KEEP_Z_FAN_IN; docs/triton-training-step.md section 14). None leaves the rule."""
    if fan_in is None:
        return
    for m in model.modules():
        if isinstance(m, nfnet_fast.nn._FusedConv):
            m.keep_z = m.fan_in >= fan_in


def block_policy(model, name: str) -> None:
    """Turn on the NormFreeBlock policy ``name`` on every block of ``model``: ``inputs_from_z`` (each conv after
    one that keeps z holds that z in place of its input; docs/triton-training-step.md section 16) or
    ``input_grads_in_conv`` (each block input's two gradients summed in a conv's backward; section 17) or
    ``bias_grads_in_eca`` (conv3's and the downsample conv's bias gradients made by the ECA tail's backward;
    section 18)."""
    if not isinstance(getattr(nfnet_fast.nn.NormFreeBlock, name, None), bool):
        raise ValueError(f"NormFreeBlock has no policy {name!r}")
    for m in model.modules():
        if isinstance(m, nfnet_fast.nn.NormFreeBlock):
            setattr(m, name, True)


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
    ap.add_argument("--keep-y-stages", type=int, nargs="*", default=[], metavar="STAGE",
                    help="stages (0-based) whose blocks keep their ECA input y for the backward instead of "
                         "recomputing it (NormFreeBlock.recompute_tail_input = False; docs/triton-training-step.md "
                         "section 9)")
    ap.add_argument("--keep-z-fan-in", type=int, default=None, metavar="FAN_IN",
                    help="convs with an activation keep their pre-activation for the backward from this fan-in "
                         f"(default nn.KEEP_Z_FAN_IN, {nfnet_fast.nn.KEEP_Z_FAN_IN}; 576 adds eca_nfnet_l0's grouped "
                         "3x3s; docs/triton-training-step.md section 14)")
    ap.add_argument("--inputs-from-z", action="store_true",
                    help="the conv after one that keeps z holds z in place of its input (NormFreeBlock.inputs_from_z; "
                         "docs/triton-training-step.md section 16)")
    ap.add_argument("--input-grads-in-conv", action="store_true",
                    help="each block input's two gradients summed in a conv's backward (NormFreeBlock.input_grads_in_conv; "
                         "docs/triton-training-step.md section 17)")
    ap.add_argument("--bias-grads-in-eca", action="store_true",
                    help="conv3's and the downsample conv's bias gradients made by the ECA tail's backward "
                         "(NormFreeBlock.bias_grads_in_eca; docs/triton-training-step.md section 18)")
    args = ap.parse_args(argv)
    import timm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    batches = args.batches or ([args.target_batch] if cuda else [2, 4])
    size = args.size or (args.target_size if cuda else 96)
    torch.manual_seed(0)
    ref = timm.create_model(args.model, num_classes=10).to(device).train()
    fast = nfnet_fast.convert(copy.deepcopy(ref), backend=args.backend, silu_prologue=args.silu_prologue).train()
    keep_y(fast, args.keep_y_stages)
    keep_z(fast, args.keep_z_fan_in)
    for name in ("inputs_from_z", "input_grads_in_conv", "bias_grads_in_eca"):
        if getattr(args, name):
            block_policy(fast, name)
    kept = f", y kept in stages {args.keep_y_stages}" if args.keep_y_stages else ""
    kept += f", z kept from fan-in {args.keep_z_fan_in}" if args.keep_z_fan_in is not None else ""
    kept += ", inputs held as the z before them" if args.inputs_from_z else ""
    kept += ", input gradients summed in the convs" if args.input_grads_in_conv else ""
    kept += ", conv3's and the downsample's bias gradients from ECA" if args.bias_grads_in_eca else ""
    print(f"{args.model}, {args.dtype}, training step (SGD momentum + AGC), {device.type}, size {size}, "
          f"nfnet_fast backend {args.backend}{' with the SiLU prologue' if args.silu_prologue else ''}{kept}")
    mib = 2**-20
    peaks = {}
    for name, model in (("timm eager", ref), ("nfnet_fast", fast)):
        for b in batches:
            p = peaks[name, b] = step_peak(model, b, size, args.dtype, device)
            if cuda:
                print(f"  {name:10s} batch {b:4d}: peak {p['step'] * mib:9.1f} MiB", flush=True)
                continue
            phases = ", ".join(f"{k} {p[k] * mib:.1f}" for k in B.TRAIN_PHASES)
            print(f"  {name:10s} batch {b:4d}: peak {max(p[k] for k in B.TRAIN_PHASES) * mib:9.1f} MiB "
                  f"(by phase: {phases}); the forward added {(p['forward end'] - p['start']) * mib:.1f} MiB, "
                  f"of which its saved tensors {p['saved'] * mib:.1f} MiB (the batch included); "
                  f"unaccounted at the end {p['unaccounted'] * mib:.1f} MiB", flush=True)
    phases = ("step",) if cuda else B.TRAIN_PHASES
    for b in batches:
        ratio = max(peaks["nfnet_fast", b][k] for k in phases) / max(peaks["timm eager", b][k] for k in phases)
        print(f"  ratio at batch {b}: {ratio:.3f}")
    if len(batches) >= 2 and (batches[-1], size) != (args.target_batch, args.target_size):
        # Each phase's peak is a fixed part plus a part that grows with the batch; extrapolated phase
        # by phase, since a small batch can peak in another phase (the optimizer's) than a large one.
        b0, b1 = batches[0], batches[-1]
        scale = (args.target_size / size) ** 2
        target = {}
        for name in ("timm eager", "nfnet_fast"):
            at_target = {}
            for k in phases:
                per_sample = (peaks[name, b1][k] - peaks[name, b0][k]) / (b1 - b0)
                fixed = peaks[name, b0][k] - per_sample * b0
                at_target[k] = fixed + per_sample * scale * args.target_batch
                print(f"  {name:10s} {k:9s}: fixed {fixed * mib:8.1f} MiB + {per_sample * mib:7.2f} MiB a sample "
                      f"at {size} px -> batch {args.target_batch} at {args.target_size} px: "
                      f"{at_target[k] / 2**30:6.2f} GiB")
            worst = max(at_target, key=at_target.get)
            target[name] = at_target[worst]
            print(f"  {name:10s} peaks in the {worst}: {target[name] / 2**30:.2f} GiB")
        print(f"  extrapolated ratio at batch {args.target_batch}, {args.target_size} px: "
              f"{target['nfnet_fast'] / target['timm eager']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
