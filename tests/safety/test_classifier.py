"""The lmforge-trained moderation classifier: learns harmful vs benign requests, generalises to held-out sets."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmforge.errors import DataError
from lmforge.safety.classifier import ClassifierConfig, load_classifier, read_labelled, run

MODERATION = Path(__file__).resolve().parents[2] / "lmforge" / "data" / "moderation"
TASKS = Path(__file__).resolve().parents[2] / "lmforge" / "eval" / "tasks"


def prompts(name):
    return [json.loads(line)["prompt"] for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]


def subset(split: str, every: int, path: Path) -> Path:
    """Every `every`-th record of a shipped split (whole templates stay in their split)."""
    with gzip.open(MODERATION / f"moderation_{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        lines = f.readlines()[::every]
    path.write_text("".join(lines))
    return path


def test_classifier_calibrated_on_validation_serves_at_its_thresholds(trained_run, tmp_path):
    train, val = subset("train", 4, tmp_path / "train.jsonl"), subset("validation", 2, tmp_path / "val.jsonl")
    metrics = run(ClassifierConfig(model=str(trained_run), data=str(train), val_data=str(val), out=str(tmp_path / "clf"),
                                   epochs=4, lr=1e-3, max_len=48, train_base=True, target_fpr=0.05))
    # Calibrated: on validation at most 5% of the safe texts are flagged in any category.
    assert metrics["binary"]["fpr"] <= 0.05 and metrics["target_fpr"] == 0.05
    assert metrics["n"] == len(read_labelled(val)) and metrics["binary"]["recall"] > metrics["binary"]["fpr"]
    saved = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert saved["thresholds"] == {c: m["threshold"] for c, m in metrics["categories"].items()}
    assert len(set(saved["thresholds"].values())) > 1  # per category, not one number
    classifier = load_classifier(tmp_path / "clf")
    assert sorted(classifier.categories) == ["harassment", "hate", "illicit", "self-harm", "sexual", "violence"]
    # The held-out test templates: the classifier separates them better than chance.
    test = read_labelled(subset("test", 2, tmp_path / "test.jsonl"))
    flagged = classifier.flags([t for t, _ in test])
    recall = sum(bool(f) for f, (_, y) in zip(flagged, test, strict=True) if y) / sum(bool(y) for _, y in test)
    fpr = sum(bool(f) for f, (_, y) in zip(flagged, test, strict=True) if not y) / sum(not y for _, y in test)
    assert recall > 1.5 * fpr, (recall, fpr)
    # A serving policy composes it with the rules at its calibrated thresholds unless it sets its own.
    from lmforge.safety.moderation import build

    moderation = build(["rules", {"name": "classifier", "path": str(tmp_path / "clf")}])
    assert {c: moderation.thresholds[c] for c in classifier.categories} == saved["thresholds"]
    assert build([{"name": "classifier", "path": str(tmp_path / "clf")}], {"hate": 0.9}).thresholds["hate"] == 0.9
    assert "pii/email" in moderation.moderate(["Mail me at a.b@example-corp.com"])[0].flagged


def test_bad_labelled_data_names_the_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "ok", "label": "safe"}) + "\n" + json.dumps({"text": "", "label": "hate"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: record needs a non-empty string 'text'"):
        read_labelled(data)
    data.write_text(json.dumps({"text": "a", "label": "safe"}) + "\n" + json.dumps({"text": "b", "label": "safe"}) + "\n")
    with pytest.raises(DataError, match="every record is labelled safe"):
        run(ClassifierConfig(model=str(tmp_path), data=str(data), out=str(tmp_path / "c")))
