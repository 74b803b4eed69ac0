"""Classification metrics as an `evaluate.Metric` defined here, so they work offline
(`evaluate.load("accuracy")` needs the Hub). One implementation for training and eval.py."""

from __future__ import annotations

from typing import Optional

import datasets
import evaluate
import numpy as np

DEFAULT_TOP_K = 2


class ClassificationMetrics(evaluate.Metric):
    """Accuracy, top-k accuracy, macro and per-class precision/recall/F1, confusion matrix.

    predictions: per-example class scores (logits or probabilities); references: class ids.
    A class that is never predicted gets precision 0 (as scikit-learn with zero_division=0).
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Multi-class classification metrics computed from class scores.",
            citation="",
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float32")),
                "references": datasets.Value("int64"),
            }),
        )

    def _compute(self, predictions, references, num_classes: Optional[int] = None,
                 top_k: int = DEFAULT_TOP_K) -> dict:
        scores = np.asarray(predictions, dtype=np.float32)
        labels = np.asarray(references, dtype=np.int64)
        n = num_classes or scores.shape[1]
        predicted = scores.argmax(axis=1)
        confusion = np.zeros((n, n), dtype=np.int64)  # rows: true class, columns: predicted class
        np.add.at(confusion, (labels, predicted), 1)
        tp = np.diag(confusion).astype(np.float64)
        support = confusion.sum(axis=1)
        predicted_count = confusion.sum(axis=0)
        precision = np.divide(tp, predicted_count, out=np.zeros(n), where=predicted_count > 0)
        recall = np.divide(tp, support, out=np.zeros(n), where=support > 0)
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros(n), where=denom > 0)
        k = min(top_k, n)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return {
            "accuracy": float((predicted == labels).mean()) if len(labels) else 0.0,
            "top_k": k,
            f"top{k}_accuracy": float((top == labels[:, None]).any(axis=1).mean()) if len(labels) else 0.0,
            "macro_precision": float(precision.mean()),
            "macro_recall": float(recall.mean()),
            "macro_f1": float(f1.mean()),
            "per_class": {"precision": precision.tolist(), "recall": recall.tolist(),
                          "f1": f1.tolist(), "support": support.tolist()},
            "confusion_matrix": confusion.tolist(),
            "num_samples": int(len(labels)),
        }


def compute_metrics(scores: np.ndarray, labels: np.ndarray, num_classes: int, top_k: int = DEFAULT_TOP_K,
                    losses: Optional[np.ndarray] = None) -> dict:
    """All metrics for one evaluation pass; `losses` (per-example cross-entropy) adds the mean `loss`."""
    metric = ClassificationMetrics(keep_in_memory=True)
    result = metric.compute(predictions=scores, references=labels, num_classes=num_classes, top_k=top_k)
    if losses is not None:
        result["loss"] = float(np.mean(losses, dtype=np.float64)) if len(losses) else float("nan")
    return result
