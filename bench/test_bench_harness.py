"""The benchmark harness itself: a run cut short at the report's budget (SIGINT) keeps its finished rows."""
import json
import os
import signal
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))


def test_interrupted_run_still_writes_the_finished_rows(tmp_path):
    (tmp_path / "test_cut.py").write_text(textwrap.dedent("""
        import os, signal

        def test_a_finishes(run_timed, benchmark):
            run_timed(lambda: None, rounds=2, warmup=0)
            benchmark.extra_info["row"] = "a"

        def test_b_is_cut_off(run_timed, benchmark):
            run_timed(lambda: os.kill(os.getpid(), signal.SIGINT), rounds=2, warmup=0)
    """))
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest",
                           f"--benchmark-json={out}", str(tmp_path / "test_cut.py")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
                          # (a job started in the background of a non-interactive shell ignores SIGINT,
                          # and so would the child, which then never sees the cut: give it the default)
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "KeyboardInterrupt" in proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["benchmarks"]
    assert [r["extra_info"].get("row") for r in rows] == ["a"], proc.stdout + proc.stderr


def test_saved_storage_bytes_counts_without_keeping_the_graph():
    """The bytes of what autograd saves, each storage once, and nothing kept alive after: a pack hook
    that returned the tensor itself leaked every graph whose node saves its own output (sigmoid,
    exp): each training row of the 2026-11-27 H100 report then peaked above the row before it."""
    import gc
    import weakref

    import torch

    from nfnet_fast.benchmark import saved_storage_bytes

    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    n, k = (int(v) for v in torch.randint(2, 9, (2,), generator=g))
    x = torch.randn(n, k, generator=g, requires_grad=True)
    w = torch.randn(k, k, generator=g, requires_grad=True)
    outs = []

    def forward():
        h = torch.sigmoid(x @ w)  # mm saves x and w (excluded: w), sigmoid its output h
        outs.append(weakref.ref(h))
        return h.exp().sum()  # exp saves its output too (a fresh storage)

    nbytes, loss = saved_storage_bytes(forward, exclude=[w])
    assert nbytes == (x.numel() + 2 * n * k) * 4
    loss.backward()
    expect = torch.autograd.grad(torch.sigmoid(x @ w).exp().sum(), (x, w))
    assert torch.allclose(x.grad, expect[0]) and torch.allclose(w.grad, expect[1])
    del loss
    saved_storage_bytes(forward)
    gc.collect()
    assert [r() for r in outs] == [None, None]


def test_policy_table_compares_each_policy_with_its_default():
    """report.py's saving-policy table: each graphed training row with a policy against the same backend's,
    dtype's and case's default graphed row (time and peak differences); rows without a default, eager rows
    and other cases' rows stay out; each row's speed against timm eager's step of its case and dtype, where the run
    has one."""
    import random

    import report

    seed = int.from_bytes(os.urandom(4), "little")
    rnd = random.Random(seed)

    def row(contender, median, peak, batch=128, size=224):
        info = dict(kind="train", contender=contender, img_per_s=batch / median, batch=batch, size=size,
                    dtype=contender.split()[-1], peak_mem_mb=peak)
        return dict(stats=dict(median=median), extra_info=info)
    base_s, base_mb = rnd.uniform(0.03, 0.05), rnd.uniform(3000, 5000)
    policy_s, policy_mb = rnd.uniform(0.03, 0.05), rnd.uniform(3000, 5000)
    benches = [row("nfnet_fast triton cudagraph bf16", base_s, base_mb),
               row("nfnet_fast triton cudagraph keep-z-576 bf16", policy_s, policy_mb),
               row("nfnet_fast triton bf16", 0.09, 9000),  # eager: not a policy row, not a default
               row("timm cudagraph bf16", 0.04, 5000),
               row("nfnet_fast cuda cudagraph recompute-z bf16", 0.04, 5000),  # no cuda default row
               row("nfnet_fast triton cudagraph recompute-z bf16", 0.04, 4000, batch=64)]  # no default at batch 64
    lines = report.policy_table(benches)
    rows = [line for line in lines if line.startswith("| triton") or line.startswith("| cuda")]
    expect = (f"| triton bf16, batch 128 @ 224 | keep-z-576 | {policy_s * 1e3:.2f} | "
              f"{(policy_s - base_s) * 1e3:+.2f} | {policy_mb:.0f} | {policy_mb - base_mb:+.0f} |")
    assert rows == [expect + " - |"], (seed, lines)  # (no timm eager row in this run)
    assert report.policy_table(benches[:1] + benches[2:4]) == []
    timm_s = rnd.uniform(0.05, 0.08)
    others = [row("timm eager bf16", timm_s, 6000), row("timm eager fp32", 0.01, 6000),  # (another dtype)
              row("timm eager bf16", 0.01, 6000, batch=64)]  # (another case)
    lines = report.policy_table(benches + others)
    rows = [line for line in lines if line.startswith("| triton") or line.startswith("| cuda")]
    assert rows == [expect + f" {timm_s / policy_s:.2f}x |"], (seed, lines)


def test_every_policy_row_sets_its_own_configuration():
    """Each of test_bench_model.py's POLICIES (the graphed training rows that only a GPU runs) applies to a converted
    eca_nfnet_l0 here: each gives a configuration of its own, none the default's, so that a typo in a row shows on
    the CPU, not in a GPU session's report. The combined row is keep-z-576-inputs-from-z with the other two time
    policies on every block."""
    import copy

    import nfnet_fast
    import timm
    import test_bench_model

    base = nfnet_fast.convert(timm.create_model("eca_nfnet_l0", num_classes=10), backend="reference")
    policies = ("inputs_from_z", "input_grads_in_conv", "bias_grads_in_eca", "recompute_tail_input")

    def configuration(model):
        convs = tuple(m.keep_z for m in model.modules() if isinstance(m, nfnet_fast.nn._FusedConv))
        blocks = tuple(tuple(getattr(m, name) for name in policies)
                       for m in model.modules() if isinstance(m, nfnet_fast.nn.NormFreeBlock))
        return convs, blocks

    configurations = {}
    for name, apply in test_bench_model.POLICIES.items():
        model = copy.deepcopy(base)
        apply(model)
        configurations[name] = configuration(model)
    default = configuration(base)
    assert default not in configurations.values()
    assert len(set(configurations.values())) == len(configurations), configurations.keys()
    convs, blocks = configurations["all-time-levers"]
    assert convs == configurations["keep-z-576"][0] and set(blocks) == {(True, True, True, True)}
