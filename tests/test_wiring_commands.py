"""Every option of eval.py, predict, export and compare observed through the command's own
function (run_eval, predict/main, export, compare's main), in-process on the session's tiny
checkpoint: each test fails when the option's wiring is broken (tests/wiring_mutations.py)."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
import yaml
from PIL import Image
from accelerate.state import AcceleratorState, GradientState

from conftest import CLASSES, make_dataset
from flowers import checkpoint, compare, evaluation, predict
from flowers.config import EvalConfig, ExportConfig, PredictConfig, parse
from flowers.errors import UserError
from flowers.export import export


def _fresh_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def evaluate_with(trained_run, monkeypatch):
    """eval.py's run_eval for a command line, recording the loader it builds (batch size, workers)."""
    loaders = []
    make_loader = evaluation.make_loader

    def recording(ds, batch_size, shuffle, options, **kwargs):
        loaders.append((batch_size, options.workers))
        return make_loader(ds, batch_size, shuffle, options, **kwargs)

    monkeypatch.setattr(evaluation, "make_loader", recording)

    def run(*args: str) -> dict:
        _fresh_state()
        result = evaluation.run_eval(parse(EvalConfig, ["--output-dir", str(trained_run["output_dir"]), *args]))
        result["loader"] = loaders[-1]
        return result
    return run


# ---- eval.py ---------------------------------------------------------------------------------------

def test_eval_checkpoint_split_top_k_mistakes_batch_size_and_workers(evaluate_with):
    result = evaluate_with("--ckpt", "last", "--split", "train", "--top-k", "3", "--mistakes", "2",
                           "--batch-size", "5", "--workers", "1")
    assert result["checkpoint"].endswith("last") and result["split"] == "train"
    metrics = result["metrics"]
    assert metrics["num_samples"] == 32 and "top3_accuracy" in metrics
    assert metrics["accuracy"] * 32 < 30, "needs at least 3 mistakes to see --mistakes 2"
    assert len(result["mistakes"]) == 2
    assert result["loader"] == (5, 1)


def test_eval_output_dir_names_where_the_runs_are(evaluate_with, tmp_path):
    with pytest.raises(UserError, match=f"no runs with a 'best' checkpoint under {tmp_path / 'empty'}/"):
        evaluate_with("--output-dir", str(tmp_path / "empty"))


def test_eval_data_and_strict_evaluate_another_folder(evaluate_with, tmp_path):
    other = make_dataset(tmp_path / "other", per_class=2)
    result = evaluate_with("--data", str(other))
    assert result["data"] == str(other) and result["split"] == "all" and result["metrics"]["num_samples"] == 10
    (other / "rose" / "broken.jpg").write_bytes(b"not a jpeg")
    assert evaluate_with("--data", str(other))["metrics"]["num_samples"] == 10
    with pytest.raises(UserError, match="--strict"):
        evaluate_with("--data", str(other), "--strict")


def _noise_photos(root, per_class=2):
    """Photos of random noise in the flower classes' folders: no mirror symmetry (a generated
    stand-in photo of one colour looks the same flipped)."""
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(root / name / f"{i}.jpg")
    return root


def test_eval_tta_eval_size_and_precision_change_the_forward_pass(evaluate_with, tmp_path):
    data = ("--data", str(_noise_photos(tmp_path / "noise")))
    plain = evaluate_with(*data)
    flipped = evaluate_with(*data, "--tta", "flip")
    larger = evaluate_with(*data, "--eval-size", "48")
    bf16 = evaluate_with(*data, "--mixed-precision", "bf16")
    assert (plain["tta"], flipped["tta"], larger["eval_size"]) == ("none", "flip", 48)
    assert flipped["metrics"]["loss"] != plain["metrics"]["loss"] != larger["metrics"]["loss"]
    assert (plain["mixed_precision"], bf16["mixed_precision"]) == ("no", "bf16")
    assert bf16["metrics"]["loss"] != plain["metrics"]["loss"]


def test_eval_calibrate_writes_the_temperature_into_the_checkpoint(evaluate_with, trained_run, tmp_path):
    copy = tmp_path / "copy" / "best"
    shutil.copytree(trained_run["ckpt"], copy)
    checkpoint.update_meta(copy, {"temperature": 1.0, "calibration": None})
    evaluate_with("--ckpt", str(copy), "--calibrate", "--eval-size", "40")
    meta = checkpoint.load_meta(copy)
    assert meta["calibration"]["eval_size"] == 40 and meta["temperature"] != 1.0


