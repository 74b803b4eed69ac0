"""Calibration analysis over arrays: ECE, its bootstrap interval, temperature fitting, the held-out
estimate, risk-coverage. No images needed."""

import numpy as np
import pytest

from flowers import calibration as cal


def synthetic(temperature: float, n: int = 20000, classes: int = 5, seed: int = 0):
    """Logits a model outputs, and labels drawn from softmax(logits / temperature): a model whose
    calibrating temperature is exactly `temperature`."""
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, classes)) * 3).astype(np.float32)
    truth = cal.scaled_probabilities(logits, temperature)
    labels = (rng.random(n)[:, None] > truth.cumsum(axis=1)).sum(axis=1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.7, 1.0, 2.5])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_with(true_t):
    logits, labels = synthetic(true_t)
    assert cal.fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.04)


def test_heldout_ece_falls_after_scaling_an_overconfident_model():
    logits, labels = synthetic(2.5, n=4000)  # the model's logits are 2.5x too large: overconfident
    held = cal.heldout_ece(logits, labels)
    assert held["ece_before"] > 0.1
    assert held["ece_after"] < held["ece_before"] / 3
    assert all(t == pytest.approx(2.5, rel=0.15) for t in held["temperatures"])
    assert abs(held["sizes"][0] - held["sizes"][1]) <= 1 and sum(held["sizes"]) == 4000


def test_halves_are_disjoint_stratified_and_cover_everything():
    labels = np.array([0] * 7 + [1] * 4 + [2] * 5)
    a, b = cal.halves(labels)
    assert sorted(np.concatenate([a, b]).tolist()) == list(range(len(labels)))
    assert abs(len(a) - len(b)) <= 1
    for c in range(3):
        assert abs((labels[a] == c).sum() - (labels[b] == c).sum()) <= 1


@pytest.mark.parametrize("t", [0.3, 1.0, 1.7, 9.0])
def test_scaling_never_changes_a_prediction(t):
    logits, _ = synthetic(1.0, n=2000)
    before = cal.scaled_probabilities(logits).argmax(axis=1)
    assert np.array_equal(cal.scaled_probabilities(logits, t).argmax(axis=1), before)
    assert np.array_equal(logits.argmax(axis=1), before)


def test_ece_and_reliability_bins_match_a_hand_computation():
    # confidences 0.9, 0.9, 0.6, 0.55 (3 classes); bins of width 0.25: (0.5, 0.75] and (0.75, 1]
    probs = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.6, 0.3, 0.1], [0.2, 0.25, 0.55]])
    labels = np.array([0, 0, 0, 2])  # right, wrong, right, right
    table = cal.reliability_bins(probs, labels, bins=4)
    assert table["count"] == [0, 0, 2, 2]
    assert table["accuracy"][2:] == [1.0, 0.5] and table["accuracy"][0] is None
    assert table["confidence"][2] == pytest.approx(0.575)
    # 2/4 * |1 - 0.575| + 2/4 * |0.5 - 0.9|
    assert cal.expected_calibration_error(probs, labels, bins=4) == pytest.approx(0.5 * 0.425 + 0.5 * 0.4)
    # a confidence exactly on an edge goes to the bin below: (0.5, 0.75] holds 0.75
    edge = np.array([[0.75, 0.25]])
    assert cal.reliability_bins(edge, np.array([0]), bins=4)["count"] == [0, 0, 1, 0]


def test_bootstrap_interval_contains_the_ece_and_narrows_with_more_images():
    logits, labels = synthetic(2.0, n=4000)
    probs = cal.scaled_probabilities(logits)
    ece = cal.expected_calibration_error(probs, labels)
    low, high = cal.bootstrap_ece(probs, labels, rounds=200)
    assert low <= ece <= high
    small_low, small_high = cal.bootstrap_ece(probs[:300], labels[:300], rounds=200)
    assert small_high - small_low > high - low


def test_risk_coverage_matches_a_hand_computation():
    probs = np.array([[0.95, 0.05], [0.85, 0.15], [0.3, 0.7], [0.45, 0.55], [0.6, 0.4]])
    labels = np.array([0, 1, 1, 0, 0])  # right, wrong, right, wrong, right
    rows = cal.risk_coverage(probs, labels, thresholds=(0.0, 0.6, 0.8, 0.9, 0.99))
    assert [r["answered"] for r in rows] == [5, 4, 2, 1, 0]
    assert [r["coverage"] for r in rows] == [1.0, 0.8, 0.4, 0.2, 0.0]
    assert [r["accuracy"] for r in rows] == [pytest.approx(3 / 5), pytest.approx(3 / 4), 0.5, 1.0, None]
    coverage, accuracy = cal.risk_coverage_curve(probs, labels)
    assert coverage.tolist() == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert accuracy.tolist() == pytest.approx([1, 0.5, 2 / 3, 3 / 4, 3 / 5])


def test_fitted_record_names_its_setting_and_a_mismatch_says_so():
    logits, labels = synthetic(1.5, n=1000)
    record = cal.fitted_record(logits, labels, eval_size=64, tta="none", split="val")
    assert record["calibration"]["nll_after"] <= record["calibration"]["nll_before"]
    meta = {**record}
    assert cal.setting_mismatch(meta, eval_size=64, tta="none") is None
    assert "fitted for TTA: none, 64 px" in cal.setting_mismatch(meta, eval_size=64, tta="flip")
    assert cal.setting_mismatch({}, eval_size=96, tta="flip") is None


def test_a_perfectly_separated_set_keeps_t_1_and_says_why():
    logits = np.eye(4, dtype=np.float32)[[0, 1, 2, 3] * 10] * 5  # every image right, by a margin
    labels = np.array([0, 1, 2, 3] * 10)
    assert cal.fit_temperature(logits, labels) == pytest.approx(cal.TEMPERATURE_RANGE[0], rel=0.01)
    record = cal.fitted_record(logits, labels, eval_size=64, tta="none", split="val")
    assert record["temperature"] == 1.0 and "no temperature can be fitted" in record["calibration"]["warning"]
