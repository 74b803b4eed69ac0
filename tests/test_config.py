import pytest

from flowers.config import EvalConfig, TrainConfig, parse
from flowers.errors import UserError


def test_defaults_keep_the_reports_setup_and_recipe_report_its_recipe():
    cfg = parse(TrainConfig, [])
    assert (cfg.epochs, cfg.batch_size, cfg.val_split, cfg.image_size) == (25, 32, 0.2, 224)
    report = parse(TrainConfig, ["--recipe", "report"])
    assert (report.lr, report.optimizer, report.scheduler) == (1e-3, "adam", "step")


def test_yaml_config_and_flags_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nepochs: 3\nimage-size: 64\n")
    cfg = parse(TrainConfig, ["--config", str(path), "--epochs", "5"])
    assert (cfg.lr, cfg.epochs, cfg.image_size) == (0.01, 5, 64)


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr"),
    (["--epochs", "0"], "--epochs"),
    (["--image-size", "16"], "--image-size"),
    (["--resize-from", "16"], "--resize-from must be 0 \\(off\\) or at least 32, got 16"),
    (["--val-split", "1.5"], "--val-split"),
    (["--optimizer", "lion"], "invalid choice"),
    (["--epochs", "two"], "argument --epochs: must be a whole number at least 1, got 'two'"),
])
def test_bad_values_are_one_line_errors(argv, message):
    with pytest.raises(UserError, match=message) as info:
        parse(TrainConfig, argv)
    assert "\n" not in str(info.value)


def test_unknown_yaml_key_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(UserError, match="unknown option.*learning_rate"):
        parse(TrainConfig, ["--config", str(path)])


def test_eval_defaults():
    cfg = parse(EvalConfig, [])
    assert cfg.ckpt == "best" and cfg.output_dir == "outputs"
