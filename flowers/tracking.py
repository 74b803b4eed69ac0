"""Experiment tracking through Accelerate's trackers (W&B, TensorBoard), plus summary.csv.

Only the main process creates a run. What a run holds is listed in README ("Experiment
tracking"): the resolved config, the dataset and the environment at the start; per-epoch
metrics; at the end the best epoch, the confusion matrix, sample predictions and the best
checkpoint as a model artifact. summary.csv (one row per epoch) is written whatever the tracker.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import netrc
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml
from accelerate import Accelerator
from accelerate.tracking import TensorBoardTracker

from flowers.errors import UserError

TRACKERS = {"wandb": ["wandb"], "tensorboard": ["tensorboard"], "all": ["wandb", "tensorboard"], "none": []}
TRACKING_FILE = "tracking.json"   # in the run folder: the W&B run id, so a resume continues that run
SUMMARY_FILE = "summary.csv"
SAMPLE_PREDICTIONS = 32           # rows of the validation-predictions table
THUMBNAIL_PX = 128


def tracker_names(report_to: str) -> list[str]:
    names = TRACKERS[report_to]
    if "tensorboard" in names and importlib.util.find_spec("tensorboard") is None:
        raise UserError(f"--report-to {report_to} needs the tensorboard package: pip install tensorboard")
    return names


def wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (OSError, netrc.NetrcParseError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    return auth.authenticators(host) is not None


def prepare_wandb_mode(report_to: str) -> bool:
    """With no API key and WANDB_MODE unset, run offline instead of failing or prompting.

    Call on every process before the Accelerator exists. Returns True when it switched to
    offline mode (start() then prints one line with the `wandb sync` command).
    """
    if "wandb" not in TRACKERS[report_to] or os.environ.get("WANDB_MODE") or wandb_key_configured():
        return False
    os.environ["WANDB_MODE"] = "offline"
    return True


def project_name(configured: Optional[str]) -> str:
    return configured or os.environ.get("WANDB_PROJECT") or "flowers"


def stored_run_id(run_dir: Path) -> Optional[str]:
    """The W&B run id a previous launch saved in `run_dir/tracking.json` (None if it had no W&B run)."""
    path = Path(run_dir) / TRACKING_FILE
    try:
        return json.loads(path.read_text()).get("wandb_run_id")
    except (OSError, json.JSONDecodeError):
        return None


# ---- what a run holds at the start -------------------------------------------------------

def run_info(config: dict[str, Any], source: str, class_names: list[str], train_size: int, val_size: int,
             env: dict[str, Any]) -> dict[str, Any]:
    """The run's config as trackers store it: every flag (resolved), the dataset and the environment
    (runtime.environment(): versions, device, number of processes, mixed precision)."""
    dataset = {"source": source, "class_names": list(class_names), "num_classes": len(class_names),
               "train_size": train_size, "val_size": val_size}
    # plain JSON types (torch.__version__ is a str subclass that YAML and some trackers reject)
    return json.loads(json.dumps({**config, "dataset": dataset, "env": env}, default=str))


# ---- start -------------------------------------------------------------------------------

@dataclass
class RunInfo:
    """What start() needs to create (or continue) a run with the trackers of `report_to`."""
    report_to: str
    project: Optional[str]          # --wandb-project (else WANDB_PROJECT, else "flowers")
    run_name: str
    run_dir: Path
    config: dict[str, Any]          # what the trackers store as the run's config: see run_info()
    tags: Optional[str] = None      # comma-separated
    group: Optional[str] = None
    name_given: bool = True         # the name came from --run-name (so it wins over WANDB_NAME)
    switched_offline: bool = False  # prepare_wandb_mode() switched to offline mode
    resume_run_id: Optional[str] = None  # continue that W&B run instead of creating one (see stored_run_id())


def wandb_init_kwargs(run: RunInfo) -> dict[str, Any]:
    """Keyword arguments for wandb.init. Flags win over WANDB_* variables, which win over our defaults."""
    kwargs: dict[str, Any] = {
        "dir": os.environ.get("WANDB_DIR") or str(run.run_dir),
        "config": run.config,
        "settings": wandb_settings(),
    }
    if run.name_given or not os.environ.get("WANDB_NAME"):
        kwargs["name"] = run.run_name
    if run.tags:
        kwargs["tags"] = split_tags(run.tags)
    if run.group:
        kwargs["group"] = run.group
    if run.resume_run_id:
        kwargs.update(id=run.resume_run_id, resume="allow")
    return kwargs


def wandb_settings():
    """No banners in the training log; offline, nothing at all: start() prints the one line that
    matters. The console is still captured into the run's Logs tab."""
    import wandb

    return wandb.Settings(quiet=True, silent=offline_mode())


