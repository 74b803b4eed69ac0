"""Every train.py option observed through the `Run` that fit() trains with (training.open_run):
the optimizer and schedule it built, the loss of a known batch, the batches its loaders give,
the model, the EMA, early stopping and the saves its steps make. Each test fails when the option's
wiring is broken (fit() or Run.create passing the default instead); tests/wiring_mutations.py
breaks each one and runs these tests."""

from __future__ import annotations

import json

import numpy as np
import pytest
from accelerate.state import AcceleratorState, GradientState
import torch
from PIL import Image
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from conftest import open_tiny_run, CLASSES, make_dataset
from flowers import tracking, training
from flowers.data import image_paths
from flowers.device_data import DeviceLoader
from flowers.errors import UserError
from flowers.config import TrainConfig, parse
from flowers.resume import epoch_loader, read_history
from flowers.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_size


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """40 photos, 8 a class."""
    return make_dataset(tmp_path_factory.mktemp("wiring") / "flowers")


@pytest.fixture
def open_run(photos, tmp_path):
    """training.open_run for a command line (with small, fast defaults before it)."""
    return lambda *args, data=None: open_tiny_run(data or photos, tmp_path / "out", *args)


def _lr_factors(run: training.Run, group: int = -1) -> list[float]:
    """The schedule's factor of the peak lr at every optimizer step of the run."""
    steps = run.cfg.epochs * _steps_per_epoch(run)
    return [run.scheduler.lr_lambdas[group](step) for step in range(steps)]


def _steps_per_epoch(run: training.Run) -> int:
    return -(-len(run.train_loader) // run.accelerator.gradient_accumulation_steps)


def _named_groups(run):
    return {(g["name"], g["weight_decay"] > 0): g for g in run.optimizer.param_groups}


# ---- where: data, output folder, run name, split ----------------------------------------------------

def test_data_output_dir_and_run_name_place_the_run(open_run, photos, tmp_path):
    run = open_run("--run-name", "named")
    assert run.splits.source == str(photos)
    assert run.run_dir == tmp_path / "out" / "named"
    assert (run.run_dir / "config.yaml").is_file()


def test_val_split_and_seed_choose_the_held_out_photos(open_run):
    default = open_run()
    quarter = open_run("--val-split", "0.25")
    reseeded = open_run("--seed", "7")
    assert (len(default.splits.val), len(quarter.splits.val)) == (8, 10)
    files = lambda run: sorted(e["path"] for e in run.splits.val.cast_column("image", _undecoded())["image"])
    assert files(default) != files(reseeded)


def _undecoded():
    from datasets import Image
    return Image(decode=False)


def test_neighbouring_seeds_get_unrelated_data_orders(open_run):
    """Accelerate's sampler draws epoch e's order from data_seed + e: seeds 7 and 8 must not hand
    it 7 and 8 (seed 7's epoch 2 would be seed 8's epoch 1)."""
    seeds = [open_run("--seed", seed).accelerator.dataloader_config.data_seed for seed in ("7", "8")]
    assert abs(seeds[0] - seeds[1]) != 1


# ---- the optimizer and the schedule -----------------------------------------------------------------

def test_optimizer_lr_momentum_and_weight_decay_reach_the_optimizer(open_run):
    run = open_run("--optimizer", "sgd", "--lr", "0.05", "--momentum", "0.8", "--weight-decay", "0.01")
    assert isinstance(run.optimizer.optimizer, torch.optim.SGD)
    groups = _named_groups(run)
    assert {g["initial_lr"] for g in run.optimizer.param_groups} == {0.05}
    assert {g["momentum"] for g in run.optimizer.param_groups} == {0.8}
    assert groups[("backbone", True)]["weight_decay"] == 0.01
    assert isinstance(open_run("--optimizer", "adam").optimizer.optimizer, torch.optim.Adam)
    assert isinstance(open_run().optimizer.optimizer, torch.optim.AdamW)


def test_step_schedule_with_warmup_follows_its_options(open_run):
    run = open_run("--scheduler", "step", "--step-size", "2", "--gamma", "0.5", "--warmup-epochs", "1",
                   "--epochs", "4")
    per_epoch = _steps_per_epoch(run)
    factors = _lr_factors(run)
    assert len(factors) == 4 * per_epoch
    assert factors[0] == pytest.approx(1 / per_epoch)  # warming up over the first epoch
    assert factors[per_epoch:2 * per_epoch] == pytest.approx([1.0] * per_epoch)
    assert factors[2 * per_epoch:] == pytest.approx([0.5] * 2 * per_epoch)  # halved after 2 epochs


def test_cosine_onecycle_and_no_schedule_span_the_run(open_run):
    cosine = _lr_factors(open_run("--scheduler", "cosine", "--warmup-epochs", "0", "--epochs", "3"))
    assert cosine[0] == 1.0 and cosine[-1] < 0.05 and cosine == sorted(cosine, reverse=True)
    onecycle = _lr_factors(open_run("--scheduler", "onecycle", "--epochs", "3"))
    assert onecycle[0] == pytest.approx(1 / 25) and max(onecycle) == pytest.approx(1.0) and onecycle[-1] < 0.05
    assert set(_lr_factors(open_run("--scheduler", "none", "--warmup-epochs", "0", "--epochs", "2"))) == {1.0}


def test_recipe_report_is_adam_with_a_step_schedule_and_no_smoothing(open_run):
    run = open_run("--recipe", "report")
    assert isinstance(run.optimizer.optimizer, torch.optim.Adam)
    assert {g["initial_lr"] for g in run.optimizer.param_groups} == {1e-3}
    logits, labels = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0]]), torch.tensor([0])
    assert run.loss_fn(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())


