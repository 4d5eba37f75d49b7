"""nfnet-fast finetune on a tiny synthetic image folder made here (3 colours, 40 px PNGs): the loss goes down,
the checkpoints load in plain timm and in nfnet-fast predict, an interrupted run resumes to the same weights as an
uninterrupted one, and every bad input is one line and exit status 2 with nothing written."""
import contextlib
import io
import json
import os
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from nfnet_fast import cli, train

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
# test_nfnet (timm's smallest NF model, 0.4M parameters) at 32 px on the reference backend: seconds per epoch.
# RandAugment (the default --aa) stays on: the colours survive it well enough to learn in two epochs.
ARGS = ["--model", "test_nfnet", "--backend", "reference", "--device", "cpu", "--img-size", "32", "--batch-size", "12",
        "--workers", "0", "--lr", "0.05", "--warmup-epochs", "0", "--ema-decay", "0.999", "--seed", "0", "--quiet"]


def _make_images(root, per_class=12, val_per_class=3, classes=tuple(COLOURS), size=40, seed=0):
    """root/train/<colour>/*.png and root/val/<colour>/*.png: a colour plus strong noise."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in classes:
            os.makedirs(os.path.join(root, split, c), exist_ok=True)
            for i in range(n):
                img = np.clip(np.array(COLOURS[c]) + rng.normal(0, 40, (size, size, 3)), 0, 255).astype("uint8")
                Image.fromarray(img).save(os.path.join(root, split, c, f"{i}.png"))
    return str(root)


def _finetune(data, output, *extra, epochs=2):
    return cli.main(["finetune", "--data", data, "--output", str(output), "--epochs", str(epochs), *ARGS, *extra])


def _one_line(err):
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """One 2-epoch run: (output folder, its summary.json, its stdout)."""
    out = tmp_path_factory.mktemp("run") / "out"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert _finetune(data, out) == 0
    with open(out / train.SUMMARY_FILE) as f:
        return out, json.load(f), buf.getvalue()


def test_loss_goes_down_and_files_are_written(run):
    out, summary, stdout = run
    losses = [e["train_loss"] for e in summary["history"]]
    assert len(losses) == 2 and losses[1] < losses[0], losses
    assert sorted(os.listdir(out)) == sorted([train.RESUME_FILE, train.FINAL_FILE, train.BEST_FILE, train.SUMMARY_FILE,
                                              train.CLASSES_FILE])  # no temporary file left behind
    assert summary["classes"] == ["blue", "green", "red"]
    assert [line.split()[:2] for line in stdout.splitlines() if line.startswith("epoch")] == [
        ["epoch", "1/2"], ["epoch", "2/2"]]
    for e in summary["history"]:  # 3 classes: top-1 only; the EMA validated beside the model
        assert e["val"]["top5"] is None and e["val_ema"] is not None and 0 <= e["val"]["top1"] <= 100
    assert "aa rand-m9-mstd0.5" in stdout and "AGC 0.015 (head excluded)" in stdout


def _val_images(data):
    paths, labels = [], []
    for i, c in enumerate(["blue", "green", "red"]):
        folder = os.path.join(data, "val", c)
        for name in sorted(os.listdir(folder)):
            paths.append(os.path.join(folder, name))
            labels.append(i)
    return paths, torch.tensor(labels)


def test_checkpoint_loads_in_plain_timm_and_predicts(run, data):
    """model.pth is a plain state_dict of timm's keys (the EMA weights here): timm.create_model(checkpoint_path=...)
    loads it, and its top-1 on the validation images is the one finetune reported for the last epoch."""
    out, summary, _ = run
    state = torch.load(out / train.FINAL_FILE, weights_only=True)
    model = timm.create_model("test_nfnet", num_classes=3, checkpoint_path=str(out / train.FINAL_FILE)).eval()
    assert set(state) == set(model.state_dict())
    paths, labels = _val_images(data)
    tf = create_transform(**resolve_data_config({"input_size": (3, 32, 32)}, model=model))
    with torch.no_grad():
        pred = model(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])).argmax(-1)
    top1 = 100 * (pred == labels).double().mean().item()
    assert top1 == pytest.approx(summary["history"][-1]["val_ema"]["top1"])
    assert top1 > 50
    best = timm.create_model("test_nfnet", num_classes=3, checkpoint_path=str(out / train.BEST_FILE))
    assert best.num_classes == 3
    # last.pth, the resumable checkpoint, loads in timm too (its state_dict_ema, as timm's own train.py writes it)
    timm.create_model("test_nfnet", num_classes=3, checkpoint_path=str(out / train.RESUME_FILE))


def test_predict_reads_the_checkpoint_and_its_class_names(run, data, capsys):
    out, _, _ = run
    paths, _ = _val_images(data)
    assert cli.main(["predict", paths[0], paths[-1], "--model", "test_nfnet", "--checkpoint", str(out / train.FINAL_FILE),
                     "--device", "cpu", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [len(r["topk"]) for r in got] == [3, 3]  # the default top-5, capped at the 3 classes
    assert {t["label"] for t in got[0]["topk"]} == {"blue", "green", "red"}  # from classes.json beside it
    # at the size it was trained at (32 px, from summary.json beside it), as finetune validated it: its probabilities
    model = timm.create_model("test_nfnet", num_classes=3, checkpoint_path=str(out / train.FINAL_FILE)).eval()
    for size, flags in ((32, []), (48, ["--img-size", "48"])):
        tf = create_transform(**resolve_data_config({"input_size": (3, size, size)}, model=model))
        with torch.no_grad():
            probs = model(tf(Image.open(paths[0]).convert("RGB"))[None]).softmax(-1)[0]
        assert cli.main(["predict", paths[0], "--model", "test_nfnet", "--checkpoint", str(out / train.FINAL_FILE),
                         "--device", "cpu", "--json", "--backend", "reference", *flags]) == 0
        top = json.loads(capsys.readouterr().out)[0]["topk"]
        assert [t["prob"] for t in top] == pytest.approx(probs.sort(descending=True).values.tolist(), abs=1e-5), size


@pytest.mark.parametrize("workers", [0, 1])
def test_interrupted_run_resumes_to_the_same_weights(workers, run, data, tmp_path, monkeypatch, capsys):
    """Interrupted during epoch 2 (Ctrl-C: exit 130, last.pth of epoch 1 kept), then --resume: the same weights,
    history and files as the uninterrupted run (each epoch's randomness is seeded by the epoch, in the loader's
    worker processes too: they are started afresh each epoch, since persistent ones would carry epoch 1's
    augmentation draws into epoch 2 where a resumed run's fresh ones would not)."""
    out, summary, _ = run
    extra = ("--workers", str(workers))
    if workers:  # (worker processes draw other random numbers than the main process: its own baseline)
        out = tmp_path / "full"
        assert _finetune(data, out, *extra) == 0
        capsys.readouterr()
        with open(out / train.SUMMARY_FILE) as f:
            summary = json.load(f)
    calls = []
    validate = train._validate

    def interrupt_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # model and EMA are validated each epoch: the third call is epoch 2's
            raise KeyboardInterrupt
        return validate(*a, **k)

    monkeypatch.setattr(train, "_validate", interrupt_in_epoch_2)
    part = tmp_path / "part"
    assert _finetune(data, part, *extra) == 130
    assert capsys.readouterr().err.strip().endswith(f"interrupted; continue with --resume {part / train.RESUME_FILE}")
    assert not (part / train.FINAL_FILE).exists()
    assert torch.load(part / train.RESUME_FILE, weights_only=True)["epoch"] == 0
    monkeypatch.setattr(train, "_validate", validate)

    assert cli.main(["finetune", "--data", data, "--resume", str(part / train.RESUME_FILE), "--epochs", "2",
                     *ARGS, *extra]) == 0  # --output defaults to the checkpoint's folder
    stdout = capsys.readouterr().out
    assert f"resuming from {part / train.RESUME_FILE} after epoch 1" in stdout
    assert [line.split()[1] for line in stdout.splitlines() if line.startswith("epoch")] == ["2/2"]
    resumed = torch.load(part / train.FINAL_FILE, weights_only=True)
    full = torch.load(out / train.FINAL_FILE, weights_only=True)
    for k in full:
        assert torch.equal(resumed[k], full[k]), k
    with open(part / train.SUMMARY_FILE) as f:
        history = json.load(f)["history"]
    assert [e["epoch"] for e in history] == [1, 2]
    assert [e["train_loss"] for e in history] == [e["train_loss"] for e in summary["history"]]


def test_resume_extends_a_finished_run(run, data, tmp_path, capsys):
    """--resume with a larger --epochs trains the epochs left, on a cosine schedule stretched to the new total."""
    out, _, _ = run
    more = tmp_path / "more"
    shutil.copytree(out, more)
    assert cli.main(["finetune", "--data", data, "--resume", str(more / train.RESUME_FILE), "--epochs", "3", *ARGS,
                     "--batch-size", "36"]) == 0
    stdout = capsys.readouterr().out
    assert "note: the schedule changed" in stdout
    assert [line.split()[1] for line in stdout.splitlines() if line.startswith("epoch")] == ["3/3"]
    with open(more / train.SUMMARY_FILE) as f:
        assert [e["epoch"] for e in json.load(f)["history"]] == [1, 2, 3]


def test_interrupted_extension_leaves_no_stale_final_weights(run, data, tmp_path, monkeypatch, capsys):
    """A resume that extends a finished run (2 -> 4 epochs), interrupted in epoch 4: last.pth is epoch 3's, and
    the finished run's model.pth, no longer this run's weights, is gone (summary.json: no final file)."""
    out, _, _ = run
    more = tmp_path / "more"
    shutil.copytree(out, more)
    calls, validate = [], train._validate

    def interrupt_in_epoch_4(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # (model and EMA: epoch 3's two calls, then epoch 4's first)
            raise KeyboardInterrupt
        return validate(*a, **k)
    monkeypatch.setattr(train, "_validate", interrupt_in_epoch_4)
    assert cli.main(["finetune", "--data", data, "--resume", str(more / train.RESUME_FILE), "--epochs", "4",
                     *ARGS]) == 130
    capsys.readouterr()
    assert torch.load(more / train.RESUME_FILE, weights_only=True)["epoch"] == 2
    assert not (more / train.FINAL_FILE).exists()
    with open(more / train.SUMMARY_FILE) as f:
        summary = json.load(f)
    assert summary["files"]["final"] is None and [e["epoch"] for e in summary["history"]] == [1, 2, 3]


def _stop_while_saving(monkeypatch, name, stop):
    """Make ``stop()`` happen inside save_atomic's write of ``name``, after part of the file is written."""
    save = torch.save

    def half_then_stop(obj, f, *a, **k):
        path = os.readlink(f"/proc/self/fd/{f.fileno()}")  # (save_atomic writes through an fd: no name on f)
        if os.path.basename(path).startswith(f".{name}."):  # (its temporary file for ``name``)
            f.write(b"half a checkpoint")
            f.flush()
            stop()
        return save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", half_then_stop)


def _temporary_files(folder):
    return [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_run_stopped_while_writing_its_final_weights_finishes_on_resume(data, tmp_path, monkeypatch, capsys):
    """Ctrl-C while model.pth is written (its epochs all done): exit 130, no model.pth and no temporary file;
    the --resume the message names then writes model.pth (the EMA's weights of last.pth) and summary.json
    without training, instead of refusing a run with no epoch left."""
    def interrupt():
        raise KeyboardInterrupt
    _stop_while_saving(monkeypatch, train.FINAL_FILE, interrupt)
    out = tmp_path / "out"
    assert _finetune(data, out, epochs=1) == 130
    last = out / train.RESUME_FILE
    assert _one_line(capsys.readouterr().err) == f"nfnet-fast finetune: interrupted; continue with --resume {last}"
    assert not (out / train.FINAL_FILE).exists() and not _temporary_files(out)
    monkeypatch.undo()

    assert cli.main(["finetune", "--data", data, "--resume", str(last), "--epochs", "1", *ARGS]) == 0
    stdout = capsys.readouterr().out
    assert "no epoch left to train (--epochs 1): writing the final weights" in stdout
    assert not [line for line in stdout.splitlines() if line.startswith("epoch")]  # nothing trained
    final = torch.load(out / train.FINAL_FILE, weights_only=True)
    ema = torch.load(last, weights_only=True)["state_dict_ema"]
    assert final.keys() == ema.keys() and all(torch.equal(final[k], ema[k]) for k in ema)
    with open(out / train.SUMMARY_FILE) as f:
        summary = json.load(f)
    assert summary["files"]["final"] == train.FINAL_FILE and [e["epoch"] for e in summary["history"]] == [1]
    # finished now: a second such resume has nothing to do and says so
    assert cli.main(["finetune", "--data", data, "--resume", str(last), "--epochs", "1", *ARGS]) == 2
    assert "has completed 1 epochs, --epochs is 1: nothing left to train" in _one_line(capsys.readouterr().err)


def test_sigterm_while_saving_leaves_no_half_written_file(data, tmp_path, monkeypatch, capsys):
    """SIGTERM (kill, timeout, a scheduler) during a save: the temporary file is removed, one line, exit 143
    (128 + SIGTERM), and the process's own SIGTERM handler is back afterwards."""
    import signal

    before = signal.getsignal(signal.SIGTERM)
    _stop_while_saving(monkeypatch, train.RESUME_FILE, lambda: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "out"
    assert _finetune(data, out, epochs=1) == 143
    assert _one_line(capsys.readouterr().err) == "nfnet-fast finetune: terminated"  # (no last.pth to resume yet)
    assert not (out / train.RESUME_FILE).exists() and not _temporary_files(out)
    assert signal.getsignal(signal.SIGTERM) is before


def test_resume_into_another_folder_writes_its_own_best(run, data, tmp_path, capsys):
    """--resume with another --output: that folder has no model_best.pth of the earlier epochs, so the best is
    judged again from the first resumed epoch and written there (summary.json never names a missing file)."""
    out, _, _ = run
    other = tmp_path / "other"
    assert cli.main(["finetune", "--data", data, "--resume", str(out / train.RESUME_FILE), "--epochs", "3", *ARGS,
                     "--output", str(other)]) == 0
    assert f"note: {other} holds no {train.BEST_FILE}" in capsys.readouterr().out
    with open(other / train.SUMMARY_FILE) as f:
        summary = json.load(f)
    assert summary["best"]["epoch"] == 3 and (other / summary["files"]["best"]).exists()


# --- bad input: one line, exit status 2, nothing written ----------------------------------------------------

def _garbage_png(root):
    path = os.path.join(root, "train", "red", "broken.png")
    with open(path, "wb") as f:
        f.write(b"not a png at all")
    return path


def _bad_data(kind, root):
    """A data folder with one thing wrong, and the start of the error line it must give."""
    if kind == "empty":
        os.makedirs(os.path.join(root, "train", "red"))
        return root, f"no images in training folder {os.path.join(root, 'train')}: expected one subfolder per class"
    if kind == "nothing":
        os.makedirs(root)
        return root, f"no images in training folder {root}"
    if kind == "one-class":
        _make_images(root, per_class=2, val_per_class=1, classes=("red",))
        return root, (f"training folder {os.path.join(root, 'train')} has a single class (red): fine-tuning a "
                      f"classifier needs at least two class subfolders")
    if kind == "unreadable":
        _make_images(root, per_class=2, val_per_class=1)
        return root, f"cannot read image {_garbage_png(root)}: UnidentifiedImageError"
    if kind == "loose-images":
        _make_images(root, per_class=2, val_per_class=1)
        Image.new("RGB", (8, 8)).save(os.path.join(root, "train", "stray.png"))
        return root, (f"training folder {os.path.join(root, 'train')} holds images outside any class subfolder (e.g. "
                      f"{os.path.join(root, 'train', 'stray.png')}): put each class's images in a subfolder")
    if kind == "val-class-unknown":
        _make_images(root, per_class=2, val_per_class=1, classes=("red", "green"))
        _make_images(os.path.join(root, "extra"), per_class=1, val_per_class=1, classes=("blue",))
        shutil.move(os.path.join(root, "extra", "val", "blue"), os.path.join(root, "val", "blue"))
        shutil.rmtree(os.path.join(root, "extra"))
        return root, f"validation folder {os.path.join(root, 'val')} has classes that"
    if kind == "truncated-jpeg":  # PIL's verify reads no JPEG data: only decoding finds it
        _make_images(root, per_class=2, val_per_class=1)
        path = os.path.join(root, "val", "green", "cut.jpg")
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        with open(path, "wb") as f:
            f.write(buf.getvalue()[:len(buf.getvalue()) // 2])
        return root, f"cannot read image {path}: OSError: image file is truncated"
    if kind == "nested":  # timm would name both classes' 2019/ folders one class, "2019"
        _make_images(root, per_class=2, val_per_class=1)
        for c in ("red", "green"):
            os.makedirs(os.path.join(root, "train", c, "2019"))
            shutil.copy(os.path.join(root, "train", c, "0.png"), os.path.join(root, "train", c, "2019", "9.png"))
        train_root = os.path.join(root, "train")
        return root, (f"training folder {train_root} holds images in nested folders (e.g. "
                      f"{os.path.join(train_root, 'green', '2019', '9.png')}): each image's class is the folder "
                      f"directly under {train_root}")
    if kind == "empty-class":  # timm's scan would drop the class without a word
        _make_images(root, per_class=2, val_per_class=1, classes=("red", "green"))
        os.makedirs(os.path.join(root, "train", "blue"))
        return root, (f"training folder {os.path.join(root, 'train')} has a class folder without images, "
                      f"{os.path.join(root, 'train', 'blue')}: add its images or remove it")
    if kind == "hidden-class":
        _make_images(root, per_class=2, val_per_class=1)
        os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))
        shutil.copy(os.path.join(root, "train", "red", "0.png"), os.path.join(root, "train", ".ipynb_checkpoints"))
        return root, (f"training folder {os.path.join(root, 'train')} has a hidden folder of images, "
                      f".ipynb_checkpoints, that would be a class")
    if kind == "missing":
        return root, f"--data {root}: no such directory"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["empty", "nothing", "one-class", "unreadable", "truncated-jpeg", "nested",
                                  "empty-class", "hidden-class", "loose-images", "val-class-unknown", "missing"])
def test_bad_data(kind, tmp_path, capsys):
    root, message = _bad_data(kind, str(tmp_path / "data"))
    out = tmp_path / "out"
    assert _finetune(root, out) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"nfnet-fast finetune: error: {message}"), line
    assert not out.exists()


def _two_class_data(root):
    return _make_images(root, per_class=2, val_per_class=1, classes=("red", "green"))


def test_resume_with_another_held_out_split_is_refused(tmp_path, capsys):
    """A run that held out --val-split 0.25 with --seed 0 cannot be resumed with another seed, fraction or none:
    images it validated on would be trained on."""
    flat = os.path.join(_make_images(str(tmp_path / "d"), per_class=4, val_per_class=0), "train")
    first = tmp_path / "first"
    assert cli.main(["finetune", "--data", flat, "--val-split", "0.25", "--output", str(first), "--epochs", "1",
                     *ARGS]) == 0
    capsys.readouterr()
    last = str(first / train.RESUME_FILE)
    for split, shown in ((["--val-split", "0.25", "--seed", "1"], "--val-split 0.25 --seed 1"),
                         (["--val-split", "0.5"], "--val-split 0.5 --seed 0"), ([], "no --val-split")):
        assert cli.main(["finetune", "--data", flat, "--resume", last, "--epochs", "2", *ARGS, *split]) == 2
        assert _one_line(capsys.readouterr().err) == (
            f"nfnet-fast finetune: error: {last} held out its validation images with --val-split 0.25 --seed 0, this "
            f"run has {shown}: resume with the same, or images it validated on would be trained on (or the reverse)")
    assert cli.main(["finetune", "--data", flat, "--resume", last, "--epochs", "2", *ARGS, "--val-split", "0.25"]) == 0


@pytest.mark.parametrize("case", ["another-model", "other-classes", "plain-state-dict", "finished", "garbage"])
def test_bad_resume(case, run, data, tmp_path, capsys):
    out, _, _ = run
    last = str(out / train.RESUME_FILE)
    args, message = {
        "another-model": (["--data", data, "--resume", last, "--model", "nf_regnet_b0"],
                          f"{last} is a checkpoint of test_nfnet, not of nf_regnet_b0 (--model)"),
        "other-classes": (["--data", _two_class_data(str(tmp_path / "two")), "--resume", last],
                          f"{last} was trained on 3 classes (blue, green, red), this data has 2 (green, red)"),
        "plain-state-dict": (["--data", data, "--resume", str(out / train.FINAL_FILE)],
                             f"{out / train.FINAL_FILE} is not a resumable checkpoint of nfnet-fast finetune"),
        "finished": (["--data", data, "--resume", last, "--epochs", "2"],
                     f"{last} has completed 2 epochs, --epochs is 2: nothing left to train"),
        "garbage": (["--data", data, "--resume", str(tmp_path / "x.pth")],
                    f"{tmp_path / 'x.pth'} is not a loadable checkpoint of"),
    }[case]
    (tmp_path / "x.pth").write_bytes(b"\x00" * 64)
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out)}
    new = tmp_path / "new-out"
    assert cli.main(["finetune", *ARGS, *args, "--output", str(new)]) == 2  # the case's flags win over ARGS'
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"nfnet-fast finetune: error: {message}"), line
    assert not new.exists()
    assert {f: os.path.getmtime(out / f) for f in os.listdir(out)} == before  # the run resumed from is untouched