def offline_mode() -> bool:
    return os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")


def split_tags(tags: str) -> list[str]:
    return [t.strip() for t in tags.split(",") if t.strip()]


def start(accelerator: Accelerator, run: RunInfo) -> None:
    """Create the run (main process only) for each tracker of `run.report_to`."""
    names = tracker_names(run.report_to)
    if not names:
        return
    init_kwargs: dict[str, Any] = {}
    if "wandb" in names:
        if accelerator.is_main_process:
            import wandb
            wandb.setup(settings=wandb_settings())  # also quiets messages outside the run (artifacts)
        init_kwargs["wandb"] = wandb_init_kwargs(run)
    # Accelerate would put TensorBoard logs under <project_dir>/<project>; keep them in the run folder.
    accelerator.log_with = [TensorBoardTracker("tensorboard", str(run.run_dir)) if str(t) == "tensorboard" else t
                            for t in accelerator.log_with]
    accelerator.init_trackers(project_name(run.project), init_kwargs=init_kwargs)
    if not accelerator.is_main_process:
        return
    if "tensorboard" in names:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
        writer.add_text("config", "```\n" + yaml.safe_dump(run.config, sort_keys=False) + "```")
        writer.flush()
    if "wandb" in names:
        _remember_wandb_run(accelerator.get_tracker("wandb", unwrap=True), run)


def _remember_wandb_run(wandb_run, run: RunInfo) -> None:
    """Save the W&B run id in the run folder (a resume continues that run); offline, say how to upload it."""
    (Path(run.run_dir) / TRACKING_FILE).write_text(json.dumps(
        {"wandb_run_id": wandb_run.id, "wandb_project": wandb_run.project, "wandb_dir": wandb_run.settings.sync_dir},
        indent=2))
    if offline_mode():
        reason = "no API key configured, so this run is logged offline" if run.switched_offline else "offline run"
        print(f"W&B: {reason}; upload it later with: wandb sync {wandb_run.settings.sync_dir}", flush=True)


# ---- per epoch ---------------------------------------------------------------------------

def log_epoch(accelerator: Accelerator, epoch: int, metrics: dict[str, float]) -> None:
    """One epoch's scalars to every tracker (step = epoch); training writes summary.csv with its
    checkpoints (write_summary_row)."""
    accelerator.log({"epoch": epoch, **metrics}, step=epoch)


def log_calibration(accelerator: Accelerator, name: str, epoch: int, scores: np.ndarray, labels: np.ndarray,
                    temperature: float, step: int) -> None:
    """A checkpoint's calibration at the end of training, to every tracker (at `step`, the last
    epoch): `<name>/ece` with its bootstrap interval, the held-out ECE after scaling, the
    temperature, and the reliability diagram (before and after scaling)."""
    import tempfile

    from PIL import Image

    from flowers import calibration, report

    if not accelerator.trackers:
        return
    summary = calibration.summarize(scores, labels, temperature=temperature)
    low, high = summary["ece_uncalibrated_interval"]
    values = {f"{name}/ece": summary["ece_uncalibrated"], f"{name}/ece_low": low, f"{name}/ece_high": high,
              f"{name}/ece_scaled_heldout": summary["heldout"]["ece_after"], f"{name}/temperature": temperature}
    accelerator.log(values, step=step)
    with tempfile.TemporaryDirectory() as folder:
        path = report.plot_reliability(
            summary["reliability_uncalibrated"], f"{name}/ (epoch {epoch}): ECE {summary['ece_uncalibrated']:.3f}, "
            f"{summary['ece']:.3f} at T = {temperature:.2f}", Path(folder) / "reliability.png",
            scaled=summary["reliability"])
        with Image.open(path) as image:
            picture = np.asarray(image.convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":
            import wandb
            tracker.tracker.log({f"{name}/reliability": wandb.Image(picture)}, step=step)
        elif tracker.name == "tensorboard":
            tracker.tracker.add_image(f"{name}/reliability", picture, global_step=step, dataformats="HWC")


def write_summary_row(path: Path, row: dict[str, Any]) -> None:
    """Append `row`; rows of this epoch or later (left by an interrupted run) are replaced."""
    rows = []
    if path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["epoch"]) < int(row["epoch"])]
    rows.append(row)
    columns = list(row) + [c for c in rows[0] if c not in row]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


