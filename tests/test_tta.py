"""Test-time augmentation (--tta flip) and --eval-size: the averaged output on hand-built models,
and eval.py / predict on the checkpoint trained in `trained_run`."""

import csv
import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from torch import nn

from conftest import make_dataset, read_history
from conftest import run_cli as _run_cli
from flowers import evaluation, training
from flowers.config import EvalConfig, PredictConfig, TrainConfig, parse
from flowers.engine import predict_logits
from flowers.errors import UserError


def run_cli(*args, **kwargs):
    """Generous time limit: these runs share 2 CPU cores with whatever else the machine is doing."""
    return _run_cli(*args, timeout=1200, **kwargs)


class LeftVsRight(nn.Module):
    """Two logits: the mean of the left half of the image and the mean of the right half.
    Mirroring swaps them, so it is as far from mirror-symmetric as a model gets."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        half = images.shape[-1] // 2
        return torch.stack([images[..., :half].mean((1, 2, 3)), images[..., half:].mean((1, 2, 3))], dim=1)


class PooledLinear(nn.Module):
    """Global average pooling, then a linear head: mirror-symmetric by construction."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(3, 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(images.mean((2, 3)))


def images(n: int = 6, size: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 3


def test_no_tta_is_the_plain_forward_pass():
    model, x = PooledLinear(), images()
    assert torch.equal(predict_logits(model, x), model(x))
    assert torch.equal(predict_logits(model, x, "none"), model(x))


def test_flip_on_a_mirror_symmetric_model_changes_nothing():
    model, x = PooledLinear(), images()
    averaged = torch.softmax(predict_logits(model, x, "flip"), dim=1)
    torch.testing.assert_close(averaged, torch.softmax(model(x), dim=1))


def test_flip_averages_the_probabilities_of_the_image_and_its_mirror():
    model, x = LeftVsRight(), images()
    x[:, :, :, :4] += 2.0  # a bright left half: the plain model is sure of class 0
    plain = torch.softmax(model(x), dim=1)
    assert (plain[:, 0] > 0.8).all()
    averaged = torch.softmax(predict_logits(model, x, "flip"), dim=1)
    # the mirror swaps the two logits, so the mean of the two probability vectors is exactly even
    torch.testing.assert_close(averaged, torch.full_like(averaged, 0.5))
    # and in general: the mean of the probabilities (not the softmax of the mean logits)
    three = nn.Sequential(LeftVsRight(), nn.Linear(2, 3))
    expected = (torch.softmax(three(x), 1) + torch.softmax(three(x.flip(-1)), 1)) / 2
    with torch.no_grad():
        torch.testing.assert_close(torch.softmax(predict_logits(three, x, "flip"), 1), expected)


def test_flip_tta_is_invariant_to_mirroring_the_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).eval()
    x = images()
    with torch.no_grad():
        assert not torch.allclose(model(x), model(x.flip(-1)), atol=1e-3)
        torch.testing.assert_close(predict_logits(model, x, "flip"), predict_logits(model, x.flip(-1), "flip"))


@pytest.mark.parametrize("cls,extra", [(EvalConfig, []), (PredictConfig, ["photo.jpg"])])
@pytest.mark.parametrize("flags,message", [(["--tta", "rotate"], "--tta"), (["--eval-size", "8"], "--eval-size")])
def test_bad_tta_or_eval_size_is_one_line(cls, extra, flags, message):
    with pytest.raises(UserError, match=message):
        parse(cls, [*flags, *extra])


def report_of(proc) -> Path:
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.startswith("results written to ")
    return Path(last_line.removeprefix("results written to "))


def photo_key(path: str) -> str:
    return "/".join(Path(path).parts[-2:])


