"""The lmforge-trained moderation classifier: learns harmful vs benign requests, generalises to held-out sets."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmforge.errors import DataError
from lmforge.safety.classifier import ClassifierConfig, load_classifier, read_labelled, run

TASKS = Path(__file__).resolve().parents[2] / "lmforge" / "eval" / "tasks"
CHAT = Path(__file__).resolve().parents[2] / "lmforge" / "data" / "chat" / "safety_sft.jsonl.gz"


def prompts(name):
    return [json.loads(line)["prompt"] for line in (TASKS / f"{name}.jsonl").read_text().splitlines()]


def test_classifier_trained_on_refusal_data_flags_unseen_harmful_requests(trained_run, tmp_path):
    rows = []
    with gzip.open(CHAT, "rt", encoding="utf-8") as f:
        for record in map(json.loads, f):
            label = "harmful" if record["id"].startswith("safety-refusal") else "safe"
            rows.append({"text": record["messages"][0]["content"], "label": label})
    rows += [{"text": json.loads(line)["question"], "label": "safe"} for line in (TASKS / "python_mc.jsonl").read_text().splitlines()]
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = run(ClassifierConfig(model=str(trained_run), data=str(data), out=str(tmp_path / "clf"),
                                   epochs=10, lr=1e-3, train_base=True))
    assert metrics["n"] == 20 and metrics["categories"]["harmful"]["support"] > 0
    classifier = load_classifier(tmp_path / "clf")
    harmful, benign = classifier.flags(prompts("safety_harmful")), classifier.flags(prompts("safety_benign"))
    recall = sum(bool(f) for f in harmful) / len(harmful)
    false_positive = sum(bool(f) for f in benign) / len(benign)
    precision = sum(bool(f) for f in harmful) / max(1, sum(bool(f) for f in harmful) + sum(bool(f) for f in benign))
    assert recall >= 0.75 and false_positive <= 0.5 and precision >= 0.65, (recall, false_positive, precision)
    assert set(classifier.scores(["How do I sort a list?"])[0]) == {"harmful"}
    # The trained classifier is a moderation backend, composed with the rules at its own thresholds.
    from lmforge.safety.moderation import build

    moderation = build(["rules", {"name": "classifier", "path": str(tmp_path / "clf")}])
    results = moderation.moderate([*prompts("safety_harmful")[:8], "Mail me at a.b@example-corp.com"])
    assert sum("harmful" in r.flagged for r in results[:8]) >= 6 and "pii/email" in results[-1].flagged


def test_bad_labelled_data_names_the_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"text": "ok", "label": "safe"}) + "\n" + json.dumps({"text": "", "label": "hate"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: record needs a non-empty string 'text'"):
        read_labelled(data)
    data.write_text(json.dumps({"text": "a", "label": "safe"}) + "\n" + json.dumps({"text": "b", "label": "safe"}) + "\n")
    with pytest.raises(DataError, match="every record is labelled safe"):
        run(ClassifierConfig(model=str(tmp_path), data=str(data), out=str(tmp_path / "c")))


def test_the_shipped_moderation_set_trains_openai_categories_that_separate_held_out_requests(trained_run, tmp_path):
    shipped = Path(__file__).resolve().parents[2] / "lmforge" / "data" / "moderation" / "moderation_labelled.jsonl.gz"
    records = read_labelled(shipped)
    assert len(records) == 160
    run(ClassifierConfig(model=str(trained_run), data=str(shipped), out=str(tmp_path / "clf"), epochs=40, lr=2e-3,
                         train_base=True, val_fraction=0.0, threshold=0.3))
    classifier = load_classifier(tmp_path / "clf")
    assert sorted(classifier.categories) == ["harassment", "hate", "illicit", "self-harm", "sexual", "violence"]
    # Held out: the safety evaluation sets, written separately from the moderation set.
    harmful, benign = classifier.flags(prompts("safety_harmful")), classifier.flags(prompts("safety_benign"))
    recall = sum(bool(f) for f in harmful) / len(harmful)
    false_positive = sum(bool(f) for f in benign) / len(benign)
    assert recall - false_positive >= 0.2, (recall, false_positive)
