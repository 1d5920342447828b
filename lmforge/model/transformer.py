"""The decoder: token embedding, a stack of registered blocks, final RMSNorm, output head.

Pure math: no I/O, no devices, no distribution. The trainer applies FSDP/compile/
checkpointing from outside (train/parallel.py), so this file serves one CPU or many GPUs.
What a layer computes is its block type (lmforge/model/blocks/, `model.block`), by default
the Llama-family block; weight layouts follow HF Llama (rotate-half RoPE), so export is a
renaming plus a split of the fused projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.attention import attention_mask, document_starts
from lmforge.model.blocks import block_type
from lmforge.model.config import ModelConfig
from lmforge.model.kv_cache import KVCache, KVCacheRows
from lmforge.model.losses import linear_cross_entropy
from lmforge.model.rope import rope_tables


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be set before building a model")
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        block = block_type(config.block).module
        self.layers = nn.ModuleList(block(config, layer) for layer in range(config.n_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.tie_weights()
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta, config.rope_scaling)
        # Not persistent: derived from the config, so checkpoints hold only learned weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Losses beside the objective's from the last forwards (z-loss; MoE layers keep their own).
        self.aux_losses: dict[str, torch.Tensor] = {}
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
            block.init_weights(std, residual_std, generator)
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
        if document_ids is not None:
            positions = torch.arange(seq, device=tokens.device) - document_starts(document_ids)
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
        masks: dict[int | None, torch.Tensor | None] = {}
        if kv_cache is not None:
            if isinstance(kv_cache, KVCache):  # batch row b is cache row b
                kv_cache = kv_cache.rows(range(batch))
            if length > kv_cache.max_len:
                raise ValueError(f"KV cache holds {kv_cache.max_len} positions, asked for {length}")
            positions = (torch.arange(seq, device=tokens.device) if positions is None else positions).expand(batch, seq)
            kv_cache = kv_cache.at(positions, length)  # the cache gives each layer its mask
        x = self.tok_embeddings(tokens)
        for layer, block in enumerate(self.layers if blocks is None else blocks):
            mask = None
            if kv_cache is None:
                # One mask per attention span (full, or each sliding window), built once per forward.
                window = self.config.layer_window(layer)
                if window not in masks:
                    masks[window] = attention_mask(seq, tokens.device, document_ids, window)
                mask = masks[window]
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
            loss, z = linear_cross_entropy(hidden, self.output.weight, targets, z_loss=self.config.z_loss)
            if self.config.z_loss and self.training:
                self.aux_losses["z_loss"] = self.aux_losses.get("z_loss", 0) + self.config.z_loss * z  # logged only
            return loss
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.output(hidden)
        if targets is None:
            return logits
        # Cross-entropy in fp32: bf16 log-softmax over a large vocabulary loses precision.
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))

    def pop_aux_losses(self) -> dict[str, torch.Tensor]:
        return pop_aux_losses(self)


def pop_aux_losses(model: nn.Module) -> dict[str, torch.Tensor]:
    """The auxiliary losses of `model`'s forwards since the last call (any wrapper around a
    Transformer), summed over layers, each already weighted by its coefficient: MoE load
    balancing and router z-loss, to add to the objective's loss; output z-loss, whose gradient
    is already in the loss, for the logs."""
    total: dict[str, torch.Tensor] = {}
    for module in model.modules():
        losses = getattr(module, "aux_losses", None)
        if losses:
            for name, value in losses.items():
                total[name] = total.get(name, 0) + value
            module.aux_losses = {}
    return total
