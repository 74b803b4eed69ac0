"""Experiment tracking: what a W&B offline run and TensorBoard hold, read back from their files."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, TINY_TRAIN, make_dataset, run_cli
from flowers import tracking
from flowers.config import TrainConfig, parse
from flowers.errors import UserError
from wandb_offline import read_run

EPOCH_METRICS = {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr",
                 "epoch_time_s", "images_per_s", "data_wait"}
_at = TINY_TRAIN.index("--report-to")
TRAIN = [*TINY_TRAIN[:_at], *TINY_TRAIN[_at + 2:]]  # the tiny run, tracker chosen per test


def _env(root: Path, **extra: str) -> dict[str, str]:
    """A hermetic environment for a subprocess (module-scoped fixtures cannot use monkeypatch)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NETRC"))}
    for key in ("HF_HOME", "TORCH_HOME", "WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        (root / key.lower()).mkdir(parents=True, exist_ok=True)
        env[key] = str(root / key.lower())
    env.update(HOME=str(root / "home"), HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_EVALUATE_OFFLINE="1",
               PYTHONPATH=str(REPO), **extra)
    (root / "home").mkdir(exist_ok=True)
    return env


def _offline_runs(env: dict[str, str]) -> list[Path]:
    return sorted((Path(env["WANDB_DIR"]) / "wandb").glob("offline-run-*"))


@pytest.fixture(scope="module")
def no_key_run(tmp_path_factory):
    """`train.py --report-to all` with no W&B key and WANDB_MODE unset: 2 epochs on 40 real photos."""
    root = tmp_path_factory.mktemp("no_key_run")
    env = _env(root)  # no WANDB_MODE, no WANDB_API_KEY, a HOME without .netrc
    data = make_dataset(root / "flowers")
    proc = subprocess.run(
        [sys.executable, "train.py", "--data", str(data), "--output-dir", str(root / "out"), *TRAIN,
         "--epochs", "2", "--report-to", "all", "--run-name", "first", "--tags", "baseline,tiny",
         "--group", "stages"],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wandb_dir,) = _offline_runs(env)
    return {"proc": proc, "run_dir": root / "out" / "first", "wandb_dir": wandb_dir, "run": read_run(wandb_dir)}


@pytest.mark.slow
def test_no_api_key_runs_offline_and_prints_one_sync_line(no_key_run):
    output = no_key_run["proc"].stdout + no_key_run["proc"].stderr
    lines = [line for line in output.splitlines() if "wandb sync" in line]
    assert lines == [f"W&B: no API key configured, so this run is logged offline; upload it later with: "
                     f"wandb sync {no_key_run['wandb_dir']}"]
    assert "\x1b[" not in output and "\r" not in output  # no colour codes or progress bars in a log file
    assert not [line for line in output.splitlines() if line.startswith("wandb:")]  # no W&B banner


@pytest.mark.slow
def test_run_holds_config_dataset_and_environment(no_key_run):
    run = no_key_run["run"]
    assert run.run.project == "flowers" and run.run.display_name == "first"
    assert run.run.run_group == "stages" and list(run.run.tags) == ["baseline", "tiny"]
    config = run.config
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= set(config)
    assert config["run_name"] == "first" and config["epochs"] == 2 and config["report_to"] == "all"
    assert config["dataset"]["class_names"] == ["daisy", "dandelion", "rose", "sunflower", "tulip"]
    assert config["dataset"]["train_size"] + config["dataset"]["val_size"] == 40
    assert config["dataset"]["source"].endswith("flowers")
    env = config["env"]
    assert env["device"] == "cpu" and env["num_processes"] == 1 and env["mixed_precision"] == "no"
    assert {"torch", "torchvision", "accelerate", "datasets", "wandb", "python"} <= set(env["versions"])


@pytest.mark.slow
def test_run_holds_every_epoch_and_matches_summary_csv(no_key_run):
    history = [row for row in no_key_run["run"].history if "train_loss" in row]
    assert [row["epoch"] for row in history] == [1, 2]
    assert [row["_step"] for row in history] == [1, 2]
    for row in history:
        assert EPOCH_METRICS <= set(row)
    with open(no_key_run["run_dir"] / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for logged, written in zip(history, rows):
        for key in EPOCH_METRICS:
            assert float(written[key]) == pytest.approx(logged[key])


@pytest.mark.slow
def test_run_summary_has_best_epoch_confusion_matrix_and_predictions(no_key_run):
    run, wandb_dir = no_key_run["run"], no_key_run["wandb_dir"]
    history = [row for row in run.history if "val_accuracy" in row]
    best = max(history, key=lambda row: (row["val_accuracy"], -row["epoch"]))
    assert run.summary["best_val_accuracy"] == best["val_accuracy"]
    assert run.summary["best_epoch"] == best["epoch"]
    best_meta = json.loads((no_key_run["run_dir"] / "best" / "checkpoint.json").read_text())
    assert best_meta["epoch"] == best["epoch"]
    assert run.exit_code == 0

    matrix = json.loads((wandb_dir / "files" / run.summary["confusion_matrix_table"]["path"]).read_text())
    assert sum(count for *_, count in matrix["data"]) == run.config["dataset"]["val_size"]

    table = json.loads((wandb_dir / "files" / run.summary["val_predictions"]["path"]).read_text())
    assert table["columns"] == ["index", "image", "label", "prediction", "confidence", "correct"]
    assert len(table["data"]) == run.config["dataset"]["val_size"]  # 8 < 32 rows: all of them
    for index, image, label, prediction, confidence, correct in table["data"]:
        assert label in run.config["dataset"]["class_names"] and 0 < confidence <= 1
        assert correct == (label == prediction)
    # the images travel in the table's artifact, staged locally until `wandb sync`
    (stored,) = [a for a in run.artifacts if a.name == f"run-{run.run.run_id}-val_predictions"]
    images = [entry for entry in stored.manifest.contents if entry.path.startswith("media/images/")]
    assert len(images) == len(table["data"])
    assert all(Path(entry.local_path).is_file() for entry in images)


@pytest.mark.slow
def test_best_checkpoint_is_a_model_artifact(no_key_run):
    run = no_key_run["run"]
    (model,) = [a for a in run.artifacts if a.type == "model"]
    assert model.name == f"model-{run.run.run_id}"
    assert {"best", f"epoch-{run.summary['best_epoch']}"} <= set(model.aliases)
    assert json.loads(model.metadata)["epoch"] == run.summary["best_epoch"]
    stored = {entry.path for entry in model.manifest.contents}
    assert stored == {"model.safetensors", "checkpoint.json"}


@pytest.mark.slow
def test_run_folder_remembers_the_wandb_run_id(no_key_run):
    assert tracking.stored_run_id(no_key_run["run_dir"]) == no_key_run["run"].run.run_id


@pytest.mark.slow
def test_tensorboard_holds_the_same_scalars_and_the_confusion_matrix(no_key_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(no_key_run["run_dir"] / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    history = {row["epoch"]: row for row in no_key_run["run"].history if "train_loss" in row}
    for key in EPOCH_METRICS:
        logged = {e.step: e.value for e in events.Scalars(key)}
        assert logged == pytest.approx({epoch: row[key] for epoch, row in history.items()}, rel=1e-6)
    assert "confusion_matrix" in events.Tags()["images"]
    assert events.Scalars("best_val_accuracy")[0].value == pytest.approx(no_key_run["run"].summary["best_val_accuracy"])


@pytest.mark.slow
def test_two_process_launch_creates_exactly_one_run_and_never_writes_the_key(tmp_path):
    secret = "0123456789abcdef0123456789abcdef01234567"
    env = _env(tmp_path, WANDB_MODE="offline", WANDB_API_KEY=secret, ACCELERATE_USE_CPU="true")
    data = make_dataset(tmp_path / "flowers", per_class=5)
    out = tmp_path / "out"
    run_cli(sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "train.py",
            "--data", str(data), "--output-dir", str(out), *TRAIN, "--epochs", "1", "--run-name", "ddp",
            env=env, timeout=900)
    (wandb_dir,) = _offline_runs(env)
    run = read_run(wandb_dir)
    assert run.config["env"]["num_processes"] == 2
    assert [row["epoch"] for row in run.history if "train_loss" in row] == [1]
    assert tracking.stored_run_id(out / "ddp") == run.run.run_id
    written = [p for p in [*tmp_path.rglob("*")] if p.is_file() and not p.is_symlink()]
    assert not [p for p in written if secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_resume_continues_the_same_wandb_run(tmp_path):
    env = _env(tmp_path, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    data = make_dataset(tmp_path / "flowers", per_class=5)
    out = tmp_path / "out"
    train = [sys.executable, "train.py", "--data", str(data), "--output-dir", str(out), *TRAIN, "--epochs", "2",
             "--report-to", "wandb"]
    proc = subprocess.Popen([*train, "--run-name", "cut"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("epoch 1/2  train_loss"):
            proc.send_signal(signal.SIGTERM)  # lands in epoch 2: saves last/ and exits
            break
    proc.stdout.read()
    assert proc.wait(timeout=900) == 128 + signal.SIGTERM
    run_cli(*train, "--resume", env=env, timeout=900)

    first, second = (read_run(d) for d in _offline_runs(env))
    assert first.run.run_id == second.run.run_id == tracking.stored_run_id(out / "cut")
    assert [row["epoch"] for row in first.history if "train_loss" in row] == [1]
    assert [row["epoch"] for row in second.history if "train_loss" in row] == [2]
    with open(out / "cut" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    accuracies = [float(r["val_accuracy"]) for r in rows]  # epoch 1 from the first process, 2 from the second
    best = accuracies.index(max(accuracies))
    assert second.summary["best_epoch"] == best + 1  # the first best epoch, across the resume
    assert second.summary["best_val_accuracy"] == pytest.approx(accuracies[best])


def test_summary_csv_replaces_rows_left_by_an_interrupted_run(tmp_path):
    path = tmp_path / "summary.csv"
    for epoch in (1, 2, 3):
        tracking.write_summary_row(path, {"epoch": epoch, "val_accuracy": epoch / 10})
    tracking.write_summary_row(path, {"epoch": 2, "val_accuracy": 0.5})  # resumed from epoch 1
    with open(path, newline="") as f:
        assert [(r["epoch"], r["val_accuracy"]) for r in csv.DictReader(f)] == [("1", "0.1"), ("2", "0.5")]


def test_tags_and_group_flags(tmp_path):
    cfg = parse(TrainConfig, ["--tags", "a, b,,c", "--group", "two-stage"])
    assert tracking.split_tags(cfg.tags) == ["a", "b", "c"] and cfg.group == "two-stage"
    with pytest.raises(UserError, match="at most 64"):
        parse(TrainConfig, ["--tags", "x" * 65])


def test_sweep_files_set_only_real_flags():
    sweeps = sorted((REPO / "sweeps").glob("*.yaml"))
    assert sweeps
    for path in sweeps:
        sweep = yaml.safe_load(path.read_text())
        assert sweep["program"] == "train.py" and sweep["metric"]["name"] == "best_val_accuracy"
        assert {"lr", "epochs"} <= set(sweep["parameters"])
        for name, spec in sweep["parameters"].items():
            for value in spec.get("values", [spec.get("value")]):
                parse(TrainConfig, [f"--{name.replace('_', '-')}={value}"])  # what `wandb agent` passes


@pytest.mark.slow
def test_the_end_of_training_logs_best_checkpoint_calibration_to_both_trackers(no_key_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    meta = json.loads((no_key_run["run_dir"] / "best" / "checkpoint.json").read_text())
    logged = {k: v for row in no_key_run["run"].history for k, v in row.items() if k.startswith("best/")}
    assert logged["best/temperature"] == pytest.approx(meta["temperature"])
    assert logged["best/ece_low"] <= logged["best/ece_high"] and 0 <= logged["best/ece"] <= 1
    assert logged["best/ece_scaled_heldout"] == pytest.approx(meta["calibration"]["ece_after_heldout"])
    assert logged["best/reliability"]["_type"] == "image-file"
    events = EventAccumulator(str(no_key_run["run_dir"] / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    assert "best/reliability" in events.Tags()["images"]
    assert events.Scalars("best/temperature")[0].value == pytest.approx(meta["temperature"])
