"""`lmforge train-classifier`: a moderation classifier fine-tuned from an lmforge model.

A linear head on the mean of the model's final hidden states predicts one probability per
category (multi-label, sigmoid), trained from labelled JSONL:

    {"text": "...", "labels": ["violence", "illicit"]}      several categories
    {"text": "...", "label": "hate"}  /  {"label": "safe"}   one category, or none

By default only the head trains (seconds on a CPU); `train_base: true` fine-tunes the
whole model. Each category's threshold is then calibrated on the validation data (`val_data`,
or `val_fraction` held out) to a target false-positive rate (`target_fpr`, 5%), and the
serving policy uses these thresholds unless it sets its own. The output dir holds
`classifier.json` (categories, calibrated thresholds, base model, validation precision,
recall, F1 and false-positive rates), `head.safetensors`, and the fine-tuned base as a model
dir when it was trained. `TextClassifier.scores(texts)` serves moderation.
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
from lmforge.safety import calibration
from lmforge.store.loading import load_model
from lmforge.store.model_dir import save_model_dir

CLASSIFIER_FILE = "classifier.json"
SAFE = "safe"


class ClassifierConfig(Section):
    model: str = Field(description="base lmforge model: model dir, run dir or checkpoint")
    data: str = Field(description="labelled JSONL: text + labels (list) or label (one category or 'safe')")
    out: str = Field(description="classifier dir to write")
    val_data: str | None = Field(None, description="labelled JSONL for validation and calibration (default: hold out val_fraction of data)")
    val_fraction: float = Field(0.2, ge=0, lt=1)
    epochs: int | None = Field(None, ge=1, description="passes over the data (default: 200 for the head alone, 5 with train_base)")
    lr: float | None = Field(None, gt=0, description="default: 1e-2 for the head alone, 1e-3 with train_base")
    batch_size: int = Field(32, ge=1)
    max_len: int = Field(128, ge=8)
    train_base: bool = Field(False, description="fine-tune the whole model, not only the head")
    target_fpr: float | None = Field(0.05, ge=0, lt=1, description="calibrate the per-category thresholds on validation so that at most this share of safe texts is flagged by any category; null: use threshold")
    threshold: float = Field(0.5, gt=0, lt=1, description="every category's threshold when not calibrated")
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


def _split(config: ClassifierConfig, records: list) -> tuple[list, list]:
    if config.val_data:
        return records, read_labelled(config.val_data)
    order = list(range(len(records)))
    random.Random(config.seed).shuffle(order)
    held = round(len(records) * config.val_fraction)
    return [records[i] for i in order[held:]], [records[i] for i in order[:held]]


def _targets(items: list[tuple[str, list[str]]], categories: list[str]) -> torch.Tensor:
    labels = torch.zeros(len(items), len(categories))
    for i, (_, names) in enumerate(items):
        for name in names:
            if name in categories:
                labels[i, categories.index(name)] = 1.0
    return labels


@torch.no_grad()
def _pooled(classifier: TextClassifier, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """The frozen base's pooled features, computed once when only the head trains."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens, mask = classifier.encode(texts[start : start + batch_size])
        hidden = classifier.base.hidden_states(tokens)
        out.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out)


def _fit(classifier: TextClassifier, train: list, config: ClassifierConfig) -> None:
    labels = _targets(train, classifier.categories)
    positives = labels.sum(0)
    pos_weight = ((len(train) - positives) / positives.clamp(min=1)).clamp(1, 10)  # rare categories count more
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    params = [p for p in classifier.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr or (1e-3 if config.train_base else 1e-2))
    features = None if config.train_base else _pooled(classifier, [t for t, _ in train])
    classifier.train()
    epochs = config.epochs or (5 if config.train_base else 200)
    for epoch in range(epochs):
        order = list(range(len(train)))
        random.Random(config.seed + epoch).shuffle(order)
        for start in range(0, len(order), config.batch_size):
            rows = order[start : start + config.batch_size]
            if features is None:
                logits = classifier.logits(*classifier.encode([train[i][0] for i in rows]))
            else:
                logits = classifier.head(features[rows])
            loss = loss_fn(logits, labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _calibrate(classifier: TextClassifier, val: list, config: ClassifierConfig) -> dict[str, Any]:
    """Thresholds for the target false-positive rate on validation, and the metrics there."""
    if not val:
        return {}
    scores = classifier.scores([t for t, _ in val])
    labels = [y for _, y in val]
    if config.target_fpr is not None:
        classifier.thresholds = calibration.calibrate(scores, labels, classifier.categories, config.target_fpr)
    return {**calibration.report(scores, labels, classifier.thresholds), "target_fpr": config.target_fpr}


def run(config: ClassifierConfig) -> dict[str, Any]:
    """Train, calibrate on validation, save; return the validation metrics."""
    atomic.check_output_dir(config.out, "moderation classifier", overwrite=config.overwrite,
                            inputs=[config.model, config.data, *([config.val_data] if config.val_data else [])])
    records = read_labelled(config.data)
    categories = sorted({c for _, labels in records for c in labels})
    if not categories:
        raise DataError(f"{config.data}: every record is labelled safe; nothing to learn")
    train, val = _split(config, records)
    base, tokenizer, source = load_model(config.model, "cpu", torch.float32)
    torch.manual_seed(config.seed)
    classifier = TextClassifier(base, categories, dict.fromkeys(categories, config.threshold), tokenizer, config.max_len)
    for param in base.parameters():
        param.requires_grad_(config.train_base)
    _fit(classifier, train, config)
    metrics = _calibrate(classifier, val, config)
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