@pytest.fixture
def renamed_copy(trained_run, tmp_path):
    """A copy of the session's best/ whose classes are named A-E: what a command read tells which
    checkpoint it used (the tiny run's best/ and last/ hold the same epoch)."""
    copy = tmp_path / "renamed" / "best"
    shutil.copytree(trained_run["ckpt"], copy)
    checkpoint.update_meta(copy, {"class_names": list("ABCDE")})
    return copy


# ---- predict -------------------------------------------------------------------------------------------

@pytest.fixture
def photos(tmp_path):
    folder = _noise_photos(tmp_path / "photos", per_class=1)
    return [str(p) for p in sorted(folder.rglob("*.jpg"))][:3]


def _predict(trained_run, *args):
    _fresh_state()
    return predict.predict(parse(PredictConfig, ["--output-dir", str(trained_run["output_dir"]), *args]))


def test_predict_inputs_checkpoint_top_k_and_batch_size(trained_run, photos, monkeypatch):
    chunks = []
    batches = predict._batches
    monkeypatch.setattr(predict, "_batches", lambda items, size: (chunks.append(size), batches(items, size))[1])
    results = _predict(trained_run, *photos, "--ckpt", "last", "--top-k", "3", "--batch-size", "2")
    assert [r.path for r in results] == photos
    assert all(len(r.top) == 3 for r in results)
    assert chunks == [2]
    with pytest.raises(UserError, match="no runs with a 'best' checkpoint under /nonexistent-runs/"):
        predict.predict(parse(PredictConfig, [photos[0], "--output-dir", "/nonexistent-runs"]))


def test_predict_uses_the_checkpoint_it_is_given(trained_run, photos, renamed_copy):
    results = _predict(trained_run, *photos, "--ckpt", str(renamed_copy))
    assert {name for r in results for name, _ in r.top} <= set("ABCDE")


def test_predict_tta_and_eval_size_change_the_probabilities(trained_run, photos):
    probability = lambda results: [r.top[0][1] for r in results]
    plain = probability(_predict(trained_run, *photos))
    assert probability(_predict(trained_run, *photos, "--tta", "flip")) != plain
    assert probability(_predict(trained_run, *photos, "--eval-size", "48")) != plain


def test_predict_reject_below_and_output(trained_run, photos, tmp_path, monkeypatch):
    results = _predict(trained_run, *photos, "--reject-below", "1")
    assert [r.answer for r in results] == [predict.UNKNOWN] * 3  # no probability is above 1
    assert all(r.answer is None for r in _predict(trained_run, *photos))
    out = tmp_path / "p.json"
    monkeypatch.setattr(sys, "argv", ["predict", *photos, "--output-dir", str(trained_run["output_dir"]),
                                      "--output", str(out)])
    _fresh_state()
    predict.main()
    assert [row["path"] for row in json.loads(out.read_text())] == photos


# ---- export -------------------------------------------------------------------------------------------

def test_export_format_out_and_checkpoint(trained_run, tmp_path, renamed_copy):
    _fresh_state()
    path = export(parse(ExportConfig, ["--output-dir", str(trained_run["output_dir"]), "--ckpt", "last",
                                       "--format", "torchscript", "--out", str(tmp_path / "exported")]))
    assert path == tmp_path / "exported" / "model.torchscript.pt" and path.is_file()
    assert checkpoint.load_meta(tmp_path / "exported")["run_name"] == "tiny"
    _fresh_state()
    export(parse(ExportConfig, ["--ckpt", str(renamed_copy), "--format", "torchscript", "--out", str(tmp_path / "e2")]))
    assert json.loads((tmp_path / "e2" / "checkpoint.json").read_text())["class_names"] == list("ABCDE")


# ---- compare ---------------------------------------------------------------------------------------------

