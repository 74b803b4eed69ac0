"""The temperature in use: predict --reject-below and the export helper against a hand computation
(a model whose logits are known: a zero last layer and a chosen bias), the atomic checkpoint.json
update, option checks; then eval.py --calibrate and a deliberately overconfident real run (slow)."""

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from PIL import Image

from conftest import CLASSES, COLOURS, TINY_TRAIN, make_colour_dataset, make_dataset, run_cli
from flowers import checkpoint
from flowers.config import EvalConfig, PredictConfig, parse
from flowers.errors import UserError

# every image gets these probabilities (at T = 1): the model's last layer is zero, its bias their log
PROBS = [0.6, 0.2, 0.1, 0.05, 0.05]


@pytest.fixture
def known_logits_ckpt(tmp_path) -> Path:
    from flowers.model import build_model

    model = build_model(len(CLASSES), "none", arch="resnet18")
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.log(torch.tensor(PROBS)))
    meta = {"format_version": 1, "arch": "resnet18", "num_classes": len(CLASSES), "class_names": CLASSES,
            "image_size": 32, "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}, "config": {"dropout": 0.0},
            "data": {"source": "synthetic", "split_seed": 0, "val_split": 0.2}}
    return checkpoint.save_checkpoint(tmp_path / "ckpt", model.state_dict(), meta)


def predict(ckpt: Path, photos: Path, *args: str):
    from flowers.predict import predict as run_predict
    return run_predict(parse(PredictConfig, [str(photos), "--ckpt", str(ckpt), "--top-k", "2", *args]))


def hand_top(temperature: float) -> float:
    """The top probability of PROBS at this temperature: p^(1/T), renormalised."""
    powered = [p ** (1 / temperature) for p in PROBS]
    return powered[0] / sum(powered)


def test_reject_below_answers_unknown_under_the_calibrated_probability(known_logits_ckpt, tmp_path, monkeypatch):
    from flowers.predict import main as predict_main

    photos = make_dataset(tmp_path / "photos", per_class=1)
    # T = 1: top 0.6, so 0.5 answers daisy, 0.7 answers unknown
    answered = predict(known_logits_ckpt, photos, "--reject-below", "0.5")
    assert len(answered) == 5 and {r.answer for r in answered} == {"daisy"}
    assert answered[0].top[0][1] == pytest.approx(0.6, abs=1e-6)
    assert {r.answer for r in predict(known_logits_ckpt, photos, "--reject-below", "0.7")} == {"unknown"}

    # T = 2 (written as calibration does): top = sqrt(0.6) / sum(sqrt(p)) = 0.3902
    checkpoint.update_meta(known_logits_ckpt, {"temperature": 2.0,
                                               "calibration": {"eval_size": 32, "tta": "none"}})
    scaled = predict(known_logits_ckpt, photos, "--reject-below", "0.5")
    assert hand_top(2.0) == pytest.approx(0.3902, abs=1e-4)
    assert {r.answer for r in scaled} == {"unknown"}
    assert scaled[0].top[0] == ("daisy", pytest.approx(hand_top(2.0), abs=1e-6))  # same class, calibrated p
    assert {r.answer for r in predict(known_logits_ckpt, photos, "--reject-below", "0.39")} == {"daisy"}
    monkeypatch.setattr(sys, "argv", ["predict", str(photos), "--ckpt", str(known_logits_ckpt), "--reject-below",
                                      "0.5", "--output", str(tmp_path / "p.csv")])
    predict_main()
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))  # the CSV keeps the probabilities
    assert {r["answer"] for r in rows} == {"unknown"} and {r["class_1"] for r in rows} == {"daisy"}
    assert float(rows[0]["probability_1"]) == pytest.approx(hand_top(2.0), abs=1e-6)

    # no --reject-below: no answer column, the predictions as before
    plain = predict(known_logits_ckpt, photos)
    assert all(r.answer is None for r in plain) and {r.top[0][0] for r in plain} == {"daisy"}


def test_export_folder_carries_the_temperature_and_a_helper_applies_it(known_logits_ckpt, tmp_path):
    from flowers.export import probabilities

    logits = np.log(np.array([PROBS, PROBS[::-1]]))
    assert probabilities(logits, known_logits_ckpt) == pytest.approx(np.array([PROBS, PROBS[::-1]]))
    checkpoint.update_meta(known_logits_ckpt, {"temperature": 2.0})
    assert probabilities(logits, known_logits_ckpt)[0, 0] == pytest.approx(hand_top(2.0))


def test_update_meta_replaces_checkpoint_json_whole_and_keeps_the_rest(known_logits_ckpt):
    before = checkpoint.load_meta(known_logits_ckpt)
    weights = (known_logits_ckpt / checkpoint.WEIGHTS_FILE).read_bytes()
    after = checkpoint.update_meta(known_logits_ckpt, {"temperature": 1.5})
    assert after == {**before, "temperature": 1.5} == checkpoint.load_meta(known_logits_ckpt)
    assert (known_logits_ckpt / checkpoint.WEIGHTS_FILE).read_bytes() == weights
    assert sorted(p.name for p in known_logits_ckpt.iterdir()) == [checkpoint.META_FILE, checkpoint.WEIGHTS_FILE]


