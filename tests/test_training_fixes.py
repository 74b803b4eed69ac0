"""Review findings in the training loop, each shown with a real run or the real components:
run folders are never shared, DDP ranks draw their own dropout and agree on the EMA, resuming
refuses another process count, --on-nan skip leaves no trace of the skipped batch, seeds give
unrelated data orders, no weight decay on biases and norms, losses reported alike, and images
that break mid-run are left out on every rank."""

from __future__ import annotations

import datetime as real_datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from conftest import REPO, TINY_TRAIN, make_dataset, patched_entry_script, run_cli
from flowers import training
from flowers.config import TrainConfig
from flowers.engine import EpochOptions, train_one_epoch
from flowers.model import build_model
from flowers.nonfinite import NonFiniteGuard
from flowers.optim import build_optimizer, build_scheduler
from flowers.recipe import WeightEMA, parameter_groups
from flowers.runtime import make_accelerator

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


# ---- run folders ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_an_existing_run_name_is_refused_and_left_untouched(flower_dir, tmp_path):
    taken = tmp_path / "out" / "mine"
    taken.mkdir(parents=True)
    (taken / "history.jsonl").write_text('{"epoch": 1}\n')
    (taken / "last").mkdir()  # something to resume (a folder without it gives its name back)
    (taken / "last" / "checkpoint.json").write_text("{}")
    proc = run_cli("python", "train.py", "--data", str(flower_dir), "--output-dir", str(tmp_path / "out"),
                   "--run-name", "mine", *TINY_TRAIN, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --run-name mine: {taken} already exists; continue that run with --resume {taken}, "
        "or choose another name")
    assert sorted(p.name for p in taken.iterdir()) == ["history.jsonl", "last"]
    assert (taken / "history.jsonl").read_text() == '{"epoch": 1}\n'


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch):
    class FrozenClock(real_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 29, 12, 0, 0)

    monkeypatch.setattr(training.dt, "datetime", FrozenClock)
    cfg = TrainConfig(output_dir=str(tmp_path), weights="none")
    accelerator = Accelerator(cpu=True)
    first, second = (training._create_run_dir(accelerator, cfg) for _ in range(2))
    assert (first.name, second.name) == ("20261129-120000", "20261129-120000-2")
    assert first.is_dir() and second.is_dir()


# ---- resuming with another number of processes ------------------------------------------------------

