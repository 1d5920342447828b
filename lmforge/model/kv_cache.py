"""Keys and values of earlier tokens, so decoding computes each token once.

One cache serves both a batch that advances in lockstep and continuous batching, where
rows sit at different lengths: every token carries its own position, and row b of a
forward may read and write any row of the cache (`KVCache.rows`). The model's forward
(`Transformer.forward(tokens, positions=..., kv_cache=...)`) is the only code that runs
layers; this file stores keys and values and says which of them each token may see.

A layer with a sliding window of W keeps only W positions per row, in a ring (position p
at slot p mod W), so a long generation's cache for that layer stays W long: what Mistral's
rolling buffer does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge.model.config import ModelConfig


class KVCache:
    """Pre-allocated keys and values per layer, [rows, kv_heads, length, head_dim]: `max_len`
    for full-attention layers, the window for sliding ones (with each slot's position, -1 empty).

    Passed to the model as it is, batch row b reads and writes cache row b. `rows(...)`
    maps a batch onto other cache rows (the serving engine's slots).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.slot_positions: list[torch.Tensor | None] = []
        self.windows: list[int | None] = []
        for layer in range(config.n_layers):
            window = config.layer_window(layer)
            window = window if window is not None and window < max_len else None
            shape = (batch_size, config.n_kv_heads, window or max_len, config.head_dim)
            self.k.append(torch.zeros(shape, device=device, dtype=dtype))
            self.v.append(torch.zeros(shape, device=device, dtype=dtype))
            ring = None if window is None else torch.full((batch_size, window), -1, dtype=torch.long, device=device)
            self.slot_positions.append(ring)
            self.windows.append(window)
        self.batch_size, self.max_len = batch_size, max_len

    def rows(self, read: Sequence[int], write: torch.Tensor | None = None) -> KVCacheRows:
        """Batch row b reads cache row `read[b]`; token (b, s) writes row `write[b, s]`
        ([batch, seq] or [batch, 1]; default: the row it reads)."""
        read = list(read)
        first = read[0]
        device = self.k[0].device
        # Contiguous rows are read as a view; others are gathered (one copy per layer).
        if read == list(range(first, first + len(read))):
            index: slice | torch.Tensor = slice(first, first + len(read))
        else:
            index = torch.tensor(read, device=device)
        if write is None:
            write = torch.tensor(read, device=device)[:, None]
        return KVCacheRows(self, index, write)


class KVCacheRows:
    """A batch's view of some rows of a `KVCache`; `at(positions, kv_len)` binds one forward's positions."""

    def __init__(self, cache: KVCache, read: slice | torch.Tensor, write: torch.Tensor,
                 positions: torch.Tensor | None = None, kv_len: int = 0):
        self.cache, self.read, self.write = cache, read, write
        self.positions, self.kv_len = positions, kv_len
        self.max_len = cache.max_len
        self._full_mask: torch.Tensor | None = None

    def at(self, positions: torch.Tensor, kv_len: int) -> KVCacheRows:
        """This view for one forward: tokens at `positions` [batch, seq], reading `kv_len` positions."""
        return KVCacheRows(self.cache, self.read, self.write, positions, kv_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store k, v [batch, kv_heads, seq, head_dim] at the bound positions; return the keys and
        values each row attends over and the mask [batch, 1, seq, keys] of those it may see."""
        if self.cache.windows[layer] is not None:
            return self._update_ring(layer, k, v)
        cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]
        # Advanced indices on dims 0 and 2 around a slice put the index dims first:
        # [batch, seq, kv_heads, head_dim].
        cache_k[self.write, :, self.positions] = k.transpose(1, 2)
        cache_v[self.write, :, self.positions] = v.transpose(1, 2)
        if self._full_mask is None:
            # Token (b, s) sees its row's cached keys up to its own position (its prefix and
            # the earlier tokens of this chunk).
            keys = torch.arange(self.kv_len, device=k.device)
            self._full_mask = (keys[None, None, :] <= self.positions[:, :, None])[:, None]
        return cache_k[self.read, :, : self.kv_len], cache_v[self.read, :, : self.kv_len], self._full_mask

    def _update_ring(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """A sliding layer: attend over the ring as it was (positions before this chunk) plus the
        chunk's own keys, then keep each row's last `window` positions in the ring."""
        window = self.cache.windows[layer]
        ring_k, ring_v, ring_pos = self.cache.k[layer], self.cache.v[layer], self.cache.slot_positions[layer]
        positions = self.positions
        batch, seq = positions.shape
        write = self.write.expand(batch, seq)
        old_k, old_v, old_pos = ring_k[self.read], ring_v[self.read], ring_pos[self.read]
        query = positions[:, :, None]
        # A ring slot counts only if written before this chunk (rows feed positions in order, so
        # the chunk's first token is its earliest; a reused slot's older entries fall away) and
        # within the window of the query.
        start = positions[:, :1, None]
        old_ok = (old_pos[:, None, :] >= 0) & (old_pos[:, None, :] < start) & (query - old_pos[:, None, :] < window)
        # The chunk's own keys: those of the same destination row (padding writes elsewhere),
        # causal, within the window.
        key = positions[:, None, :]
        new_ok = (write[:, :, None] == write[:, None, :]) & (key <= query) & (query - key < window)
        mask = torch.cat([old_ok, new_ok], dim=-1)[:, None]
        keys = torch.cat([old_k, k], dim=2)
        values = torch.cat([old_v, v], dim=2)
        # Keep only positions within the window of the row's newest one, so no two tokens of a
        # row write the same slot.
        newest = torch.where(write == write[:, :1], positions, -1).amax(dim=1, keepdim=True)
        keep = positions > newest - window
        rows, slots = write[keep], positions[keep] % window
        ring_k[rows, :, slots] = k.transpose(1, 2)[keep]
        ring_v[rows, :, slots] = v.transpose(1, 2)[keep]
        ring_pos[rows, slots] = positions[keep]
        return keys, values, mask