@pytest.mark.parametrize("cls, args, message", [
    (PredictConfig, ["x.jpg", "--reject-below", "1.5"], "--reject-below must be in [0, 1], got 1.5"),
    (PredictConfig, ["x.jpg", "--reject-below", "nan"], "--reject-below must be in [0, 1], got nan"),
    (EvalConfig, ["--calibrate", "--split", "train"], "--calibrate fits the temperature on held-out images"),
])
def test_new_options_are_checked(cls, args, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(cls, args)


def test_a_bad_reject_below_is_one_error_line_and_exit_2(tmp_path):
    proc = run_cli("python", "-m", "flowers.predict", "--reject-below", "2", str(tmp_path), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --reject-below must be in [0, 1], got 2.0"]


def _eval(ckpt: Path, *args: str) -> tuple[str, dict, Path]:
    proc = run_cli("python", "eval.py", "--ckpt", str(ckpt), "--workers", "0", *args, timeout=1200)
    report_dir = Path(proc.stdout.strip().splitlines()[-1].removeprefix("results written to "))
    return proc.stdout, json.loads((report_dir / "results.json").read_text()), report_dir


def _predicted(report_dir: Path) -> dict[str, str]:
    return {r["file"]: r["predicted"] for r in csv.DictReader(open(report_dir / "predictions.csv"))}


@pytest.mark.slow
def test_eval_calibrate_writes_the_temperature_and_keeps_every_prediction(trained_run, tmp_path):
    ckpt = tmp_path / "best"
    shutil.copytree(trained_run["ckpt"], ckpt)
    meta = checkpoint.load_meta(ckpt)  # as training wrote it, minus its temperature: an older checkpoint
    meta.pop("temperature"), meta.pop("calibration")
    (ckpt / checkpoint.META_FILE).write_text(json.dumps(meta))

    stdout, before, before_dir = _eval(ckpt)
    assert "the checkpoint has no temperature (T = 1)" in stdout and before["calibration"]["temperature"] == 1.0
    shutil.copytree(before_dir, tmp_path / "before")
    stdout, fitted, report_dir = _eval(ckpt, "--calibrate")
    meta = checkpoint.load_meta(ckpt)
    t = meta["temperature"]
    assert meta["calibration"]["eval_size"] == 32 and meta["calibration"]["tta"] == "none"
    assert f"temperature {t:.4f} fitted on 8 images" in stdout and fitted["calibration"]["temperature"] == t
    assert fitted["calibration"]["nll"] <= fitted["calibration"]["nll_uncalibrated"] + 1e-9
    # predictions identical before and after scaling; only the confidences moved
    assert _predicted(tmp_path / "before") == _predicted(report_dir)
    assert fitted["calibration"]["predictions_changed"] == 0
    assert fitted["metrics"]["accuracy"] == before["metrics"]["accuracy"]
    for name in ("reliability.png", "risk_coverage.png"):
        assert (report_dir / name).stat().st_size > 10_000
    assert "risk-coverage" in stdout and "ECE without a temperature" in stdout

    stdout, flip, _ = _eval(ckpt, "--tta", "flip")  # another setting: said in one line, T still applied
    assert "was fitted for TTA: none, 32 px; applied to TTA: flip, 32 px" in stdout
    assert flip["calibration"]["temperature"] == t and flip["calibration"]["predictions_changed"] == 0


def make_shifted_colour_set(root: Path, per_class: int = 30, seed: int = 0) -> Path:
    """train/: the three pure colour classes of make_colour_dataset; val/: 50/50 blends of two
    colours labelled one or the other in turn: photos unlike any the model trained on, half of which
    no model can get right, yet it calls them with certainty. (With half of val/ pure colours, which
    it gets right with certainty, one temperature leaves those underconfident while it fixes the
    blends, and the held-out ECE of such a run could rise, 0.179 -> 0.190 at T > 1.5, while its NLL
    fell: a run made overconfident on purpose should be judged on the photos it is wrong about.)"""
    make_colour_dataset(root / "train", per_class=per_class, seed=seed)
    pixels, names = np.random.default_rng(seed + 1), list(COLOURS)
    for k, name in enumerate(names):
        other = names[(k + 1) % len(names)]
        blend = (np.array(COLOURS[name]) + np.array(COLOURS[other])) / 2
        for i in range(per_class):
            rgb, label = blend, (name, other)[i % 2]
            noisy = np.clip(rgb + pixels.integers(-30, 31, (40, 40, 3)), 0, 255).astype(np.uint8)
            (root / "val" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy).save(root / "val" / label / f"{name}_{i}.jpg", quality=90)
    return root


@pytest.mark.slow
def test_an_overconfident_real_run_gets_a_temperature_above_1_and_a_lower_heldout_ece(tmp_path):
    """A real training run made overconfident on purpose: no label smoothing or weight decay (the
    report's recipe), many epochs on a tiny, trivially separable set (90 photos of three colours),
    validated on blends of two colours. Training's end fits best/'s
    temperature; eval.py reports the held-out ECE before and after."""
    data = make_shifted_colour_set(tmp_path / "colours")
    out = tmp_path / "outputs"
    proc = run_cli("python", "train.py", "--data", str(data), "--output-dir", str(out), "--run-name", "sure",
                   "--recipe", "report", "--epochs", "15", "--step-size", "100", *TINY_TRAIN, timeout=1800)
    meta = checkpoint.load_meta(out / "sure" / "best")
    fitted = meta["calibration"]
    assert "best/: temperature" in proc.stdout and "held-out halves" in proc.stdout
    assert meta["temperature"] > 1.5 and fitted["images"] == 90
    # (with half of val/ pure colours, before the augmentation draws changed: T 5.6, held-out ECE
    # 0.183 -> 0.127, NLL 1.37 -> 0.57; see make_shifted_colour_set for why val/ is blends only now)
    assert fitted["ece_after_heldout"] < fitted["ece_before_heldout"]
    assert fitted["nll_after"] < fitted["nll_before"]
    stdout, result, _ = _eval(out / "sure" / "best")
    held = result["calibration"]["heldout"]
    assert held["ece_after"] == pytest.approx(fitted["ece_after_heldout"])
    assert f"{held['ece_before']:.3f} -> {held['ece_after']:.3f}" in stdout
