"""Bad steps: which to skip, when to roll back, and planted faults for tests.

A step whose loss or gradient norm is not finite, or whose gradient norm exceeds
`grad_spike_factor` x the running median of recent norms, gets no optimizer update. After
`rollback_after` such steps within `rollback_window` steps, the run reloads the newest
checkpoint from before the first of them and skips the data from there to the last (PaLM, Chowdhery et al. 2022, section
5.1: restart ~100 steps before a spike and skip the batches around it), so the same
batches do not produce the same blow-up again.

Every rank reaches the same decision: the loss is summed across ranks and the gradient
norm is global (after DDP's all-reduce, over all FSDP shards) before anything is judged.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import time
from collections import deque
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.train.config import FaultConfig

# Fault injection for tests, on the first launch only (a torchrun relaunch runs clean):
#   "kill:RANK:STEP"   that rank SIGKILLs itself after finishing STEP (a dying machine)
#   "hang:RANK:STEP"   that rank sleeps HANG_SECONDS there (a stuck one: peers time out)
FAULT_ENV = "LMFORGE_DEBUG_FAULT"
HANG_SECONDS = 30.0


class TrainingError(LmforgeError):
    """The run cannot go on: bad steps that do not recover, or a peer rank that is gone."""


class StepGuard:
    def __init__(self, config: FaultConfig):
        self.config = config
        self.norms: deque[float] = deque(maxlen=config.grad_spike_window)
        self.skipped: list[int] = []  # skipped steps in the window, since the last rollback
        self.data_offset = 0  # data steps skipped by rollbacks: step s trains on data step s + offset
        self.rollbacks = 0

    def poisoned(self, step: int) -> bool:
        """Whether step `step` (0-based, about to run) is planted with a NaN loss."""
        return (step + 1 + self.data_offset) in self.config.debug_nan_steps

    def judge(self, loss: float, grad_norm: float) -> str | None:
        """Why this step's update must not be applied, or None (and the norm joins the median)."""
        if self.config.skip_non_finite and not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'}"
        factor = self.config.grad_spike_factor
        if factor and len(self.norms) >= min(self.config.grad_spike_min_steps, self.norms.maxlen):
            median = statistics.median(self.norms)
            if grad_norm > factor * median:
                return f"gradient norm {grad_norm:.4g} > {factor:g} x running median {median:.4g}"
        if math.isfinite(grad_norm):
            self.norms.append(grad_norm)
        return None

    def record_skip(self, step: int) -> bool:
        """Count a skipped step (1-based); True when it is time to roll back."""
        self.skipped = [s for s in self.skipped if s > step - self.config.rollback_window] + [step]
        return bool(self.config.rollback_after) and len(self.skipped) >= self.config.rollback_after

    def rolled_back(self, from_step: int, to_step: int, saved: dict[str, Any]) -> None:
        """After reloading the checkpoint at `to_step` (its fault state `saved`): the data of
        steps to_step+1..from_step is skipped, so step to_step+1 trains on the data that came
        after from_step. The offset and rollback count carry on; the norms are the checkpoint's."""
        self.norms.clear()
        self.norms.extend(saved.get("grad_norms", []))
        self.data_offset += from_step - to_step
        self.rollbacks += 1
        self.skipped = []

    def state_dict(self) -> dict[str, Any]:
        return {"grad_norms": list(self.norms), "data_offset": self.data_offset, "rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.norms.clear()
        self.norms.extend(state.get("grad_norms", []))
        self.data_offset = state.get("data_offset", 0)
        self.rollbacks = state.get("rollbacks", 0)
        self.skipped = []


def inject(rank: int, step: int, restart_count: int) -> None:
    """Fault injection: act on FAULT_ENV when this rank reaches its planted step."""
    planted = os.environ.get(FAULT_ENV)
    if not planted or restart_count > 0:
        return
    kind, fault_rank, fault_step = planted.split(":")
    if rank != int(fault_rank) or step != int(fault_step):
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "hang":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a hung process does not save on SIGTERM
        time.sleep(HANG_SECONDS)
