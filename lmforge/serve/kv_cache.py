"""A slot KV cache and a batched forward in which every row has its own positions.

`lmforge.model.KVCache` serves one batch that advances in lockstep (one shared `start`).
Continuous batching needs rows at different lengths in one forward: row b writes its new
keys/values at its own positions in its own slot and attends to its own cached prefix.
`SlotKVCache` is duck-typed to the model's cache interface (`update(layer, start, k, v)`),
so the model's blocks run unchanged; `forward_rows` supplies per-row RoPE positions and
the attention mask.
"""

from __future__ import annotations

import torch

from lmforge.model import ModelConfig, Transformer


class SlotKVCache:
    """Keys and values [layers, slots + 1, kv_heads, max_len, head_dim], one slot per sequence.

    The extra last slot is scratch: padding tokens of a ragged prefill batch write there,
    so they never touch a live sequence's cache.
    """

    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, device=None, dtype=None):
        shape = (config.n_layers, num_slots + 1, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.num_slots, self.max_len = num_slots, max_len
        self.scratch = num_slots
        self._bound: tuple | None = None

    def bytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def bind(self, read_slots: list[int], write_slots: torch.Tensor, positions: torch.Tensor, kv_len: int):
        """Set where the next forward writes ([batch, seq] slots and positions) and what it reads."""
        first = read_slots[0]
        contiguous = read_slots == list(range(first, first + len(read_slots)))
        # Contiguous slots are read as a view; others are gathered (one copy per layer).
        read = slice(first, first + len(read_slots)) if contiguous else torch.tensor(read_slots, device=self.k.device)
        self._bound = (read, write_slots, positions, kv_len)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [batch, kv_heads, seq, head_dim] -> the rows' cached keys/values [batch, kv_heads, kv_len, head_dim]."""
        read, write_slots, positions, kv_len = self._bound
        # Advanced indices on dims 0 and 2 around a slice put the index dims first: [batch, seq, kv_heads, head_dim].
        self.k[layer][write_slots, :, positions] = k.transpose(1, 2)
        self.v[layer][write_slots, :, positions] = v.transpose(1, 2)
        return self.k[layer][read, :, :kv_len], self.v[layer][read, :, :kv_len]


def forward_rows(
    model: Transformer,
    cache: SlotKVCache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    read_slots: list[int],
    write_slots: torch.Tensor,
    blocks=None,
) -> torch.Tensor:
    """Final hidden states [batch, seq, dim] of `tokens` [batch, seq] at `positions` [batch, seq].

    Row b reads slot `read_slots[b]`; token (b, s) attends to keys at positions <= positions[b, s]
    of that slot (its cached prefix and the chunk's earlier tokens) and is written at
    (write_slots[b, s], positions[b, s]). Padding tokens use position 0 and the scratch slot.
    `blocks`: the model's blocks as they should run (compiled ones, for the engine's `compile`).
    """
    kv_len = int(positions.max()) + 1
    cos = model.rope_cos[positions][:, None]  # [batch, 1, seq, head_dim]: RoPE per row
    sin = model.rope_sin[positions][:, None]
    keys = torch.arange(kv_len, device=tokens.device)
    mask = (keys[None, None, :] <= positions[:, :, None])[:, None]  # [batch, 1, seq, kv_len]
    cache.bind(read_slots, write_slots, positions, kv_len)
    x = model.tok_embeddings(tokens)
    for layer, block in enumerate(blocks if blocks is not None else model.layers):
        x = block(x, cos, sin, cache, layer, 0, mask)
    return model.norm(x)
