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
from lmforge.model.kv_cache import KVCache, KVCacheRows
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


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        # One fused projection for q, k and v: a single larger matmul is faster than three.
        self.wqkv = nn.Linear(
            config.dim, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=config.qkv_bias
        )
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=config.attn_out_bias)

    def forward(self, x, cos, sin, attn_mask=None, kv_cache: KVCacheRows | None = None, layer: int = 0):
        """`attn_mask` None: causal over x itself. With `kv_cache`, x's keys/values are stored
        and attention runs over the cached ones, which `attn_mask` then must cover."""
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
            k, v = kv_cache.update(layer, k, v)
        # GQA: each KV head serves n_heads / n_kv_heads query heads; SDPA broadcasts them
        # itself (enable_gqa) instead of materialising repeated keys and values.
        gqa = self.n_kv_heads != self.n_heads
        if attn_mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=gqa)
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

    def forward(self, x, cos, sin, attn_mask=None, kv_cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, attn_mask, kv_cache, layer)
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

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | KVCacheRows | None = None,
        document_ids: torch.Tensor | None = None,
        blocks: nn.ModuleList | list[nn.Module] | None = None,
    ) -> torch.Tensor:
        """Final normalised hidden states [batch, seq, dim]; `forward` documents the arguments.

        `blocks`: this model's blocks as the caller wrapped them (the engine's torch.compile'd
        ones); by default `self.layers`.
        """
        batch, seq = tokens.shape
        mask = None
        if document_ids is not None:
            positions, mask = packed_positions_and_mask(document_ids)
            length = seq
        elif positions is not None:
            length = int(positions.max()) + 1  # positions may run ahead of seq (a cached prefix)
        else:
            length = seq
        if length > self.config.max_seq_len:
            raise ValueError(f"sequence of {length} tokens exceeds max_seq_len {self.config.max_seq_len}")
        if positions is None:
            cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        else:
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]
            if positions.dim() == 2:  # per row: [batch, 1, seq, head_dim]
                cos, sin = cos[:, None], sin[:, None]
        if kv_cache is not None:
            if isinstance(kv_cache, KVCache):  # batch row b is cache row b
                kv_cache = kv_cache.rows(range(batch))
            if length > kv_cache.max_len:
                raise ValueError(f"KV cache holds {kv_cache.max_len} positions, asked for {length}")
            positions = (torch.arange(seq, device=tokens.device) if positions is None else positions).expand(batch, seq)
            kv_cache = kv_cache.at(positions, length)
            # Token (b, s) sees its row's cached keys up to its own position (its prefix and
            # the earlier tokens of this chunk).
            keys = torch.arange(length, device=tokens.device)
            mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [batch, 1, seq, length]
        x = self.tok_embeddings(tokens)
        for layer, block in enumerate(self.layers if blocks is None else blocks):
            x = block(x, cos, sin, mask, kv_cache, layer)
        return self.norm(x)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        kv_cache: KVCache | KVCacheRows | None = None,
        document_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits [batch, seq, vocab], or the mean cross-entropy if `targets` are given.

        `logits_to_keep` N > 0: only the last N positions' logits ([batch, N, vocab]), as HF's
        argument of that name (RL scores completions only: the head skips the prompts).

        `positions` [batch, seq] (or [seq], shared by the rows) are the tokens' RoPE positions,
        0..seq-1 by default. With a `kv_cache`, each token's keys and values are stored at its
        position and it attends to the cached ones at positions up to its own, so decoding feeds
        only new tokens; rows may sit at different positions (continuous batching).
        `document_ids` [batch, seq] marks sequences packed into one row: each token attends
        only to earlier tokens of its own document, and RoPE positions restart at every
        document, so a packed row computes exactly what the documents would alone.
        """
        hidden = self.hidden_states(tokens, positions, kv_cache, document_ids)
        if targets is not None and logits_to_keep:
            raise ValueError("logits_to_keep returns logits; it does not take targets")
        if targets is not None and torch.is_grad_enabled():
            # Training: head and loss fused per chunk of tokens, never holding all logits.
            return linear_cross_entropy(hidden, self.output.weight, targets)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.output(hidden)
        if targets is None:
            return logits
        # Cross-entropy in fp32: bf16 log-softmax over a large vocabulary loses precision.
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
