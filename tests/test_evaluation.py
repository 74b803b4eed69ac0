"""eval.py end to end: the table, results.json, PNGs, splits, and 2 processes == 1 process."""

import csv
import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import CLASSES
from conftest import run_cli as _run_cli


def run_cli(*args, **kwargs):
    """Generous time limit: these runs share 2 CPU cores with whatever else the machine is doing."""
    return _run_cli(*args, timeout=1200, **kwargs)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.slow]  # every test evaluates a trained checkpoint in subprocesses


def run_eval(trained_run, *args, launcher=("python",), env=None):
    proc = run_cli(*launcher, "eval.py", "--ckpt", "best", "--output-dir", str(trained_run["output_dir"]),
                   "--workers", "0", *args, env=env)
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.startswith("results written to ")
    report_dir = Path(last_line.removeprefix("results written to "))
    return proc.stdout, report_dir, json.loads((report_dir / "results.json").read_text())


def assert_sensible_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert 400 <= image.width <= 3000 and 400 <= image.height <= 3000, image.size
        image.load()  # decodes the whole file: fails on a truncated PNG
        assert len(set(image.convert("L").getdata())) > 16  # not a blank canvas


def test_eval_prints_a_per_class_table_and_writes_the_report(trained_run):
    stdout, report_dir, result = run_eval(trained_run)

    assert report_dir == trained_run["ckpt"].parent / "eval-best-val"
    for name in CLASSES:
        assert any(line.startswith(name) for line in stdout.splitlines()), name
    assert "macro avg" in stdout and "top-2 accuracy" in stdout
    assert "matches the accuracy recorded at training time" in stdout
    metrics = result["metrics"]
    assert result["split"] == "val" and result["class_names"] == CLASSES
    assert metrics["num_samples"] == 8 and sum(map(sum, metrics["confusion_matrix"])) == 8
    recorded = json.loads((trained_run["ckpt"] / "checkpoint.json").read_text())["metrics"]["val"]
    assert metrics["accuracy"] == recorded["accuracy"] and metrics["loss"] == pytest.approx(recorded["loss"])
    rows = list(csv.DictReader(open(report_dir / "predictions.csv")))
    assert len(rows) == 8 and sum(int(r["correct"]) for r in rows) == round(metrics["accuracy"] * 8)
    wrong = [r for r in rows if r["correct"] == "0"]
    assert len(result["mistakes"]) == len(wrong)
    assert [m["confidence"] for m in result["mistakes"]] == sorted((m["confidence"] for m in result["mistakes"]),
                                                                   reverse=True)
    assert_sensible_png(report_dir / "confusion_matrix.png")
    assert_sensible_png(report_dir / "mistakes.png")


def test_split_all_and_train_cover_the_whole_data_set(trained_run):
    _, _, train = run_eval(trained_run, "--split", "train", "--mistakes", "4")
    _, all_dir, every = run_eval(trained_run, "--split", "all", "--top-k", "3")
    assert train["metrics"]["num_samples"] == 32 and len(train["mistakes"]) <= 4
    assert every["metrics"]["num_samples"] == 40 and "top3_accuracy" in every["metrics"]
    assert all_dir.name == "eval-best-all"


def test_two_processes_give_exactly_the_numbers_of_one(trained_run):
    # 40 images in batches of 8 split unevenly over 2 ranks: padding must not be counted twice.
    _, _, single = run_eval(trained_run, "--split", "all", "--batch-size", "8")
    launch = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    _, _, double = run_eval(trained_run, "--split", "all", "--batch-size", "8", launcher=launch,
                            env={"ACCELERATE_USE_CPU": "true"})
    assert double["processes"] == 2 and single["processes"] == 1
    assert double["metrics"] == single["metrics"]
    assert double["mistakes"] == single["mistakes"]


def test_other_folder_with_different_classes_is_one_line(trained_run, tmp_path):
    other = tmp_path / "other"
    for name in ("cat", "dog"):
        shutil.copytree(trained_run["data"] / CLASSES[0], other / name, symlinks=True)
    proc = run_cli("python", "eval.py", "--ckpt", str(trained_run["ckpt"]), "--data", str(other),
                   "--workers", "0", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: classes in") and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("missing", ["checkpoint.json", "model.safetensors"])
def test_checkpoint_missing_a_file_names_it(trained_run, tmp_path, missing):
    from flowers.loading import load_model
    from flowers.errors import UserError  # printed as one `error: ...` line by every command

    broken = tmp_path / "broken"
    shutil.copytree(trained_run["ckpt"], broken)
    (broken / missing).unlink()
    with pytest.raises(UserError) as error:
        load_model(broken)
    assert str(error.value) == f"checkpoint {broken} is missing {missing}"


def test_the_verdict_names_fp32_not_accelerates_no():
    """eval.py's verdict line said "(evaluated in no)" for fp32."""
    from flowers.evaluation import recorded_accuracy_verdict

    same = recorded_accuracy_verdict(0.9, 0.9, 100, "no", "no")
    assert same.endswith("(evaluated in fp32)"), same
    other = recorded_accuracy_verdict(0.9, 0.89, 100, "bf16", "no")
    assert "trained in bf16; evaluated in fp32" in other and " no" not in other, other
