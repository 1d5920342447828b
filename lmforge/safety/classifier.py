"""`lmforge train-classifier`: a moderation classifier fine-tuned from an lmforge model.

A linear head on the mean of the model's final hidden states predicts one probability per
category (multi-label, sigmoid), trained from labelled JSONL:

    {"text": "...", "labels": ["violence", "illicit"]}      several categories
    {"text": "...", "label": "hate"}  /  {"label": "safe"}   one category, or none

By default only the head trains (seconds on a CPU); `train_base: true` fine-tunes the
whole model. The output dir holds `classifier.json` (categories, thresholds, base model,
validation precision/recall), `head.safetensors`, and the fine-tuned base as a model dir
when it was trained. `TextClassifier.scores(texts)` serves moderation.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge import atomic
from lmforge.config import Section
from lmforge.errors import CheckpointError, DataError
from lmforge.jsonl import load_jsonl
from lmforge.store.loading import load_model
from lmforge.store.model_dir import save_model_dir

CLASSIFIER_FILE = "classifier.json"
SAFE = "safe"


class ClassifierConfig(Section):
    model: str = Field(description="base lmforge model: model dir, run dir or checkpoint")
    data: str = Field(description="labelled JSONL: text + labels (list) or label (one category or 'safe')")
    out: str = Field(description="classifier dir to write")
    val_fraction: float = Field(0.2, ge=0, lt=1)
    epochs: int = Field(20, ge=1)
    lr: float = Field(3e-3, gt=0)
    batch_size: int = Field(16, ge=1)
    max_len: int = Field(128, ge=8)
    train_base: bool = Field(False, description="fine-tune the whole model, not only the head")
    threshold: float = Field(0.5, gt=0, lt=1)
    seed: int = 0
    overwrite: bool = Field(False, description="replace an out dir that is not an lmforge classifier")


def read_labelled(path: str | os.PathLike) -> list[tuple[str, list[str]]]:
    records = []
    for number, record in load_jsonl(path):
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path}:{number}: record needs a non-empty string 'text'")
        labels = record.get("labels", [record["label"]] if "label" in record else None)
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise DataError(f"{path}:{number}: record needs 'labels' (a list of strings) or 'label'")
        records.append((text, [x for x in labels if x != SAFE]))
    if len(records) < 2:
        raise DataError(f"{path}: needs at least two labelled records")
    return records


class TextClassifier(nn.Module):
    def __init__(self, base: nn.Module, categories: list[str], thresholds: dict[str, float], tokenizer, max_len: int):
        super().__init__()
        self.base, self.categories, self.thresholds = base, categories, thresholds
        self.tokenizer, self.max_len = tokenizer, max_len
        self.head = nn.Linear(base.config.dim, len(categories))

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.tokenizer.encode_prompt(t)[: self.max_len] for t in texts]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), self.tokenizer.pad_id or 0, dtype=torch.long)
        mask = torch.zeros(len(rows), width)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return tokens, mask

    def logits(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.base.hidden_states(tokens)  # causal: padding after a text never reaches it
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)

    @torch.no_grad()
    def scores(self, texts: list[str], batch_size: int = 32) -> list[dict[str, float]]:
        """Per text, the probability of each category."""
        self.eval()
        out = []
        for start in range(0, len(texts), batch_size):
            tokens, mask = self.encode(texts[start : start + batch_size])
            probs = torch.sigmoid(self.logits(tokens, mask))
            out += [dict(zip(self.categories, row.tolist(), strict=True)) for row in probs]
        return out

    def flags(self, texts: list[str]) -> list[list[str]]:
        return [[c for c, p in s.items() if p >= self.thresholds[c]] for s in self.scores(texts)]


def _metrics(classifier: TextClassifier, items: list[tuple[str, list[str]]]) -> dict[str, Any]:
    if not items:
        return {}
    predicted = classifier.flags([t for t, _ in items])
    per_category = {}
    for category in classifier.categories:
        tp = sum(category in p and category in y for p, (_, y) in zip(predicted, items, strict=True))
        fp = sum(category in p and category not in y for p, (_, y) in zip(predicted, items, strict=True))
        fn = sum(category not in p and category in y for p, (_, y) in zip(predicted, items, strict=True))
        per_category[category] = {"precision": tp / (tp + fp) if tp + fp else None,
                                  "recall": tp / (tp + fn) if tp + fn else None, "support": tp + fn}
    exact = sum(set(p) == set(y) for p, (_, y) in zip(predicted, items, strict=True)) / len(items)
    return {"exact_match": exact, "categories": per_category, "n": len(items)}


def run(config: ClassifierConfig) -> dict[str, Any]:
    """Train, validate, save; return the validation metrics."""
    atomic.check_output_dir(config.out, "moderation classifier", overwrite=config.overwrite,
                            inputs=[config.model, config.data])
    records = read_labelled(config.data)
    categories = sorted({c for _, labels in records for c in labels})
    if not categories:
        raise DataError(f"{config.data}: every record is labelled safe; nothing to learn")
    base, tokenizer, source = load_model(config.model, "cpu", torch.float32)
    rng = random.Random(config.seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    held = round(len(records) * config.val_fraction)
    val = [records[i] for i in order[:held]]
    train = [records[i] for i in order[held:]]
    torch.manual_seed(config.seed)
    classifier = TextClassifier(base, categories, dict.fromkeys(categories, config.threshold), tokenizer, config.max_len)
    for param in base.parameters():
        param.requires_grad_(config.train_base)
    optimizer = torch.optim.AdamW([p for p in classifier.parameters() if p.requires_grad], lr=config.lr)
    targets = {c: i for i, c in enumerate(categories)}
    classifier.train()
    for epoch in range(config.epochs):
        random.Random(config.seed + epoch).shuffle(train)
        for start in range(0, len(train), config.batch_size):
            batch = train[start : start + config.batch_size]
            tokens, mask = classifier.encode([t for t, _ in batch])
            labels = torch.zeros(len(batch), len(categories))
            for i, (_, names) in enumerate(batch):
                for name in names:
                    labels[i, targets[name]] = 1.0
            loss = nn.functional.binary_cross_entropy_with_logits(classifier.logits(tokens, mask), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    metrics = _metrics(classifier, val)
    out = Path(config.out)
    with atomic.atomic_dir(out, "moderation classifier") as tmp:
        save_file({k: v.contiguous() for k, v in classifier.head.state_dict().items()}, str(tmp / "head.safetensors"))
        base_ref = str(Path(source).resolve())
        if config.train_base:
            save_model_dir(tmp / "base", base, tokenizer)
            base_ref = "base"
        atomic.write_json(tmp / CLASSIFIER_FILE, {
            "categories": categories, "thresholds": classifier.thresholds, "base_model": base_ref,
            "max_len": config.max_len, "train_records": len(train), "validation": metrics,
        })
    return metrics


def load_classifier(directory: str | os.PathLike) -> TextClassifier:
    directory = Path(directory)
    try:
        meta = json.loads((directory / CLASSIFIER_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{directory} is not a classifier dir (no readable {CLASSIFIER_FILE})") from None
    base_path = directory / meta["base_model"] if meta["base_model"] == "base" else Path(meta["base_model"])
    base, tokenizer, _ = load_model(base_path, "cpu", torch.float32)
    classifier = TextClassifier(base, meta["categories"], meta["thresholds"], tokenizer, meta["max_len"])
    classifier.head.load_state_dict(load_file(str(directory / "head.safetensors")))
    return classifier.eval()
