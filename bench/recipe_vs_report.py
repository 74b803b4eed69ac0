"""Benchmark: the default recipe against `--recipe report`, from random init.

Trains both recipes under the same conditions (ResNet18 from random init, 128 px, 25 epochs,
the default stratified 80/20 split, seed 42, CPU fp32), then writes a learning-curve PNG of
both and prints the best validation accuracy of each. Not a test: each run takes ~30 min on
an idle 2-core CPU.

    python bench/recipe_vs_report.py --data ../shared/data/flower_dataset --out /tmp/bench
    python bench/recipe_vs_report.py --out /tmp/bench --plot-only      # re-plot finished runs

The two runs go one after the other (--parallel runs them side by side; add --pin-cores to
give each its own core with taskset, which on a busy 2-core machine avoids the two runs'
threads thrashing). Each run's exact command is printed and saved as <out>/<name>.cmd; its
output as <out>/<name>.log; wall times go to <out>/wall_seconds.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPES = {"default": [], "report": ["--recipe", "report"]}


def train_command(data: str, out: Path, name: str, epochs: int, image_size: int, workers: int) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--data", data, "--output-dir", str(out / "runs"),
            "--run-name", name, "--weights", "none", "--image-size", str(image_size),
            "--epochs", str(epochs), "--seed", "42", "--workers", str(workers), "--report-to", "none",
            *RECIPES[name]]


def start(cmd: list[str], out: Path, name: str, core: int | None = None) -> subprocess.Popen:
    (out / f"{name}.cmd").write_text(shlex.join(cmd) + "\n")
    print(f"[{name}] {shlex.join(cmd)}", flush=True)
    log = open(out / f"{name}.log", "w")
    if core is not None:
        cmd = ["taskset", "-c", str(core), *cmd]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def read_history(out: Path, name: str) -> list[dict]:
    path = out / "runs" / name / "history.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_epoch = {row["epoch"]: row for row in lines}  # a resumed run may repeat an epoch: keep the latest
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot(out: Path, histories: dict[str, list[dict]]) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in histories.items():
        epochs = [r["epoch"] for r in rows]
        best = max((r["val_accuracy"] for r in rows), default=float("nan"))
        line, = acc_ax.plot(epochs, [100 * r["val_accuracy"] for r in rows], label=f"{name} val (best {best:.2%})")
        acc_ax.plot(epochs, [100 * r["train_accuracy"] for r in rows], "--", color=line.get_color(),
                    label=f"{name} train")
        loss_ax.plot(epochs, [r["val_loss"] for r in rows], color=line.get_color(), label=f"{name} val")
        loss_ax.plot(epochs, [r["train_loss"] for r in rows], "--", color=line.get_color(), label=f"{name} train")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="ResNet18 from scratch, 128 px")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss (train includes label smoothing)")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "flower_dataset"))
    parser.add_argument("--out", default="bench-out", help="folder for logs, runs and the PNG")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--parallel", action="store_true", help="run both recipes at the same time")
    parser.add_argument("--pin-cores", action="store_true", help="with --parallel: run i on core i (taskset)")
    parser.add_argument("--plot-only", action="store_true", help="only plot runs already in --out")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    if not args.plot_only:
        wall = {}
        procs = {}
        for core, name in enumerate(RECIPES):
            cmd = train_command(args.data, out, name, args.epochs, args.image_size, args.workers)
            pin = core if args.parallel and args.pin_cores else None
            procs[name] = (start(cmd, out, name, pin), time.perf_counter())
            if not args.parallel:
                code = procs[name][0].wait()
                wall[name] = time.perf_counter() - procs[name][1]
                if code:
                    sys.exit(f"[{name}] failed with exit code {code}; see {out / (name + '.log')}")
        for name, (proc, started) in procs.items():
            if name not in wall:
                if proc.wait():
                    sys.exit(f"[{name}] failed; see {out / (name + '.log')}")
                wall[name] = time.perf_counter() - started
        (out / "wall_seconds.json").write_text(json.dumps(wall, indent=2))

    histories = {name: read_history(out, name) for name in RECIPES}
    wall = json.loads((out / "wall_seconds.json").read_text()) if (out / "wall_seconds.json").is_file() else {}
    for name, rows in histories.items():
        if rows:
            best = max(rows, key=lambda r: r["val_accuracy"])
            seconds = wall.get(name) or sum(r["epoch_time_s"] for r in rows)
            print(f"{name:8s} best val_acc {best['val_accuracy']:.2%} (epoch {best['epoch']}/{len(rows)}), "
                  f"wall {seconds / 60:.0f} min")
    print(f"learning curves: {plot(out, histories)}")


if __name__ == "__main__":
    main()
