"""The user's workflow, for real: train.py (one process and two DDP ranks) then eval.py --ckpt best.

The single-process train -> eval pair is the fast loop's end-to-end test; the rest is marked slow."""

import json
import os
from pathlib import Path

import pytest

from conftest import ACCELERATE, TINY_TRAIN, make_dataset, read_history, run_cli


def _best_meta(out: Path) -> dict:
    (best,) = out.glob("*/best/checkpoint.json")
    return json.loads(best.read_text())


def _eval_results(out: Path) -> dict:
    (results,) = out.glob("*/eval-best-val/results.json")
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    data = make_dataset(tmp / "flowers")
    out = tmp / "outputs"
    # the real launcher, as users run it; it sets OMP_NUM_THREADS=1, which train.py must override
    proc = run_cli(ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu.yaml", "train.py",
                   "--data", str(data), "--epochs", "2", "--output-dir", str(out), *TINY_TRAIN, "--ema-decay", "0.5",
                   cwd=tmp)
    return tmp, data, out, proc


def test_training_writes_best_and_last_with_self_contained_metadata(single_run):
    _, data, out, proc = single_run
    assert "epoch 2/2" in proc.stdout and "val_acc" in proc.stdout
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    for name in ("best", "last"):
        assert (run / name / "model.safetensors").stat().st_size > 1_000_000
    assert (run / "config.yaml").is_file()
    meta = _best_meta(out)
    assert meta["class_names"] == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    shuffle_seed = meta["data"].pop("shuffle_seed")  # derived from the seed, never the seed itself
    assert isinstance(shuffle_seed, int) and shuffle_seed != 42
    groups = meta["data"].pop("groups")  # near-duplicates kept on one side (see test_near_duplicates.py)
    assert isinstance(groups, list)
    assert meta["data"] == {"source": str(data), "split_seed": 42, "val_split": 0.2, "train_size": 32, "val_size": 8,
                            "val_from": None,  # split here, not a validation split of its own
                            "sampler": "random", "class_weights": None,  # the defaults: shuffled, unweighted
                            "exclude": [], "relabel": {}, "fold": None,
                            "augmentation_draws": 2}  # how the augmentation draws (see design.md): checked on --resume
    assert meta["image_size"] == 32 and meta["config"]["epochs"] == 2
    history = read_history(run)
    assert [row["epoch"] for row in history] == [1, 2]
    accuracies = [row["val_accuracy"] for row in history]
    assert meta["epoch"] == accuracies.index(max(accuracies)) + 1  # best/ holds the first best epoch
    assert meta["metrics"]["val_accuracy"] == max(accuracies)
    assert meta["metrics"]["val_accuracy"] * 8 == round(meta["metrics"]["val_accuracy"] * 8)  # k of 8 images
    assert meta["environment"]["num_processes"] == 1
    ema = json.loads((run / "ema" / "checkpoint.json").read_text())  # records the EMA weights' own accuracy
    assert ema["metrics"]["weights"] == "ema"
    assert ema["metrics"]["val_accuracy"] == history[ema["epoch"] - 1]["ema_val_accuracy"]
    assert meta["environment"]["torch_threads"] == len(os.sched_getaffinity(0))  # all cores
    # the end of training fitted best/'s temperature on the 8 validation images, plain at 32 px
    assert meta["temperature"] > 0 and "held-out halves" in proc.stdout
    assert {k: meta["calibration"][k] for k in ("eval_size", "tta", "fitted_on", "images")} == {
        "eval_size": 32, "tta": "none", "fitted_on": "val", "images": 8}
    assert meta["calibration"]["nll_after"] <= meta["calibration"]["nll_before"] + 1e-9


def test_eval_best_reproduces_the_recorded_accuracy(single_run):
    tmp, _, out, _ = single_run
    proc = run_cli("python", "eval.py", "--ckpt", "best", "--workers", "0", cwd=tmp)
    assert "matches the accuracy recorded" in proc.stdout
    result = _eval_results(out)
    meta = _best_meta(out)
    assert result["metrics"]["accuracy"] == meta["metrics"]["val_accuracy"]
    assert result["metrics"]["loss"] == pytest.approx(meta["metrics"]["val_loss"], rel=1e-5)
    assert result["metrics"]["num_samples"] == 8
    assert proc.stdout.strip().splitlines()[-1].endswith("eval-best-val")
    # calibration: the checkpoint's temperature in use, the ECE before/after, risk-coverage
    calibration = result["calibration"]
    assert calibration["temperature"] == meta["temperature"] and calibration["predictions_changed"] == 0
    assert f"the checkpoint's temperature {meta['temperature']:.3f}" in proc.stdout
    assert "ECE without a temperature" in proc.stdout and "risk-coverage" in proc.stdout
    assert sum(calibration["reliability"]["count"]) == 8 and calibration["risk_coverage"][0]["threshold"] == 0.5
    report_dir = tmp / proc.stdout.strip().splitlines()[-1].removeprefix("results written to ")
    assert (report_dir / "reliability.png").is_file() and (report_dir / "risk_coverage.png").is_file()


@pytest.mark.slow
def test_eval_on_another_folder_with_other_classes_is_refused(single_run, tmp_path):
    tmp, _, out, _ = single_run
    other = make_dataset(tmp_path / "other", per_class=2, classes=["cat", "dog"])
    proc = run_cli("python", "eval.py", "--ckpt", "best", "--output-dir", str(out), "--data", str(other),
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: classes in") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_eval_on_another_folder_with_the_same_classes(single_run, tmp_path):
    _, data, out, _ = single_run
    other = make_dataset(tmp_path / "other", per_class=2)
    run_cli("python", "eval.py", "--ckpt", "best", "--output-dir", str(out), "--data", str(other), "--workers", "0")
    (results,) = out.glob("*/eval-best-*all/results.json")  # eval-best-<data folder>-all
    assert json.loads(results.read_text())["metrics"]["num_samples"] == 10


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (("train.py", "--data", "/no/such/dir", "--weights", "none"), "no such folder"),
    (("eval.py", "--ckpt", "best", "--output-dir", "/no/runs/here"), "no runs"),
    (("train.py", "--lr", "0"), "--lr must be"),
])
def test_user_mistakes_get_one_line_and_exit_2(args, message):
    proc = run_cli("python", *args, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_real_ddp_ranks_agree_with_single_process_eval(tmp_path):
    data = make_dataset(tmp_path / "flowers")
    out = tmp_path / "outputs"
    proc = run_cli(ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_ddp.yaml",
                   "--main_process_port", "29531", "train.py", "--data", str(data), "--epochs", "1",
                   "--output-dir", str(out), *TINY_TRAIN)
    assert "processes: 2" in proc.stdout
    meta = _best_meta(out)
    env = meta["environment"]
    assert env["num_processes"] == 2 and env["model_wrapper"] == "DistributedDataParallel"
    assert meta["metrics"]["train_samples"] == 32  # both ranks trained: 16 images each, summed
    assert len(list(out.iterdir())) == 1  # one run folder, written by the main process only
    run_cli("python", "eval.py", "--ckpt", "best", "--output-dir", str(out), "--workers", "0")
    single = _eval_results(out)["metrics"]
    assert single["accuracy"] == meta["metrics"]["val_accuracy"]
    assert single["loss"] == pytest.approx(meta["metrics"]["val_loss"], rel=1e-5)
    assert single["num_samples"] == 8  # gather_for_metrics: no duplicated or dropped samples
