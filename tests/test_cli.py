"""The nfnet-fast command line: bench and predict, including their one-line errors; help texts, and
help without importing torch."""
import argparse
import json
import os
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
def network_untouched(monkeypatch):
    """Records any socket the CLI opens itself (the default hub host looks unreachable: create_connection raises
    OSError, as behind a firewall that lets only a mirror or a proxy through) and snapshots the environment and
    huggingface_hub's offline switch; the test calls the returned function to assert the CLI changed none of it."""
    import socket

    import huggingface_hub.constants as hub
    opened = []

    def create_connection(address, *a, **k):
        opened.append(address)
        raise OSError(f"test: no route to {address}")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", hub.HF_HUB_OFFLINE)  # restored after the test, whatever the CLI does
    def environ():
        return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}

    env, offline = environ(), hub.HF_HUB_OFFLINE

    def check():
        assert opened == [], f"the CLI opened sockets itself: {opened}"
        assert environ() == env, "the CLI changed the environment"
        assert hub.HF_HUB_OFFLINE == offline, "the CLI changed huggingface_hub's offline switch"
    return check


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The user's own switch: HF_HUB_OFFLINE=1, with nothing in the hub cache."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache" / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return str(tmp_path / "empty-cache" / "hub")


def _one_line(err):
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    return lines[0]


def test_predict_pretrained_offline_mode(images, offline, network_untouched, capfd):
    """HF_HUB_OFFLINE=1 and nothing cached: huggingface_hub itself refuses (no socket of ours, nothing forced),
    and the CLI says so in one line."""
    assert cli.main(["predict", images[0], "--pretrained", "--device", "cpu"]) == 2
    line = _one_line(capfd.readouterr().err)
    assert line == (f"nfnet-fast predict: error: the pretrained weights of eca_nfnet_l0 are not in the local Hugging "
                    f"Face cache ({offline}) and HF_HUB_OFFLINE is set; unset it to download them, or pass "
                    f"--checkpoint FILE")
    network_untouched()


def test_bench_pretrained_offline_mode(offline, network_untouched, capfd):
    assert cli.main(["bench", "--pretrained", "--device", "cpu", "--no-compile"]) == 2
    line = _one_line(capfd.readouterr().err)
    assert "the pretrained weights of eca_nfnet_l0 are not in the local Hugging Face cache" in line
    assert line.endswith("or run without --pretrained (random weights)")
    network_untouched()


@pytest.fixture
def hub_log():
    """The records huggingface_hub's loggers let through to its handler (which prints them on stderr)."""
    import logging
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("huggingface_hub")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def _http_library():
    """The HTTP client huggingface_hub raises the errors of (httpx2 in huggingface_hub 2.x, httpx in 1.x)."""
    for name in ("httpx2", "httpx"):
        try:
            return __import__(name)
        except ImportError:
            pass
    pytest.skip("neither httpx2 nor httpx is installed")


def _hub_unreachable_error(kind):
    """What huggingface_hub raises when the hub cannot be reached: a failed HEAD call and nothing cached gives
    LocalEntryNotFoundError from the client's ConnectError (from socket.gaierror); a download that keeps timing
    out, after its retries, the client's ReadTimeout itself. It also logs a warning per retry, as it does."""
    import socket

    from huggingface_hub.errors import LocalEntryNotFoundError
    from huggingface_hub.utils import logging as hub_logging
    http = _http_library()
    log = hub_logging.get_logger("huggingface_hub.utils._http")
    log.warning("'[Errno -2] Name or service not known' thrown while requesting HEAD https://hf-mirror.example/x")
    log.warning("Retrying in 1s [Retry 1/5].")
    if kind == "timeout":
        return http.ReadTimeout("The read operation timed out")
    try:
        try:
            raise socket.gaierror(-2, "Name or service not known")
        except socket.gaierror as e:
            raise http.ConnectError("[Errno -2] Name or service not known") from e
    except http.ConnectError as e:
        try:
            raise LocalEntryNotFoundError(
                "An error happened while trying to locate the file on the Hub and we cannot find the requested files "
                "in the local cache. Please check your connection and try again or make sure your Internet "
                "connection is on.") from e
        except LocalEntryNotFoundError as err:
            return err


