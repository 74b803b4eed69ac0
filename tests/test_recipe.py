"""Recipe options: each changes what it should (in-process, no training runs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from flowers.config import TrainConfig, parse
from flowers.errors import UserError
from flowers.model import build_model, match_head_keys
from flowers.optim import build_optimizer, build_scheduler
from flowers.recipe import EarlyStopping, make_batch_transform, make_loss, parameter_groups


def _cfg(**values) -> TrainConfig:
    return TrainConfig(**values)


def test_label_smoothing_changes_the_loss_by_the_expected_amount():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    plain = make_loss(_cfg(label_smoothing=0.0))(logits, labels).mean()  # per-example losses
    smoothed = make_loss(_cfg(label_smoothing=0.1))(logits, labels).mean()
    uniform = (-F.log_softmax(logits, 1)).mean(1).mean()  # cross-entropy against the uniform target
    assert torch.isclose(plain, F.cross_entropy(logits, labels))
    assert torch.isclose(smoothed, 0.9 * plain + 0.1 * uniform, atol=1e-6)
    assert not torch.isclose(smoothed, plain)


def test_recipe_report_is_the_reports_recipe_and_explicit_options_win(tmp_path):
    report = parse(TrainConfig, ["--recipe", "report"])
    assert (report.optimizer, report.lr, report.scheduler, report.step_size, report.gamma, report.batch_size) == \
        ("adam", 1e-3, "step", 7, 0.1, 32)
    assert report.weight_decay == report.label_smoothing == report.warmup_epochs == report.mixup == 0
    assert parse(TrainConfig, ["--recipe", "report", "--lr", "0.01"]).lr == 0.01
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"recipe": "report", "label_smoothing": 0.2}))
    from_yaml = parse(TrainConfig, ["--config", str(config)])
    assert (from_yaml.optimizer, from_yaml.label_smoothing) == ("adam", 0.2)
    default = parse(TrainConfig, [])
    assert (default.optimizer, default.scheduler, default.label_smoothing) == ("adamw", "cosine", 0.1)


@pytest.mark.parametrize("argv, message", [
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1.0"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1), got -0.1"),
    (["--ema-decay", "1"], "--ema-decay must be in [0, 1), got 1.0"),
    (["--resume", "--init-from", "best"], "give only one of them"),
    (["--scheduler", "onecycle", "--warmup-epochs", "30"], "--warmup-epochs must be shorter than --epochs"),
])
def test_bad_recipe_options_are_one_line_errors(argv, message):
    with pytest.raises(UserError) as error:
        parse(TrainConfig, argv)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_freeze_backbone_flag_alone_means_the_whole_run():
    assert parse(TrainConfig, ["--freeze-backbone"]).freeze_backbone == -1
    assert parse(TrainConfig, ["--freeze-backbone", "3"]).freeze_backbone == 3


def _lrs(cfg: TrainConfig, steps_per_epoch: int = 10) -> list[list[float]]:
    model = build_model(5, "none")
    optimizer = build_optimizer(cfg, parameter_groups(cfg, model))
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch)
    lrs = []  # [backbone, head] learning rates per step
    for _ in range(cfg.epochs * steps_per_epoch):
        by_name = {g["name"]: g["lr"] for g in optimizer.param_groups}
        lrs.append([by_name[name] for name in ("backbone", "head") if name in by_name])
        optimizer.step()
        scheduler.step()
    return lrs


def test_cosine_schedule_warms_up_linearly_then_decays_to_zero():
    lrs = [head for _, head in _lrs(_cfg(epochs=5, lr=0.1, warmup_epochs=1, scheduler="cosine"))]
    assert lrs[:10] == pytest.approx([0.01 * (i + 1) for i in range(10)])
    assert lrs[10] == pytest.approx(0.1)
    assert lrs[30] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert lrs[-1] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_step_and_onecycle_schedules():
    step = [head for _, head in _lrs(_cfg(epochs=4, lr=1.0, scheduler="step", step_size=2, gamma=0.1,
                                          warmup_epochs=0))]
    assert step[0] == step[19] == 1.0 and step[20] == pytest.approx(0.1)
    onecycle = [head for _, head in _lrs(_cfg(epochs=10, lr=1.0, scheduler="onecycle", warmup_epochs=0))]
    assert onecycle[0] == pytest.approx(1 / 25)
    assert max(onecycle) == pytest.approx(1.0) and onecycle.index(max(onecycle)) == 30  # 30% of 100 steps
    assert onecycle[-1] < 1e-3


def test_freeze_backbone_for_n_epochs_zeroes_only_the_backbone_learning_rate():
    lrs = _lrs(_cfg(epochs=3, lr=0.1, warmup_epochs=0, scheduler="none", freeze_backbone=1))
    assert all(backbone == 0.0 and head == 0.1 for backbone, head in lrs[:10])
    assert all(backbone == head == 0.1 for backbone, head in lrs[10:])


def test_freeze_backbone_for_the_whole_run_trains_only_the_head():
    model = build_model(5, "none")
    groups = parameter_groups(_cfg(freeze_backbone=-1), model)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    assert {g["name"] for g in groups} == {"head"} and sum(len(g["params"]) for g in groups) == 2


@pytest.mark.parametrize("name, kind", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW),
                                        ("sgd", torch.optim.SGD)])
def test_optimizer_choice_and_weight_decay(name, kind):
    cfg = _cfg(optimizer=name, weight_decay=0.01)
    optimizer = build_optimizer(cfg, parameter_groups(cfg, build_model(5, "none")))
    assert type(optimizer) is kind
    assert sorted({g["weight_decay"] for g in optimizer.param_groups}) == [0.0, 0.01]  # none on biases and norms


def test_early_stopping_stops_at_the_right_epoch_on_a_scripted_sequence():
    accuracies = [0.50, 0.60, 0.60, 0.55, 0.70, 0.65, 0.69, 0.70]
    stopper = EarlyStopping(patience=3)
    stopped_at = next(epoch for epoch, acc in enumerate(accuracies, 1) if stopper.step(acc))
    assert stopped_at == 8  # best 0.70 at epoch 5; epochs 6, 7, 8 are no better (a tie is not better)
    resumed = EarlyStopping(patience=3)
    first = EarlyStopping(patience=3)
    for acc in accuracies[:6]:
        first.step(acc)
    resumed.load_state_dict(first.state_dict())
    assert [resumed.step(a) for a in accuracies[6:]] == [False, True]
    assert not any(EarlyStopping(patience=0).step(a) for a in [0.5] * 10)  # 0: off


@pytest.mark.parametrize("options", [{"mixup": 0.4}, {"cutmix": 1.0}, {"mixup": 0.4, "cutmix": 1.0}])
def test_mixup_and_cutmix_mix_images_and_soften_the_targets(options):
    torch.manual_seed(1)
    images, labels = torch.rand(8, 3, 16, 16), torch.arange(8) % 5
    mix = make_batch_transform(_cfg(**options), num_classes=5)
    mixed, targets = mix(images, labels)
    assert targets.shape == (8, 5) and torch.allclose(targets.sum(1), torch.ones(8))
    assert (targets.max(1).values < 1).all()  # every target is a blend of two labels
    assert not torch.equal(mixed, images)
    assert make_loss(_cfg())(torch.randn(8, 5), targets).isfinite().all()
    assert make_batch_transform(_cfg(), num_classes=5) is None


def test_dropout_sits_before_the_head_and_a_saved_head_fits_either_way():
    plain, dropped = build_model(5, "none"), build_model(5, "none", dropout=0.5)
    assert isinstance(dropped.fc[0], torch.nn.Dropout) and dropped.fc[0].p == 0.5
    x = torch.rand(2, 3, 32, 32)
    dropped.train()
    assert not torch.equal(dropped(x), dropped(x))  # dropout is active in training
    dropped.eval()
    assert torch.equal(dropped(x), dropped(x))
    dropped.load_state_dict(match_head_keys(plain.state_dict(), dropped))
    plain.load_state_dict(match_head_keys(dropped.state_dict(), plain))
    assert torch.equal(plain.fc.weight, dropped.fc[1].weight)