@pytest.mark.slow
def test_resume_with_another_number_of_processes_is_refused_naming_both(flower_dir, tmp_path):
    out = tmp_path / "out"
    run_cli("python", "train.py", "--data", str(flower_dir), "--output-dir", str(out), "--epochs", "2",
            "--run-name", "r", *TINY_TRAIN)
    meta_file = out / "r" / "last" / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    meta["environment"]["num_processes"], meta["epoch"], meta["config"]["epochs"] = 2, 1, 3  # as if from 2 ranks
    meta_file.write_text(json.dumps(meta))
    proc = run_cli("python", "train.py", "--resume", str(out / "r"), check=False)
    assert proc.returncode == 2, proc.stdout[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "trained with 2 process(es) and this launch has 1" in last and "--num_processes 2" in last


def test_a_run_saved_with_the_old_augmentation_draws_is_refused_in_one_line(trained_run, tmp_path):
    """Runs saved before the epoch-wide draws (transforms.AUGMENTATION_DRAWS 2) drew other images:
    --resume cannot continue them exactly and says so, naming --init-from."""
    run = tmp_path / "old"
    shutil.copytree(trained_run["output_dir"] / "tiny", run)
    meta_file = run / "last" / "checkpoint.json"
    meta = json.loads(meta_file.read_text())
    assert meta["data"].pop("augmentation_draws") == 2  # what this version records
    meta["config"]["epochs"] = 3  # unfinished
    meta_file.write_text(json.dumps(meta))
    proc = run_cli("python", "train.py", "--resume", str(run), "--data", str(trained_run["data"]), check=False)
    assert proc.returncode == 2, proc.stdout[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot continue exactly" in last and f"--init-from {run / 'last'}" in last, last
    assert len(proc.stderr.strip().splitlines()) == 1


# ---- DDP: per-rank dropout, the same EMA on every rank ----------------------------------------------

# a patch of train.py recording, on each rank, which units the first training batch's dropout zeroed, and the
# EMA weights at the end of the run.
RECORD_RANKS = '''
    import torch
    from flowers import training

    out = os.environ["RECORD"] + os.environ["RANK"]
    record, build_model, WeightEMA = {}, training.build_model, training.WeightEMA

    def dropped_units(module, inputs, output):
        if module.training and "dropped" not in record:
            record["dropped"] = ((output == 0) & (inputs[0] != 0)).cpu()

    def build_model_recording_dropout(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.fc[0].register_forward_hook(dropped_units)
        return model

    class RecordedEMA(WeightEMA):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            record["ema"] = self

    training.build_model, training.WeightEMA = build_model_recording_dropout, RecordedEMA
'''
SAVE_RECORD = '''
    torch.save({"dropped": record["dropped"], "ema": record["ema"].module.state_dict()}, out)
'''


@pytest.mark.slow
def test_ddp_ranks_draw_their_own_dropout_and_keep_the_same_ema(tmp_path):
    script = patched_entry_script(tmp_path / "train_recording.py", RECORD_RANKS, after=SAVE_RECORD)
    data = make_dataset(tmp_path / "flowers", per_class=5)
    out = tmp_path / "out"
    run_cli(ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_ddp.yaml", "--main_process_port", "29563",
            str(script), "--data", str(data), "--output-dir", str(out), "--epochs", "2", "--run-name", "d",
            "--dropout", "0.5", "--ema-decay", "0.9", *TINY_TRAIN, "--batch-size", "4",
            env={"RECORD": str(tmp_path / "rank-")}, timeout=900)
    rank0, rank1 = (torch.load(tmp_path / f"rank-{r}", weights_only=True) for r in "01")
    assert rank0["dropped"].any() and rank1["dropped"].any()
    assert not torch.equal(rank0["dropped"], rank1["dropped"])  # the same seed gave both ranks one mask
    assert rank0["ema"].keys() == rank1["ema"].keys()
    assert all(torch.equal(rank0["ema"][k], rank1["ema"][k]) for k in rank0["ema"])
    evaluated = run_cli("python", "eval.py", "--ckpt", str(out / "d" / "ema"), "--workers", "0")
    assert "images in" in evaluated.stdout


def test_ema_warms_up_and_averages_buffers():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.999)
    assert [round(ema.decay_at(t), 4) for t in (0, 1, 10, 10_000)] == [0.1, 0.1818, 0.55, 0.999]
    ema.update(model)  # the first update copies the weights
    with torch.no_grad():
        start = model[0].weight.clone()
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)  # decay (1 + 1) / (10 + 1)
    assert torch.allclose(ema.module[0].weight, 2 / 11 * start + 9 / 11 * model[0].weight)
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), 9 / 11 * 2.0))
    assert ema.module[1].num_batches_tracked.item() == 7
    assert not ema.module[0].weight.requires_grad



def _averaged_model_ema(model: nn.Module, ema: WeightEMA) -> "torch.optim.swa_utils.AveragedModel":
    """The EMA as AveragedModel.update_parameters computes it, with the same decays: what runs saved
    before the host-side update hold, and resume from."""
    from torch.optim.swa_utils import AveragedModel

    def average(averaged, current, _count):
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1 - ema.decay_at(reference.updates))
        else:
            torch._foreach_copy_(averaged, current)
    reference = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
    reference.updates = 0
    return reference


def test_ema_is_bit_identical_to_averaged_model_updates_and_resumes_from_their_state():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 2))
    ema = WeightEMA(model, decay=0.99)
    reference = _averaged_model_ema(model, ema)

    def train_a_little():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g))
        model.train()(torch.randn(5, 3, 8, 8, generator=g))  # BatchNorm statistics and num_batches_tracked move
    for _ in range(5):
        train_a_little()
        ema.update(model)
        reference.update_parameters(model)
        reference.updates += 1
    assert ema.state_dict()["averaged"].keys() == reference.state_dict().keys()
    assert all(torch.equal(ema.state_dict()["averaged"][k], v) for k, v in reference.state_dict().items())
    # a run saved by AveragedModel's update resumes exactly: the same state, the same next updates
    resumed = WeightEMA(model, decay=0.99)
    resumed.load_state_dict({"averaged": reference.state_dict(), "updates": reference.updates})
    train_a_little()
    resumed.update(model)
    reference.update_parameters(model)
    assert all(torch.equal(resumed.state_dict()["averaged"][k], v) for k, v in reference.state_dict().items())


