"""Optimizers: AdamW, or Muon for 2-D hidden weights with AdamW for the rest."""

from __future__ import annotations

import torch
from torch import nn

from lmforge.train.config import OptimConfig


def _adamw(groups: list[dict], config: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        groups,
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        eps=config.eps,
        # The fused kernel exists for CPU and CUDA and is the fastest implementation on both.
        fused=device.type in ("cpu", "cuda"),
    )


def build_optimizers(model: nn.Module, config: OptimConfig, device: torch.device) -> list[torch.optim.Optimizer]:
    """Weight decay on matrices only (not norms); with Muon, embeddings and the output head
    stay on AdamW, as in Jordan et al. (2024), because Muon's orthogonalised update suits
    hidden linear maps, not lookup tables or classifiers. MoE routers (classifiers too) and
    stacked expert weights (3-D, which torch's Muon does not take) also stay on AdamW."""
    seen: set[int] = set()
    hidden, embed_head, vectors = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        if param.ndim < 2:
            vectors.append(param)
        elif name.startswith(("tok_embeddings", "output")) or param.ndim > 2 or ".router." in name:
            embed_head.append(param)
        else:
            hidden.append(param)
    decay = {"weight_decay": config.weight_decay}
    no_decay = {"weight_decay": 0.0}
    if config.name == "adamw":
        groups = [{"params": hidden + embed_head, **decay}, {"params": vectors, **no_decay}]
        return [_adamw(groups, config, device)]
    adamw = _adamw([{"params": embed_head, **decay}, {"params": vectors, **no_decay}], config, device)
    muon = torch.optim.Muon(
        hidden, lr=config.muon_lr, weight_decay=config.weight_decay, momentum=config.muon_momentum
    )
    return [adamw, muon]
