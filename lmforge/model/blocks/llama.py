"""The Llama-family block: pre-norm attention then a pre-norm FFN, each added to the residual.

Its options cover the open families that share this layout: grouped-query attention with
optional biases (Qwen2), QK-norm (Qwen3), sliding-window layers (Mistral, Qwen2/3's
`layer_types`), and a dense SwiGLU or a mixture-of-experts FFN per layer (Mixtral,
Qwen3-MoE). Its Hugging Face mapping is beside it, in llama_hf.py.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.attention import Attention
from lmforge.model.blocks import register_block
from lmforge.model.blocks.llama_hf import LlamaFamilyLayout
from lmforge.model.config import ModelConfig
from lmforge.model.feedforward import FeedForward
from lmforge.model.moe import MoE


@register_block("llama", hf=LlamaFamilyLayout())
class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config, layer)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn = MoE(config) if config.is_moe_layer(layer) else FeedForward(config.dim, config.ffn_dim, config.mlp_bias)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, kv_cache, layer)
        return x + self.ffn(self.ffn_norm(x))

    @staticmethod
    def num_params(config: ModelConfig, layer: int, active: bool = False) -> int:
        """Attention, per-head QK-norm, two norms and the FFN (`active`: a token's experts only)."""
        qk_norm = 2 * config.head_dim * config.qk_norm
        return config.attention_params() + qk_norm + 2 * config.dim + config.ffn_params(layer, active)

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float, generator: torch.Generator | None = None) -> None:
        """Normal(0, std) inputs; residual output projections at `residual_std`; biases zero, norms one."""
        init_attention(self.attn, std, residual_std, generator)
        self.ffn.init_weights(std, residual_std, generator)  # dense or MoE, each its own
        self.attn_norm.reset_parameters()
        self.ffn_norm.reset_parameters()


def init_linear(linear: nn.Linear, std: float, generator: torch.Generator | None) -> None:
    nn.init.normal_(linear.weight, std=std, generator=generator)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def init_attention(attn: Attention, std: float, residual_std: float, generator: torch.Generator | None) -> None:
    init_linear(attn.wqkv, std, generator)
    init_linear(attn.wo, residual_std, generator)
    for norm in (attn.q_norm, attn.k_norm):
        if norm is not None:
            norm.reset_parameters()
