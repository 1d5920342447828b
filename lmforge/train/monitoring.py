"""What a training run reports while it runs, and where.

Rank 0 reports for the run: metrics.jsonl and TensorBoard, the trackers (W&B, MLflow),
alerts, the progress bar. Every rank keeps its own profiler trace and CUDA memory
snapshots. The trainer decides what to report; this holds the sinks and closes them.
"""

from __future__ import annotations

from tqdm import tqdm

from lmforge.monitor.alerts import AlertMonitor
from lmforge.monitor.profiler import CudaMemoryRecorder, StepProfiler, parse_steps
from lmforge.monitor.trackers import build_trackers
from lmforge.store.run_dir import MetricsLogger, RunDir
from lmforge.train.config import TrainingRun
from lmforge.train.distributed import DistEnv


class SilentAlerts:
    """Alerts on ranks other than 0: one rank reports for the run."""

    fired: list = []

    def observe(self, *args, **kwargs) -> list:
        return []

    def observe_experts(self, *args, **kwargs) -> list:
        return []

    def alert(self, *args, **kwargs) -> dict:
        return {}

    def checkpoint_failed(self, *args) -> dict:
        return {}

    def start_watchdog(self) -> None:
        pass

    def close(self) -> None:
        pass


class RunMonitors:
    """The sinks of one run, opened together and closed together."""

    def __init__(self, config: TrainingRun, run_dir: RunDir, env: DistEnv, start_step: int):
        main = env.is_main
        loop = config.train
        self.metrics = MetricsLogger(run_dir) if main else None
        # A resumed run reopens its tracker runs (ids in trackers.json): its curves continue.
        self.trackers = (build_trackers(config.trackers, run_dir.path, config.run.name, config.model_dump(mode="json"),
                                        resume=start_step > 0) if main else [])
        self.alerts = AlertMonitor(run_dir.path, config.alerts, config.run.name) if main else SilentAlerts()
        self.alerts.start_watchdog()
        profile_dir = run_dir.path / "profile"
        self.memory = CudaMemoryRecorder(profile_dir, env.device)
        self.profiler = None
        if loop.profile:
            first, last = parse_steps(loop.profile)
            self.profiler = StepProfiler(profile_dir, first, last, start_step, env.device.type == "cuda")
        self.bar = tqdm(total=loop.max_steps, initial=start_step, desc=config.run.name,
                        disable=not (loop.progress and main) or None, dynamic_ncols=True)

    def log(self, step: int, **values: float | str | None) -> None:
        """One record of metrics.jsonl; its numbers also go to the trackers."""
        if self.metrics is None:
            return
        self.metrics.log(step, **values)
        for tracker in self.trackers:
            tracker.log(step, {k: v for k, v in values.items() if isinstance(v, (int, float))})

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        self.alerts.close()
        if self.profiler is not None:
            self.profiler.close()
        for tracker in self.trackers:
            tracker.close()
