"""A run name is free again when its folder holds nothing to resume (no last/) and no process trains there; --resume
names every option of its command line that it ignores, whatever its value."""

from __future__ import annotations

import fcntl
import os

import pytest
from accelerate import Accelerator

from flowers import checkpoint
from flowers.config import TrainConfig, parse, to_dict
from flowers.errors import UserError
from flowers.resume import resumed_config
from flowers.training import _create_run_dir
from flowers.transforms import AUGMENTATION_DRAWS


def test_a_run_that_stopped_before_its_first_save_does_not_block_its_name(tmp_path, capsys):
    """Its folder held only config.yaml; the same --run-name was refused with advice to --resume,
    which then failed (no last/ checkpoint)."""
    stale = tmp_path / "out" / "r"
    stale.mkdir(parents=True)
    (stale / "config.yaml").write_text("epochs: 3\n")
    cfg = parse(TrainConfig, ["--output-dir", str(tmp_path / "out"), "--run-name", "r"])
    assert _create_run_dir(Accelerator(cpu=True), cfg) == stale
    assert list(stale.iterdir()) == []
    assert "held nothing to resume" in capsys.readouterr().out
    # killed while saving its first epoch: history.jsonl, best/ and ema/ written, last/ not yet
    killed = tmp_path / "out" / "k"
    killed.mkdir()
    (killed / "config.yaml").write_text("epochs: 3\n")
    (killed / "history.jsonl").write_text('{"epoch": 1}\n')
    checkpoint.save_checkpoint(killed / "best", {}, {"epoch": 1})
    cfg = parse(TrainConfig, ["--output-dir", str(tmp_path / "out"), "--run-name", "k"])
    assert _create_run_dir(Accelerator(cpu=True), cfg) == killed
    assert list(killed.iterdir()) == []


def test_a_run_name_stays_blocked_by_a_checkpoint_or_a_live_run(tmp_path):
    cfg = parse(TrainConfig, ["--output-dir", str(tmp_path / "out"), "--run-name", "r"])
    saved = tmp_path / "out" / "r"
    checkpoint.save_checkpoint(saved / "last", {}, {"epoch": 1})
    with pytest.raises(UserError, match="already exists; continue that run with --resume"):
        _create_run_dir(Accelerator(cpu=True), cfg)
    live = tmp_path / "out" / "live"
    live.mkdir()
    (live / "config.yaml").write_text("epochs: 3\n")
    fd = os.open(live, os.O_RDONLY)  # another process training there, before its first save
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(UserError, match="already exists"):
            _create_run_dir(Accelerator(cpu=True), parse(TrainConfig, ["--output-dir", str(tmp_path / "out"),
                                                                        "--run-name", "live"]))
        assert (live / "config.yaml").exists()
    finally:
        os.close(fd)


def _finished_run(tmp_path, **config):
    run_dir = tmp_path / "out" / "r"
    checkpoint.save_checkpoint(run_dir / "last", {}, {"config": to_dict(TrainConfig(**config)),
                                                      "data": {"augmentation_draws": AUGMENTATION_DRAWS}})
    return run_dir


@pytest.mark.parametrize("flags, named", [
    (["--epochs", "25"], "--epochs"),   # the default value: was dropped without a note
    (["--epochs", "30"], "--epochs"),
    (["--lr", "0.002"], "--lr"),        # the default again
])
def test_resume_names_every_option_it_ignores_whatever_its_value(flags, named, tmp_path, capsys):
    run_dir = _finished_run(tmp_path, epochs=2, lr=0.01)
    cfg = resumed_config(parse(TrainConfig, ["--resume", str(run_dir), *flags]), run_dir)
    assert cfg.epochs == 2 and cfg.lr == 0.01
    out = capsys.readouterr().out
    assert f"ignoring {named}" in out


def test_resume_says_nothing_of_options_that_match_the_run_or_that_it_takes(tmp_path, capsys):
    run_dir = _finished_run(tmp_path, epochs=2)
    resumed_config(parse(TrainConfig, ["--resume", str(run_dir), "--epochs", "2", "--report-to", "none"]), run_dir)
    assert "ignoring" not in capsys.readouterr().out


def test_resume_of_a_run_that_saved_nothing_says_to_start_it_again(tmp_path):
    from flowers.resume import find_run

    stale = tmp_path / "out" / "r"
    stale.mkdir(parents=True)
    (stale / "config.yaml").write_text("epochs: 3\n")
    with pytest.raises(UserError, match="stopped before its first save: start it again with --run-name r"):
        find_run(str(stale), str(tmp_path / "out"))