def test_bad_output(run, data, tmp_path, capsys):
    out, _, _ = run
    afile = tmp_path / "a-file"
    afile.write_text("x")
    assert _finetune(data, afile) == 2
    assert _one_line(capsys.readouterr().err) == f"nfnet-fast finetune: error: --output {afile} is a file, not a folder"
    assert _finetune(data, afile / "sub" / "run") == 2  # found before training, not when the first epoch ends
    assert _one_line(capsys.readouterr().err) == (f"nfnet-fast finetune: error: --output {afile / 'sub' / 'run'}: "
                                                  f"{afile} is a file, not a folder")
    assert afile.read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["a-file"]  # (the writability probe leaves nothing)
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out)}
    assert _finetune(data, out) == 2  # holds a run that this one does not resume
    line = _one_line(capsys.readouterr().err)
    assert line == (f"nfnet-fast finetune: error: --output {out} already holds a fine-tuning run (last.pth); continue "
                    f"it with --resume {out / train.RESUME_FILE}, or pass another --output")
    assert {f: os.path.getmtime(out / f) for f in os.listdir(out)} == before


@pytest.mark.parametrize("flags, message", [
    (["--train-split", "test"], "--train-split applies to --dataset only"),
    (["--download"], "--download applies to --dataset only"),
    (["--device", "meta"], "--device meta: nfnet-fast runs on cpu or cuda, not meta"),
    (["--cuda-graph"], "--cuda-graph needs a CUDA device, not cpu")])
