"""The block types a model can be built from, registered by name: the extension point.

A block type is one file in this package (or a module another package names under the
`lmforge.blocks` entry-point group): an `nn.Module` built as `Block(config, layer)` and
registered with `@register_block("name", hf=...)`, where `hf` is its Hugging Face mapping
(an `HFLayout`) written beside it. `model.block: name` in a config selects it; export and
import find the mapping through the same name. README, "Add your own block", walks one.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

import torch
from torch import nn

ENTRY_POINT_GROUP = "lmforge.blocks"


class HFLayout(Protocol):
    """How a block type's layers look in a Hugging Face model dir (config.json and tensor names).

    The rest of the model (embedding, final norm, head, RoPE, vocabulary, token ids) is common
    to every decoder and mapped by lmforge.store.hf; a layout maps only what its block adds.
    Names inside a layer are relative: ours under `layers.{i}.`, HF's under `model.layers.{i}.`.
    Unsupported choices raise ValueError with a one-line reason.
    """

    architectures: dict[str, str]  # HF architecture class -> its model_type, that this layout reads

    def export_architecture(self, config: Any) -> str: ...
    def config_to_hf(self, config: Any, architecture: str) -> dict[str, Any]: ...
    def config_from_hf(self, hf: dict[str, Any], architecture: str) -> dict[str, Any]: ...
    def layer_to_hf(self, state: dict[str, torch.Tensor], config: Any, layer: int, architecture: str) -> dict[str, torch.Tensor]: ...
    def layer_from_hf(self, tensors: dict[str, torch.Tensor], config: Any, layer: int, architecture: str) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class BlockType:
    name: str
    module: type[nn.Module]
    hf: HFLayout | None  # None: lmforge checkpoints only, no Hugging Face export

    def num_params(self, config: Any, active: bool = False) -> int:
        """Parameters of all the layers: the module's own count, a static `num_params(config,
        layer, active)` (`active`: those one token uses), if it has one; else counted on a
        meta-device build (no memory, every parameter active)."""
        count = getattr(self.module, "num_params", None)
        if count is not None:
            return sum(count(config, layer, active) for layer in range(config.n_layers))
        with torch.device("meta"):
            return sum(p.numel() for layer in range(config.n_layers) for p in self.module(config, layer).parameters())


_REGISTRY: dict[str, BlockType] = {}
_discovered = False


def register_block(name: str, hf: HFLayout | None = None) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: make `model.block: name` build this module for every layer."""

    def register(module: type[nn.Module]) -> type[nn.Module]:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.module.__qualname__ != module.__qualname__:
            raise ValueError(f"block type {name!r} is already registered by {existing.module.__module__}")
        _REGISTRY[name] = BlockType(name, module, hf)
        return module

    return register


def _discover() -> None:
    """Import this package's modules and the entry points' once, so their decorators run."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()


def block_names() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def block_type(name: str) -> BlockType:
    _discover()
    if name not in _REGISTRY:
        raise ValueError(f"unknown block type {name!r} (registered: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[name]


def block_for_architecture(architecture: str) -> BlockType | None:
    """The block type whose HF layout reads `architecture` (e.g. "Qwen3MoeForCausalLM")."""
    _discover()
    for entry in _REGISTRY.values():
        if entry.hf is not None and architecture in entry.hf.architectures:
            return entry
    return None


def hf_architectures() -> list[str]:
    _discover()
    return sorted(a for entry in _REGISTRY.values() if entry.hf is not None for a in entry.hf.architectures)