# ---- --on-nan skip -----------------------------------------------------------------------------

def test_a_skipped_nan_batch_leaves_weights_and_batchnorm_statistics_as_they_were():
    """The NaN enters before a BatchNorm layer, whose forward pass updates its running statistics."""
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    g = torch.Generator().manual_seed(0)
    batches = [{"pixel_values": torch.randn(4, 3, 2, 2, generator=g), "labels": torch.tensor([0, 1, 0, 1]),
                "valid": torch.ones(4, dtype=torch.bool)} for _ in range(3)]
    batches[1]["pixel_values"][0, 0, 0, 0] = float("nan")
    states, stepped = [], []

    def after_step(step, did_step=None):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        stepped.append(did_step)
        return False

    guard = NonFiniteGuard(accelerator, "skip")
    guard.start_epoch(1, len(batches))
    train_one_epoch(accelerator, model, batches, optimizer, None, nn.CrossEntropyLoss(reduction="none"),
                    EpochOptions(channels_last=False, on_step=after_step, guard=guard))
    before, after = states[0], states[1]
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])]
    assert stepped == [True, False, True]  # training.fit updates the EMA on stepped batches only
    assert all(torch.isfinite(v.float()).all() for v in states[2].values())


# ---- data order -------------------------------------------------------------------------------

def _orders(seed: int, epochs: int) -> list[list[int]]:
    accelerator = make_accelerator(training.data_order_seed(seed))
    loader = accelerator.prepare(torch.utils.data.DataLoader(list(range(64)), batch_size=64, shuffle=True))
    orders = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        orders.append(next(iter(loader)).tolist())
    return orders


def test_neighbouring_seeds_do_not_share_data_orders():
    """Accelerate's seedable sampler shuffles epoch e with data_seed + e: seeding it with the run
    seed made seed s's epoch 2 the order of seed s + 1's epoch 1."""
    s, s_plus_1 = _orders(5, 3), _orders(6, 3)
    assert all(order not in s_plus_1 for order in s)
    assert _orders(5, 3) == s  # still a function of the seed


# ---- optimizer groups and reported losses --------------------------------------------------------

def test_no_weight_decay_on_biases_and_norm_weights_and_frozen_epochs_still_freeze_them():
    cfg = TrainConfig(weights="none", weight_decay=0.05, freeze_backbone=1, epochs=2, warmup_epochs=0,
                      scheduler="none")
    model = build_model(5, "none")
    optimizer = build_optimizer(cfg, parameter_groups(cfg, model))
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert decay[id(p)] == (0.05 if p.ndim > 1 else 0.0), name
    assert len(decay) == len(list(model.parameters()))
    scheduler = build_scheduler(cfg, optimizer, steps_per_epoch=1)
    lrs = {g["name"] + str(g["weight_decay"]): g["lr"] for g in optimizer.param_groups}
    assert lrs == {"backbone0.05": 0.0, "backbone0.0": 0.0, "head0.05": cfg.lr, "head0.0": cfg.lr}
    optimizer.step()
    scheduler.step()
    assert {g["lr"] for g in optimizer.param_groups} == {cfg.lr}


def test_train_loss_is_reported_without_label_smoothing_like_val_loss():
    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the weights stay put
    model, optimizer = accelerator.prepare(model, optimizer)
    g = torch.Generator().manual_seed(1)
    batches = [{"pixel_values": torch.randn(4, 3, 2, 2, generator=g), "labels": torch.randint(0, 3, (4,), generator=g),
                "valid": torch.ones(4, dtype=torch.bool)} for _ in range(2)]
    stats = train_one_epoch(accelerator, model, batches, optimizer, None,
                            nn.CrossEntropyLoss(label_smoothing=0.3, reduction="none"),
                            EpochOptions(channels_last=False))
    with torch.no_grad():
        plain = torch.cat([nn.functional.cross_entropy(model(b["pixel_values"]), b["labels"], reduction="none")
                           for b in batches]).mean()
    assert stats.loss == pytest.approx(plain.item(), rel=1e-6)


# ---- an image that breaks after the up-front scan, under DDP ----------------------------------------

