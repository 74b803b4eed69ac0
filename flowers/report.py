"""Human-readable evaluation output: the per-class table, the confusion-matrix PNG, the grid of
the most confidently wrong images, and the learning curves of a group of runs (flowers.compare)
(matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def metrics_table(metrics: dict, class_names: list[str]) -> str:
    """Per-class precision/recall/F1/support rows, then macro averages, accuracy, top-k and loss."""
    per_class = metrics["per_class"]
    width = max(len("macro avg"), *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    for i, name in enumerate(class_names):
        lines.append(f"{name:<{width}}  {per_class['precision'][i]:9.3f}  {per_class['recall'][i]:6.3f}  "
                     f"{per_class['f1'][i]:6.3f}  {per_class['support'][i]:7d}")
    n = metrics["num_samples"]
    k = metrics["top_k"]
    lines += [
        "-" * len(lines[0]),
        f"{'macro avg':<{width}}  {metrics['macro_precision']:9.3f}  {metrics['macro_recall']:6.3f}  "
        f"{metrics['macro_f1']:6.3f}  {n:7d}",
        f"accuracy {metrics['accuracy']:.2%} ({round(metrics['accuracy'] * n)}/{n})  "
        f"top-{k} accuracy {metrics[f'top{k}_accuracy']:.2%}  loss {metrics['loss']:.4f}",
    ]
    return "\n".join(lines)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_confusion(confusion: list[list[int]], class_names: list[str], title: str, path: Path) -> Path:
    """Counts in the cells; colour is the share of each true class (row), so rows compare fairly."""
    plt = _pyplot()
    counts = np.asarray(confusion)
    row_share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 2.5 + 0.9 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1, size), dpi=120)
    image = ax.imshow(row_share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    for (row, col), count in np.ndenumerate(counts):
        ax.text(col, row, str(count), ha="center", va="center", fontsize=11,
                color="white" if row_share[row, col] > 0.5 else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_mistakes(images: list[Image.Image], captions: list[str], title: str, path: Path,
                  columns: int = 4, empty: str = "no misclassified images") -> Path:
    """A grid of images with a caption each (true label, prediction, confidence, file)."""
    plt = _pyplot()
    rows = max(1, math.ceil(len(images) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.4 * rows + 0.6), dpi=100, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(image)
        ax.set_title(caption, fontsize=9)
    if not images:
        fig.text(0.5, 0.5, empty, ha="center", va="center", fontsize=14)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_learning_curves(curves: dict[str, dict[str, list[float]]], path: Path,
                         best: dict[str, tuple[float, float]] | None = None) -> Path:
    """Curves of several runs side by side: accuracy, loss (validation solid, training dashed) and
    learning rate per epoch. `curves[run]` holds the lists epoch, val_accuracy, train_accuracy,
    val_loss, train_loss and lr; `best[run]` = (epoch, val accuracy) is marked with a dot."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (acc_ax, loss_ax, lr_ax) = plt.subplots(1, 3, figsize=(16, 4.6), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (run, c) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        acc_ax.plot(c["epoch"], [100 * a for a in c["val_accuracy"]], color=colour, label=f"{run} val")
        acc_ax.plot(c["epoch"], [100 * a for a in c["train_accuracy"]], color=colour, ls="--", label=f"{run} train")
        loss_ax.plot(c["epoch"], c["val_loss"], color=colour, label=f"{run} val")
        loss_ax.plot(c["epoch"], c["train_loss"], color=colour, ls="--", label=f"{run} train")
        lr_ax.plot(c["epoch"], c["lr"], color=colour, label=run)
        if best and run in best:
            acc_ax.plot(best[run][0], 100 * best[run][1], "o", color=colour)
    for ax, title, unit in ((acc_ax, "accuracy", "%"), (loss_ax, "cross-entropy loss", ""),
                            (lr_ax, "learning rate", "")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if any(v > 0 for c in curves.values() for v in c["lr"]):
        lr_ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_reliability(table: dict, title: str, path: Path, *, scaled: dict | None = None) -> Path:
    """Reliability diagram: accuracy against confidence per equal-width bin (bars; the diagonal is
    perfect calibration), the bin counts below; `scaled`, the same table after temperature scaling,
    drawn as a line with dots. Tables as calibration.reliability_bins returns them."""
    plt = _pyplot()
    edges = np.asarray(table["edges"])
    width, centres = np.diff(edges), (edges[:-1] + edges[1:]) / 2
    fig, (ax, count_ax) = plt.subplots(2, 1, figsize=(6, 6.6), dpi=110, sharex=True,
                                       gridspec_kw={"height_ratios": [3, 1]})
    accuracy = [a if a is not None else 0.0 for a in table["accuracy"]]
    ax.bar(centres, accuracy, width=width, edgecolor="black", color="tab:blue", alpha=0.7, label="accuracy")
    confidence = [(c, a) for c, a in zip(table["confidence"], table["accuracy"]) if c is not None]
    ax.plot([c for c, _ in confidence], [a for _, a in confidence], "o", color="tab:blue", ms=3)
    if scaled is not None:
        points = [(c, a) for c, a in zip(scaled["confidence"], scaled["accuracy"]) if c is not None]
        ax.plot([c for c, _ in points], [a for _, a in points], "o-", color="tab:orange",
                label="after temperature scaling")
    ax.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    count_ax.bar(centres, table["count"], width=width, edgecolor="black", color="tab:grey")
    if scaled is not None:
        count_ax.step(edges, [*scaled["count"], scaled["count"][-1]], where="post", color="tab:orange")
    count_ax.set_xlabel("confidence (top probability)")
    count_ax.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_risk_coverage(coverage: np.ndarray, accuracy: np.ndarray, rows: list[dict], title: str,
                       path: Path) -> Path:
    """Accuracy of the answers kept against coverage as the rejection threshold rises; the
    thresholds of the table (calibration.risk_coverage rows) marked on the curve."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.4), dpi=110)
    ax.plot(100 * np.asarray(coverage), 100 * np.asarray(accuracy), color="tab:blue")
    for row in rows:
        if row["answered"]:
            ax.plot(100 * row["coverage"], 100 * row["accuracy"], "o", color="tab:red", ms=4)
            ax.annotate(f"{row['threshold']:g}", (100 * row["coverage"], 100 * row["accuracy"]), fontsize=8,
                        textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("coverage: images answered (%)")
    ax.set_ylabel("accuracy of the answered (%)")
    ax.set_xlim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def calibration_lines(summary: dict, fitted: dict | None) -> str:
    """The printed calibration report: ECE before and after (held out), the temperature in use and
    what it was fitted for, and the risk-coverage table (calibration.summarize's dict; `fitted`: the
    checkpoint's meta["calibration"], None when it has no temperature)."""
    bins, n, t = summary["bins"], summary["images"], summary["temperature"]

    def ece(key: str) -> str:
        low, high = summary[f"{key}_interval"]
        below = " (above the estimate: the binned ECE of a resample is biased upwards)" if summary[key] < low else ""
        return f"{summary[key]:.3f} (95% bootstrap interval {low:.3f}-{high:.3f}{below})"

    lines = [f"calibration (top label, {bins} equal-width bins, {n} images):",
             f"  ECE without a temperature: {ece('ece_uncalibrated')}"]
    held = summary["heldout"]
    if held:
        lines.append(f"  ECE after temperature scaling, held out (fitted on one half, measured on the other, both "
                     f"ways): {held['ece_before']:.3f} -> {held['ece_after']:.3f} "
                     f"(T {held['temperatures'][0]:.3f} / {held['temperatures'][1]:.3f})")
    if fitted is None:
        lines.append("  the checkpoint has no temperature (T = 1): eval.py --calibrate fits one on this split")
    else:
        lines.append(f"  the checkpoint's temperature {t:.3f} (fitted on {fitted.get('fitted_on')}, "
                     f"{fitted.get('images')} images, TTA: {fitted.get('tta')}, {fitted.get('eval_size')} px): "
                     f"ECE {ece('ece')}, "
                     f"NLL {summary['nll_uncalibrated']:.4f} -> {summary['nll']:.4f}; "
                     f"predictions changed: {summary['predictions_changed']}")
    lines.append(f"risk-coverage (answer only when the {'calibrated ' if fitted else ''}top probability >= P):")
    lines.append("     P  answered  coverage  accuracy")
    for row in summary["risk_coverage"]:
        accuracy = "-" if row["accuracy"] is None else f"{row['accuracy']:.2%}"
        lines.append(f"  {row['threshold']:4.2f}  {row['answered']:8d}  {row['coverage']:8.1%}  {accuracy:>8}")
    return "\n".join(lines)
