"""LoRA (Hu et al., 2021) on lmforge's own modules, through peft.

peft wraps the fused projections (`wqkv`, `wo`, `w13`, `w2` by default) with low-rank
adapters and freezes everything else. An adapter dir is peft's own layout
(`adapter_config.json` + `adapter_model.safetensors`) plus `lmforge_adapter.json` naming
the base model, so `lmforge lora merge` can rebuild the merged model from it alone.

Adapters are deltas to one set of base weights, so the base is recorded by content, not
only by place: `lmforge_adapter.json` (and a LoRA run's checkpoints) hold the sha256 of the
base's weights beside its absolute path and its path relative to the adapter. Loading
looks for the base at an explicit `base`, else the absolute path, else the relative one
(the two moved together), and refuses weights whose hash differs: a base that was
overwritten or retrained would silently give another model.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pydantic import Field
from torch import nn

from lmforge import atomic
from lmforge.config import Section
from lmforge.errors import CheckpointError, ConfigError
from lmforge.store import hashes

log = logging.getLogger(__name__)

BASE_FILE = "lmforge_adapter.json"
LORA_TARGETS = ("wqkv", "wo", "w13", "w2")


class LoraSettings(Section):
    enabled: bool = False
    r: int = Field(8, ge=1, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))


def peft_module():
    try:
        import peft
    except ImportError:
        raise ConfigError("LoRA needs peft: pip install 'lmforge[align]'") from None
    return peft


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """The model wrapped with trainable adapters; base weights frozen."""
    peft = peft_module()
    LoraConfig, get_peft_model = peft.LoraConfig, peft.get_peft_model

    unknown = [t for t in settings.target_modules if t not in LORA_TARGETS + ("output",)]
    if unknown:
        raise ConfigError(f"unknown LoRA target {unknown[0]!r} (allowed: {', '.join(LORA_TARGETS)}, output)")
    if getattr(getattr(model, "config", None), "moe", None) is not None:
        log.warning("LoRA on a mixture-of-experts model adapts attention and the dense/shared FFNs; "
                    "routed experts (stacked weights) and routers stay frozen")
    config = LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules), bias="none",
    )
    return get_peft_model(model, config)


def weights_hash(model: nn.Module) -> str:
    """The sha256 of a base model's weights as LoRA trains on them (fp32)."""
    return hashes.model_hash(model)


def base_record(base: str | os.PathLike, base_hash: str | None, anchor: str | os.PathLike) -> dict[str, str | None]:
    """Where the base is (absolute, and relative to `anchor`, the dir that records it) and its weights' hash."""
    resolved = Path(base).resolve()
    return {"path": str(resolved), "relative": os.path.relpath(resolved, Path(anchor).resolve()), "sha256": base_hash}


def save_adapter(directory: str | os.PathLike, model: nn.Module, base: str, base_hash: str | None = None) -> Path:
    """Adapters only (peft layout) and the base model they apply to, written atomically."""
    directory = Path(directory)
    record = base_record(base, base_hash, directory)
    with atomic.atomic_dir(directory) as tmp:
        model.save_pretrained(str(tmp))
        atomic.write_json(tmp / BASE_FILE, {"base_model": record["path"], "base_model_relative": record["relative"],
                                            "base_weights_sha256": record["sha256"]})
    return directory


ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG_FILE).is_file()


def read_base_file(directory: Path) -> dict[str, str | None]:
    try:
        data = json.loads((directory / BASE_FILE).read_text())
        return {"path": data["base_model"], "relative": data.get("base_model_relative"),
                "sha256": data.get("base_weights_sha256")}
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{directory} lacks {BASE_FILE} naming its base model") from None


def merge(model: nn.Module) -> nn.Module:
    """The base model with every adapter folded into its weights (W + alpha/r * B A)."""
    return model.merge_and_unload()
