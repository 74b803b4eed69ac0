"""Shared fixtures: a hermetic environment, small real-photo datasets, and a CLI runner."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Optional real photos: $FLOWERS_TEST_PHOTOS, a folder with one sub-folder per class (.ci/run points
# it at the flower set when there is one); generated images when it is unset or a class is absent.
REAL_DATA = Path(os.environ.get("FLOWERS_TEST_PHOTOS") or REPO / "missing").expanduser().resolve()
CLASSES = ["daisy", "dandelion", "rose", "sunflower", "tulip"]
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


@pytest.fixture(autouse=True)
def hermetic_env(tmp_path_factory, monkeypatch):
    """Caches, trackers and hubs under tmp; never the network."""
    root = tmp_path_factory.getbasetemp() / "env"
    env = {
        "HF_HOME": root / "hf", "TORCH_HOME": root / "torch", "WANDB_DIR": root / "wandb",
        "WANDB_CACHE_DIR": root / "wandb-cache", "WANDB_CONFIG_DIR": root / "wandb-config",
        "WANDB_DATA_DIR": root / "wandb-data",
        "MPLCONFIGDIR": root / "mpl",
    }
    for key, value in env.items():
        value.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(key, str(value))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("FLOWERS_DATA", raising=False)


def make_dataset(root: Path, per_class: int = 8, classes=CLASSES) -> Path:
    """`per_class` real flower photos per class (symlinks), or generated JPEGs when the real set is absent."""
    for index, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        real = sorted((REAL_DATA / name).glob("*.jpg"))[:per_class] if (REAL_DATA / name).is_dir() else []
        if real:
            for src in real:
                (folder / src.name).symlink_to(src)
        else:
            for i in range(per_class):
                colour = ((index * 50 + i * 7) % 256, (index * 90) % 256, (255 - index * 40) % 256)
                Image.new("RGB", (80, 60), colour).save(folder / f"{name}_{i}.jpg")
    return root


@pytest.fixture
def flower_dir(tmp_path) -> Path:
    """40 real photos (8 per class, 5 classes)."""
    return make_dataset(tmp_path / "flowers")


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 300,
            check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (e.g. `python train.py ...`) as a user would; returns the finished process.

    Repository files named relatively (train.py, accelerate_configs/cpu.yaml) work from any cwd.
    """
    cmd = [sys.executable if a == "python" else str(REPO / a) if (REPO / a).is_file() and not Path(a).is_absolute()
           else a for a in args]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# Three classes a small network tells apart at once: their colours (noisy, so no two photos are equal).
COLOURS = {"blue": (40, 70, 220), "green": (40, 200, 60), "red": (220, 40, 40)}


