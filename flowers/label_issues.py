"""Likely label errors, ranked, from out-of-fold probabilities (confident learning, with cleanlab).

    python -m flowers.label_issues CROSSVAL_DIR    # every image, from flowers.crossval's oof.csv
    python -m flowers.label_issues RUN_DIR         # a plain run: its held-out images only

cleanlab's `filter.find_label_issues` picks the images whose given label the out-of-fold
probabilities contradict, and `rank.get_label_quality_scores` scores every image (0-1, lower: the
label is more likely wrong). Writes into the folder: label_issues.csv (path relative to the data
folder, given_label, suggested_label, score; most likely wrong first) and label_issues.png (the
first --show of them, like eval.py's mistakes.png). Then drop or fix them and train again:
`train.py --exclude label_issues.csv` or `--relabel label_issues.csv` (after reviewing it).
Needs the label-issues extra: pip install 'flowers[label-issues]'.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from flowers import checkpoint
from flowers.cli import run
from flowers.config import LabelIssuesConfig, parse
from flowers.errors import UserError

CSV_FILE = "label_issues.csv"
GALLERY_FILE = "label_issues.png"
INSTALL = "pip install 'flowers[label-issues]'"


def rank_label_issues(labels: np.ndarray, pred_probs: np.ndarray, *,
                      filter_by: str = "prune_by_noise_rate") -> tuple[np.ndarray, np.ndarray]:
    """(indices of the likely label errors, lowest label-quality score first; every image's score).

    labels: (n,) class ids; pred_probs: (n, classes), out-of-sample probabilities (rows sum to 1),
    every class given to at least one image."""
    labels, pred_probs = np.asarray(labels), np.asarray(pred_probs, dtype=np.float64)
    if pred_probs.ndim != 2 or labels.shape != (len(pred_probs),):
        raise UserError(f"label issues need labels (n,) and probabilities (n, classes); got {labels.shape} and "
                        f"{pred_probs.shape}")
    missing = sorted(set(range(pred_probs.shape[1])) - set(labels.tolist()))
    if missing:
        raise UserError(f"class id(s) {missing} label no image: every class needs images to judge labels")
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise UserError(f"finding label issues needs cleanlab: {INSTALL}") from None
    issues = find_label_issues(labels, pred_probs, filter_by=filter_by, n_jobs=1)
    scores = get_label_quality_scores(labels, pred_probs)
    found = np.flatnonzero(issues)
    return found[np.argsort(scores[found], kind="stable")], scores


def _held_out_predictions(folder: Path, workers: int) -> dict[str, Any]:
    """A plain run's last/ weights on its validation images (crossval.predict_fold)."""
    from flowers.crossval import predict_fold
    return predict_fold(folder, workers)


def load_probabilities(folder: Path, workers: int) -> tuple[list[str], np.ndarray, np.ndarray, list[str], str, bool]:
    """(paths, labels, probabilities, class names, data folder, every image judged?) of a
    cross-validation folder (oof.csv) or of a plain run (its held-out images)."""
    from flowers.crossval import OOF_FILE, SUMMARY_FILE, read_oof
    if (folder / OOF_FILE).is_file():
        paths, labels, probs, names = read_oof(folder / OOF_FILE)
        source = json.loads((folder / SUMMARY_FILE).read_text())["source"]
        return paths, labels, probs, names, source, True
    if (folder / "last" / checkpoint.META_FILE).is_file():
        held_out = _held_out_predictions(folder, workers)
        return (held_out["paths"], np.asarray(held_out["labels"]), np.asarray(held_out["probabilities"]),
                held_out["class_names"], held_out["source"], False)
    raise UserError(f"{folder}: neither a finished cross-validation (no oof.csv: python -m flowers.crossval) nor a "
                    "run folder with last/")


def write_csv(rows: list[list[Any]]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "given_label", "suggested_label", "score"])
    writer.writerows(rows)
    return text.getvalue().encode()


def plot_gallery(rows: list[list[Any]], source: str, title: str, path: Path) -> None:
    from flowers import report
    from flowers.imagefiles import load_rgb
    images, captions = [], []
    for rel, given, suggested, score in rows:
        image = load_rgb({"path": str(Path(source) / rel), "bytes": None})
        image.thumbnail((320, 320))
        images.append(image)
        captions.append(f"given: {given}\nsuggested: {suggested} (score {float(score):.3f})\n{Path(rel).name}")
    report.plot_mistakes(images, captions, title, path, empty="no likely label errors")


def label_issues(cfg: LabelIssuesConfig) -> list[list[Any]]:
    """Rank the folder's likely label errors; write label_issues.csv and .png there; the rows."""
    folder = Path(cfg.folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{cfg.folder}: no such folder")
    paths, labels, probs, names, source, every_image = load_probabilities(folder, cfg.workers)
    found, scores = rank_label_issues(labels, probs, filter_by=cfg.filter_by)
    rows = [[paths[i], names[labels[i]], names[int(probs[i].argmax())], f"{scores[i]:.6f}"] for i in found]
    checkpoint.write_file_atomic(folder / CSV_FILE, write_csv(rows))
    judged = "" if every_image else " held-out"
    plot_gallery(rows[:cfg.show], source, f"likely label errors: {len(rows)} of {len(paths)}{judged} images "
                 f"(lowest label-quality score first)", folder / GALLERY_FILE)
    print(f"{len(rows)} of {len(paths)}{judged} images have a likely label error (cleanlab, filter_by "
          f"{cfg.filter_by}); most likely first:")
    for row in rows[:10]:
        print(f"  {row[0]}: given {row[1]}, suggested {row[2]} (score {float(row[3]):.3f})")
    if not every_image:
        print(f"note: {folder} is a single run: only its {len(paths)} held-out images were judged; the training "
              "images need out-of-fold probabilities: python -m flowers.crossval --folds 5 [train.py flags]")
    print(f"written: {folder / CSV_FILE}, {folder / GALLERY_FILE}. To retrain without them: train.py --exclude "
          f"{folder / CSV_FILE} (or --relabel it, after review)")
    return rows


def main() -> None:
    label_issues(parse(LabelIssuesConfig, description=__doc__))


if __name__ == "__main__":
    run(main)
