"""Grouped-query attention through SDPA, with the options frontier models add: QK-norm and a
sliding window, and the masks that packing (document ids) and windows need."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.kv_cache import KVCacheRows
from lmforge.model.rope import apply_rope


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """Index of the first token of each token's document [batch, seq]."""
    batch, seq = document_ids.shape
    index = torch.arange(seq, device=document_ids.device).expand(batch, seq)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values


def attention_mask(seq: int, device: torch.device, document_ids: torch.Tensor | None = None,
                   window: int | None = None) -> torch.Tensor | None:
    """Which keys each query sees, [batch or 1, 1, seq, seq] (True: attend); None: plain causal.

    Causal, within the query's document when `document_ids` packs several into a row, and
    within the last `window` positions (the query's own included, as HF's sliding window).
    """
    if document_ids is None and window is None:
        return None
    index = torch.arange(seq, device=device)
    mask = index[None, :] <= index[:, None]
    if window is not None:
        mask = mask & (index[:, None] - index[None, :] < window)
    mask = mask[None, None]
    if document_ids is not None:
        mask = mask & (document_ids[:, :, None] == document_ids[:, None, :])[:, None]
    return mask


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.window = config.layer_window(layer)
        # One fused projection for q, k and v: a single larger matmul is faster than three.
        self.wqkv = nn.Linear(
            config.dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=config.qkv_bias
        )
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=config.attn_out_bias)
        # QK-norm (Dehghani et al., 2023; Qwen3): RMSNorm over each head's width, shared by the
        # heads, before RoPE; it keeps attention logits from growing without bound.
        self.q_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=config.norm_eps) if config.qk_norm else None

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of x as [batch, seq, heads, head_dim], QK-norm applied (per head here; a block
        type may normalise otherwise, as OLMo-2 does over all heads at once)."""
        batch, seq, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim],
            dim=-1,
        )
        q = q.view(batch, seq, self.n_heads, self.head_dim)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v.view(batch, seq, self.n_kv_heads, self.head_dim)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache: KVCacheRows | None = None, layer: int = 0):
        """`attn_mask` None: causal over x itself. With `kv_cache`, x's keys/values are stored and
        attention runs over the cached ones, with the mask the cache gives for this layer."""
        batch, seq, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.project(x))
        # RoPE in the activation dtype (as HF Llama does): no fp32 round trip per layer.
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v, attn_mask = kv_cache.update(layer, k, v)
        # GQA: each KV head serves n_heads / n_kv_heads query heads; SDPA broadcasts them
        # itself (enable_gqa) instead of materialising repeated keys and values.
        gqa = self.n_kv_heads != self.n_heads
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))
