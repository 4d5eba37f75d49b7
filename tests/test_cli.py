"""The nfnet-fast command line: bench and predict, including their one-line errors; help texts, and
help without importing torch."""
import argparse
import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from conftest import randomize_
from nfnet_fast import cli


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(300, 260), (64, 90), (128, 128)]):
        p = d / f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(p)
        paths.append(str(p))
    return paths


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = randomize_(timm.create_model("eca_nfnet_l0"), seed=5)
    with torch.no_grad():
        model.head.fc.weight.mul_(0.05)  # softmax not saturated, so probabilities are comparable
    path = tmp_path_factory.mktemp("ckpt") / "eca_nfnet_l0.pth"
    torch.save(model.state_dict(), path)
    return str(path), model.eval()


def test_predict_matches_timm(images, checkpoint, capsys):
    path, model = checkpoint
    assert cli.main(["predict", *images, "--checkpoint", path, "--topk", "3", "--json", "--device", "cpu",
                     "--batch-size", "2"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in got] == images
    transform = create_transform(**resolve_data_config({}, model=model))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    top = probs.topk(3, dim=-1)
    for r, idx, val in zip(got, top.indices.tolist(), top.values.tolist()):
        assert [t["index"] for t in r["topk"]] == idx
        np.testing.assert_allclose([t["prob"] for t in r["topk"]], val, rtol=1e-4)
        assert r["topk"][0]["label"] == timm.data.ImageNetInfo().index_to_description(idx[0])


def test_predict_text_and_unreadable(images, checkpoint, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    rc = cli.main(["predict", images[0], str(bad), str(tmp_path / "missing.png"), "--checkpoint", checkpoint[0],
                   "--topk", "2", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert out.count("\n") == 1 and out.startswith(images[0] + ": ") and out.count("%") == 2
    assert f"skipping {bad}: not a readable image" in err
    assert "missing.png: no such file" in err
    assert "Traceback" not in err


def test_predict_missing_checkpoint(images, tmp_path, capsys):
    assert cli.main(["predict", images[0], "--checkpoint", str(tmp_path / "nope.pth")]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "checkpoint not found" in err


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and nothing in the hub cache."""
    import huggingface_hub.constants
    monkeypatch.setattr(cli, "_hub_reachable", lambda *a, **k: False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", huggingface_hub.constants.HF_HUB_OFFLINE)


def test_predict_pretrained_without_network(images, offline, capsys):
    assert cli.main(["predict", images[0], "--pretrained", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cannot load pretrained weights for eca_nfnet_l0" in err and "Traceback" not in err


def test_bench_pretrained_without_network(offline, capsys):
    assert cli.main(["bench", "--pretrained", "--device", "cpu", "--no-compile"]) == 2
    err = capsys.readouterr().err
    assert "cannot build eca_nfnet_l0 with pretrained weights" in err and err.strip().count("\n") == 0


def test_bench_small(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert cli.main(["bench", "--device", "cpu", "--batch", "1", "--size", "48", "--iters", "1", "--warmup", "0",
                     "--no-compile", "--backends", "reference", "--json", str(out_json), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| timm eager fp32 |" in out and "| nfnet_fast reference fp32 |" in out
    data = json.loads(out_json.read_text())
    errs = {r["name"]: r["max_rel_err"] for r in data["results"]}
    assert errs["timm eager fp32"] == 0.0 and errs["nfnet_fast reference fp32"] < 1e-4


# --- help texts, and help without torch ------------------------------------------------------------

def _subparsers(parser):
    """(the subparsers action, {command name: its parser}) of an argparse parser with subcommands."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action, dict(action.choices)


def test_help_describes_the_cli_and_each_command(capsys):
    parser = cli.build_parser()
    assert parser.description and "``" not in parser.description and "the command line" not in parser.description
    action, commands = _subparsers(parser)
    assert set(commands) == {"bench", "predict"}
    listed = {a.dest: a.help for a in action._choices_actions}
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    assert " ".join(parser.description.split()) in flat
    for name, sub in commands.items():
        assert listed.get(name), f"subcommand {name} has no help line in the top-level help"
        assert sub.description, f"subcommand {name} has no description"
        assert name in out and listed[name] in flat


def test_every_option_has_help(capsys):
    """Every argument of the top level and of every subcommand has help text, shown by `<cmd> --help`."""
    parser = cli.build_parser()
    for name, sub in {"": parser, **_subparsers(parser)[1]}.items():
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            what = f"nfnet-fast {name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help and action.help != argparse.SUPPRESS, f"{what} has no help text"
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                assert "default" in action.help, f"{what}: help does not state its default {action.default!r}"
        if name:
            with pytest.raises(SystemExit):
                cli.main([name, "--help"])
            out = " ".join(capsys.readouterr().out.split())
            for action in sub._actions:
                if action.option_strings:
                    assert action.option_strings[-1] in out


def test_backend_choices_match_the_registry():
    from nfnet_fast import _backends
    assert cli.BACKEND_CHOICES == ("auto", *_backends.NAMES)


def test_bench_cpu_defaults_match_help(monkeypatch, capsys):
    """On a CPU `nfnet-fast bench` times batch 4 at 160x160 with 2 warm-up and 5 timed calls per contender, as
    its help and the README's CPU table say."""
    from nfnet_fast import benchmark as B
    seen = {}

    def run_contender(c, x, ref_out, iters, warmup, device):
        seen.update(shape=tuple(x.shape), iters=iters, warmup=warmup, device=device.type)
        return B.Result(c.name, c.dtype, 1.0, 1.0, [1.0] * iters, 0.0, None)

    monkeypatch.setattr(B, "build_reference", lambda *a, **k: torch.nn.Identity())
    monkeypatch.setattr(B, "inference_contenders", lambda *a, **k: [B.Contender("timm eager fp32", None)])
    monkeypatch.setattr(B, "run_contender", run_contender)
    assert cli.main(["bench", "--device", "cpu", "--quiet"]) == 0
    assert seen == dict(shape=(4, 3, 160, 160), iters=5, warmup=2, device="cpu")
    out = capsys.readouterr().out
    assert "| contender | max err / max abs (vs timm fp32) | img/s | peak MiB | vs timm eager fp32 |" in out
    text = " ".join(_subparsers(cli.build_parser())[1]["bench"].format_help().split())
    for stated in ("256 on CUDA, 4 on CPU", "288 on CUDA, 160 on CPU", "20 on CUDA, 5 on CPU", "(default: 2)"):
        assert stated in text


_HEAVY = ("torch", "timm", "triton", "numpy")
_CHECK = """
import sys
{load}
for argv in (["--help"], ["bench", "--help"], ["predict", "--help"], []):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == (0 if argv else 2), (argv, e.code)
    else:
        raise AssertionError(f"{{argv}} did not exit")
print("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


def _run_help(load):
    r = subprocess.run([sys.executable, "-c", _CHECK.format(load=load, heavy=_HEAVY)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.rsplit("HEAVY:", 1)[1].strip()


def test_cli_module_parses_and_helps_without_torch():
    """cli.py itself imports nothing heavy before parsing: loaded on its own (outside the package), its help
    runs without importing torch, timm, triton or numpy."""
    heavy = _run_help(f"import importlib.util\n"
                      f"spec = importlib.util.spec_from_file_location('nfnet_fast_cli_alone', {cli.__file__!r})\n"
                      f"mod = importlib.util.module_from_spec(spec)\n"
                      f"spec.loader.exec_module(mod)\n"
                      f"main = mod.main")
    assert heavy == "", f"nfnet_fast/cli.py imports {heavy} at module level"


def test_entry_point_help_without_torch():
    """`nfnet-fast --help` (the console script does `from nfnet_fast.cli import main`) imports no torch.

    That also needs the package's __init__ to import torch lazily; until it does, this test reports
    xfail rather than fail."""
    heavy = _run_help("from nfnet_fast.cli import main")
    if heavy:
        r = subprocess.run([sys.executable, "-c", "import sys, nfnet_fast; print('torch' in sys.modules)"],
                           capture_output=True, text=True, timeout=120)
        if r.stdout.strip() == "True":
            pytest.xfail(f"nfnet_fast/__init__.py imports torch eagerly, so `nfnet-fast --help` loads {heavy}")
    assert heavy == "", f"`nfnet-fast --help` imports {heavy}"
