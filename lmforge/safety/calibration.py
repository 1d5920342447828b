"""Moderation thresholds calibrated on validation data, and the metrics they are judged by.

A moderator gives each text a probability per category; where to cut is a choice between
catching harm and blocking innocent requests. `calibrate` picks per-category thresholds on
validation data so that the share of safe texts flagged in any category (what a gateway's
users see as over-blocking) stays at or below a target (5% by default), spending that budget
where it catches the most harmful texts. `report`
gives per category precision, recall, F1 and false-positive rate, and the same for the
binary question a gateway asks (is this text harmful at all?), whose false-positive rate
is the share of safe texts flagged in any category.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

Scores = Sequence[dict[str, float]]
Labels = Sequence[Sequence[str]]


def _above(score: float) -> float:
    """The smallest threshold a text with `score` does not reach (scores pass at >=)."""
    return math.nextafter(score, math.inf)


def calibrate(scores: Scores, labels: Labels, categories: Sequence[str], target_fpr: float = 0.05,
              floor: float = 0.05) -> dict[str, float]:
    """Per-category thresholds that flag the most harmful validation texts while at most
    `target_fpr` of the safe ones are flagged in any category (the gateway's false-positive rate).

    Every category starts just above its highest-scoring safe text (no false positive). The
    budget of safe texts that may be flagged is then spent greedily: at each step the category
    and depth whose lowering gains the most harmful texts per newly flagged safe text (a safe
    text another category already flags costs nothing) takes it, until nothing that fits the
    budget gains anything. Ties move together; no threshold goes below `floor`.
    """
    if not 0 <= target_fpr < 1:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    safe = [i for i, y in enumerate(labels) if not y]
    if not safe:
        raise ValueError("calibration needs safe (unlabelled) validation texts")
    budget = math.floor(target_fpr * len(safe) + 1e-9)
    ranked = {c: sorted(((scores[i][c], i) for i in safe), reverse=True) for c in categories}
    positives = {c: sorted(s[c] for s, y in zip(scores, labels, strict=True) if c in y) for c in categories}
    thresholds = {c: max(floor, _above(ranked[c][0][0])) for c in categories}
    admitted = dict.fromkeys(categories, 0)  # how many of the category's ranked safe texts pass
    flagged: set[int] = set()
    while True:
        best = None
        for c in categories:
            move = _best_move(ranked[c], positives[c], admitted[c], thresholds[c], flagged, budget, floor)
            if move is not None and (best is None or move[0] > best[0]):
                best = (*move, c)
        if best is None:
            return thresholds
        _, depth, threshold, c = best
        flagged.update(i for _, i in ranked[c][admitted[c]:depth])
        admitted[c], thresholds[c] = depth, threshold


def _best_move(ranked, positives, start, current, flagged, budget, floor):
    """((gain per cost, gain), depth, threshold) of this category's best lowering within the budget."""
    best, cost, j = None, 0, start
    while j < len(ranked):
        level = ranked[j][0]
        while j < len(ranked) and ranked[j][0] == level:  # ties pass together
            cost += ranked[j][1] not in flagged
            j += 1
        if len(flagged) + cost > budget:
            break
        threshold = max(floor, _above(ranked[j][0]) if j < len(ranked) else floor)
        gain = bisect.bisect_left(positives, current) - bisect.bisect_left(positives, threshold)
        if gain > 0:
            key = (gain / cost if cost else math.inf, gain)
            if best is None or key > best[0]:
                best = (key, j, threshold)
    return best


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
