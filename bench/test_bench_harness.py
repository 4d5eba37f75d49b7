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