def test_flags_out_of_place_refused(flags, message, data, tmp_path, capsys):
    assert _finetune(data, tmp_path / "o", *flags) == 2
    assert _one_line(capsys.readouterr().err).startswith(f"nfnet-fast finetune: error: {message}")
    assert not (tmp_path / "o").exists()


def test_resume_with_pretrained_loads_no_pretrained_weights(run, data, tmp_path, monkeypatch, capsys):
    """The command line of a --pretrained run plus --resume continues it without fetching the pretrained
    weights (the checkpoint holds every weight: an offline node resumes); the header says what it runs."""
    import nfnet_fast

    out, _, _ = run
    more = tmp_path / "more"
    shutil.copytree(out, more)
    created, create_model = [], nfnet_fast.create_model
    monkeypatch.setattr(nfnet_fast, "create_model", lambda *a, **k: created.append(k["pretrained"]) or
                        create_model(*a, **k))
    assert cli.main(["finetune", "--data", data, "--resume", str(more / train.RESUME_FILE), "--epochs", "3", *ARGS,
                     "--pretrained", "--clip-grad", "0"]) == 0
    assert created == [False]
    header = capsys.readouterr().out.splitlines()[0]
    assert "(resumed weights, 3-class head" in header and "no AGC" in header, header


def test_unknown_augmentation_refused_before_anything_runs(data, tmp_path, capsys):
    assert _finetune(data, tmp_path / "o", "--aa", "bogus") == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("nfnet-fast finetune: error: --aa bogus: not an augmentation timm knows "
                           "(Unknown AA policy"), line
    assert not (tmp_path / "o").exists()