def _group_of_runs(root):
    """Three runs of group g as training leaves them: stage2 started from stage1's epoch 3, stage3 from
    stage2's epoch 2; and one run of another group."""
    for name, group, parent in (("stage1", "g", None), ("stage2", "g", ("stage1", 3)),
                                ("stage3", "g", ("stage2", 2)), ("other", "h", None)):
        run = root / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump({"group": group, "run_name": name, "epochs": 3,
                                                         "wandb_project": "recorded"}))
        (run / "history.jsonl").write_text("".join(json.dumps({"epoch": e, "val_accuracy": 0.5, "train_loss": 1.0,
                                                               "val_loss": 1.0, "train_accuracy": 0.5, "lr": 1e-3})
                                                   + "\n" for e in (1, 2, 3)))
        init = {"run_name": parent[0], "epoch": parent[1]} if parent else None
        checkpoint.save_checkpoint(run / "best", {}, {
            "epoch": 3, "class_names": ["a", "b"], "data": {"val_size": 2}, "init_from": init,
            "metrics": {"val_accuracy": 0.5, "val": {"confusion_matrix": [[1, 0], [1, 0]]}}})
    return root


def test_compare_group_output_dir_out_and_the_chain_of_stages(tmp_path, monkeypatch):
    runs_dir = _group_of_runs(tmp_path / "runs")
    monkeypatch.setattr(sys, "argv", ["compare", "--group", "g", "--output-dir", str(runs_dir),
                                      "--out", str(tmp_path / "report")])
    compare.main()
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| stage3 |" in report and "| other |" not in report
    runs = compare.find_runs(str(runs_dir), "g")
    assert compare.epoch_offsets(runs) == {"stage1": 0, "stage2": 3, "stage3": 5}  # stage3 starts at epoch 6


def test_compare_wandb_entity_and_project_reach_the_report(tmp_path, monkeypatch):
    runs_dir = _group_of_runs(tmp_path / "runs")
    built = []

    def build(runs, group, entity, project):
        built.append((entity, project))
        raise RuntimeError("no server here")

    monkeypatch.setattr(compare, "wandb_unavailable", lambda: None)  # as if a W&B server answered
    monkeypatch.setattr(compare, "build_wandb_report", build)
    for args, expected in ((["--wandb-entity", "team", "--wandb-project", "p"], ("team", "p")),
                           (["--wandb-entity", "team"], ("team", "recorded"))):
        monkeypatch.setattr(sys, "argv", ["compare", "--group", "g", "--output-dir", str(runs_dir), *args])
        compare.main()
        assert built[-1] == expected


# ---- crossval ---------------------------------------------------------------------------------------------

def test_crossval_folds_train_one_model_per_fold_and_predict_every_image_once(tmp_path, monkeypatch):
    from flowers.config import CrossvalConfig
    from flowers.crossval import crossval

    data = make_dataset(tmp_path / "flowers", per_class=4)
    _fresh_state()
    summary = crossval(parse(CrossvalConfig, [
        "--data", str(data), "--output-dir", str(tmp_path / "out"), "--run-name", "cv", "--folds", "2",
        "--epochs", "1", "--image-size", "32", "--batch-size", "4", "--weights", "none", "--report-to", "none",
        "--workers", "0"]))
    assert len(summary["val_accuracy"]) == 2
    folds = [checkpoint.load_meta(tmp_path / "out" / "cv" / f"fold-{k}" / "last")["data"]["fold"] for k in (1, 2)]
    assert folds == [[1, 2], [2, 2]]
    rows = (tmp_path / "out" / "cv" / "oof.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 20  # a header, then every image once

    # ---- label_issues on it: its folder, --filter-by and --show ----
    pytest.importorskip("cleanlab")
    from flowers import label_issues as li
    from flowers.config import LabelIssuesConfig

    shown = []
    plot_gallery = li.plot_gallery
    monkeypatch.setattr(li, "plot_gallery", lambda rows, *args: (shown.append(len(rows)), plot_gallery(rows, *args)))
    oof = [line.split(",") for line in rows[1:]]
    header = (tmp_path / "out" / "cv" / "oof.csv").read_text().splitlines()[0].split(",")
    names = header[2:]
    wrong = sum(max(range(len(names)), key=lambda k: float(r[2 + k])) != names.index(r[1]) for r in oof)
    found = li.label_issues(parse(LabelIssuesConfig, [str(tmp_path / "out" / "cv"), "--filter-by",
                                                      "predicted_neq_given", "--show", "1"]))
    assert len(found) == wrong >= 2  # predicted_neq_given: exactly the images whose argmax is not their label
    assert shown == [1]
    assert (tmp_path / "out" / "cv" / "label_issues.csv").is_file()
