"""LoRA (Hu et al., 2021) on lmforge's own modules, through peft.

peft wraps the fused projections (`wqkv`, `wo`, `w13`, `w2` by default) with low-rank
adapters and freezes everything else. An adapter dir is peft's layout
(`adapter_config.json` + `adapter_model.safetensors`) for the model `lmforge export` writes
(q/k/v/o_proj, gate/up/down_proj, lm_head: `adapter_hf`), so peft and vLLM load it over the
exported base, plus `lmforge_adapter.json` naming the base model, so `lmforge lora merge`
can rebuild the merged model from it alone.

Adapters are deltas to one set of base weights, so the base is recorded by content, not
only by place: `lmforge_adapter.json` (and a LoRA run's checkpoints) hold the sha256 of the
base's weights beside its absolute path and its path relative to the adapter. Loading
looks for the base at an explicit `base`, else the absolute path, else the relative one
(the two moved together), and refuses weights whose hash differs: a base that was
overwritten or retrained would silently give another model.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge import atomic, extras
from lmforge.config import Section
from lmforge.errors import CheckpointError, ConfigError
from lmforge.store import adapter_hf, hashes

log = logging.getLogger(__name__)

BASE_FILE = "lmforge_adapter.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"  # peft's
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
LORA_TARGETS = ("wqkv", "wo", "w13", "w2")


class LoraSettings(Section):
    """LoRA adapters (peft): train low-rank updates of target modules instead of the whole model."""

    enabled: bool = False
    r: int = Field(8, ge=1, description="rank of the update")
    alpha: float = Field(16.0, gt=0, description="scale: the update is multiplied by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGETS))


def peft_module():
    return extras.require("peft", "LoRA")


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
    """Adapters only (peft's layout for the exported model) and the base model they apply to, written atomically."""
    peft = peft_module()
    directory = Path(directory)
    record = base_record(base, base_hash, directory)
    state = peft.get_peft_model_state_dict(model)
    pairs = {key[len(adapter_hf.PEFT_PREFIX):-len(".lora_A.weight")]:
             (state[key], state[key.replace(".lora_A.", ".lora_B.")]) for key in state if key.endswith(".lora_A.weight")}
    config = copy.deepcopy(model.peft_config["default"])
    config.base_model_name_or_path = record["path"]
    config.task_type = "CAUSAL_LM"
    base_config = model.get_base_model().config
    with atomic.atomic_dir(directory) as tmp:
        if adapter_hf.convertible(pairs):
            tensors = adapter_hf.to_hf(pairs, base_config)
            config.target_modules = sorted({hf for t in config.target_modules for hf in adapter_hf.HF_TARGETS[t]})
        else:  # modules HF has no name for: lmforge's own names, which only lmforge reads
            log.warning("%s: LoRA on modules outside the Llama layout keeps lmforge's module names "
                        "(loads in lmforge, not in peft/vLLM over the exported model)", directory)
            tensors = {f"{adapter_hf.PEFT_PREFIX}{name}.lora_{ab}.weight": t.contiguous()
                       for name, pair in pairs.items() for ab, t in zip("AB", pair, strict=True)}
        save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS_FILE),
                  metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        atomic.write_json(tmp / BASE_FILE, {"base_model": record["path"], "base_model_relative": record["relative"],
                                            "base_weights_sha256": record["sha256"]})
    return directory



@dataclass
class AdapterWeights:
    """An adapter dir read into lmforge's terms: its settings and (A, B) per adapted module."""

    settings: LoraSettings
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]

    @property
    def scale(self) -> float:
        return self.settings.alpha / self.settings.r


def read_adapter(directory: str | os.PathLike, config) -> AdapterWeights:
    """Read an adapter dir (HF module names, or lmforge's as older lmforge wrote) for a base of `config`."""
    directory = Path(directory)
    try:
        data = json.loads((directory / ADAPTER_CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        raise CheckpointError(f"{directory} is not a LoRA adapter dir (no readable {ADAPTER_CONFIG_FILE})") from None
    where = directory / ADAPTER_CONFIG_FILE
    if data.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{where}: peft_type {data['peft_type']!r} is not LoRA")
    for key in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save"):
        if data.get(key):
            raise CheckpointError(f"{where}: {key} is not supported by lmforge's LoRA")
    try:
        tensors = load_file(str(directory / ADAPTER_WEIGHTS_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{directory / ADAPTER_WEIGHTS_FILE} is missing or corrupt ({err})") from None
    settings = LoraSettings(enabled=True, r=data["r"], alpha=data.get("lora_alpha", data["r"]),
                            dropout=data.get("lora_dropout", 0.0),
                            target_modules=adapter_hf.targets_from_hf(data.get("target_modules"), where))
    pairs = {name: (a.float(), b.float()) for name, (a, b) in adapter_hf.from_hf(tensors, config, directory).items()}
    return AdapterWeights(settings, pairs)


def load_into(model: nn.Module, weights: AdapterWeights) -> nn.Module:
    """`model` wrapped with LoRA (peft) holding `weights`' adapters."""
    peft = peft_module()
    wrapped = apply_lora(model, weights.settings)
    state = {f"{adapter_hf.PEFT_PREFIX}{name}.lora_{ab}.weight": t
             for name, pair in weights.pairs.items() for ab, t in zip("AB", pair, strict=True)}
    expected = {k for k in peft.get_peft_model_state_dict(wrapped)}
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)[0]
        raise CheckpointError(f"the adapter does not fit its base model: {odd!r} is {'extra' if odd in state else 'missing'}")
    peft.set_peft_model_state_dict(wrapped, state)
    return wrapped


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
