"""Can its confidence be trusted? Calibration of a classifier's probabilities, over arrays.

- expected_calibration_error: top-label ECE over equal-width confidence bins, with the
  per-bin table a reliability diagram draws; bootstrap_ece: its percentile interval;
- fit_temperature: one temperature T (Guo et al., 2017) minimising the NLL of softmax(logits / T);
- heldout_ece: the ECE after scaling estimated honestly (fit on one half, measure on the other,
  both ways, averaged);
- risk_coverage: coverage and accuracy when answers below a confidence are withheld.

Everything takes logits (N, C) or probabilities (N, C) and labels (N,) as numpy arrays; options
are keyword-only. The temperature a checkpoint records (`meta.get("temperature", 1.0)`) is
applied in one place: `scaled_probabilities`.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

DEFAULT_BINS = 15
TEMPERATURE_RANGE = (0.05, 20.0)  # the search interval for T; a fit at either end is reported as such


def _check(probs_or_logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, labels = np.asarray(probs_or_logits), np.asarray(labels)
    if scores.ndim != 2 or labels.ndim != 1 or len(scores) != len(labels):
        raise ValueError(f"expected (N, C) scores and (N,) labels, got {scores.shape} and {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must be in [0, {scores.shape[1]}), got {labels.min()}..{labels.max()}")
    return scores, labels.astype(np.int64)


def scaled_probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) in float64 (N, C): the one place a temperature is applied.

    With --tta flip the scores are the log of the mean of the two views' probabilities (see
    engine.predict_logits), so T sharpens or flattens the averaged probabilities: p_c^(1/T),
    renormalised. Dividing by T > 0 keeps each row's order, so no prediction changes."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    return torch.softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64) / temperature, dim=1).numpy()


def reliability_bins(probs: np.ndarray, labels: np.ndarray, *, bins: int = DEFAULT_BINS) -> dict[str, list]:
    """Per equal-width bin of top-label confidence (bin i: (i/bins, (i+1)/bins], the first one
    closed at 0): image count, mean confidence and accuracy (None for an empty bin)."""
    probs, labels = _check(probs, labels)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    conf_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct.astype(np.float64), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf, accuracy = conf_sum / counts, correct_sum / counts
    return {"edges": np.linspace(0, 1, bins + 1).tolist(), "count": counts.tolist(),
            "confidence": [None if n == 0 else float(c) for n, c in zip(counts, mean_conf)],
            "accuracy": [None if n == 0 else float(a) for n, a in zip(counts, accuracy)]}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, *, bins: int = DEFAULT_BINS) -> float:
    """Top-label ECE: sum over bins of (bin share of the images) x |accuracy - mean confidence|.
    probs: (N, C) rows summing to 1; labels: (N,). 0 for no images."""
    probs, labels = _check(probs, labels)
    if len(labels) == 0:
        return 0.0
    table = reliability_bins(probs, labels, bins=bins)
    return float(sum(n * abs(a - c) for n, a, c in zip(table["count"], table["accuracy"], table["confidence"])
                     if n) / len(labels))


def bootstrap_ece(probs: np.ndarray, labels: np.ndarray, *, bins: int = DEFAULT_BINS, rounds: int = 1000,
                  level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the ECE: images resampled with replacement `rounds` times.
    The ECE of a small set is biased upwards (each bin's |gap| is noisy), so the interval says how
    much of a difference between two ECEs could be sampling alone."""
    probs, labels = _check(probs, labels)
    if len(labels) == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(labels), size=(rounds, len(labels)))
    values = [expected_calibration_error(probs[d], labels[d], bins=bins) for d in draws]
    tail = (1 - level) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return float(low), float(high)


