"""Thresholds calibrated for a target false-positive rate, the metrics, and the TF-IDF baseline."""

from __future__ import annotations

import math

import pytest

from lmforge.jsonl import load_jsonl
from lmforge.safety import calibration
from lmforge.safety.moderation_data import CATEGORIES, OUT
from lmforge.safety.tfidf import TfidfClassifier


def one(safe, harmful, target, floor=0.0):
    scores = [{"a": x} for x in [*safe, *harmful]]
    return calibration.calibrate(scores, [[]] * len(safe) + [["a"]] * len(harmful), ["a"], target, floor)["a"]


def test_calibrate_admits_at_most_the_target_share_of_safe_texts():
    safe = [i / 100 for i in range(100)]  # 0.00 .. 0.99
    harmful = [i / 100 + 0.005 for i in range(100)]  # one just above every safe text
    t = one(safe, harmful, 0.05)
    assert sum(x >= t for x in safe) == 5 and t == math.nextafter(0.94, math.inf)
    assert one(safe, harmful, 0.0) == math.nextafter(0.99, math.inf)  # no safe text may pass
    # Ties move together: three safe texts at 0.9 cannot be split, so none passes.
    assert one([0.9, 0.9, 0.9, 0.1], [0.5], 0.5) == math.nextafter(0.9, math.inf)
    assert one([0.01, 0.02], [0.5], 0.0, floor=0.05) == 0.05  # never below the floor
    # Spending the budget must catch something: with nothing to gain, no safe text is flagged.
    assert one(safe, [0.999], 0.05) == math.nextafter(0.99, math.inf)


def test_calibrate_bounds_the_share_of_safe_texts_flagged_in_any_category():
    scores = [{"a": 0.9, "b": 0.2}, {"a": 0.6, "b": 0.8}, {"a": 0.3, "b": 0.7}, {"a": 0.1, "b": 0.1}, {"a": 0.7, "b": 0.1}]
    labels = [["a"], ["b"], [], [], ["a"]]
    thresholds = calibration.calibrate(scores, labels, ["a", "b"], target_fpr=0.0, floor=0.0)
    assert thresholds == {"a": math.nextafter(0.3, math.inf), "b": math.nextafter(0.7, math.inf)}  # above the safe texts
    report = calibration.report(scores, labels, thresholds)
    assert report["categories"]["a"] == {"precision": pytest.approx(2 / 3), "recall": 1.0, "f1": pytest.approx(0.8), "fpr": pytest.approx(1 / 3),
                                         "support": 2, "threshold": thresholds["a"]}  # one-vs-rest: b's text scores a 0.6
    assert report["categories"]["b"]["recall"] == 1.0 and report["binary"]["fpr"] == 0.0
    loose = calibration.report(scores, labels, {"a": 0.5, "b": 0.5})
    assert loose["binary"] == {"precision": 0.75, "recall": 1.0, "f1": pytest.approx(6 / 7), "fpr": 0.5, "support": 3}
    with pytest.raises(ValueError, match="target_fpr"):
        calibration.calibrate(scores, labels, ["a"], target_fpr=1.0)


def test_calibrate_spends_the_budget_where_it_catches_the_most_harm():
    # 100 safe texts, a budget of 6. Catching a's harmful texts (0.85) means flagging the 10
    # safe texts that score a higher (0.90..): over budget. Catching b's second group (0.4)
    # costs the 6 safe texts that score b above it: within budget.
    safe = [{"a": 0.9 + i / 1000 if i < 10 else 0.1, "b": 0.5 if i == 50 else 0.45 - i / 1000 if 60 <= i < 65 else 0.0}
            for i in range(100)]
    harmful = [{"a": 0.85, "b": 0.0}] * 10 + [{"b": 0.6, "a": 0.0}] * 10 + [{"b": 0.4, "a": 0.0}] * 10
    labels = [[]] * 100 + [["a"]] * 10 + [["b"]] * 20
    thresholds = calibration.calibrate([*safe, *harmful], labels, ["a", "b"], target_fpr=0.06, floor=0.0)
    assert thresholds["a"] > 0.909  # a cannot afford its harmful texts: it flags no safe one
    assert thresholds["b"] <= 0.4  # b spends the budget on its second group
    flagged = sum(any(s[c] >= thresholds[c] for c in "ab") for s in safe)
    assert flagged <= 6
    report = calibration.report([*safe, *harmful], labels, thresholds)
    assert report["categories"]["b"]["recall"] == 1.0 and report["binary"]["fpr"] <= 0.06


def split(name):
    rows = [r for _, r in load_jsonl(OUT / f"moderation_{name}.jsonl.gz")]
    return [r["text"] for r in rows], [r["labels"] for r in rows]


def test_tfidf_baseline_calibrated_on_validation_keeps_near_its_false_positive_rate_on_unseen_templates():
    train, val, test = split("train"), split("validation"), split("test")
    model = TfidfClassifier(CATEGORIES).fit(*train)
    val_scores, test_scores = model.scores(val[0]), model.scores(test[0])
    thresholds = calibration.calibrate(val_scores, val[1], CATEGORIES, target_fpr=0.05)
    assert calibration.report(val_scores, val[1], thresholds)["binary"]["fpr"] <= 0.05
    calibrated = calibration.report(test_scores, test[1], thresholds)["binary"]
    naive = calibration.report(test_scores, test[1], dict.fromkeys(CATEGORIES, 0.1))["binary"]
    # Unseen templates move the rate (whole templates pass or fail together), but not far,
    # and far less than an uncalibrated threshold.
    assert calibrated["fpr"] <= 0.15 and calibrated["recall"] >= 0.3, calibrated
    assert naive["fpr"] >= calibrated["fpr"] + 0.15, (naive, calibrated)
