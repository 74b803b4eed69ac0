"""predict on real JPEGs and the export round trip, from the checkpoint trained in `trained_run`."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CLASSES
from conftest import run_cli as _run_cli

pytestmark = pytest.mark.slow  # every test uses a trained checkpoint and subprocesses


def run_cli(*args, **kwargs):
    """Generous time limit: these runs share 2 CPU cores with whatever else the machine is doing."""
    return _run_cli(*args, timeout=1200, **kwargs)


def photo_key(path: str) -> str:
    """class/file name: the same photo whatever the folder it was reached through."""
    return "/".join(Path(path).parts[-2:])


def predict(trained_run, *args, check=True):
    return run_cli("python", "-m", "flowers.predict", "--ckpt", str(trained_run["ckpt"]), *args, check=check)


def test_predict_gives_top_k_per_photo_and_skips_unreadable_files(trained_run, tmp_path):
    photos = tmp_path / "photos"
    shutil.copytree(trained_run["data"] / "rose", photos / "rose")  # 8 real JPEGs, in a sub-folder
    broken = photos / "broken.jpg"
    broken.write_bytes(b"this is not a JPEG")
    (photos / "notes.txt").write_text("not an image, and not an image suffix: ignored in a folder")
    single = next(iter(sorted((trained_run["data"] / "tulip").iterdir())))
    output = tmp_path / "predictions.csv"

    proc = predict(trained_run, "--top-k", "3", "--output", str(output), str(photos), str(single), check=False)

    assert proc.returncode == 1  # something was skipped
    assert proc.stderr.count("skipped") == 1 and f"skipped {broken}: not an image" in proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 9
    for line in lines:
        path, *top = line.split("  ")
        assert len(top) == 3 and all(t.split()[0] in CLASSES and t.endswith("%") for t in top)
    rows = list(csv.DictReader(open(output)))
    assert len(rows) == 10 and sum(1 for r in rows if r["error"]) == 1
    for row in (r for r in rows if not r["error"]):
        probs = [float(row[f"probability_{i}"]) for i in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_predict_agrees_with_eval_and_needs_only_the_checkpoint(trained_run, tmp_path):
    # Only the checkpoint folder is copied: no output dir, no training data, no run folder.
    ckpt = tmp_path / "moved_ckpt"
    shutil.copytree(trained_run["ckpt"], ckpt)
    output = tmp_path / "predictions.json"
    run_cli("python", "-m", "flowers.predict", "--ckpt", str(ckpt), "--top-k", "1", "--output", str(output),
            str(trained_run["data"]), cwd=tmp_path)
    predicted = {photo_key(row["path"]): row["top_k"][0]["class"] for row in json.loads(output.read_text())}

    proc = run_cli("python", "eval.py", "--ckpt", str(ckpt), "--data", str(trained_run["data"]), "--workers", "0")
    report_dir = proc.stdout.strip().splitlines()[-1].removeprefix("results written to ")
    by_eval = {photo_key(row["file"]): row["predicted"] for row in csv.DictReader(open(f"{report_dir}/predictions.csv"))}
    assert len(predicted) == 40 and predicted == by_eval


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_round_trip_gives_the_same_top1_as_pytorch(trained_run, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        pytest.importorskip("onnxscript")
    from flowers.loading import load_model
    from flowers.export import load_exported
    from flowers.predict import load_image
    from flowers.transforms import eval_transform

    proc = run_cli("python", "-m", "flowers.export", "--ckpt", str(trained_run["ckpt"]), "--format", fmt,
                   "--out", str(tmp_path / "exported"))
    path = tmp_path / "exported" / ("model.onnx" if fmt == "onnx" else "model.torchscript.pt")
    assert proc.stdout.strip().splitlines()[-1] == f"exported to {path}"
    meta = json.loads((tmp_path / "exported" / "checkpoint.json").read_text())
    assert meta["class_names"] == CLASSES

    model, _ = load_model(trained_run["ckpt"])
    transform = eval_transform(meta["image_size"], meta["normalization"]["mean"], meta["normalization"]["std"])
    photos = [sorted((trained_run["data"] / name).iterdir())[0] for name in CLASSES]
    batch = torch.stack([transform(load_image(str(p))) for p in photos])
    with torch.inference_mode():
        expected = model.eval()(batch).numpy()
    got = load_exported(path)(batch.numpy())
    np.testing.assert_array_equal(got.argmax(1), expected.argmax(1))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
    # still logits; the folder's checkpoint.json carries the temperature training fitted
    from flowers.export import probabilities
    assert meta["temperature"] > 0 and "calibrated probabilities: softmax(logits / " in proc.stdout
    calibrated = torch.softmax(torch.from_numpy(got).double() / meta["temperature"], dim=1).numpy()
    np.testing.assert_allclose(probabilities(got, tmp_path / "exported"), calibrated, rtol=1e-9)


def test_predict_with_a_checkpoint_missing_its_weights_is_one_line(trained_run, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(trained_run["ckpt"], broken)
    (broken / "model.safetensors").unlink()
    proc = run_cli("python", "-m", "flowers.predict", "--ckpt", str(broken), str(trained_run["data"]), check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: checkpoint {broken} is missing model.safetensors"