@pytest.mark.parametrize("kind, reason", [("connect", "(ConnectError: [Errno -2] Name or service not known)"),
                                          ("timeout", "(ReadTimeout: The read operation timed out)")])
def test_predict_pretrained_hub_unreachable(images, network_untouched, hub_log, monkeypatch, capfd, kind, reason):
    """The CLI leaves the network to huggingface_hub (HF_ENDPOINT's mirror here; the default host unreachable):
    no socket of its own, offline mode not forced, the environment unchanged; when huggingface_hub gives up,
    one line names the endpoint and the reason, and the exit status is 2."""
    import huggingface_hub.constants as hub
    import nfnet_fast
    from huggingface_hub.utils import logging as hub_logging
    monkeypatch.setattr(hub, "ENDPOINT", "https://hf-mirror.example")
    seen = {}

    def create_model(name, pretrained=False, **kwargs):
        seen.update(name=name, pretrained=pretrained, offline=hub.HF_HUB_OFFLINE)
        raise _hub_unreachable_error(kind)

    monkeypatch.setattr(nfnet_fast, "create_model", create_model)
    verbosity = hub_logging.get_verbosity()
    assert cli.main(["predict", images[0], "--pretrained", "--device", "cpu"]) == 2
    assert seen == dict(name="eca_nfnet_l0", pretrained=True, offline=False)
    line = _one_line(capfd.readouterr().err)
    assert [r.getMessage() for r in hub_log] == [], "huggingface_hub's retry warnings were printed"
    assert line == ("nfnet-fast predict: error: cannot download the pretrained weights of eca_nfnet_l0 from the "
                    f"Hugging Face Hub at https://hf-mirror.example {reason}; set HF_ENDPOINT for a mirror, or pass "
                    "--checkpoint FILE")
    assert hub_logging.get_verbosity() == verbosity
    network_untouched()


def test_bench_pretrained_hub_unreachable(network_untouched, hub_log, monkeypatch, capfd):
    import huggingface_hub.constants as hub
    from nfnet_fast import benchmark as B
    seen = {}

    def build_reference(name, device, pretrained=False, **kwargs):
        seen.update(pretrained=pretrained, offline=hub.HF_HUB_OFFLINE)
        raise _hub_unreachable_error("connect")

    monkeypatch.setattr(B, "build_reference", build_reference)
    assert cli.main(["bench", "--pretrained", "--device", "cpu", "--no-compile"]) == 2
    assert seen == dict(pretrained=True, offline=False)
    line = _one_line(capfd.readouterr().err)
    assert hub_log == []
    assert line.startswith("nfnet-fast bench: error: cannot download the pretrained weights of eca_nfnet_l0 from "
                           f"the Hugging Face Hub at {hub.ENDPOINT} (ConnectError: ")
    assert line.endswith("set HF_ENDPOINT for a mirror, or run without --pretrained (random weights)")
    network_untouched()


# --- checkpoint, device and --topk errors: one line, exit status 2 --------------------------------------

def _tiny_checkpoint(path):
    torch.save(torch.nn.Linear(16, 16).state_dict(), path)
    return path