@pytest.mark.slow
def test_eval_with_tta_writes_its_own_labelled_report_and_keeps_the_plain_one(trained_run):
    eval_args = ("python", "eval.py", "--ckpt", "best", "--output-dir", str(trained_run["output_dir"]),
                 "--workers", "0")
    ckpt_json = trained_run["ckpt"] / "checkpoint.json"
    recorded_meta = ckpt_json.read_bytes()
    recorded = json.loads(recorded_meta)["metrics"]["val_accuracy"]
    plain_dir = report_of(run_cli(*eval_args))
    plain_results = (plain_dir / "results.json").read_bytes()

    proc = run_cli(*eval_args, "--tta", "flip", "--eval-size", "40")

    report_dir = report_of(proc)
    assert report_dir == trained_run["ckpt"].parent / "eval-best-val-tta-flip-40"
    result = json.loads((report_dir / "results.json").read_text())
    assert result["tta"] == "flip" and result["eval_size"] == 40
    assert result["metrics"]["num_samples"] == 8
    assert (report_dir / "confusion_matrix.png").is_file() and (report_dir / "predictions.csv").is_file()
    assert "TTA: flip, 40 px" in proc.stdout.splitlines()
    assert "matches the accuracy recorded" not in proc.stdout and "DIFFERS" not in proc.stdout
    assert (f"accuracy with TTA: flip, 40 px: {result['metrics']['accuracy']:.2%}; the accuracy recorded at "
            f"training time, {recorded:.2%}, is for TTA: none, 32 px") in proc.stdout
    # the plain report and the checkpoint's record are untouched; plain evaluation still matches it
    assert (plain_dir / "results.json").read_bytes() == plain_results
    assert ckpt_json.read_bytes() == recorded_meta
    again = run_cli(*eval_args)
    assert report_of(again) == plain_dir and "matches the accuracy recorded at training time" in again.stdout
    assert json.loads((plain_dir / "results.json").read_text())["tta"] == "none"


@pytest.mark.slow
def test_predict_with_tta_agrees_with_eval_with_tta(trained_run, tmp_path):
    flags = ("--tta", "flip", "--eval-size", "40")
    output = tmp_path / "predictions.json"
    run_cli("python", "-m", "flowers.predict", "--ckpt", str(trained_run["ckpt"]), "--top-k", "1",
            "--output", str(output), *flags, str(trained_run["data"]))
    predicted = {photo_key(row["path"]): row["top_k"][0] for row in json.loads(output.read_text())}

    proc = run_cli("python", "eval.py", "--ckpt", str(trained_run["ckpt"]), "--data", str(trained_run["data"]),
                   "--workers", "0", *flags)
    rows = list(csv.DictReader(open(report_of(proc) / "predictions.csv")))
    by_eval = {photo_key(row["file"]): row for row in rows}
    assert len(predicted) == 40 and set(predicted) == set(by_eval)
    for key, top in predicted.items():
        assert top["class"] == by_eval[key]["predicted"], key
        assert top["probability"] == pytest.approx(float(by_eval[key]["confidence"]), abs=1e-3), key


def _fresh():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_val_tta_flip_validates_with_the_mirror_and_eval_tta_flip_reproduces_it(tmp_path, capsys):
    """--val-tta flip: training's validation averages each image and its mirror (its loss is the
    TTA one, not the plain one), best/ records it, and eval.py --tta flip is the evaluation that
    matches it (plain eval.py is then a different setting and says so). In-process: fit, run_eval."""
    data = make_dataset(tmp_path / "flowers")
    _fresh()
    run_dir = training.fit(parse(TrainConfig, [
        "--data", str(data), "--output-dir", str(tmp_path / "out"), "--run-name", "r", "--epochs", "1",
        "--val-tta", "flip", "--image-size", "32", "--batch-size", "8", "--weights", "none", "--report-to", "none",
        "--workers", "0"]))
    recorded = read_history(run_dir)[0]
    capsys.readouterr()

    def evaluate(*args):
        _fresh()
        result = evaluation.run_eval(parse(EvalConfig, ["--ckpt", str(run_dir / "best"), "--workers", "0", *args]))
        return result, capsys.readouterr().out

    flip, out = evaluate("--tta", "flip")
    assert "matches the accuracy recorded at training time" in out, out
    assert abs(flip["metrics"]["loss"] - recorded["val_loss"]) < 1e-4
    plain, out = evaluate()
    assert "is for TTA: flip, 32 px" in out and "DIFFERS" not in out
    assert abs(plain["metrics"]["loss"] - recorded["val_loss"]) > 1e-4  # the mirror made a difference the check can see