def test_recipe_scratch_is_random_weights_a_growing_size_and_a_milder_augmentation(open_run, halves):
    """--recipe scratch (issue 28's half-compute recipe): from random weights, 21 epochs growing
    from 32 to 128 px, crops of at least 35% of the photo, no rotation/shift/zoom; the default
    optimizer and schedule; options given win."""
    cfg = parse(TrainConfig, ["--recipe", "scratch"])
    assert (cfg.weights, cfg.image_size, cfg.resize_from, cfg.epochs) == ("none", 128, 32, 21)
    assert (cfg.crop_scale, cfg.affine, cfg.colour_jitter) == (0.35, False, True)
    assert (cfg.optimizer, cfg.lr, cfg.scheduler, cfg.label_smoothing, cfg.batch_size) == ("adamw", 2e-3, "cosine", 0.1, 32)
    run = open_run("--recipe", "scratch", "--image-size", "128", "--epochs", "4", "--duplicate-distance", "-1",
                   data=halves)
    assert run.sizes == (32, 80, 128, 128)
    assert _epoch_colours(run)["black"].max() == 0  # no warp, so no black fill
    assert parse(TrainConfig, ["--recipe", "scratch", "--epochs", "25", "--affine"]).epochs == 25


def test_grad_accum_steps_reach_the_accelerator_and_the_schedule(open_run):
    run = open_run("--grad-accum-steps", "2", "--scheduler", "cosine", "--warmup-epochs", "0", "--epochs", "2")
    assert run.accelerator.gradient_accumulation_steps == 2
    assert len(_lr_factors(run)) == 2 * -(-len(run.train_loader) // 2)  # 8 batches: 4 steps an epoch
    assert run.scheduler.lr_lambdas[-1].total_steps == 8


# ---- the loss, the batches, the model -------------------------------------------------------------

def test_label_smoothing_is_in_the_loss(open_run):
    run = open_run("--label-smoothing", "0.2")
    logits, labels = torch.tensor([[2.0, 0.0, 1.0, 0.0, 0.0]]), torch.tensor([2])
    expected = F.cross_entropy(logits, labels, label_smoothing=0.2)
    assert run.loss_fn(logits, labels).item() == pytest.approx(expected.item())


def test_batch_size_image_size_and_workers_shape_the_batches(open_run):
    run = open_run("--batch-size", "8", "--image-size", "48", "--workers", "1")
    batch = next(iter(run.train_loader))
    assert batch["pixel_values"].shape == (8, 3, 48, 48)
    assert run.train_loader.num_workers == 1


@pytest.mark.parametrize("pipeline", ["workers", "device"])
def test_resize_from_grows_the_training_crops_and_keeps_validation_at_image_size(open_run, pipeline):
    """--resize-from 32 --image-size 64 over 5 epochs: the ramp 32, 48, 48, 64, 64 (16 px steps, at
    the full size by three quarters of the run), on both pipelines; validation at 64 throughout."""
    run = open_run("--resize-from", "32", "--image-size", "64", "--epochs", "5", "--pipeline", pipeline,
                   "--workers", "0")
    shapes = [next(iter(epoch_loader(run.train_loader, epoch, 0)))["pixel_values"].shape[-1] for epoch in range(5)]
    assert shapes == [32, 48, 48, 64, 64]
    assert next(iter(run.val_loader))["pixel_values"].shape[-1] == 64
    assert run.sizes == (32, 48, 48, 64, 64)  # the history's image_size column (time_to_accuracy.py's compute)
    # without it: the one size
    plain = open_run("--image-size", "64", "--epochs", "5", "--pipeline", pipeline, "--workers", "0")
    assert {next(iter(epoch_loader(plain.train_loader, e, 0)))["pixel_values"].shape[-1] for e in (0, 4)} == {64}


def test_resize_from_is_in_the_history_with_the_images_seen(photos, tmp_path):
    """A real fit(): each history row names the size it trained at, which time_to_accuracy.py
    weighs the images by."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = parse(TrainConfig, ["--data", str(photos), "--output-dir", str(tmp_path), "--run-name", "r",
                              "--weights", "none", "--image-size", "48", "--resize-from", "32", "--batch-size", "8",
                              "--epochs", "2", "--report-to", "none", "--workers", "0"])
    rows = read_history(training.fit(cfg))
    assert [(row["image_size"], row["train_samples"]) for row in rows] == [(32, 32), (48, 32)]


@pytest.fixture(scope="module")
def halves(tmp_path_factory):
    """20 square photos, the left half red and the right half blue, in two folders (identical: split
    with --duplicate-distance -1)."""
    root = tmp_path_factory.mktemp("halves") / "flowers"
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :32], pixels[:, 32:] = (255, 0, 0), (0, 0, 255)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def _epoch_colours(run) -> dict[str, np.ndarray]:
    """Per training image of the first epoch, the share of its pixels that are red, blue, black
    (the affine warp's fill) and neither (a blend, or a colour the jitter made)."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    shares = []
    for batch in epoch_loader(run.train_loader, 0, 0):
        rgb = (batch["pixel_values"].float() * std + mean) * 255
        r, g, b = rgb[:, 0], rgb[:, 1], rgb[:, 2]
        red = (r > 235) & (g < 20) & (b < 20)
        blue = (b > 235) & (r < 20) & (g < 20)
        black = (r < 20) & (g < 20) & (b < 20)
        shares += [torch.stack([m.float().mean((1, 2)) for m in (red, blue, black)], 1)]
    red, blue, black = torch.cat(shares).numpy().T
    return {"red": red, "blue": blue, "black": black, "other": 1 - red - blue - black}


@pytest.mark.parametrize("pipeline", ["workers", "device"])
def test_crop_scale_affine_and_colour_jitter_set_the_augmentation(open_run, halves, pipeline):
    """Photos half red, half blue: with the mildest settings every training image is the whole
    photo (half red, half blue, nothing else but the seam); each option on its own brings back its
    effect: small crops (mostly one colour), the warp's black fill, colours the photo lacks."""
    mild = ("--crop-scale", "1", "--no-affine", "--no-colour-jitter")
    options = {"crop": ("--crop-scale", "0.08", "--no-affine", "--no-colour-jitter"),
               "affine": ("--crop-scale", "1", "--affine", "--no-colour-jitter"),
               "jitter": ("--crop-scale", "1", "--no-affine", "--colour-jitter")}
    colours = {name: _epoch_colours(open_run(*args, "--pipeline", pipeline, "--duplicate-distance", "-1", data=halves))
               for name, args in {"mild": mild, **options}.items()}
    plain = colours["mild"]
    assert np.all(np.abs(plain["red"] - 0.5) < 0.1) and np.all(np.abs(plain["blue"] - 0.5) < 0.1)
    assert plain["black"].max() == 0 and plain["other"].max() < 0.1
    assert np.abs(colours["crop"]["red"] - 0.5).max() > 0.3  # some crops mostly one colour
    assert colours["affine"]["black"].max() > 0.02 and colours["affine"]["other"].max() < 0.25
    assert colours["jitter"]["other"].max() > 0.5 and colours["jitter"]["black"].max() == 0


def test_pipeline_device_and_cache_resized_change_where_pixels_come_from(open_run):
    assert isinstance(open_run("--pipeline", "device").train_loader, DeviceLoader)
    assert not isinstance(open_run("--pipeline", "workers").train_loader, DeviceLoader)
    first_photo = lambda run: min(run.splits.train[0]["image"].size)  # the photos are about 320x240
    assert first_photo(open_run("--cache-resized", "--image-size", "32")) == eval_size(32)
    assert first_photo(open_run("--no-cache-resized", "--image-size", "32")) > eval_size(32)


def test_arch_dropout_and_channels_last_build_the_model(open_run):
    run = open_run("--arch", "mobilenet_v3_small", "--dropout", "0.3")
    model = run.plain_model()
    assert type(model).__name__ == "MobileNetV3"
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules())
    conv = lambda run: next(m for m in run.plain_model().modules() if isinstance(m, nn.Conv2d)).weight
    assert conv(open_run()).is_contiguous(memory_format=torch.channels_last)
    assert not conv(open_run("--no-channels-last")).is_contiguous(memory_format=torch.channels_last)


def test_weights_and_init_from_load_their_weights(open_run, tmp_path):
    source = open_run("--seed", "3")
    state = {k: v + 1 if v.is_floating_point() else v for k, v in source.plain_model().state_dict().items()}
    torch.save(state, tmp_path / "w.pt")
    run = open_run("--weights", str(tmp_path / "w.pt"))
    key = "layer1.0.conv1.weight"
    assert torch.equal(run.plain_model().state_dict()[key].contiguous(), state[key].contiguous())
    from flowers import checkpoint
    checkpoint.save_checkpoint(tmp_path / "ck", state, {**source.checkpoint_meta({}), "arch": "resnet18"})
    started = open_run("--init-from", str(tmp_path / "ck"))
    assert torch.equal(started.plain_model().state_dict()[key].contiguous(), state[key].contiguous())
    assert started.init_info["path"] == str((tmp_path / "ck").resolve())


def test_freeze_backbone_for_some_epochs_or_the_whole_run(open_run):
    some = open_run("--freeze-backbone", "1", "--epochs", "2", "--warmup-epochs", "0", "--scheduler", "none")
    per_epoch = _steps_per_epoch(some)
    backbone = [i for i, g in enumerate(some.optimizer.param_groups) if g["name"] == "backbone"][0]
    assert _lr_factors(some, backbone) == [0.0] * per_epoch + [1.0] * per_epoch
    whole = open_run("--freeze-backbone")
    assert {g["name"] for g in whole.optimizer.param_groups} == {"head"}
    assert not whole.plain_model().conv1.weight.requires_grad


# ---- MixUp/CutMix, the EMA, early stopping, NaN policy --------------------------------------------------

def _mixes(run, draws: int = 30) -> set[str]:
    """What run.mix does to two constant images over many draws: "mixup" (every pixel a blend),
    "cutmix" (a box of the other image's pixels pasted in)."""
    images = torch.stack([torch.zeros(3, 16, 16), torch.ones(3, 16, 16)])
    seen = set()
    for seed in range(draws):
        torch.manual_seed(seed)
        mixed, _ = run.mix(images, torch.tensor([0, 1]))
        values = set(mixed[0].unique().tolist())
        seen.add("cutmix" if values <= {0.0, 1.0} else "mixup")
    return seen


def test_mixup_and_cutmix_mix_the_batches_with_their_alphas(open_run):
    assert open_run().mix is None
    mixup = open_run("--mixup", "0.4").mix
    assert isinstance(mixup, v2.MixUp) and mixup._dist.concentration1.item() == pytest.approx(0.4)
    cutmix = open_run("--cutmix", "0.7").mix
    assert isinstance(cutmix, v2.CutMix) and cutmix._dist.concentration1.item() == pytest.approx(0.7)
    assert _mixes(open_run("--mixup", "1", "--cutmix", "1")) == {"mixup", "cutmix"}


def test_ema_decay_and_the_ema_follows_optimizer_steps_only(open_run):
    run = open_run("--ema-decay", "0.7")
    assert run.ema.decay_at(10**6) == 0.7
    run.last_batch = 100
    run.after_step(0, stepped=False)  # an accumulation step, or a skipped update
    assert run.ema.updates == 0
    run.after_step(1, stepped=True)
    assert run.ema.updates == 1 and run.progress.global_step == 1
    assert open_run().ema is None


def test_early_stopping_patience_stops_the_run(open_run):
    run = open_run("--early-stopping-patience", "2")
    assert [run.stopper.step(a) for a in (0.5, 0.4, 0.4)] == [False, False, True]
    never = open_run()
    assert not any(never.stopper.step(0.1) for _ in range(30))


def test_on_nan_reaches_the_guard(open_run):
    assert open_run("--on-nan", "skip").guard.policy == "skip"
    assert open_run().guard.policy == "stop"


# ---- saving, resuming, tracking, strictness, --config ---------------------------------------------------

def test_save_every_steps_saves_last_mid_epoch(open_run):
    run = open_run("--save-every-steps", "2")
    run.last_batch = 100
    run.after_step(0, stepped=True)
    assert not (run.run_dir / "last").exists()
    run.after_step(1, stepped=True)
    assert json.loads((run.run_dir / "last" / "checkpoint.json").read_text())["global_step"] == 2


def test_resume_continues_the_saved_run(open_run, tmp_path):
    first = open_run("--run-name", "r", "--epochs", "3", "--save-every-steps", "1")
    first.last_batch = 100
    first.after_step(0, stepped=True)
    again = open_run("--resume", str(tmp_path / "out" / "r"))
    assert again.run_dir == tmp_path / "out" / "r" and again.cfg.epochs == 3
    assert again.resume() and again.progress.global_step == 1 and again.progress.batches_done == 1


def test_report_to_project_tags_and_group_reach_the_trackers(open_run, monkeypatch):
    started = []
    monkeypatch.setattr(tracking, "start", lambda accelerator, info: started.append(info))
    run = open_run("--wandb-project", "p", "--tags", "a,b", "--group", "g", "--run-name", "t")
    run.start_tracking()
    kwargs = tracking.wandb_init_kwargs(started[0])
    assert (started[0].project, kwargs["tags"], kwargs["group"], kwargs["name"]) == ("p", ["a", "b"], "g", "t")
    assert started[0].report_to == "none"
    assert open_run("--report-to", "tensorboard").accelerator.log_with  # a tracker is set up


def test_compile_asks_accelerate_for_torch_compile(open_run):
    assert open_run("--compile").accelerator.state.dynamo_plugin.backend.value != "NO"
    assert open_run().accelerator.state.dynamo_plugin.backend.value == "NO"


def test_strict_refuses_a_folder_with_a_broken_photo(open_run, tmp_path):
    data = make_dataset(tmp_path / "dirty")
    (data / "rose" / "broken.jpg").write_bytes(b"not a jpeg")
    assert len(open_run(data=data).splits.skipped) == 1
    with pytest.raises(UserError, match="--strict: 1 of 41 files"):
        open_run("--strict", data=data)


def test_a_config_file_sets_options_and_flags_win(open_run, tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 0.05\nlabel_smoothing: 0.3\n")
    run = open_run("--config", str(tmp_path / "c.yaml"), "--label-smoothing", "0")
    assert {g["initial_lr"] for g in run.optimizer.param_groups} == {0.05}
    logits, labels = torch.tensor([[2.0, 0.0, 0.0, 0.0, 0.0]]), torch.tensor([0])
    assert run.loss_fn(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())


def test_the_loop_sums_in_float32_and_validates_on_the_validation_split(open_run):
    """The epoch's sums stay float32 (Apple's MPS has no float64); validation sees each held-out
    photo once, and only those."""
    run = open_run()
    assert run.totals.dtype == torch.float32
    seen = sum(int(batch["valid"].sum()) for batch in run.val_loader)
    assert seen == len(run.splits.val) == 8


def test_device_cache_chooses_where_the_decoded_photos_live(open_run, capsys):
    """On a CPU the device is the host's memory: `auto` and `device` keep the photos "on cpu", `host`
    keeps them on the host (the gather branch a GPU takes when they do not fit)."""
    open_run("--pipeline", "device", "--device-cache", "host")
    assert "kept on the host (--device-cache host)" in capsys.readouterr().out
    open_run("--pipeline", "device")
    assert "kept on cpu (--device-cache auto)" in capsys.readouterr().out


def _blob_photos(root, per_class: int = 8):
    """Photos of smooth random blobs (upscaled 8x6 noise), one sub-folder per flower class: no two
    alike, and a resized copy of one hashes close to it (a flat generated colour has no hash)."""
    rng = np.random.default_rng(1)
    for name in CLASSES:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            small = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
            small.resize((80, 60), Image.BILINEAR).save(root / name / f"{i}.jpg", quality=95)
    return root


def test_exclude_relabel_and_duplicate_distance_shape_the_split(open_run, tmp_path):
    data = _blob_photos(tmp_path / "blobs")
    Image.open(data / "daisy" / "0.jpg").resize((64, 48)).save(data / "daisy" / "copy.jpg", quality=80)
    (tmp_path / "drop.csv").write_text("rose/1.jpg\n")
    (tmp_path / "fix.csv").write_text("path,label\ntulip/2.jpg,daisy\n")
    run = open_run("--exclude", str(tmp_path / "drop.csv"), "--relabel", str(tmp_path / "fix.csv"), data=data)
    splits = run.splits
    labels = {p: label for part in (splits.train, splits.val) for p, label in zip(image_paths(part), part["label"])}
    assert str(data / "rose" / "1.jpg") not in labels and len(labels) == 40
    assert labels[str(data / "tulip" / "2.jpg")] == splits.class_names.index("daisy")
    assert sorted(map(sorted, splits.groups)) == [["daisy/0.jpg", "daisy/copy.jpg"]]
    assert open_run("--duplicate-distance", "-1", data=data).splits.groups == []
