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
