"""The engine's slot bookkeeping: one row of the model's `KVCache` per running sequence.

The model runs every forward itself (`Transformer.hidden_states(tokens, positions,
kv_cache)`); this file only decides which cache row a sequence owns, and maps a batch onto
those rows.
"""

from __future__ import annotations

import torch

from lmforge.model import KVCache, KVCacheRows, ModelConfig


class SlotKVCache:
    """A `KVCache` of `num_slots + 1` rows: one slot per sequence, lowest free slots first.

    The extra last row is scratch: padding tokens of a ragged prefill batch write there,
    so they never touch a live sequence's cache.
    """

    def __init__(self, config: ModelConfig, num_slots: int, max_len: int, device=None, dtype=None):
        self.cache = KVCache(config, num_slots + 1, max_len, device=device, dtype=dtype)
        self.num_slots, self.max_len = num_slots, max_len
        self.scratch = num_slots
        self._free = list(range(num_slots))

    def has_free(self) -> bool:
        return bool(self._free)

    def allocate(self) -> int:
        slot = self._free.pop(0)
        # A sliding layer's ring forgets the slot's last sequence (the model only reads a ring
        # entry written before the current chunk, but a new sequence should not depend on that).
        for positions in self.cache.slot_positions:
            if positions is not None:
                positions[slot] = -1
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)
        self._free.sort()  # lowest slots first: running rows stay contiguous more often

    def rows(self, read_slots: list[int], write_slots: torch.Tensor) -> KVCacheRows:
        """Row b reads slot `read_slots[b]`; token (b, s) writes slot `write_slots[b, s]`."""
        return self.cache.rows(read_slots, write_slots)