def _random_bytes(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return path


def _truncated(path):
    data = _tiny_checkpoint(path).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _empty(path):
    path.write_bytes(b"")
    return path


def _pickled_module(path):
    torch.save(torch.nn.Linear(2, 2), path)
    return path


@pytest.mark.parametrize("make, why", [
    (_random_bytes, "it is neither a PyTorch (torch.save) nor a safetensors file"),
    (_truncated, "the file is truncated or damaged"),
    (_empty, "the file is empty"),
    (_pickled_module, "it pickles Python objects, not just tensors (torch.nn.modules.linear.Linear)"),
    (_tiny_checkpoint, "185 of the model's 185 tensors missing (e.g. 'stem.conv1.weight'), 2 unexpected keys "
                       "(e.g. 'weight')"),
], ids=["random-bytes", "truncated", "empty", "pickled-module", "another-model"])
def test_predict_bad_checkpoint(images, tmp_path, capsys, make, why):
    path = make(tmp_path / "model.pth")
    assert cli.main(["predict", images[0], "--checkpoint", str(path), "--device", "cpu"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"nfnet-fast predict: error: {path} is not a loadable checkpoint of eca_nfnet_l0: {why}")


def test_predict_checkpoint_is_a_directory(images, tmp_path, capsys):
    assert cli.main(["predict", images[0], "--checkpoint", str(tmp_path), "--device", "cpu"]) == 2
    assert _one_line(capsys.readouterr().err) == f"nfnet-fast predict: error: checkpoint is a directory, not a file: " \
                                                 f"{tmp_path}"


@pytest.mark.parametrize("command", [["predict", "image.jpg"], ["bench", "--no-compile"]])
def test_device_cuda_without_gpu(command, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main([*command, "--device", "cuda"]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"nfnet-fast {command[0]}: error: --device cuda: no CUDA GPU is available here "
        f"(torch.cuda.is_available() is False); use --device cpu")


@pytest.mark.parametrize("k, why", [("0", "topk must be >= 1, got 0"), ("-1", "topk must be >= 1, got -1"),
                                    ("two", "topk must be an integer >= 1, not 'two'")])
def test_predict_topk_below_one(images, capsys, k, why):
    """Refused while parsing the arguments (argparse's usage lines, then one error line), before any model."""
    with pytest.raises(SystemExit) as e:
        cli.main(["predict", images[0], "--topk", k, "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith("usage: nfnet-fast predict")
    assert err.strip().splitlines()[-1] == f"nfnet-fast predict: error: argument --topk: {why}"


def test_predict_topk_above_the_classes(images, checkpoint, capsys):
    assert cli.main(["predict", images[0], "--checkpoint", checkpoint[0], "--topk", "1001", "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert _one_line(err) == "nfnet-fast predict: error: --topk 1001 is more than the 1000 classes of eca_nfnet_l0"


def test_bench_small(tmp_path, capsys, network_untouched):
    """A bench with random weights (the default) runs without any network."""
    out_json = tmp_path / "bench.json"
    assert cli.main(["bench", "--device", "cpu", "--batch", "1", "--size", "48", "--iters", "1", "--warmup", "0",
                     "--no-compile", "--backends", "reference", "--json", str(out_json), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "| timm eager fp32 |" in out and "| nfnet_fast reference fp32 |" in out
    data = json.loads(out_json.read_text())
    errs = {r["name"]: r["max_rel_err"] for r in data["results"]}
    assert errs["timm eager fp32"] == 0.0 and errs["nfnet_fast reference fp32"] < 1e-4
    network_untouched()


# --- help texts, and help without torch ------------------------------------------------------------

def _subparsers(parser):
    """(the subparsers action, {command name: its parser}) of an argparse parser with subcommands."""
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action, dict(action.choices)


def test_help_describes_the_cli_and_each_command(capsys):
    parser = cli.build_parser()
    assert parser.description and "``" not in parser.description and "the command line" not in parser.description
    action, commands = _subparsers(parser)
    assert set(commands) == {"bench", "predict", "finetune"}
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
    """`nfnet-fast --help` (the console script does `from nfnet_fast.cli import main`) imports no torch:
    the package's __init__ loads its public names on first use."""
    heavy = _run_help("from nfnet_fast.cli import main")
    assert heavy == "", f"`nfnet-fast --help` imports {heavy}"
