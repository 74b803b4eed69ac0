"""The code paths that GPU runs take, exercised on the CPU: --compile checkpoints, bf16 mixed
precision, skipped fp16 steps, the DDP stop check's interval, and MPS's float32-only rule."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import TINY_TRAIN, make_dataset, patched_entry_script, run_cli
from flowers.data import default_workers, pins_memory
from flowers.engine import EpochOptions, train_one_epoch
from flowers.evaluation import recorded_accuracy_verdict

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
EAGER = {"ACCELERATE_DYNAMO_BACKEND": "eager"}  # torch.compile's wrapper and keys, without the 55 s compile


def _meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "checkpoint.json").read_text())


@pytest.fixture(scope="module")
def compiled_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("compiled")
    data = make_dataset(root / "flowers", per_class=5)
    out = root / "out"
    proc = run_cli("python", "train.py", "--data", str(data), "--output-dir", str(out), "--epochs", "1",
                   "--run-name", "c", "--compile", *TINY_TRAIN, env=EAGER, timeout=900)
    return {"root": root, "data": data, "out": out, "ckpt": out / "c" / "best", "proc": proc}


@pytest.mark.slow
def test_compile_run_saves_plain_keys_that_eval_predict_export_and_init_from_use(compiled_run, tmp_path):
    ckpt, out, data = compiled_run["ckpt"], compiled_run["out"], compiled_run["data"]
    assert _meta(ckpt)["environment"]["model_wrapper"] == "OptimizedModule"  # it really ran compiled
    keys = load_file(str(ckpt / "model.safetensors")).keys()
    assert "fc.weight" in keys and not any("_orig_mod" in k or k.startswith("module.") for k in keys)

    evaluated = run_cli("python", "eval.py", "--ckpt", str(ckpt), "--workers", "0")
    assert "matches the accuracy recorded at training time" in evaluated.stdout
    photo = next((data / "rose").iterdir())
    predicted = run_cli("python", "-m", "flowers.predict", "--ckpt", str(ckpt), str(photo))
    assert predicted.stdout.startswith(str(photo))
    run_cli("python", "-m", "flowers.export", "--ckpt", str(ckpt), "--format", "torchscript",
            "--out", str(tmp_path / "exported"))
    assert any((tmp_path / "exported").iterdir())
    run_cli("python", "train.py", "--data", str(data), "--output-dir", str(out), "--epochs", "1", "--run-name",
            "from-compiled", "--init-from", str(ckpt), "--compile", *TINY_TRAIN, env=EAGER, timeout=900)
    assert _meta(out / "from-compiled" / "best")["init_from"]["head_loaded"] is True


@pytest.mark.slow
def test_checkpoints_written_with_compiled_keys_still_load(compiled_run, tmp_path):
    """Checkpoints saved by earlier versions of a --compile run hold `_orig_mod.` keys."""
    old = tmp_path / "old-best"
    shutil.copytree(compiled_run["ckpt"], old)
    state = load_file(str(old / "model.safetensors"))
    save_file({f"_orig_mod.{k}": v for k, v in state.items()}, str(old / "model.safetensors"))
    evaluated = run_cli("python", "eval.py", "--ckpt", str(old), "--workers", "0")
    assert "matches the accuracy recorded at training time" in evaluated.stdout
    run_cli("python", "train.py", "--data", str(compiled_run["data"]), "--output-dir", str(tmp_path / "out"),
            "--epochs", "1", *TINY_TRAIN, "--weights", str(old))


@pytest.mark.slow
def test_bf16_trains_saves_fp32_weights_and_eval_judges_the_recorded_accuracy(tmp_path):
    data = make_dataset(tmp_path / "flowers", per_class=5)
    out = tmp_path / "out"
    proc = run_cli(ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu.yaml", "--mixed_precision", "bf16",
                   "train.py", "--data", str(data), "--output-dir", str(out), "--epochs", "2", "--run-name", "b",
                   *TINY_TRAIN, timeout=900)
    assert "precision: bf16" in proc.stdout
    rows = [json.loads(line) for line in (out / "b" / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor([r["train_loss"], r["val_loss"]])).all() for r in rows)
    weights = load_file(str(out / "b" / "best" / "model.safetensors"))
    assert {t.dtype for k, t in weights.items() if "num_batches" not in k} == {torch.float32}
    assert _meta(out / "b" / "best")["environment"]["mixed_precision"] == "bf16"

    same = run_cli("python", "eval.py", "--ckpt", "best", "--output-dir", str(out), "--workers", "0")
    assert "matches the accuracy recorded at training time" in same.stdout and "(evaluated in bf16)" in same.stdout
    fp32 = run_cli("python", "eval.py", "--ckpt", "best", "--output-dir", str(out), "--workers", "0",
                   "--mixed-precision", "no")
    assert "DIFFERS" not in fp32.stdout and "the accuracy recorded at training time" in fp32.stdout


def test_recorded_accuracy_verdict_allows_a_few_images_only_across_precisions():
    assert recorded_accuracy_verdict(0.5, 0.5, 570, "bf16", "bf16").startswith("matches")
    assert recorded_accuracy_verdict(512 / 570, 511 / 570, 570, "no", "no").startswith("DIFFERS FROM")
    assert recorded_accuracy_verdict(512 / 570, 510 / 570, 570, "bf16", "no").startswith("agrees")
    assert "within 2 image(s)" in recorded_accuracy_verdict(512 / 570, 510 / 570, 570, "bf16", "no")
    assert recorded_accuracy_verdict(512 / 570, 505 / 570, 570, "bf16", "no").startswith("DIFFERS FROM")


class _Batches:
    """Sized, re-iterable batches already in memory (what train_one_epoch takes)."""

    def __init__(self, batches):
        self.batches = batches

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def _batches(n: int, size: int = 4) -> _Batches:
    g = torch.Generator().manual_seed(0)
    return _Batches([{"pixel_values": torch.randn(size, 3, 4, 4, generator=g),
                      "labels": torch.randint(0, 2, (size,), generator=g),
                      "valid": torch.ones(size, dtype=torch.bool)} for _ in range(n)])


def test_a_step_the_grad_scaler_skips_advances_neither_the_schedule_nor_the_step_count():
    """fp16: GradScaler skips a step whose gradients overflowed; so must the schedule."""
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu")  # Accelerate makes none on a CPU; a real one here
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    calls = []

    def loss_overflowing_at_batch_3(logits, targets):
        calls.append(1)
        scale = float("inf") if len(calls) == 3 else 1.0
        return nn.functional.cross_entropy(logits, targets, reduction="none") * scale

    stepped = []
    train_one_epoch(accelerator, model, _batches(5), optimizer, scheduler, loss_overflowing_at_batch_3,
                    EpochOptions(channels_last=False, on_step=lambda step, did_step=None: stepped.append(did_step)))
    assert scheduler.last_epoch == 4  # 5 batches, one skipped
    assert stepped == [True, True, False, True, True]  # what training.fit counts optimizer steps (and EMA updates) by


def test_the_training_loop_creates_no_float64_tensor():
    """MPS has no float64: every tensor the loop creates on the training device must be float32."""
    from torch.utils._python_dispatch import TorchDispatchMode

    created = []

    class RecordFloat64(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
                created.append(str(func))
            return out

    accelerator = Accelerator(cpu=True)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    with RecordFloat64():
        stats = train_one_epoch(accelerator, model, _batches(3), optimizer, None,
                                nn.CrossEntropyLoss(reduction="none"), EpochOptions(channels_last=False))
    assert stats.samples == 12
    assert created == []


def test_mps_gets_its_own_loader_rule(monkeypatch):
    assert not pins_memory("mps") and not pins_memory("cpu") and pins_memory("cuda")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))  # a 16-core machine
    assert {device: default_workers(1, device) for device in ("cpu", "cuda", "mps")} == {"cpu": 8, "cuda": 15, "mps": 4}


# a patch of train.py counting the collective operations each training epoch makes (DDP, 2 ranks).
COUNT_COLLECTIVES = '''
    import json, os, sys
    import torch.distributed as dist
    from flowers import training

    counts, all_reduce = [], dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        if counts:
            counts[-1] += 1
        return all_reduce(*args, **kwargs)

    dist.all_reduce = counting_all_reduce
    train_one_epoch = training.train_one_epoch

    def counted_epoch(*args, **kwargs):
        counts.append(0)
        stats = train_one_epoch(*args, **kwargs)
        with open(os.environ["COUNTS"] + os.environ["RANK"], "w") as f:
            json.dump({"collectives": counts, "steps": len(args[2])}, f)
        return stats

    training.train_one_epoch = counted_epoch
'''


@pytest.mark.slow
def test_ddp_agrees_on_stop_signals_every_few_steps_not_every_step(tmp_path):
    """Each check is an all-reduce plus a read that makes the host wait for the GPU."""
    script = patched_entry_script(tmp_path / "train_counting.py", COUNT_COLLECTIVES)
    data = make_dataset(tmp_path / "flowers", per_class=60, classes=["a", "b"])  # 120 images: 96 train
    run_cli(ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_ddp.yaml", "--main_process_port", "29561",
            str(script), "--data", str(data), "--output-dir", str(tmp_path / "out"), "--epochs", "1",
            *TINY_TRAIN, "--batch-size", "2", env={"COUNTS": str(tmp_path / "counts-")}, timeout=900)
    for rank in "01":
        counted = json.loads((tmp_path / f"counts-{rank}").read_text())
        assert counted["steps"] == 24  # 96 images over 2 ranks, batch 2
        # stop checks after steps 10 and 20 (CHECK_EVERY), and the epoch's sums at its end
        assert counted["collectives"] == [3], counted


def test_cudnn_benchmark_is_on_for_cuda_runs_only(monkeypatch):
    from types import SimpleNamespace

    from flowers.runtime import _configure_cudnn
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    _configure_cudnn(SimpleNamespace(device=torch.device("cpu")))
    assert torch.backends.cudnn.benchmark is False
    _configure_cudnn(SimpleNamespace(device=torch.device("cuda", 0)))
    assert torch.backends.cudnn.benchmark is True
