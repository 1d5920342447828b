"""Mixture-of-experts bookkeeping the trainer does around each step.

Auxiliary losses: the model's layers keep their load-balancing and router z-losses of the
last forwards (`aux_losses`); `pop_aux_losses` hands them to the trainer, which adds them to
the objective's loss (the objective's, e.g. cross-entropy, is what is logged as `loss`).

Expert load: every MoE layer counts the tokens each expert received (`expert_load`). After
each optimizer step the counts are summed over ranks (one all-reduce for all layers), move
the auxiliary-loss-free biases (DeepSeek-V3: b_i += rate * sign(mean load - load_i), the same
on every rank), and add to the window the metrics report: each expert's share of its layer's
tokens times the number of experts (1.0 is an even share). An expert under `starve_ratio` or
over `dominate_ratio` of an even share raises an alert.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from lmforge.model.transformer import pop_aux_losses
from lmforge.train import distributed

__all__ = ["ExpertBalance", "pop_aux_losses"]


class ExpertBalance:
    """The MoE layers of one model: their load after each step, bias updates, load metrics."""

    def __init__(self, model: nn.Module, env: distributed.DistEnv):
        self.env = env
        moe = [(name, m) for name, m in model.named_modules() if hasattr(m, "expert_load") and hasattr(m, "expert_bias")]
        self.layers = [m for _, m in moe]
        # The model's layer index of each MoE layer (dense layers may come first), for metrics and alerts.
        self.layer_ids = [_layer_index(name, i) for i, (name, _) in enumerate(moe)]
        # The counters are not in checkpoints: a model loaded onto empty memory starts them at garbage.
        with torch.no_grad():
            for layer in self.layers:
                layer.expert_load.zero_()
        self.window: torch.Tensor | None = None

    def __bool__(self) -> bool:
        return bool(self.layers)

    @torch.no_grad()
    def after_step(self, applied: bool) -> None:
        """Sum this step's counts over ranks; on an applied step move the biases and keep the counts."""
        if not self.layers:
            return
        loads = distributed.all_reduce_sum(self.env, torch.stack([m.expert_load for m in self.layers]))
        for layer in self.layers:
            layer.expert_load.zero_()
        rates = [layer.moe.bias_update_rate for layer in self.layers]
        if applied and any(rates):
            # One update for all layers, no host sync: a layer that saw no tokens stays put.
            step = torch.tensor(rates, device=loads.device)[:, None] * torch.sign(loads.mean(dim=1, keepdim=True) - loads)
            step = torch.where(loads.sum(dim=1, keepdim=True) > 0, step, 0.0)
            for layer, delta in zip(self.layers, step, strict=True):
                layer.expert_bias += delta
        if applied:
            self.window = loads if self.window is None else self.window + loads

    def metrics(self) -> dict[str, float | list]:
        """Expert load since the last call: per layer and expert (share x experts), and its extremes."""
        if self.window is None or self.window.sum() == 0:
            return {}
        window, self.window = self.window.cpu(), None
        share = window / window.sum(dim=1, keepdim=True).clamp(min=1) * window.shape[1]
        return {
            "expert_load_max": round(float(share.max()), 4),
            "expert_load_min": round(float(share.min()), 4),
            "expert_load": [[round(float(x), 4) for x in row] for row in share],
            "expert_load_layers": self.layer_ids,
        }


def _layer_index(name: str, position: int) -> int:
    """`layers.7.ffn` (under any wrapper's prefix) -> 7; else the MoE layer's position."""
    match = re.search(r"(?:^|\.)layers\.(\d+)\.", name + ".")
    return int(match.group(1)) if match else position
