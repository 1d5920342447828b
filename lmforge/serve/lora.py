"""Several LoRA adapters served over one model, their requests batched together (multi-LoRA).

Each adapted Linear of the engine's model is wrapped by `MultiLoraLinear`, which holds every
adapter's A and B stacked: `lora_a` [n + 1, r, in], `lora_b` [n + 1, out, r], index 0 the
base model (all zeros), ranks padded with zeros to the largest (which adds nothing), and
alpha / r folded into B. Row b of a batch computes

    y_b = base(x_b) + (x_b · A[i_b]ᵀ) · B[i_b]ᵀ

with i_b the adapter its request chose (`SamplingParams.adapter`), as vLLM's Punica kernels
do with two batched matmuls (Chen et al., 2023, "Punica: Multi-Tenant LoRA Serving"). The
engine calls `AdapterSet.select` with each forward's rows before running it; a batch with one
adapter, or none, takes the plain path.

The adapters load in the layout `lmforge sft lora.enabled=true` writes (peft's, over the
exported model), and only onto the base weights they were trained on (`lmforge_adapter.json`
holds their sha256).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lmforge.errors import ConfigError
from lmforge.serve.backend import RequestError
from lmforge.store import adapter
from lmforge.store.loading import load_model, local_path

log = logging.getLogger(__name__)


class _Selection(threading.local):
    """Which adapter each row of the next forward uses; shared by every wrapped module. Per thread:
    the engine thread's steps select, a forward elsewhere (embeddings) runs the base model."""

    single: int | None = 0  # every row uses this adapter (0: the base model)
    rows: torch.Tensor | None = None  # [batch] adapter per row, when they differ


class MultiLoraLinear(nn.Module):
    """A Linear plus, per batch row, the low-rank update of that row's adapter."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, selection: _Selection):
        super().__init__()
        self.base, self.selection = base, selection
        self.register_buffer("lora_a", lora_a, persistent=False)
        self.register_buffer("lora_b", lora_b, persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # the base weight, for code that reads it (tied embeddings, fused losses)
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        single, rows = self.selection.single, self.selection.rows
        if single == 0:
            return y
        if single is not None:
            return y + (x @ self.lora_a[single].T) @ self.lora_b[single].T
        flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [batch, tokens, in]; rows index the batch
        low = torch.bmm(flat, self.lora_a[rows].transpose(1, 2))
        return y + torch.bmm(low, self.lora_b[rows].transpose(1, 2)).reshape(y.shape)


@dataclass
class AdapterSet:
    """The adapters an engine serves: name -> index (1..n; 0 is the base) and dir, and the wrapped modules."""

    paths: dict[str, str] = field(default_factory=dict)
    weights: list[adapter.AdapterWeights] = field(default_factory=list)
    max_rank: int = 0
    selection: _Selection = field(default_factory=_Selection)
    device: torch.device = torch.device("cpu")

    def __post_init__(self):
        self.index = {name: i + 1 for i, name in enumerate(self.paths)}

    def __bool__(self) -> bool:
        return bool(self.paths)

    def check(self, name: str | None) -> None:
        """A request's adapter must be one of these (None: the base model)."""
        if name is not None and name not in self.index:
            served = ", ".join(self.index) or "none"
            raise RequestError(f"unknown LoRA adapter {name!r} (served: {served})")

    def select(self, names: list[str | None]) -> None:
        """Set the adapter of each row of the next forward (names as requests give them)."""
        if not self.paths:
            return
        indices = [self.index[n] if n is not None else 0 for n in names]
        if len(set(indices)) == 1:
            self.selection.single, self.selection.rows = indices[0], None
        else:
            self.selection.single, self.selection.rows = None, torch.tensor(indices, device=self.device)

    def install(self, model: nn.Module) -> None:
        """Wrap every module some adapter adapts, on the model's device and dtype."""
        self.device = next(model.parameters()).device
        names = dict.fromkeys(name for w in self.weights for name in w.pairs)
        for name in names:
            base = model.get_submodule(name)
            param = base.weight
            a = torch.zeros(len(self.weights) + 1, self.max_rank, base.in_features)
            b = torch.zeros(len(self.weights) + 1, base.out_features, self.max_rank)
            for i, w in enumerate(self.weights, start=1):
                if name in w.pairs:
                    lora_a, lora_b = w.pairs[name]
                    a[i, : lora_a.shape[0]] = lora_a
                    b[i, :, : lora_b.shape[1]] = lora_b * w.scale
            wrapped = MultiLoraLinear(base, a.to(param.device, param.dtype), b.to(param.device, param.dtype),
                                      self.selection)
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, wrapped)


def read_adapters(adapters: dict[str, str], model: nn.Module, max_rank: int | None = None) -> AdapterSet:
    """The adapters named in `lora.adapters`, checked against `model` (fp32, as loaded: its
    weights' hash must be the one each adapter was trained on)."""
    base_hash = adapter.weights_hash(model)
    weights = []
    for name, path in adapters.items():
        key = f"lora.adapters.{name}"
        path = local_path(path)  # a Hub id: its snapshot
        if not adapter.is_adapter_dir(path):
            raise ConfigError(f"{key}: {path} is not a LoRA adapter dir (no {adapter.ADAPTER_CONFIG_FILE})")
        expected = adapter.read_base_file(Path(path))["sha256"]
        if expected is None:
            log.warning("%s: %s records no hash of its base weights; serving it unchecked", key, path)
        elif expected != base_hash:
            raise ConfigError(f"{key}: {path} was trained on base weights {expected[:12]}, "
                              f"but the served model holds {base_hash[:12]}")
        w = adapter.read_adapter(path, model.config)
        for module, (a, b) in w.pairs.items():
            target = model.get_submodule(module) if _has(model, module) else None
            if not isinstance(target, nn.Linear) or tuple(a.shape[1:]) != (target.in_features,) \
                    or b.shape[0] != target.out_features:
                raise ConfigError(f"{key}: {path} adapts {module}, which the served model lacks or shapes otherwise")
        if max_rank is not None and w.settings.r > max_rank:
            raise ConfigError(f"{key}: {path} has rank {w.settings.r}, above lora.max_rank {max_rank}")
        weights.append(w)
    return AdapterSet(dict(adapters), weights, max(w.settings.r for w in weights) if weights else 0)


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def load_with_adapters(path: str, device: torch.device, dtype: torch.dtype, adapters: dict[str, str],
                       max_rank: int | None = None):
    """(model on `device` in `dtype`, tokenizer, AdapterSet): the base is read in fp32 first, to check
    the adapters against its weights' hash, then moved."""
    if not adapters:
        model, tokenizer, _ = load_model(path, device, dtype)
        return model, tokenizer, AdapterSet()
    model, tokenizer, _ = load_model(path, "cpu", torch.float32)
    found = read_adapters(adapters, model, max_rank)
    return model.to(device=device, dtype=dtype), tokenizer, found
