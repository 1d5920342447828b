"""A Llama-style decoder: RoPE, RMSNorm, SwiGLU, grouped-query attention through SDPA.

Pure math: no I/O, no devices, no distribution. The trainer applies FSDP/compile/
checkpointing from outside (train/parallel.py), so this file serves one CPU or many GPUs.
Weight layouts follow HF Llama (rotate-half RoPE), so export is a renaming plus a split of
the fused projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.config import ModelConfig, RopeScaling
from lmforge.model.losses import linear_cross_entropy


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d) (Su et al., 2021), optionally rescaled for long context."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.type == "linear":
        return inv_freq / scaling.factor
    # llama3: wavelengths longer than original_len / low_freq_factor are interpolated by
    # `factor`, those shorter than original_len / high_freq_factor kept, a linear blend between.
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(middle, blended, scaled)


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, scaling: RopeScaling | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape [max_seq_len, head_dim] for rotate-half RoPE."""
    inv_freq = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [seq, head_dim] or [batch, 1, seq, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def packed_positions_and_mask(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions within each document [batch, seq] and the block-causal mask [batch, 1, seq, seq]."""
    batch, seq = document_ids.shape
    index = torch.arange(seq, device=document_ids.device).expand(batch, seq)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    same = document_ids[:, :, None] == document_ids[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return index - first, (same & causal)[:, None]


class KVCache:
    """Pre-allocated keys and values for every layer: [layers, batch, kv_heads, max_len, head_dim]."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # One fused projection for q, k and v: a single larger matmul is faster than three.
        self.wqkv = nn.Linear(
            config.dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=config.qkv_bias
        )
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=config.attn_out_bias)

    def forward(
        self, x, cos, sin, kv_cache: KVCache | None = None, layer: int = 0, start: int = 0, attn_mask=None
    ):
        batch, seq, _ = x.shape
        q, k, v = self.wqkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim],
            dim=-1,
        )
        q = q.view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # RoPE in the activation dtype (as HF Llama does): no fp32 round trip per layer.
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, start, k, v)
        # GQA: each KV head serves n_heads / n_kv_heads query heads; SDPA broadcasts them
        # itself (enable_gqa) instead of materialising repeated keys and values.
        gqa = self.n_kv_heads != self.n_heads
        if attn_mask is not None:  # packed sequences: causal within each document only
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
        elif start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif seq == 1:  # one new token sees the whole cache
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:
            # A chunk appended after cached positions: query i sees keys <= start + i.
            keys = torch.arange(k.shape[2], device=x.device)
            mask = keys[None, :] <= (start + torch.arange(seq, device=x.device))[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU (Shazeer, 2020) with the gate and up projections fused into one matmul."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w13 = nn.Linear(config.dim, 2 * config.ffn_dim, bias=config.mlp_bias)
        self.w2 = nn.Linear(config.ffn_dim, config.dim, bias=config.mlp_bias)

    def forward(self, x):
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn = FeedForward(config)

    def forward(self, x, cos, sin, kv_cache=None, layer=0, start=0, attn_mask=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, layer, start, attn_mask)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building a model")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        # Not persistent: derived from the config, so checkpoints hold only learned weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head. `to_empty` (meta-device init) makes new
        parameters and unties them, so the init methods below tie again."""
        if self.config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, init_std); residual output projections scaled by 1/sqrt(2 * n_layers)
        so the residual stream's variance does not grow with depth (GPT-2, section 2.3)."""
        self.tie_weights()
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std, generator=generator)
        for block in self.layers:
            nn.init.normal_(block.attn.wqkv.weight, std=std, generator=generator)
            nn.init.normal_(block.attn.wo.weight, std=residual_std, generator=generator)
            nn.init.normal_(block.ffn.w13.weight, std=std, generator=generator)
            nn.init.normal_(block.ffn.w2.weight, std=residual_std, generator=generator)
            for linear in (block.attn.wqkv, block.attn.wo, block.ffn.w13, block.ffn.w2):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            block.attn_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
        self.norm.reset_parameters()
        if not self.config.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std, generator=generator)
        self.init_rope()

    @torch.no_grad()
    def init_rope(self) -> None:
        """Tie and fill the RoPE tables: after `to_empty`, when every weight comes from a checkpoint."""
        self.tie_weights()
        c = self.config
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta, c.rope_scaling)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def _hidden(self, tokens, cos, sin, kv_cache, start, mask) -> torch.Tensor:
        x = self.tok_embeddings(tokens)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, kv_cache, i, start, mask)
        return self.norm(x)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final normalised hidden states [batch, seq, dim] (features for classification heads)."""
        seq = tokens.shape[1]
        if seq > self.config.max_seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds max_seq_len {self.config.max_seq_len}")
        return self._hidden(tokens, self.rope_cos[:seq], self.rope_sin[:seq], None, 0, None)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        start: int = 0,
        document_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab], or the mean cross-entropy if `targets` are given.

        `document_ids` [batch, seq] marks sequences packed into one row: each token attends
        only to earlier tokens of its own document, and RoPE positions restart at every
        document, so a packed row computes exactly what the documents would alone.
        """
        seq = tokens.shape[1]
        if start + seq > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + seq} tokens exceeds max_seq_len {self.config.max_seq_len}")
        mask = None
        if document_ids is not None:
            positions, mask = packed_positions_and_mask(document_ids)
            cos, sin = self.rope_cos[positions][:, None], self.rope_sin[positions][:, None]
        else:
            cos, sin = self.rope_cos[start : start + seq], self.rope_sin[start : start + seq]
        hidden = self._hidden(tokens, cos, sin, kv_cache, start, mask)
        if targets is not None and torch.is_grad_enabled():
            # Training: head and loss fused per chunk of tokens, never holding all logits.
            return linear_cross_entropy(hidden, self.output.weight, targets)
        logits = self.output(hidden)
        if targets is None:
            return logits
        # Cross-entropy in fp32: bf16 log-softmax over a large vocabulary loses precision.
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