def test_interrupt_before_training_is_one_line(data, tmp_path, monkeypatch, capsys):
    """Ctrl-C while the images are checked (or weights load): one line, exit 130, nothing written."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "_check_images", interrupted)
    assert _finetune(data, tmp_path / "o") == 130
    assert _one_line(capsys.readouterr().err) == "nfnet-fast finetune: interrupted"
    assert not (tmp_path / "o").exists()


def test_no_data_and_conflicting_split(data, tmp_path, capsys):
    assert cli.main(["finetune", "--output", str(tmp_path / "o"), *ARGS]) == 2
    assert _one_line(capsys.readouterr().err).startswith("nfnet-fast finetune: error: no data: pass --data DIR")
    assert _finetune(data, tmp_path / "o", "--val-split", "0.2") == 2
    assert "--val-split 0.2 and a validation folder" in _one_line(capsys.readouterr().err)
    assert cli.main(["finetune", "--dataset", "torch/cifar10", "--data", data, "--output", str(tmp_path / "o"),
                     "--eval-split", "test", "--val-split", "0.2", *ARGS]) == 2  # (refused before any loading)
    assert _one_line(capsys.readouterr().err) == ("nfnet-fast finetune: error: --eval-split test and --val-split 0.2: "
                                                  "use one of them (--val-split holds out part of the training split "
                                                  "instead)")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value, why", [("--epochs", "0", "expected an integer in [1, inf), got 0"),
                                              ("--lr", "-1", "expected a number in (0, inf), got -1"),
                                              ("--val-split", "1.5", "expected a number in (0, 1), got 1.5"),
                                              ("--batch-size", "two", "expected an integer in [1, inf), not 'two'"),
                                              ("--seed", "-1", "expected an integer in [0, 4294967296), got -1"),
                                              ("--seed", "4294967296",
                                               "expected an integer in [0, 4294967296), got 4294967296")])
def test_bad_numbers_refused_while_parsing(flag, value, why, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["finetune", "--data", "x", flag, value])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"nfnet-fast finetune: error: argument {flag}: {why}"


# --- the data helpers without training -------------------------------------------------------------------

def test_cuda_graph_refused_without_cuda_in_the_api(data, tmp_path):
    """The Python API refuses --cuda-graph's setting off CUDA as the command line does, before writing anything,
    and so does the capture itself."""
    folder = train.image_folder_data(data, progress=False)
    model = timm.create_model("test_nfnet", num_classes=len(folder.classes))
    with pytest.raises(train.FinetuneError, match="CUDA graphs .* need a CUDA device, not cpu"):
        train.finetune(model, folder, train.FinetuneConfig(epochs=1, cuda_graph=True), str(tmp_path / "o"),
                       model_name="test_nfnet", device="cpu", progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA input"):
        train.graph_training_forward(model, torch.zeros(1, 3, 32, 32), amp=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_run_matches_the_eager_run(data, tmp_path, monkeypatch):
    """--cuda-graph on a GPU: the same losses and accuracies as the eager run of the same flags (bf16 autocast;
    no dropout or stochastic depth, whose draws the capture's warm-up would shift). 36 images at batch 10, so
    each epoch replays 3 batches (forward and backward: 2 graphs each) and runs its last 6 images eagerly."""
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), replay(self))[1])
    gpu = [a for a in ARGS]
    gpu[gpu.index("--device") + 1], gpu[gpu.index("--backend") + 1] = "cuda", "auto"
    gpu[gpu.index("--batch-size") + 1] = "10"
    summaries = []
    for extra in ([], ["--cuda-graph"]):
        out = tmp_path / f"run{len(extra)}"
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["finetune", "--data", data, "--output", str(out), "--epochs", "2", *gpu, *extra]) == 0
        with open(out / train.SUMMARY_FILE) as f:
            summaries.append(json.load(f)["history"])
        assert len(replays) == (0 if not extra else 2 * 3 * 2)
    for eager, graphed in zip(*summaries):
        assert abs(graphed["train_loss"] - eager["train_loss"]) <= 2e-2 * abs(eager["train_loss"]), (eager, graphed)
        assert abs(graphed["val"]["top1"] - eager["val"]["top1"]) <= 100 / 9 + 1e-9, (eager, graphed)


def test_val_split_holds_out_each_class(tmp_path):
    """A flat DIR/<class>/ folder with --val-split: a seeded, per-class split; the datasets take timm's reader."""
    root = _make_images(str(tmp_path / "d"), per_class=10, val_per_class=0)
    flat = os.path.join(root, "train")
    d = train.image_folder_data(flat, val_split=0.3, seed=1, progress=False)
    assert (d.num_train, d.num_val) == (21, 9) and d.classes == ["blue", "green", "red"]
    val = d.make_val(None)
    assert sorted(int(val[i][1]) for i in range(len(val))) == [0] * 3 + [1] * 3 + [2] * 3
    assert len(d.make_train(None)) == 21
    assert train.image_folder_data(flat, val_split=0.3, seed=1, progress=False).num_val == 9
    with pytest.raises(train.FinetuneError, match="leaves no validation image"):
        train.image_folder_data(flat, val_split=0.01, progress=False)


class _FakeDataset(torch.utils.data.Dataset):
    """What timm.data.create_dataset gives for a torch/ dataset: classes, targets, PIL images."""
    classes = ["cat", "dog"]

    def __init__(self, n):
        self.targets = [i % 2 for i in range(n)]
        self.transform = None

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = Image.new("RGB", (8, 8), (255 * self.targets[i], 0, 0))
        return (self.transform(img) if self.transform else img), self.targets[i]


def test_timm_dataset(monkeypatch):
    made = []

    def create_dataset(name, root=None, split="validation", is_training=False, download=False, **kw):
        made.append((name, root, split, is_training, download))
        if name == "torch/missing":
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        return _FakeDataset(8 if split == "train" else 4)

    monkeypatch.setattr("timm.data.create_dataset", create_dataset)
    d = train.timm_dataset_data("torch/fake", "/data", seed=0)
    assert d.classes == ["cat", "dog"] and (d.num_train, d.num_val) == (8, 4)
    assert made[-1] == ("torch/fake", "/data", "validation", False, False)
    assert d.make_train(lambda im: im.size).transform is not None
    split = train.timm_dataset_data("torch/fake", "/data", val_split=0.25)
    assert (split.num_train, split.num_val) == (6, 2) and len(split.make_val(None)) == 2
    with pytest.raises(train.FinetuneError, match=r"^cannot load dataset torch/missing \(split 'train', root /x\): "
                                                  r"Dataset not found or corrupted"):
        train.timm_dataset_data("torch/missing", "/x")
    before = len(made)
    for folder in ("torch/folder", "torch/image_folder", "torch/Folder"):  # unchecked: --data reads image folders
        with pytest.raises(train.FinetuneError, match=rf"^--dataset {folder}: an image folder is read with --data DIR"):
            train.timm_dataset_data(folder, "/data")
    for typo in ("cifar100", "bogus/thing"):  # timm would read any such name as an image folder at root
        with pytest.raises(train.FinetuneError, match=rf"^--dataset {typo}: not a timm dataset name \(torch/NAME, "):
            train.timm_dataset_data(typo, "/data")
    assert len(made) == before  # (the folders and typos reached no create_dataset)


def test_help_lists_finetune(capsys):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for flag in ("--data", "--dataset", "--val-split", "--pretrained", "--backend", "--epochs", "--batch-size", "--lr",
                 "--warmup-epochs", "--clip-grad", "--smoothing", "--aa", "--drop-rate", "--drop-path-rate",
                 "--ema-decay", "--img-size", "--workers", "--device", "--seed", "--output", "--resume", "--no-amp",
                 "--no-channels-last"):
        assert flag in out