# ---- the end -----------------------------------------------------------------------------

@dataclass
class ValidationOutputs:
    """One epoch's validation outputs, in validation-set order: what the end of a run plots."""
    epoch: int
    scores: np.ndarray          # (N, C) logits
    labels: np.ndarray          # (N,)
    class_names: list[str]
    dataset: Any                # the validation Dataset: its images go in the predictions table

    @property
    def predicted(self) -> np.ndarray:
        return self.scores.argmax(axis=1)


def finish(accelerator: Accelerator, run_dir: Path, shown: ValidationOutputs, last_epoch: int) -> None:
    """Best epoch in the summary, confusion matrix, sample predictions, best checkpoint; close the run.

    shown: the validation outputs to plot (the best epoch's when it ran in this launch)."""
    from flowers.checkpoint import load_meta

    if accelerator.is_main_process and accelerator.trackers:
        best_dir = Path(run_dir) / "best"
        best = load_meta(best_dir)
        best_summary = {"best_val_accuracy": best["metrics"]["val_accuracy"], "best_epoch": best["epoch"]}
        for tracker in accelerator.trackers:
            if tracker.name == "wandb":
                _finish_wandb(tracker.tracker, best_dir, best, best_summary, shown, last_epoch)
            elif tracker.name == "tensorboard":
                _finish_tensorboard(tracker.tracker, best_summary, shown)
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _finish_tensorboard(writer, best_summary: dict[str, Any], shown: ValidationOutputs) -> None:
    from flowers.visuals import confusion_matrix, confusion_matrix_image

    writer.add_scalar("best_val_accuracy", best_summary["best_val_accuracy"], global_step=best_summary["best_epoch"])
    matrix = confusion_matrix(shown.labels, shown.predicted, len(shown.class_names))
    image = confusion_matrix_image(matrix, shown.class_names, title=f"validation, epoch {shown.epoch}")
    writer.add_image("confusion_matrix", np.asarray(image), global_step=shown.epoch, dataformats="HWC")
    writer.flush()


def _finish_wandb(run, best_dir: Path, best: dict[str, Any], best_summary: dict[str, Any],
                  shown: ValidationOutputs, last_epoch: int) -> None:
    import wandb

    run.summary.update(best_summary)
    logged = {"confusion_matrix": wandb.plot.confusion_matrix(
        y_true=shown.labels.tolist(), preds=shown.predicted.tolist(), class_names=shown.class_names,
        title=f"Validation confusion matrix (epoch {shown.epoch})")}
    if np.array_equal(shown.labels, np.asarray(shown.dataset["label"])):
        logged["val_predictions"] = _predictions_table(shown)
    else:  # the outputs are not in dataset order, so images would get the wrong predictions
        print("warning: validation outputs are not in dataset order; no predictions table logged")
    run.log(logged, step=last_epoch)
    artifact = wandb.Artifact(f"model-{run.id}", type="model", metadata={
        "epoch": best["epoch"], "val_accuracy": best["metrics"]["val_accuracy"],
        "class_names": best["class_names"], "arch": best["arch"], "image_size": best["image_size"]})
    artifact.add_dir(str(best_dir))
    run.log_artifact(artifact, aliases=["best", f"epoch-{best['epoch']}"])


def _predictions_table(shown: ValidationOutputs):
    """Evenly spaced validation images with label, prediction and confidence."""
    import wandb
    from datasets import Image

    from flowers.imagefiles import UnusableImage, load_rgb

    scores, labels, predicted, class_names = shown.scores, shown.labels, shown.predicted, shown.class_names
    files = shown.dataset.cast_column("image", Image(decode=False))
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    count = min(SAMPLE_PREDICTIONS, len(labels))
    table = wandb.Table(columns=["index", "image", "label", "prediction", "confidence", "correct"])
    for index in np.linspace(0, len(labels) - 1, count).round().astype(int).tolist():
        try:
            image = load_rgb(files[index]["image"])
        except UnusableImage:
            continue
        image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
        table.add_data(index, wandb.Image(image), class_names[labels[index]], class_names[predicted[index]],
                       round(float(probabilities[index, predicted[index]]), 4), bool(predicted[index] == labels[index]))
    return table
