"""A run's checkpoints as the trainer uses them: save, resume, roll back.

What a checkpoint holds on disk (DCP weights and optimizer state, trainer_state.json,
the `latest` pointer, retention) is lmforge/store/checkpoint.py's. This adds what the
trainer puts in its state (step, loader position, fault state, what the run is) and the
rollback past a stretch of skipped steps (see train/faults.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lmforge.store import checkpoint
from lmforge.train import distributed
from lmforge.train.config import LoopConfig
from lmforge.train.faults import StepGuard, TrainingError
from lmforge.train.objective import Objective, resume_step


class RunCheckpoints:
    """Saves and loads the checkpoints of one run in `directory`.

    `run_state`: what every checkpoint records about the run beside the step (kind, model
    shape, world size, tokenizer hash, a fine-tune's starting weights, ...).
    """

    def __init__(self, directory: Path, loop: LoopConfig, model: nn.Module, optimizers: list, objective: Objective,
                 guard: StepGuard, env: distributed.DistEnv, run_state: dict[str, Any], trainable_only: bool = False):
        self.directory, self.model, self.optimizers, self.objective = directory, model, optimizers, objective
        self.guard, self.env, self.run_state, self.trainable_only = guard, env, run_state, trainable_only
        use_async = loop.async_checkpoint if loop.async_checkpoint is not None else env.device.type == "cuda"
        self.checkpointer = checkpoint.Checkpointer(directory, loop.keep_checkpoints, use_async, trainable_only)

    def save(self, step: int, val_loss: float | None) -> Path:
        state = {
            "step": step,
            "loader": self.objective.state_dict(step),
            "val_loss": val_loss,
            "faults": self.guard.state_dict(),
            **self.run_state,
        }
        self.checkpointer.rollback_floor = self.rollback_floor(step)
        return self.checkpointer.save(step, self.model, self.optimizers, state)

    def load(self, path: Path) -> tuple[int, dict[str, Any]]:
        """Weights and optimizer state from `path`; the step it resumes at and its trainer state."""
        state = checkpoint.load(path, self.model, self.optimizers, trainable_only=self.trainable_only)
        return resume_step(self.objective, state, path), state

    def resume(self, path: Path) -> tuple[int, dict[str, Any]]:
        """Continue from `path`: its weights, optimizers and fault state; the step to go on from."""
        step, state = self.load(path)
        self.guard.load_state_dict(state.get("faults", {}))
        return step, state

    def close(self) -> Path | None:
        """Complete a write in flight; its checkpoint dir, if any."""
        return self.checkpointer.close()

    def rollback_floor(self, step: int) -> int | None:
        """The first skipped step that a rollback could still go back before (None: no rollback
        pending); retention keeps the checkpoint from before it."""
        if not self.guard.config.rollback_after:
            return None
        recent = [s for s in self.guard.skipped if s > step - self.guard.config.rollback_window]
        return recent[0] if recent else None

    def roll_back(self, bad_step: int) -> tuple[int, tuple[int, int], str]:
        """Reload the newest checkpoint from before the bad stretch and skip the stretch's data:
        the step to go on from, the data steps skipped and what happened, in words. A TrainingError when there is no
        such checkpoint or the run has rolled back faults.max_rollbacks times already."""
        guard = self.guard
        self.checkpointer.rollback_floor = self.rollback_floor(bad_step)
        self.checkpointer.wait()
        distributed.barrier(self.env)
        first_bad = guard.skipped[0]
        target = checkpoint.checkpoint_before(self.directory, first_bad)
        if target is None:
            raise TrainingError(
                f"{len(guard.skipped)} steps in {first_bad}..{bad_step} were skipped and there is no checkpoint "
                f"from before step {first_bad} to roll back to: set train.checkpoint_every, or lower optim.lr"
            )
        if guard.rollbacks >= guard.config.max_rollbacks:
            raise TrainingError(
                f"steps {first_bad}..{bad_step} were skipped after {guard.rollbacks} rollbacks "
                f"(faults.max_rollbacks): the run does not recover; lower optim.lr or inspect the data"
            )
        to_step, state = self.load(target)
        checkpoint.discard_after(self.directory, target)
        distributed.barrier(self.env)
        skipped_data = (to_step + 1 + guard.data_offset, bad_step + guard.data_offset)
        guard.rolled_back(bad_step, to_step, state.get("faults", {}))
        return to_step, skipped_data, (f"rolled back from step {bad_step} to checkpoint step {to_step} after skipped steps "
                         f"{first_bad}..{bad_step}; skipping data steps {skipped_data[0]}..{skipped_data[1]}")