def nll(logits: np.ndarray, labels: np.ndarray, *, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / T)."""
    logits, labels = _check(logits, labels)
    scaled = torch.as_tensor(logits, dtype=torch.float64) / temperature
    return float(torch.nn.functional.cross_entropy(scaled, torch.as_tensor(labels)).item())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, bounds: tuple[float, float] = TEMPERATURE_RANGE,
                    tolerance: float = 1e-4) -> float:
    """The temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al., 2017).

    logits: (N, C) fp32 logits (cast to fp32 first: bf16/fp16 logits are rounded); labels: (N,).
    The NLL is convex in 1/T, so it is unimodal in log T: a golden-section search over log T in
    `bounds` finds the minimum to `tolerance` (relative) in ~60 evaluations, without the step-size
    and line-search choices LBFGS needs, and never leaves the interval. 1.0 for no images."""
    logits, labels = _check(logits, labels)
    if len(labels) == 0:
        return 1.0
    z = torch.as_tensor(logits.astype(np.float32)).double()
    y = torch.as_tensor(labels)

    def loss(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(z / math.exp(log_t), y).item())

    low, high = math.log(bounds[0]), math.log(bounds[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = loss(a), loss(b)
    while high - low > tolerance:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = loss(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = loss(b)
    return float(math.exp((low + high) / 2))


def halves(labels: np.ndarray, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of the indices, stratified by label (each class split in two), seeded."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        cut = min(len(members), max(0, (len(members) - len(first) + len(second)) // 2))  # sizes within one
        first.extend(members[:cut])
        second.extend(members[cut:])
    return np.sort(np.asarray(first, dtype=np.int64)), np.sort(np.asarray(second, dtype=np.int64))


def heldout_ece(logits: np.ndarray, labels: np.ndarray, *, bins: int = DEFAULT_BINS, seed: int = 0) -> dict[str, Any]:
    """The ECE before and after temperature scaling, the "after" measured on images the temperature
    was not fitted on: fit on half A, measure on half B, and the other way round; both averaged.
    Returns {"ece_before", "ece_after", "temperatures": [T_A, T_B], "sizes": [n_A, n_B]}."""
    logits, labels = _check(logits, labels)
    parts = halves(labels, seed=seed)
    before, after, temperatures = [], [], []
    for fit_on, measure_on in (parts, parts[::-1]):
        t = fit_temperature(logits[fit_on], labels[fit_on])
        temperatures.append(t)
        before.append(expected_calibration_error(scaled_probabilities(logits[measure_on]), labels[measure_on],
                                                 bins=bins))
        after.append(expected_calibration_error(scaled_probabilities(logits[measure_on], t), labels[measure_on],
                                                bins=bins))
    return {"ece_before": float(np.mean(before)), "ece_after": float(np.mean(after)), "temperatures": temperatures,
            "sizes": [len(parts[0]), len(parts[1])]}


DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def risk_coverage(probs: np.ndarray, labels: np.ndarray, *,
                  thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> list[dict[str, Any]]:
    """For each threshold P: the answers kept when those with top probability below P are withheld
    ("unknown"). Rows: threshold, answered (count), coverage (answered / N), accuracy of the
    answered (None when none is), risk (1 - accuracy). A threshold of 0 keeps every answer."""
    probs, labels = _check(probs, labels)
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    rows = []
    for p in thresholds:
        kept = confidence >= p
        answered = int(kept.sum())
        accuracy = float(correct[kept].mean()) if answered else None
        rows.append({"threshold": float(p), "answered": answered,
                     "coverage": answered / len(labels) if len(labels) else 0.0,
                     "accuracy": accuracy, "risk": None if accuracy is None else 1 - accuracy})
    return rows


def risk_coverage_curve(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, accuracy) when only the k most confident answers are kept, for k = 1..N: the
    whole curve a threshold moves along."""
    probs, labels = _check(probs, labels)
    order = np.argsort(-probs.max(axis=1), kind="stable")
    correct = (probs.argmax(axis=1) == labels)[order]
    k = np.arange(1, len(labels) + 1)
    return k / max(len(labels), 1), np.cumsum(correct) / k


