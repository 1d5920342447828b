"""`--profile steps=a:b`: a torch.profiler trace of training steps a..b (Perfetto / TensorBoard).

The trace is Chrome trace JSON with one `ProfilerStep#N` annotation per profiled step.
On CUDA, a memory snapshot is written on demand (`snapshot()`) and on out-of-memory.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from lmforge.errors import ConfigError

log = logging.getLogger(__name__)

_STEPS = re.compile(r"^(?:steps=)?(\d+):(\d+)$")


def parse_steps(spec: str) -> tuple[int, int]:
    """"steps=5:8" or "5:8" -> (5, 8): profile steps 5, 6, 7 and 8 (1-based, inclusive)."""
    match = _STEPS.match(spec.strip())
    if not match or int(match.group(1)) < 1 or int(match.group(1)) > int(match.group(2)):
        raise ConfigError(f"bad profile spec {spec!r}: expected steps=A:B with 1 <= A <= B")
    return int(match.group(1)), int(match.group(2))


class StepProfiler:
    """Call `step()` after every training step; profiling covers steps first..last."""

    def __init__(self, out_dir: Path, first: int, last: int, start_step: int = 0, cuda: bool = False):
        self.out_dir, self.first, self.last = Path(out_dir), first, last
        self.trace: Path | None = None
        self.cuda = cuda
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        # The schedule counts calls to step(): skip to `first` (one warm-up step when there is
        # room for it, so profiler start-up cost stays out of the trace), record last-first+1.
        before = max(0, first - 1 - start_step)
        warmup = 1 if before >= 1 else 0
        self.profiler = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=before - warmup, warmup=warmup, active=last - first + 1, repeat=1),
            on_trace_ready=self._save,
            record_shapes=True,
            profile_memory=True,
            with_stack=False,
        )
        self.profiler.__enter__()
        if cuda:
            torch.cuda.memory._record_memory_history(max_entries=100_000)

    def _save(self, profiler) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.trace = self.out_dir / f"trace-steps-{self.first}-{self.last}.json"
        profiler.export_chrome_trace(str(self.trace))
        log.info("profiler trace of steps %d-%d: %s", self.first, self.last, self.trace)

    def step(self) -> None:
        self.profiler.step()

    def snapshot(self, name: str = "memory-snapshot.pickle") -> Path | None:
        """A CUDA memory snapshot (open it at pytorch.org/memory_viz)."""
        if not self.cuda:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / name
        torch.cuda.memory._dump_snapshot(str(path))
        return path

    def close(self) -> None:
        self.profiler.__exit__(None, None, None)


class CudaMemoryRecorder:
    """CUDA allocator history for memory snapshots: on demand (SIGUSR1) and on out-of-memory.

    Snapshots open at https://pytorch.org/memory_viz. A no-op on CPU.
    """

    def __init__(self, out_dir: Path, device: torch.device):
        self.out_dir, self.enabled = Path(out_dir), device.type == "cuda"
        if not self.enabled:
            return
        torch.cuda.memory._record_memory_history(max_entries=100_000)
        import signal

        try:
            signal.signal(signal.SIGUSR1, lambda *_: self.dump("memory-snapshot-sigusr1.pickle"))
        except ValueError:  # not the main thread
            pass

    def dump(self, name: str) -> Path | None:
        if not self.enabled:
            return None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / name
        torch.cuda.memory._dump_snapshot(str(path))
        log.warning("CUDA memory snapshot: %s", path)
        return path
