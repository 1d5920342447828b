"""The OLMo-2 block (Groeneveld et al., 2024; OLMo Team, "2 OLMo 2 Furious", 2025), module and
Hugging Face layout in one file: the worked example of a block type (README, "Add your own block").

Two changes from the Llama block. The norms sit after each sublayer, on its output, before the
residual add (`x + norm(attn(x))`, `x + norm(ffn(x))`): the residual stream itself is never
normalised inside a layer. QK-norm (`model.qk_norm: true`, which OLMo-2 always has) is one RMSNorm
over all query heads together and one over all key heads, before splitting into heads, rather
than Qwen3's per-head norm. Everything else is lmforge's: grouped-query attention with RoPE,
the KV cache, packing and sliding-window masks, the SwiGLU FFN.

Exports as `Olmo2ForCausalLM` (model_type "olmo2"); transformers' OLMo-2 has no sliding window,
MLP bias or mixture of experts, so models with those stay lmforge checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmforge.model.attention import Attention
from lmforge.model.blocks import register_block
from lmforge.model.blocks.llama import init_attention
from lmforge.model.blocks.llama_hf import attention_from_hf, attention_to_hf, mlp_from_hf, mlp_to_hf
from lmforge.model.config import ModelConfig
from lmforge.model.feedforward import FeedForward
from lmforge.model.moe import MoE

ARCHITECTURE = "Olmo2ForCausalLM"


class Olmo2Attention(Attention):
    """lmforge's attention with QK-norm over the whole projected q and k widths."""

    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__(config, layer)
        if config.qk_norm:
            self.q_norm = nn.RMSNorm(self.n_heads * self.head_dim, eps=config.norm_eps)
            self.k_norm = nn.RMSNorm(self.n_kv_heads * self.head_dim, eps=config.norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return tuple(t.view(batch, seq, -1, self.head_dim) for t in (q, k, v))


class Olmo2Layout:
    """config.json and tensor names of transformers' Olmo2ForCausalLM."""

    architectures = {ARCHITECTURE: "olmo2"}

    def export_architecture(self, config: ModelConfig) -> str:
        unsupported = [
            (not config.qk_norm, "OLMo-2 always normalises queries and keys: set model.qk_norm: true"),
            (config.sliding_window is not None, "OLMo-2 has no sliding-window layers"),
            (config.moe is not None, "OLMo-2 has no mixture-of-experts layers"),
            (config.mlp_bias, "OLMo-2 has no MLP biases"),
            (config.qkv_bias != config.attn_out_bias, "OLMo-2's attention biases are all of q/k/v/o or none"),
        ]
        for bad, why in unsupported:
            if bad:
                raise ValueError(why)
        return ARCHITECTURE

    def config_to_hf(self, config: ModelConfig, architecture: str) -> dict[str, Any]:
        return {"intermediate_size": config.ffn_dim, "attention_bias": config.qkv_bias}

    def config_from_hf(self, hf: dict[str, Any], architecture: str) -> dict[str, Any]:
        bias = bool(hf.get("attention_bias", False))
        return {"ffn_dim": hf["intermediate_size"], "qk_norm": True, "qkv_bias": bias, "attn_out_bias": bias}

    def layer_to_hf(self, state: dict[str, torch.Tensor], config: ModelConfig, layer: int,
                    architecture: str) -> dict[str, torch.Tensor]:
        out = {
            "post_attention_layernorm.weight": state["attn_out_norm.weight"],
            "post_feedforward_layernorm.weight": state["ffn_out_norm.weight"],
            "self_attn.q_norm.weight": state["attn.q_norm.weight"],
            "self_attn.k_norm.weight": state["attn.k_norm.weight"],
        }
        out.update(attention_to_hf(state, config))  # export requires q/k/v and o biases alike
        out.update(mlp_to_hf(state, config))  # export refuses mlp_bias
        return out

    def layer_from_hf(self, tensors: dict[str, torch.Tensor], config: ModelConfig, layer: int,
                      architecture: str) -> dict[str, torch.Tensor]:
        state = {
            "attn_out_norm.weight": tensors["post_attention_layernorm.weight"],
            "ffn_out_norm.weight": tensors["post_feedforward_layernorm.weight"],
            "attn.q_norm.weight": tensors["self_attn.q_norm.weight"],
            "attn.k_norm.weight": tensors["self_attn.k_norm.weight"],
        }
        state.update(attention_from_hf(tensors, config))
        state.update(mlp_from_hf(tensors, config))
        return state


@register_block("olmo2", hf=Olmo2Layout())
class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.attn = Olmo2Attention(config, layer)
        self.attn_out_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn = MoE(config) if config.is_moe_layer(layer) else FeedForward(config.dim, config.ffn_dim, config.mlp_bias)
        self.ffn_out_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, layer=0):
        x = x + self.attn_out_norm(self.attn(x, cos, sin, attn_mask, kv_cache, layer))
        return x + self.ffn_out_norm(self.ffn(x))

    @staticmethod
    def num_params(config: ModelConfig, layer: int, active: bool = False) -> int:
        """Attention, QK-norm over all q and k heads, two norms and the FFN."""
        qk_norm = (config.n_heads + config.n_kv_heads) * config.head_dim * config.qk_norm
        return config.attention_params() + qk_norm + 2 * config.dim + config.ffn_params(layer, active)

    @torch.no_grad()
    def init_weights(self, std: float, residual_std: float, generator: torch.Generator | None = None) -> None:
        """As the Llama block's: Normal(0, std), residual output projections at `residual_std`, norms one."""
        init_attention(self.attn, std, residual_std, generator)
        self.ffn.init_weights(std, residual_std, generator)  # dense or MoE, each its own
        self.attn_out_norm.reset_parameters()
        self.ffn_out_norm.reset_parameters()
