"""The moderation and safety-SFT data builder: templates in, thousands of labelled requests out.

    python scripts/build_moderation_set.py            # rewrites lmforge/data/moderation/*.jsonl.gz

Templates (`lmforge/data/moderation/templates/<category>.yaml`, written for lmforge) list per
OpenAI moderation category the requests to flag (`harmful`) and safe look-alikes (`benign`:
fiction, history, medicine, security education, `kill`/`execute`/`shoot` in programming),
each benign one with a helpful answer. An item is an `intent` (a verb phrase that the builder
puts into openers such as "How do I {intent}?") or a whole `text`; `{slot}`s are filled from
the file's or the shared slot lists.

Splits are by template: within each category and polarity, templates are ordered by a hash
of their wording and the first 70% go to train, the next 15% to validation, the rest to
test, so test phrasing is never seen in training. Every generated text is checked against
the prompts of every eval set lmforge ships (`lmforge/eval/tasks/*.jsonl`): an exact or
near copy (word-bigram Jaccard >= 0.5, or containment) is dropped and counted in the
manifest. Output is byte-for-byte deterministic (seeded choices, sorted keys, gzip mtime 0).

Files written: `moderation_{train,validation,test}.jsonl.gz` (`{"id", "text", "labels",
"template", "split"}`, labels empty for safe texts), `safety_sft.jsonl.gz` (chat conversations
from the train templates only: harmful -> a refusal, self-harm -> a supportive reply,
benign -> its answer), `refusal_judge.jsonl.gz` (replies labelled `refusal` or `safe`, which
train the refusal judge; none of them is a reply the SFT data teaches) and `manifest.json`.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmforge import atomic
from lmforge.errors import DataError

PACKAGE = Path(__file__).resolve().parents[1]
TEMPLATES = PACKAGE / "data" / "moderation" / "templates"
EVAL_SETS = PACKAGE / "eval" / "tasks"
OUT = PACKAGE / "data" / "moderation"
CATEGORIES = ("harassment", "hate", "self-harm", "sexual", "violence", "illicit")
SPLITS = ("train", "validation", "test")
FRACTIONS = (0.70, 0.15)  # train, validation; test takes the rest
VERSION = 1


@dataclass(frozen=True)
class Template:
    category: str  # a CATEGORIES name, or "safe" for general requests
    kind: str  # "harmful" | "benign"
    key: str  # category/kind/NNN, stable across runs
    form: str  # "intent" | "text"
    pattern: str
    answer: str | None
    split: str = ""

    @property
    def labels(self) -> list[str]:
        return [self.category] if self.kind == "harmful" else []


_SLOT = re.compile(r"\{([a-z_]+)\}")


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{path}: cannot read templates ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping at the top level")
    return data


def load_templates(directory: Path = TEMPLATES) -> tuple[list[Template], dict[str, Any]]:
    """All templates (split assigned) and the shared settings (openers, slots, replies)."""
    shared = _load_yaml(directory / "_shared.yaml")
    replies = _load_yaml(directory / "_replies.yaml")
    slots: dict[str, list[str]] = dict(shared.get("slots") or {})
    templates: list[Template] = []
    for path in sorted(directory.glob("*.yaml")):
        if path.name.startswith("_"):
            continue
        data = _load_yaml(path)
        category = data.get("category")
        if category != path.stem or category not in (*CATEGORIES, "safe"):
            raise DataError(f"{path}: 'category' must be the file's name, one of {', '.join(CATEGORIES)} or safe")
        for name, fillers in (data.get("slots") or {}).items():
            if name in slots and slots[name] != fillers:
                raise DataError(f"{path}: slot {name!r} is defined differently elsewhere")
            slots[name] = fillers
        for kind in ("harmful", "benign"):
            for number, item in enumerate(data.get(kind) or []):
                templates.append(_template(path, category, kind, number, item))
    for t in templates:
        for name in _SLOT.findall(t.pattern + (t.answer or "")):
            if name not in slots and not (name == "intent" and t.form == "intent"):
                raise DataError(f"{TEMPLATES.name}/{t.key}: slot {{{name}}} is not defined")
    return assign_splits(templates), {"openers": shared["openers"], "slots": slots, "replies": replies}


def _template(path: Path, category: str, kind: str, number: int, item: Any) -> Template:
    where = f"{path}: {kind}[{number}]"
    if not isinstance(item, dict) or len({"intent", "text"} & set(item)) != 1:
        raise DataError(f"{where}: an item is a mapping with exactly one of 'intent' or 'text'")
    form = "intent" if "intent" in item else "text"
    answer = item.get("answer")
    if kind == "benign" and not (isinstance(answer, str) and answer.strip()):
        raise DataError(f"{where}: a benign item needs an 'answer'")
    if not isinstance(item[form], str) or not item[form].strip():
        raise DataError(f"{where}: '{form}' must be a non-empty string")
    return Template(category, kind, f"{category}/{kind}/{number:03d}", form, item[form].strip(), answer)


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def assign_splits(templates: list[Template]) -> list[Template]:
    """Per category and kind, templates ordered by the hash of their wording: 70/15/15."""
    groups: dict[tuple[str, str], list[Template]] = {}
    for t in templates:
        groups.setdefault((t.category, t.kind), []).append(t)
    out = []
    for group in groups.values():
        group = sorted(group, key=lambda t: _digest(t.pattern))
        n = len(group)
        train_end = round(n * FRACTIONS[0])
        val_end = train_end + max(1, round(n * FRACTIONS[1])) if n >= 3 else train_end
        for i, t in enumerate(group):
            split = "train" if i < train_end else "validation" if i < val_end else "test"
            out.append(Template(**{**t.__dict__, "split": split}))
    return sorted(out, key=lambda t: t.key)


# -- near-duplicate checks against the eval sets ---------------------------------------------

def normalize(text: str) -> str:
    text = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return " ".join(text.split())


def _shingles(text: str) -> set[tuple[str, ...]]:
    words = normalize(text).split()
    return {tuple(words[i : i + 2]) for i in range(max(1, len(words) - 1))}


def eval_prompts(directory: Path = EVAL_SETS) -> list[str]:
    """Every prompt-like string field of every eval set lmforge ships."""
    found = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                found += [v for k, v in record.items() if k != "id" and isinstance(v, str) and len(v.split()) >= 3]
    return found


class EvalGuard:
    """Is a text an exact or near copy of an eval prompt?"""

    def __init__(self, prompts: list[str], threshold: float = 0.5):
        self.prompts = [(normalize(p), _shingles(p)) for p in prompts]
        self.exact = {norm for norm, _ in self.prompts}
        self.index: dict[tuple[str, ...], list[int]] = {}
        for i, (_, grams) in enumerate(self.prompts):
            for gram in grams:
                self.index.setdefault(gram, []).append(i)
        self.threshold = threshold

    def matches(self, text: str) -> bool:
        norm, grams = normalize(text), _shingles(text)
        if norm in self.exact:
            return True
        for i in {i for gram in grams for i in self.index.get(gram, ())}:  # those sharing a bigram
            other, other_grams = self.prompts[i]
            if len(other) > 20 and (other in norm or norm in other):
                return True
            if len(grams & other_grams) / len(grams | other_grams) >= self.threshold:
                return True
        return False


# -- expansion ---------------------------------------------------------------------------------

def _fill(pattern: str, slots: dict[str, list[str]], rng: random.Random, chosen: dict[str, str]) -> str:
    def one(match: re.Match) -> str:
        name = match.group(1)
        if name not in chosen:
            chosen[name] = rng.choice(slots[name])
        return chosen[name]
    return _SLOT.sub(one, pattern)


def _noise(text: str, rng: random.Random) -> str:
    """Some variants typed as people type: lower case, no final punctuation."""
    roll = rng.random()
    if roll < 0.15:
        return text.lower()
    if roll < 0.25:
        return text.rstrip(".?!")
    return text


def expand(t: Template, settings: dict[str, Any], per_intent: int, per_text: int, seed: int) -> list[tuple[str, str | None]]:
    """(text, answer) variants of one template, seeded by its key."""
    rng = random.Random(f"{seed}/{t.key}")
    wanted = per_intent if t.form == "intent" else (per_text if _SLOT.search(t.pattern) else 1)
    out: dict[str, tuple[str, str | None]] = {}  # by normalized text: case variants are one variant
    for _ in range(wanted * 6):
        if len(out) >= wanted:
            break
        chosen: dict[str, str] = {}
        body = _fill(t.pattern, settings["slots"], rng, chosen)
        if t.form == "intent":
            body = rng.choice(settings["openers"]).replace("{intent}", body)
        text = _noise(body[0].upper() + body[1:], rng)
        answer = _fill(t.answer, settings["slots"], rng, chosen) if t.answer else None
        out.setdefault(normalize(text), (text, answer))
    return list(out.values())


def build_records(templates: list[Template], settings: dict[str, Any], guard: EvalGuard,
                  per_intent: int = 10, per_text: int = 4, seed: int = 0) -> tuple[dict[str, list[dict]], Counter]:
    """Labelled records per split, and what was dropped (eval copies, duplicates)."""
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    dropped: Counter = Counter()
    for split in SPLITS:  # train first: a text that repeats in a later split is dropped there
        for t in (t for t in templates if t.split == split):
            for text, answer in expand(t, settings, per_intent, per_text, seed):
                norm = normalize(text)
                if norm in seen:
                    dropped["duplicate"] += 1
                    continue
                if guard.matches(text):
                    dropped["eval_copy"] += 1
                    continue
                seen.add(norm)
                splits[split].append({"text": text, "labels": t.labels, "template": t.key, "split": split,
                                      "answer": answer})
    for split, records in splits.items():
        for i, record in enumerate(records):
            record["id"] = f"mod-{split}-{i:05d}"
    return splits, dropped


def sft_conversations(train: list[dict], replies: dict[str, list[str]], seed: int) -> list[dict]:
    """Train-split requests as chats: a refusal (a supportive one for self-harm) or the answer.

    Helpful answers open with "Sure." so that the reply's first token carries the decision to
    help or refuse as a whole. Without it, refusals (a few fixed openings: "I can't", "I'm
    sorry") concentrate their probability on one or two first tokens while answers spread
    theirs over hundreds, and greedy decoding refuses whenever a request is even somewhat
    uncertain: measured on the quickstart model, 35% over-refusal on the benign eval set
    without the opening, 10-12% with it, for the same training steps.
    """
    rng = random.Random(f"{seed}/sft")
    out = []
    for record in train:
        if record["labels"]:
            pool = replies["support"] if record["labels"] == ["self-harm"] else replies["refusal"]
            reply = rng.choice(pool)
        else:
            reply = "Sure. " + record["answer"]
        out.append({"id": record["id"].replace("mod-train", "safety-sft"), "template": record["template"],
                    "messages": [{"role": "user", "content": record["text"]}, {"role": "assistant", "content": reply}]})
    return out


def judge_records(replies: dict[str, list[str]], benign_answers: list[str]) -> list[dict]:
    """Replies that train the refusal judge: the judge's own refusal and compliance sets plus an
    even sample of benign answers, half as many as the refusals (so the classes stay near
    balance); never the refusals the SFT data teaches (those stay unseen)."""
    taught = {normalize(r) for r in [*replies["refusal"], *replies["support"]]}
    rows = [{"text": r, "label": "refusal"} for r in replies["judge_refusal"] if normalize(r) not in taught]
    answers = sorted(set(benign_answers))
    sample = answers[:: max(1, len(answers) // max(1, len(rows) // 2))][: len(rows) // 2]
    rows += [{"text": r, "label": "safe"} for r in [*replies["judge_compliance"], *sample]]
    return [{"id": f"judge-{i:05d}", **row} for i, row in enumerate(rows)]


def _jsonl_gz(records: list[dict]) -> bytes:
    lines = "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in records)
    return gzip.compress(lines.encode("utf-8"), mtime=0)


def build(out: Path = OUT, templates_dir: Path = TEMPLATES, eval_dir: Path = EVAL_SETS, *,
          per_intent: int = 10, per_text: int = 4, seed: int = 0) -> dict[str, Any]:
    """Write the splits, the safety SFT set, the judge set and `manifest.json`; return the manifest."""
    templates, settings = load_templates(templates_dir)
    guard = EvalGuard(eval_prompts(eval_dir))
    splits, dropped = build_records(templates, settings, guard, per_intent, per_text, seed)
    files: dict[str, bytes] = {}
    for split, records in splits.items():
        files[f"moderation_{split}.jsonl.gz"] = _jsonl_gz([{k: v for k, v in r.items() if k != "answer"} for r in records])
    files["safety_sft.jsonl.gz"] = _jsonl_gz(sft_conversations(splits["train"], settings["replies"], seed))
    answers = [r["answer"] for r in splits["train"] if r["answer"]]
    files["refusal_judge.jsonl.gz"] = _jsonl_gz(judge_records(settings["replies"], answers))
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic.write_bytes(out / name, data)
    manifest = {
        "version": VERSION, "seed": seed, "per_intent": per_intent, "per_text": per_text,
        "templates": dict(sorted(Counter(f"{t.split}/{t.kind}" for t in templates).items())),
        "records": {s: dict(sorted(Counter(r["labels"][0] if r["labels"] else "safe" for r in rs).items()))
                    for s, rs in splits.items()},
        "dropped": dict(sorted(dropped.items())),
        "eval_prompts_checked": len(guard.prompts),
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    atomic.write_json(out / "manifest.json", manifest)
    return manifest