def fitted_record(logits: np.ndarray, labels: np.ndarray, *, eval_size: int, tta: str, split: str,
                  bins: int = DEFAULT_BINS) -> dict[str, Any]:
    """What a checkpoint's JSON records about its temperature: `temperature` (fitted on all of
    these images) and `calibration` (the evaluation setting it is valid for, the NLL and ECE
    before and after on these images, and the held-out estimate)."""
    fitted = fit_temperature(logits, labels)
    # At the lower bound the NLL was still falling: every image right with a margin, where the
    # NLL-optimal T tends to 0 and would make every answer certain. Keep T = 1 and say so.
    at_lower_bound = fitted <= TEMPERATURE_RANGE[0] * 1.01
    t = 1.0 if at_lower_bound else fitted
    held = heldout_ece(logits, labels, bins=bins)
    record = {"temperature": t, "calibration": {
        "eval_size": int(eval_size), "tta": tta, "fitted_on": split, "images": int(len(labels)),
        "fitted": fitted, "nll_before": nll(logits, labels), "nll_after": nll(logits, labels, temperature=t),
        "ece_before": expected_calibration_error(scaled_probabilities(logits), labels, bins=bins),
        "ece_after_heldout": held["ece_after"], "ece_before_heldout": held["ece_before"]}}
    if at_lower_bound:
        record["calibration"]["warning"] = (
            f"the NLL keeps falling as T goes to 0 (the {len(labels)} images are all classified right with a "
            "margin): no temperature can be fitted on them, T = 1 kept")
    return record


def setting_mismatch(meta: dict, *, eval_size: int, tta: str) -> Optional[str]:
    """One line when the checkpoint's temperature was fitted for another evaluation setting (size,
    TTA) than this one; None when it matches or no temperature was fitted."""
    fitted = meta.get("calibration")
    if "temperature" not in meta or not fitted:
        return None
    if int(fitted.get("eval_size", eval_size)) == eval_size and fitted.get("tta", "none") == tta:
        return None
    return (f"note: the temperature {meta['temperature']:.3f} was fitted for TTA: {fitted.get('tta')}, "
            f"{fitted.get('eval_size')} px; applied to TTA: {tta}, {eval_size} px as well, where it may fit less "
            "well (eval.py --calibrate with this setting fits one for it)")


def summarize(logits: np.ndarray, labels: np.ndarray, *, temperature: float = 1.0, bins: int = DEFAULT_BINS,
              rounds: int = 1000, seed: int = 0, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS) -> dict[str, Any]:
    """Everything eval.py reports about calibration, as plain JSON values: the ECE (with its
    bootstrap interval) of the raw and the temperature-scaled probabilities, the held-out estimate,
    the reliability tables, how many predictions the temperature changed (none, see
    scaled_probabilities), and the risk-coverage rows of the scaled probabilities."""
    logits, labels = _check(logits, labels)
    raw, scaled = scaled_probabilities(logits), scaled_probabilities(logits, temperature)
    return {
        "temperature": float(temperature), "bins": bins, "images": int(len(labels)),
        "ece_uncalibrated": expected_calibration_error(raw, labels, bins=bins),
        "ece_uncalibrated_interval": bootstrap_ece(raw, labels, bins=bins, rounds=rounds, seed=seed),
        "ece": expected_calibration_error(scaled, labels, bins=bins),
        "ece_interval": bootstrap_ece(scaled, labels, bins=bins, rounds=rounds, seed=seed),
        "nll_uncalibrated": nll(logits, labels), "nll": nll(logits, labels, temperature=temperature),
        "heldout": heldout_ece(logits, labels, bins=bins, seed=seed) if len(labels) >= 2 else None,
        "predictions_changed": int((raw.argmax(axis=1) != scaled.argmax(axis=1)).sum()),
        "reliability_uncalibrated": reliability_bins(raw, labels, bins=bins),
        "reliability": reliability_bins(scaled, labels, bins=bins),
        "risk_coverage": risk_coverage(scaled, labels, thresholds=thresholds),
    }


def record_temperature(folder, logits: np.ndarray, labels: np.ndarray, *, eval_size: int, tta: str,
                       split: str) -> dict[str, Any]:
    """Fit the temperature on these outputs and write it atomically into the checkpoint folder's
    checkpoint.json (see fitted_record); returns the new metadata."""
    from flowers.checkpoint import update_meta

    return update_meta(folder, fitted_record(logits, labels, eval_size=eval_size, tta=tta, split=split))
