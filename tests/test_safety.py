"""Untrusted files and secrets: loading never runs code, secrets never reach an output file,
a checkpoint's JSON never decides where we write, every CLI value is checked in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN, make_dataset, run_cli
from flowers import checkpoint, loading
from flowers.config import EvalConfig, TrainConfig, parse
from flowers.errors import UserError
from flowers.loading import load_state_dict_file
from flowers.model import build_model


class FileCreatingPayload:
    """Unpickling this calls open(path, "w"): proof that the loader ran code from the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.pth"
    torch.save({"fc.weight": FileCreatingPayload(marker)}, evil)
    torch.load(evil, weights_only=False)  # the payload is live: a trusting loader creates the file
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UserError, match="refused: this pickle holds more than tensors") as error:
        load_state_dict_file(str(evil))
    assert "\n" not in str(error.value)
    assert not marker.exists()

    folder = tmp_path / "ckpt"  # the same payload dressed up as a checkpoint folder
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(evil.read_bytes())
    (folder / "checkpoint.json").write_text(json.dumps({"num_classes": 2, "config": {}}))
    with pytest.raises(UserError, match="not a valid safetensors file"):
        loading.load_model(folder)
    assert not marker.exists()


FAKE_KEY = "fake0wandb0key0" + "7" * 25  # 40 characters, like a real W&B key
FAKE_HF_TOKEN = "hf_fakeTokenThatMustNeverBeWritten0123"


@pytest.mark.slow
def test_secrets_never_reach_configs_logs_checkpoints_or_wandb_files(tmp_path):
    data = make_dataset(tmp_path / "flowers", per_class=4, classes=["a", "b"])
    out, wandb_dir = tmp_path / "out", tmp_path / "wandb"
    env = {"WANDB_API_KEY": FAKE_KEY, "HF_TOKEN": FAKE_HF_TOKEN, "WANDB_MODE": "offline",
           "WANDB_DIR": str(wandb_dir)}
    train = run_cli("python", "train.py", "--data", str(data), "--epochs", "1", "--output-dir", str(out), *TINY_TRAIN,
                    "--report-to", "wandb", env=env)
    evaluation = run_cli("python", "eval.py", "--ckpt", "last", "--output-dir", str(out), "--workers", "0", env=env)
    offline_runs = list(wandb_dir.rglob("offline-run-*"))
    assert offline_runs, "the W&B run was not recorded"
    written = [p for folder in (out, wandb_dir) for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "checkpoint.json" for p in written) and any(p.suffix == ".wandb" for p in written)
    for secret in (FAKE_KEY, FAKE_HF_TOKEN):
        for proc in (train, evaluation):
            assert secret not in proc.stdout + proc.stderr
        leaks = [str(p) for p in written if secret.encode() in p.read_bytes()]
        assert not leaks, f"secret written to {leaks}"


@pytest.mark.slow
def test_paths_in_a_checkpoint_json_never_decide_where_eval_writes(tmp_path):
    data = make_dataset(tmp_path / "flowers", per_class=3, classes=["a", "b"])
    escape = tmp_path / "escape"
    meta = {
        "num_classes": 2, "class_names": ["a", "b"], "image_size": 32, "eval_resize": 37,
        "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3},
        "data": {"source": str(data), "split_seed": 0, "val_split": 0.5},
        "run_name": "../../escape", "epoch": 1,
        "config": {"output_dir": str(escape), "run_name": "../escape", "batch_size": 4, "channels_last": False},
    }
    ckpt = checkpoint.save_checkpoint(tmp_path / "runs" / "r" / "best", build_model(2, "none").state_dict(), meta)
    before = {p for p in tmp_path.rglob("*")}
    run_cli("python", "eval.py", "--ckpt", str(ckpt), "--workers", "0")
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p.is_relative_to(tmp_path / "runs" / "r") for p in created), created
    assert not escape.exists()


@pytest.mark.parametrize("flags, message", [
    (["--lr", "-0.1"], "--lr must be in (0, 10]"),
    (["--lr", "nan"], "--lr must be in (0, 10], got nan"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--image-size", "16"], "--image-size must be in [32, 4096]"),
    (["--val-split", "1"], "--val-split must be in (0, 1)"),
    (["--val-split", "0"], "--val-split must be in (0, 1)"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--weights", "imagenet1k"], "--weights imagenet1k: not imagenet or none, and no such file"),
    (["--optimizer", "sgd", "--momentum", "0"], "--momentum must be in (0, 1)"),
    (["--seed", "-1"], "--seed must be in"),
    (["--run-name", "../elsewhere"], "--run-name must be a plain folder name"),
    (["--gamma", "nan"], "--gamma must be in (0, 1]"),
    (["--weight-decay", "-1"], "--weight-decay must be in [0, 1]"),
    (["--on-nan", "ignore"], "invalid choice"),
    (["--lr", "fast"], "argument --lr: must be a number in (0, 10], got 'fast'"),
    (["--output-dir", "{a_file}"], "exists and is not a folder"),
])
def test_every_bad_train_flag_is_one_line(flags, message, tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    with pytest.raises(UserError) as error:
        parse(TrainConfig, [f.format(a_file=a_file) for f in flags])
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("yaml_text, message", [
    ("epochs: 2.5\n", "epochs must be a whole number"),
    ("channels_last: 'no'\n", "channels_last must be true or false"),
    ("strict: 1\n", "strict must be true or false"),
])
def test_bad_config_file_values_are_one_line(yaml_text, message, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml_text)
    with pytest.raises(UserError, match=message):
        parse(TrainConfig, ["--config", str(config)])


def test_bad_eval_flags_are_one_line(tmp_path):
    with pytest.raises(UserError, match="--batch-size must be at least 1"):
        parse(EvalConfig, ["--batch-size", "0"])
    with pytest.raises(UserError, match="--ckpt must be"):
        parse(EvalConfig, ["--ckpt", ""])


def test_too_few_images_for_the_split_is_one_line(tmp_path):
    from flowers.data import load_splits
    data = make_dataset(tmp_path / "d", per_class=2, classes=["a", "b"])
    with pytest.raises(UserError, match="cannot hold out --val-split 0.1 of the 4 images"):
        load_splits(str(data), 0.1, seed=0)
    assert os.listdir(data)  # nothing removed


def test_resumable_state_with_a_malicious_pickle_is_refused_before_accelerate_loads_it(tmp_path):
    """Accelerate unpickles custom_checkpoint_*.pkl with weights_only=False; we check them first."""
    marker = tmp_path / "pwned"
    state = tmp_path / "last" / "training_state"
    state.mkdir(parents=True)
    torch.save({"last_epoch": 3, "base_lrs": [0.001]}, state / "custom_checkpoint_0.pkl")
    checkpoint.check_pickles_hold_only_data(state)  # plain data passes
    torch.save({"last_epoch": FileCreatingPayload(marker)}, state / "custom_checkpoint_1.pkl")
    with pytest.raises(UserError, match="custom_checkpoint_1.pkl: refused: this pickle holds more than data"):
        checkpoint.check_pickles_hold_only_data(state)
    assert not marker.exists()
