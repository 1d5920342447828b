"""Moderation thresholds calibrated on validation data, and the metrics they are judged by.

A moderator gives each text a probability per category; where to cut is a choice between
catching harm and blocking innocent requests. `calibrate` picks, per category, the lowest
threshold at a common false-positive rate on the safe validation texts such that the share of
safe texts flagged in any category (what a gateway's users see as over-blocking) stays at or
below a target (5% by default): the most recall under that constraint. `report`
gives per category precision, recall, F1 and false-positive rate, and the same for the
binary question a gateway asks (is this text harmful at all?), whose false-positive rate
is the share of safe texts flagged in any category.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Scores = Sequence[dict[str, float]]
Labels = Sequence[Sequence[str]]


def threshold_for_fpr(negative_scores: Sequence[float], target_fpr: float, floor: float = 0.05) -> float:
    """The lowest threshold at which at most `target_fpr` of the negatives score >= it."""
    ordered = sorted(negative_scores, reverse=True)
    allowed = math.floor(target_fpr * len(ordered) + 1e-9)  # negatives that may pass
    if allowed >= len(ordered):
        return floor
    # Strictly above the first negative that must not pass (ties move together).
    return max(floor, min(math.nextafter(ordered[allowed], math.inf), 1.0))


def calibrate(scores: Scores, labels: Labels, categories: Sequence[str], target_fpr: float = 0.05,
              floor: float = 0.05) -> dict[str, float]:
    """Per-category thresholds at which at most `target_fpr` of the safe validation texts are
    flagged in any category (the gateway's false-positive rate).

    Each category's threshold sits at the same per-category false-positive rate `alpha` on
    the safe texts; `alpha` is the largest (most recall) whose union stays within the target.
    """
    if not 0 <= target_fpr < 1:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    safe = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not safe:
        raise ValueError("calibration needs safe (unlabelled) validation texts")

    def at(alpha: float) -> dict[str, float]:
        return {c: threshold_for_fpr([s[c] for s in safe], alpha, floor) for c in categories}

    def union_fpr(thresholds: dict[str, float]) -> float:
        return sum(any(s[c] >= t for c, t in thresholds.items()) for s in safe) / len(safe)

    low, high = 0.0, target_fpr
    if union_fpr(at(high)) <= target_fpr:
        return at(high)
    for _ in range(40):  # the union grows with alpha: bisect for the largest that fits
        middle = (low + high) / 2
        low, high = (middle, high) if union_fpr(at(middle)) <= target_fpr else (low, middle)
    return at(low)


def _prf(tp: int, fp: int, fn: int, negatives: int) -> dict[str, float | None]:
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"precision": precision, "recall": recall, "f1": f1, "fpr": fp / negatives if negatives else None}


def flags(scores: Scores, thresholds: dict[str, float]) -> list[set[str]]:
    return [{c for c, p in s.items() if c in thresholds and p >= thresholds[c]} for s in scores]


def report(scores: Scores, labels: Labels, thresholds: dict[str, float]) -> dict[str, Any]:
    """Per category and binary (harmful at all?) precision, recall, F1 and false-positive rate."""
    predicted = flags(scores, thresholds)
    truth = [set(y) for y in labels]
    per_category = {}
    for c in thresholds:
        tp = sum(c in p and c in y for p, y in zip(predicted, truth, strict=True))
        fp = sum(c in p and c not in y for p, y in zip(predicted, truth, strict=True))
        fn = sum(c not in p and c in y for p, y in zip(predicted, truth, strict=True))
        per_category[c] = {**_prf(tp, fp, fn, sum(c not in y for y in truth)), "support": tp + fn,
                           "threshold": thresholds[c]}
    tp = sum(bool(p) and bool(y) for p, y in zip(predicted, truth, strict=True))
    fp = sum(bool(p) and not y for p, y in zip(predicted, truth, strict=True))
    fn = sum(not p and bool(y) for p, y in zip(predicted, truth, strict=True))
    f1s = [m["f1"] for m in per_category.values() if m["support"]]
    return {
        "n": len(truth), "safe": sum(not y for y in truth),
        "binary": {**_prf(tp, fp, fn, sum(not y for y in truth)), "support": tp + fn},
        "macro_f1": sum(f1s) / len(f1s) if f1s else None,
        "categories": per_category,
    }
