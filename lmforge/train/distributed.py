"""The process group: which of the processes `torchrun` started this one is, and agreement
between them.

`torchrun` sets RANK, LOCAL_RANK and WORLD_SIZE; without it a run is one process and no
process group exists, unless a strategy needs one (DDP and FSDP alone): then a one-member
group is made in memory. The backend follows the device: NCCL for CUDA, gloo for CPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import threading
import time

import torch
import torch.distributed as dist

from lmforge.device import rank_device
from lmforge.errors import ConfigError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    initialized: bool = False  # a process group exists (made here or by the caller)
    owns_group: bool = False  # made here: `shutdown` destroys it

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def restart_count() -> int:
    """How often torchrun's elastic agent has relaunched this worker group (0: first start)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init(device_name: str, backend: str = "auto", timeout_seconds: float = 600.0, need_group: bool = False) -> DistEnv:
    """Join (or make) the process group and pick this rank's device.

    `device_name` is train.device (auto / cpu / cuda); under torchrun rank r of a node takes
    cuda:LOCAL_RANK. `need_group`: make a one-process group when not under torchrun.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = rank_device(device_name, local_rank)
    use_cuda = device.type == "cuda"
    if use_cuda:
        torch.cuda.set_device(device)
    if dist.is_initialized():  # the caller made the group: use it as it is
        return DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), device, True, False)
    if world_size == 1 and not need_group:
        return DistEnv(device=device)
    if backend == "auto":
        backend = "nccl" if use_cuda else "gloo"
    if backend == "nccl" and not use_cuda:
        raise ConfigError("parallel.backend=nccl needs CUDA devices (allowed here: auto, gloo)")
    timeout = datetime.timedelta(seconds=timeout_seconds)
    if "MASTER_ADDR" not in os.environ:  # one process without torchrun: an in-memory store
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        rank = int(os.environ.get("RANK", "0"))
        dist.init_process_group(backend, store=_store(rank, world_size, timeout), rank=rank, world_size=world_size,
                                timeout=timeout, device_id=device if use_cuda else None)
    env = DistEnv(dist.get_rank(), local_rank, dist.get_world_size(), device, True, True)
    log.info("rank %d of %d on %s (%s)", env.rank, env.world_size, device, backend)
    return env


def _store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's rendezvous store (as env:// would open it), under a prefix per launch attempt.

    A relaunch after a failure can be handed the store of the failed attempt, where the dead
    ranks' addresses still sit under the same keys; the new ranks would then connect to
    those and fail. A prefix per TORCHELASTIC_RESTART_COUNT keeps attempts apart.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    tcp = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=not agent_store and rank == 0, timeout=timeout, multi_tenant=not agent_store,
    )
    return dist.PrefixStore(f"lmforge/attempt-{restart_count()}", tcp)


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.initialized and env.world_size > 1:
        dist.barrier()


def all_reduce_sum(env: DistEnv, values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over ranks, in place (returned for chaining)."""
    if env.initialized and env.world_size > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(env: DistEnv, value: object) -> list:
    """Every rank's `value` (picklable), in rank order; one process: `[value]`."""
    if not (env.initialized and env.world_size > 1):
        return [value]
    out: list = [None] * env.world_size
    dist.all_gather_object(out, value)
    return out


def is_collective_failure(error: BaseException) -> bool:
    """A collective that timed out or lost a peer (gloo's and NCCL's wording)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error).lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed by peer", "connection reset", "gloo"))


class StepWatchdog:
    """Names the rank and step when a step outlasts the collective timeout.

    gloo raises the timeout in the training thread (the loop reports it there); NCCL's own
    watchdog aborts the process instead, with no word of the step. This thread logs the
    rank and step first, whatever the backend.
    """

    def __init__(self, env: DistEnv, timeout_seconds: float):
        self.env, self.timeout = env, timeout_seconds
        self.step, self._since = 0, time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if env.world_size > 1:
            self._thread = threading.Thread(target=self._watch, name="lmforge-step-watchdog", daemon=True)
            self._thread.start()

    def beat(self, step: int) -> None:
        """The loop is at `step` (0-based: step + 1 is running) and making progress."""
        self.step, self._since = step, time.monotonic()

    def _watch(self) -> None:
        reported = -1
        while not self._stop.wait(min(5.0, self.timeout / 4)):
            waited = time.monotonic() - self._since
            if waited > self.timeout and reported != self.step:
                reported = self.step
                log.error(
                    "rank %d: step %d has not finished after %.0f s (parallel.timeout_seconds): a collective "
                    "is likely waiting for a rank that died or hangs", self.env.rank, self.step + 1, waited,
                )

    def close(self) -> None:
        self._stop.set()
