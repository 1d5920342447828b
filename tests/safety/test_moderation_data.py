"""The moderation data builder: deterministic, split by template, and free of eval-set copies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lmforge.errors import DataError
from lmforge.jsonl import load_jsonl
from lmforge.safety import moderation_data as md


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("moderation")
    md.build(out)
    return out


def records(directory: Path, split: str) -> list[dict]:
    return [r for _, r in load_jsonl(directory / f"moderation_{split}.jsonl.gz")]


def test_the_build_is_byte_for_byte_deterministic_and_the_shipped_files_are_its_output(built, tmp_path):
    md.build(tmp_path)
    manifest = json.loads((built / "manifest.json").read_text())
    for name in manifest["sha256"]:
        assert (tmp_path / name).read_bytes() == (built / name).read_bytes(), name
        assert (md.OUT / name).read_bytes() == (built / name).read_bytes(), f"{name}: rerun scripts/build_moderation_set.py"
    assert json.loads((md.OUT / "manifest.json").read_text()) == manifest


def test_thousands_of_examples_over_every_category_with_hard_negatives_in_every_split(built):
    manifest = json.loads((built / "manifest.json").read_text())
    assert sum(sum(c.values()) for c in manifest["records"].values()) >= 3000
    for split in md.SPLITS:
        counts = manifest["records"][split]
        assert set(counts) == {*md.CATEGORIES, "safe"}, split
        assert counts["safe"] >= sum(counts[c] for c in md.CATEGORIES) * 0.8  # hard negatives and general requests
    hard_negative_templates = {r["template"] for r in records(built, "test") if not r["labels"]}
    for category in md.CATEGORIES:
        assert any(t.startswith(f"{category}/benign/") for t in hard_negative_templates), category


def test_splits_are_by_template_so_test_phrasing_is_unseen(built):
    by_split = {s: records(built, s) for s in md.SPLITS}
    templates = {s: {r["template"] for r in rs} for s, rs in by_split.items()}
    assert not templates["train"] & templates["test"] and not templates["train"] & templates["validation"]
    assert not templates["validation"] & templates["test"]
    texts = {s: {md.normalize(r["text"]) for r in rs} for s, rs in by_split.items()}
    assert not texts["train"] & texts["test"]
    sft = [r for _, r in load_jsonl(built / "safety_sft.jsonl.gz")]
    assert {r["template"] for r in sft} <= templates["train"]
    assert len(sft) == len(by_split["train"])
    refused = [r for r in sft if "/harmful/" in r["template"]]
    assert len(refused) <= 0.5 * len(sft)  # every harmful request has benign neighbours, answered
    answered = [r for r in sft if "/benign/" in r["template"]]
    assert all(r["messages"][1]["content"].startswith("Sure. ") for r in answered)
    assert not any(r["messages"][1]["content"].startswith("Sure") for r in refused)


def test_no_generated_text_copies_an_eval_prompt(built):
    guard = md.EvalGuard(md.eval_prompts())
    assert len(guard.prompts) >= 80  # the safety sets and the other shipped tasks
    for split in md.SPLITS:
        assert not [r["text"] for r in records(built, split) if guard.matches(r["text"])]
    sft = [r for _, r in load_jsonl(built / "safety_sft.jsonl.gz")]
    assert not [r for r in sft if guard.matches(r["messages"][0]["content"])]


def test_a_template_that_paraphrases_an_eval_prompt_is_dropped(tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(md.TEMPLATES, templates)
    eval_prompt = json.loads((md.EVAL_SETS / "safety_harmful.jsonl").read_text().splitlines()[1])["prompt"]
    violence = yaml.safe_load((templates / "violence.yaml").read_text())
    near_copy = eval_prompt.replace("How do I", "how can i").rstrip("?")  # same words, other case and punctuation
    violence["harmful"] += [{"text": eval_prompt}, {"text": near_copy}]
    (templates / "violence.yaml").write_text(yaml.safe_dump(violence))
    manifest = md.build(tmp_path / "out", templates)
    baseline = json.loads((md.OUT / "manifest.json").read_text())
    assert manifest["dropped"].get("eval_copy", 0) == baseline["dropped"].get("eval_copy", 0) + 2
    texts = {md.normalize(r["text"]) for s in md.SPLITS for r in records(tmp_path / "out", s)}
    assert md.normalize(eval_prompt) not in texts and md.normalize(near_copy) not in texts


def test_bad_templates_name_the_file_and_item(tmp_path):
    templates = tmp_path / "templates"
    shutil.copytree(md.TEMPLATES, templates)
    hate = yaml.safe_load((templates / "hate.yaml").read_text())
    hate["benign"][2] = {"intent": "read about {nosuchslot}", "answer": "ok"}
    (templates / "hate.yaml").write_text(yaml.safe_dump(hate))
    with pytest.raises(DataError, match=r"hate/benign/002: slot \{nosuchslot\} is not defined"):
        md.load_templates(templates)
    hate["benign"][2] = {"intent": "x", "text": "y", "answer": "z"}
    (templates / "hate.yaml").write_text(yaml.safe_dump(hate))
    with pytest.raises(DataError, match=r"hate.yaml: benign\[2\]: an item is a mapping with exactly one"):
        md.load_templates(templates)
    hate["benign"][2] = {"text": "What is a stereotype?"}
    (templates / "hate.yaml").write_text(yaml.safe_dump(hate))
    with pytest.raises(DataError, match=r"benign\[2\]: a benign item needs an 'answer'"):
        md.load_templates(templates)