def make_colour_dataset(root: Path, per_class: int = 18, shuffle_labels: bool = False, seed: int = 0) -> Path:
    """`per_class` generated 40x40 JPEGs per colour class in COLOURS.

    shuffle_labels: the same images in random class folders, every folder holding each colour
    equally often, so a folder's name says nothing about the pixels (a negative control).
    """
    assert per_class % len(COLOURS) == 0 or not shuffle_labels, "per_class must split evenly over the classes"
    pixels, order = np.random.default_rng(seed), random.Random(seed)
    for colour, rgb in COLOURS.items():
        labels = [colour] * per_class
        if shuffle_labels:
            labels = list(COLOURS) * (per_class // len(COLOURS))
            order.shuffle(labels)
        for i, label in enumerate(labels):
            noisy = np.clip(np.array(rgb) + pixels.integers(-30, 31, (40, 40, 3)), 0, 255).astype(np.uint8)
            (root / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(noisy).save(root / label / f"{colour}_{i}.jpg", quality=90)
    return root


def read_history(run_dir: Path) -> list[dict]:
    """The run's history.jsonl: one row per finished epoch."""
    return [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]


def interrupt_when(cmd: list[str], line_start: str, sig: int = signal.SIGTERM, env: dict | None = None,
                   timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run `cmd` from the repository, send `sig` to it once a line of its output starts with
    `line_start`, and wait; returns the process with its whole stdout (stderr is dropped: progress bars)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    output = []
    for line in proc.stdout:
        output.append(line)
        if line.startswith(line_start):
            proc.send_signal(sig)
            break
    output.extend(proc.stdout)
    proc.wait(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(output), "")


def interrupt_mid_epoch(cmd: list[str], run_dir: Path, global_step: int, sig: int = signal.SIGTERM,
                        env: dict | None = None, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run `cmd` (a training run with --save-every-steps) from the repository and send `sig` once
    its last/ checkpoint records `global_step` or later, a step known to lie inside an epoch (no
    race with the end of an epoch, as a signal sent on an epoch's summary line has); then wait.
    Returns the process with its whole stdout (stderr is dropped: progress bars)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        try:  # last/ is swapped in whole; between the two renames it is briefly absent
            if json.loads((run_dir / "last" / "checkpoint.json").read_text())["global_step"] >= global_step:
                proc.send_signal(sig)
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    proc.wait(timeout=timeout)
    reader.join(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(output), "")


def free_port() -> int:
    """A TCP port nobody listens on now (for a DDP launch's --main_process_port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def open_tiny_run(data: Path, output_dir: Path, *args: str):
    """training.open_run (the Run that fit() trains with) for a command line, in-process, with small,
    fast defaults before `args`; Accelerate's process-wide state is reset first."""
    from accelerate.state import AcceleratorState, GradientState

    from flowers import training
    from flowers.config import TrainConfig, parse

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    base = ["--data", str(data), "--output-dir", str(output_dir), "--weights", "none", "--image-size", "32",
            "--batch-size", "4", "--report-to", "none", "--workers", "0"]
    return training.open_run(parse(TrainConfig, base + list(args)))


TINY_TRAIN = ("--image-size", "32", "--batch-size", "8", "--weights", "none", "--report-to", "none",
              "--workers", "0")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> dict:
    """One tiny checkpoint (1 epoch, 32 px, 40 real photos) shared by the eval/predict/export tests.

    Session-scoped, so it sets its own hermetic environment instead of using `hermetic_env`.
    Returns {"output_dir", "data", "ckpt"} paths.
    """
    root = tmp_path_factory.mktemp("trained")
    env = {"HF_HOME": str(root / "hf"), "TORCH_HOME": str(root / "torch"), "MPLCONFIGDIR": str(root / "mpl"),
           "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1",
           "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    data = make_dataset(root / "flowers")
    output_dir = root / "outputs"
    run_cli("python", "train.py", "--data", str(data), "--output-dir", str(output_dir), "--epochs", "1",
            "--run-name", "tiny", "--seed", "3", *TINY_TRAIN, env=env, timeout=1200)
    return {"output_dir": output_dir, "data": data, "ckpt": output_dir / "tiny" / "best"}


_ENTRY_POINTS = {
    "train": "from flowers import training\nfrom flowers.config import TrainConfig, parse\n"
             "run(lambda: training.fit(parse(TrainConfig)))\n",
    "eval": "from flowers import evaluation\nfrom flowers.config import EvalConfig, parse\n"
            "run(lambda: evaluation.run_eval(parse(EvalConfig)))\n",
}


def patched_entry_script(path: Path, patch: str, entry: str = "train", after: str = "") -> str:
    """train.py (or eval.py) with `patch` run first: Python source that replaces a function of a
    flowers module, to inject a fault or record what a real run does inside. `after` runs once the
    command has finished. Returns the script's path, for `python SCRIPT` or `accelerate launch SCRIPT`."""
    header = f"import os, sys\nsys.path.insert(0, {str(REPO)!r})\nfrom flowers.cli import run\n"
    path.write_text(header + textwrap.dedent(patch) + "\n" + _ENTRY_POINTS[entry] + textwrap.dedent(after))
    return str(path)