# a patch of eval.py where the first two validation photos are replaced by garbage after every process has
# loaded and scanned the split (so the images fail while batches are made, on the first process).
BREAK_AFTER_SCAN = '''
    import json, os, sys
    from flowers import evaluation
    from flowers.data import image_paths

    warn_about_data = evaluation.warn_about_data

    def break_two_photos_then_warn(accelerator, parts, class_names, **kwargs):
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            victims = image_paths(parts[1])[:2]
            with open(os.environ["BROKEN"], "w") as f:
                json.dump(victims, f)
            for path in victims:
                os.rename(path, path + ".orig")  # maybe a symlink to a real photo: never write through it
                with open(path, "wb") as f:
                    f.write(b"garbage")
        accelerator.wait_for_everyone()
        return warn_about_data(accelerator, parts, class_names, **kwargs)

    evaluation.warn_about_data = break_two_photos_then_warn
'''


@pytest.mark.slow
def test_images_failing_mid_run_are_left_out_alike_by_two_ranks_and_one(tmp_path):
    script = patched_entry_script(tmp_path / "eval_breaking.py", BREAK_AFTER_SCAN, entry="eval")
    data = make_dataset(tmp_path / "flowers", per_class=6)  # 30 photos: 6 validation
    out = tmp_path / "out"
    run_cli("python", "train.py", "--data", str(data), "--output-dir", str(out), "--epochs", "1", "--run-name", "r",
            *TINY_TRAIN)
    broken = tmp_path / "broken.json"
    results = {}
    for processes, launcher in (("2", [ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_ddp.yaml",
                                       "--main_process_port", "29565"]), ("1", ["python"])):
        proc = run_cli(*launcher, str(script), "--ckpt", str(out / "r" / "best"), "--batch-size", "2",
                       "--workers", "0", env={"BROKEN": str(broken)}, timeout=300)
        for path in json.loads(broken.read_text()):
            assert f"skipped {path}" in proc.stdout + proc.stderr
            os.replace(path + ".orig", path)  # the photo back, for the next run's up-front scan
        results[processes] = json.loads((out / "r" / "eval-best-val" / "results.json").read_text())
    assert results["2"]["processes"] == 2
    assert results["2"]["metrics"]["num_samples"] == results["1"]["metrics"]["num_samples"] == 4
    assert results["2"]["metrics"] == results["1"]["metrics"]


# ---- several nodes: per-node work on each node's local main process ----------------------------------

# a patch of train.py logging when each process enters and leaves the data loading (which fills the node's caches)
LOG_DATA_LOADING = '''
    import json, os, sys, time
    from flowers import training

    load_splits = training.load_splits

    def logged_load_splits(*args, **kwargs):
        entered = time.time()
        time.sleep(1.0)  # long enough that processes running it at once overlap
        splits = load_splits(*args, **kwargs)
        with open(os.environ["LOG"], "a") as f:
            f.write(json.dumps({"node": os.environ["GROUP_RANK"], "local_rank": os.environ["LOCAL_RANK"],
                                "entered": entered, "left": time.time()}) + "\\n")
        return splits

    training.load_splits = logged_load_splits
'''


@pytest.mark.slow
def test_on_every_node_the_local_main_process_loads_the_data_before_the_others(tmp_path):
    """Two "nodes" on localhost (2 processes each, gloo), each with its own caches: on node 1 the
    second process used to start at once with the first, both filling the same empty cache."""
    script = patched_entry_script(tmp_path / "train_logging.py", LOG_DATA_LOADING)
    data = make_dataset(tmp_path / "flowers", per_class=5)
    log = tmp_path / "log.jsonl"
    nodes = []
    for node in "01":
        env = {**os.environ, "LOG": str(log), "HF_HOME": str(tmp_path / f"hf-{node}"),
               "TORCH_HOME": str(tmp_path / f"torch-{node}"), "ACCELERATE_USE_CPU": "true"}
        nodes.append(subprocess.Popen(
            [ACCELERATE, "launch", "--multi_gpu", "--num_machines", "2", "--machine_rank", node,
             "--num_processes", "4", "--main_process_ip", "127.0.0.1", "--main_process_port", "29567",
             str(script), "--data", str(data), "--output-dir", str(tmp_path / "out"), "--epochs", "1",
             *TINY_TRAIN, "--batch-size", "4"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    for node in "01":
        first, second = (next(r for r in rows if r["node"] == node and r["local_rank"] == rank) for rank in "01")
        assert second["entered"] >= first["left"], f"node {node}: its processes loaded the data at the same time"
