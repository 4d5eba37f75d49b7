"""The nfnet-fast command line: bench and predict, including their one-line errors."""
import json

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
