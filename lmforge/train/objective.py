"""What a run trains on: the `Objective` protocol the trainer drives; batch arithmetic.

An objective gives batches as a pure function of (step, micro_step), so that resuming
needs only the step; a loss (plus extra metrics to log); and validation. Pretraining's is
in train/pretrain.py; SFT's and DPO's are in lmforge/align/objectives.py, GRPO's in
lmforge/align/grpo.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lmforge.errors import CheckpointError, ConfigError
from lmforge.store import checkpoint
from lmforge.train.config import LoopConfig


class LoaderState:
    """`state_dict`/`check_resume` of an objective whose batches come from one loader (`self.loader`):
    the loader's position is the whole resume state."""

    loader: Any

    def state_dict(self, next_step: int) -> dict[str, Any]:
        return self.loader.state_dict(next_step)

    def check_resume(self, state: dict[str, Any]) -> int:
        return self.loader.check_resume(state)


class Objective(Protocol):
    """What a run trains on: batches as a pure function of the step, a loss, validation.

    Two optional members, for objectives that make their own data (RL): `grad_accum_steps`
    (micro-batches per rank per step, instead of train.global_batch_tokens' share) and
    `prepare_step(model, data_step)`, called before each step's micro-batches with the model
    being trained (rollouts from the current weights; its time is left out of tokens/s).
    """

    kind: str
    tokens_per_step: int  # for tokens/s and MFU
    seq_len: int  # for the attention term of FLOPs/token
    sharded: bool  # batches are this rank's block of each step's samples (may run on many ranks)

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]: ...
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...
    def state_dict(self, next_step: int) -> dict[str, Any]: ...
    def check_resume(self, state: dict[str, Any]) -> int: ...
    def validate(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, float]: ...


def accumulation(loop: LoopConfig, seq_len: int, world_size: int = 1) -> int:
    """grad_accum_steps: micro-batches per rank that make up train.global_batch_tokens."""
    tokens_per_micro_step = loop.micro_batch_size * seq_len * world_size
    if loop.global_batch_tokens % tokens_per_micro_step:
        raise ConfigError(
            f"train.global_batch_tokens {loop.global_batch_tokens} is not a multiple of "
            f"train.micro_batch_size x seq_len x world size = {tokens_per_micro_step}"
        )
    return loop.global_batch_tokens // tokens_per_micro_step


def resume_step(objective: Objective, state: dict[str, Any], path: Path) -> int:
    """The step a checkpoint's loader state resumes at; a state missing keys is a CheckpointError."""
    if "loader" not in state:
        raise CheckpointError(f"checkpoint {path} is corrupt: {checkpoint.STATE_FILE} lacks 'loader'")
    try:
        return objective.check_resume(state["loader"])
    except KeyError as err:
        raise CheckpointError(f"checkpoint {path} is corrupt: its loader state lacks {err}") from None
    except (TypeError, AttributeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: its loader state is malformed") from None
