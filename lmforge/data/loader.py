"""Deterministic, resumable loading of fixed-length token windows from a token dataset.

The token stream of a split (all shards, in order) is cut into non-overlapping windows of
`seq_len + 1` tokens (inputs plus shifted targets). Sample k of the run is window
`perm(seed, epoch)[k % num_windows]` with `epoch = k // num_windows`, so the batch at any
step is a pure function of (seed, step): resuming needs only the step, and sharding by
rank only partitions each step's samples, never reorders them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import DataError
from lmforge.store.token_dataset import read_manifest


class TokenDataset:
    """One split of a token dataset dir, as a virtual concatenation of memory-mapped shards."""

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        if split not in self.manifest["splits"]:
            raise DataError(f"{self.directory}: no split {split!r}")
        info = self.manifest["splits"][split]
        self.split = split
        self.dtype = np.dtype(self.manifest["dtype"])
        self.text_bytes: int = info["text_bytes"]
        self.shards: list[np.memmap] = []
        for shard in info["shards"]:
            path = self.directory / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not path.is_file():
                raise DataError(f"token shard missing: {path}")
            if path.stat().st_size != expected:
                raise DataError(
                    f"token shard {path} has {path.stat().st_size} bytes, manifest says {expected}: "
                    "the dataset is truncated or was modified; re-run `lmforge tokenize`"
                )
            self.shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
        sizes = [len(s) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.num_tokens = int(self.offsets[-1])

    @property
    def tokenizer_hash(self) -> str:
        return self.manifest["tokenizer"]["hash"]

    @property
    def bytes_per_token(self) -> float:
        return self.text_bytes / max(1, self.num_tokens)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the concatenated stream, crossing shards as needed."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        position = start - int(self.offsets[shard])
        while filled < length:
            data = self.shards[shard]
            take = min(length - filled, len(data) - position)
            out[filled : filled + take] = data[position : position + take]
            filled += take
            shard, position = shard + 1, 0
        return out


class WindowLoader:
    """Micro-batches of (inputs, targets) for one rank, a pure function of (seed, step)."""

    def __init__(
        self,
        dataset: TokenDataset,
        seq_len: int,
        micro_batch_size: int,
        grad_accum_steps: int = 1,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        self.dataset, self.seq_len, self.seed, self.shuffle = dataset, seq_len, seed, shuffle
        self.micro_batch_size, self.grad_accum_steps = micro_batch_size, grad_accum_steps
        self.rank, self.world_size = rank, world_size
        self.num_windows = (dataset.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(
                f"{dataset.directory} split {dataset.split!r} has {dataset.num_tokens} tokens, "
                f"fewer than one window of seq_len={seq_len}"
            )
        self._perm_epoch, self._perm = -1, np.arange(0)

    @property
    def samples_per_step(self) -> int:
        """Windows in one optimizer step across all ranks: the global batch."""
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    def window_index(self, sample: int) -> int:
        epoch, within = divmod(sample, self.num_windows)
        if not self.shuffle:
            return within
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm, self._perm_epoch = rng.permutation(self.num_windows), epoch
        return int(self._perm[within])

    def samples(self, step: int, micro_step: int) -> list[int]:
        """Global sample numbers of this rank's micro-batch: each rank owns a contiguous block."""
        per_rank = self.micro_batch_size * self.grad_accum_steps
        first = step * self.samples_per_step + self.rank * per_rank + micro_step * self.micro_batch_size
        return list(range(first, first + self.micro_batch_size))

    def batch(self, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [
            self.dataset.read(self.window_index(k) * self.seq_len, self.seq_len + 1)
            for k in self.samples(step, micro_step)
        ]
        tokens = torch.from_numpy(np.stack(rows))
        return tokens[:, :-1], tokens[:, 1:]

    def state_dict(self, next_step: int) -> dict:
        return {
            "next_step": next_step,
            "samples_consumed": next_step * self.samples_per_step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "num_windows": self.num_windows,
        }

    def check_resume(self, state: dict) -> int:
        """Validate a saved loader state against this loader; return the step to resume at."""
        for key in ("seed", "seq_len", "num_windows"):
            if state.get(key) != getattr(self, key):
                raise DataError(
                    f"cannot resume: loader {key} was {state.get(key)} in the checkpoint, "
                    f"is {getattr(self, key)} now (dataset or config changed)"
                )
        if state["samples_consumed"] % self.samples_per_step:
            raise DataError(
                f"cannot resume: {state['samples_consumed']} samples consumed is not a whole number "
                f"of steps of {self.samples_per_step} (global batch changed)"
            )
        return state["samples_consumed"] // self.samples_per_step
