"""The dense FFN: SwiGLU (Shazeer, 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeedForward(nn.Module):
    """SwiGLU with the gate and up projections fused into one matmul (`w13` = gate | up, by rows)."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden_dim, bias=bias)
        self.w2 = nn.Linear(hidden_dim, dim, bias=bias)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) input projections, the residual output one at `residual_std`, biases zero."""
        for linear, scale in ((self.w13, std), (self.w2, residual_std)):
            nn.init.normal_(linear.weight, std=scale, generator=generator)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
