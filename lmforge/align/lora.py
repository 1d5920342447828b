"""LoRA (Hu et al., 2021) on lmforge's own modules, through peft.

peft wraps the fused projections (`wqkv`, `wo`, `w13`, `w2` by default) with low-rank
adapters and freezes everything else. An adapter dir is peft's own layout
(`adapter_config.json` + `adapter_model.safetensors`) plus `lmforge_adapter.json` naming
the base model, so `lmforge lora merge` can rebuild the merged model from it alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import Field
from torch import nn

from lmforge import atomic
from lmforge.config import Section
from lmforge.errors import CheckpointError, ConfigError

BASE_FILE = "lmforge_adapter.json"
LORA_TARGETS = ("wqkv", "wo", "w13", "w2")


class LoraSettings(Section):
    enabled: bool = False
    r: int = Field(8, ge=1, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install 'lmforge[align]'") from None
    return peft


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """The model wrapped with trainable adapters; base weights frozen."""
    peft = _peft()
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    unknown = [t for t in settings.target_modules if t not in LORA_TARGETS + ("output",)]
    if unknown:
        raise ConfigError(f"unknown LoRA target {unknown[0]!r} (allowed: {', '.join(LORA_TARGETS)}, output)")
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules), bias="none",
    )
    return get_peft_model(model, config)


def save_adapter(directory: str | os.PathLike, model: nn.Module, base: str) -> Path:
    """Adapters only (peft layout) and the base model they apply to, written atomically."""
    directory = Path(directory)
    with atomic.atomic_dir(directory) as tmp:
        model.save_pretrained(str(tmp))
        atomic.write_json(tmp / BASE_FILE, {"base_model": str(Path(base).resolve())})
    return directory


def load_adapter(directory: str | os.PathLike, device="cpu"):
    """(peft model over its base, tokenizer, base path) from an adapter dir."""
    PeftModel = _peft().PeftModel

    from lmforge.loading import load_model

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file():
        raise CheckpointError(f"{directory} is not a LoRA adapter dir (no adapter_config.json)")
    try:
        base = json.loads((directory / BASE_FILE).read_text())["base_model"]
    except (OSError, json.JSONDecodeError, KeyError):
        raise CheckpointError(f"{directory} lacks {BASE_FILE} naming its base model") from None
    model, tokenizer, _ = load_model(base, device)
    return PeftModel.from_pretrained(model, str(directory)), tokenizer, Path(base)


def merge(model: nn.Module) -> nn.Module:
    """The base model with every adapter folded into its weights (W + alpha/r * B A)."""
    return model.merge_and_unload()
