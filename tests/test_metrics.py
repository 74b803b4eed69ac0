"""ClassificationMetrics against scikit-learn on fixed predictions."""

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, confusion_matrix, f1_score, precision_recall_fscore_support,
                             precision_score, recall_score, top_k_accuracy_score)

from flowers.metrics import compute_metrics

NUM_CLASSES = 4


@pytest.fixture
def fixed_predictions():
    """60 examples over 4 classes; class 3 occurs but is never predicted."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, NUM_CLASSES, size=60)
    scores = rng.normal(size=(60, NUM_CLASSES)).astype(np.float32)
    scores[:, 3] -= 10.0  # never the arg-max
    labels[:5] = 3
    return scores, labels


def test_matches_scikit_learn_including_a_never_predicted_class(fixed_predictions):
    scores, labels = fixed_predictions
    predicted = scores.argmax(1)
    assert 3 not in predicted and 3 in labels
    m = compute_metrics(scores, labels, NUM_CLASSES, top_k=2)
    classes = list(range(NUM_CLASSES))

    assert m["accuracy"] == pytest.approx(accuracy_score(labels, predicted))
    assert m["top2_accuracy"] == pytest.approx(top_k_accuracy_score(labels, scores, k=2, labels=classes))
    for ours, theirs in [("macro_precision", precision_score), ("macro_recall", recall_score), ("macro_f1", f1_score)]:
        assert m[ours] == pytest.approx(theirs(labels, predicted, average="macro", labels=classes, zero_division=0))
    precision, recall, f1, support = precision_recall_fscore_support(labels, predicted, labels=classes,
                                                                     zero_division=0)
    np.testing.assert_allclose(m["per_class"]["precision"], precision)
    np.testing.assert_allclose(m["per_class"]["recall"], recall)
    np.testing.assert_allclose(m["per_class"]["f1"], f1)
    assert m["per_class"]["support"] == support.tolist()
    assert m["per_class"]["precision"][3] == 0.0 and m["per_class"]["recall"][3] == 0.0
    np.testing.assert_array_equal(m["confusion_matrix"], confusion_matrix(labels, predicted, labels=classes))


def test_confusion_matrix_shape_and_sums(fixed_predictions):
    scores, labels = fixed_predictions
    m = compute_metrics(scores, labels, NUM_CLASSES)
    confusion = np.asarray(m["confusion_matrix"])
    assert confusion.shape == (NUM_CLASSES, NUM_CLASSES)
    assert confusion.sum() == len(labels) == m["num_samples"]
    np.testing.assert_array_equal(confusion.sum(axis=1), np.bincount(labels, minlength=NUM_CLASSES))
    np.testing.assert_array_equal(confusion.sum(axis=0), np.bincount(scores.argmax(1), minlength=NUM_CLASSES))
    assert confusion.trace() == round(m["accuracy"] * len(labels))


def test_top_k_is_configurable_and_capped_at_the_class_count(fixed_predictions):
    scores, labels = fixed_predictions
    top3 = compute_metrics(scores, labels, NUM_CLASSES, top_k=3)
    assert top3["top3_accuracy"] == pytest.approx(top_k_accuracy_score(labels, scores, k=3))
    every = compute_metrics(scores, labels, NUM_CLASSES, top_k=10)
    assert every["top_k"] == NUM_CLASSES and every[f"top{NUM_CLASSES}_accuracy"] == 1.0


def test_mean_loss_from_per_example_losses(fixed_predictions):
    scores, labels = fixed_predictions
    losses = np.linspace(0.0, 2.0, len(labels), dtype=np.float32)
    assert compute_metrics(scores, labels, NUM_CLASSES, losses=losses)["loss"] == pytest.approx(1.0)
