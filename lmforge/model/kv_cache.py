"""Keys and values of earlier tokens, so decoding computes each token once.

One cache serves both a batch that advances in lockstep and continuous batching, where
rows sit at different lengths: every token carries its own position, and row b of a
forward may read and write any row of the cache (`KVCache.rows`). The model's forward
(`Transformer.forward(tokens, positions=..., kv_cache=...)`) is the only code that runs
layers; this file only stores and returns keys and values.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmforge.model.config import ModelConfig


class KVCache:
    """Pre-allocated keys and values [layers, rows, kv_heads, max_len, head_dim].

    Passed to the model as it is, batch row b reads and writes cache row b. `rows(...)`
    maps a batch onto other cache rows (the serving engine's slots).
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=None):
        shape = (config.n_layers, batch_size, config.n_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch_size, self.max_len = batch_size, max_len

    def rows(self, read: Sequence[int], write: torch.Tensor | None = None) -> KVCacheRows:
        """Batch row b reads cache row `read[b]`; token (b, s) writes row `write[b, s]`
        ([batch, seq] or [batch, 1]; default: the row it reads)."""
        read = list(read)
        first = read[0]
        # Contiguous rows are read as a view; others are gathered (one copy per layer).
        if read == list(range(first, first + len(read))):
            index: slice | torch.Tensor = slice(first, first + len(read))
        else:
            index = torch.tensor(read, device=self.k.device)
        if write is None:
            write = torch.tensor(read, device=self.k.device)[:, None]
        return KVCacheRows(self, index, write)


class KVCacheRows:
    """A batch's view of some rows of a `KVCache`; `at(positions, kv_len)` binds one forward's positions."""

    def __init__(self, cache: KVCache, read: slice | torch.Tensor, write: torch.Tensor,
                 positions: torch.Tensor | None = None, kv_len: int = 0):
        self.cache, self.read, self.write = cache, read, write
        self.positions, self.kv_len = positions, kv_len
        self.max_len = cache.max_len

    def at(self, positions: torch.Tensor, kv_len: int) -> KVCacheRows:
        """This view for one forward: tokens at `positions` [batch, seq], reading `kv_len` positions."""
        return KVCacheRows(self.cache, self.read, self.write, positions, kv_len)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [batch, kv_heads, seq, head_dim] at the bound positions; return every row's
        cached keys and values [batch, kv_heads, kv_len, head_dim]."""
        cache_k, cache_v = self.cache.k[layer], self.cache.v[layer]
        # Advanced indices on dims 0 and 2 around a slice put the index dims first:
        # [batch, seq, kv_heads, head_dim].
        cache_k[self.write, :, self.positions] = k.transpose(1, 2)
        cache_v[self.write, :, self.positions] = v.transpose(1, 2)
        return cache_k[self.read, :, : self.kv_len], cache_v[self.read, :, : self.kv_len]
