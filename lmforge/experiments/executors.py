"""Where a sweep's trials run: local processes, Ray tasks or submitit jobs (SLURM, or local).

Every trial is the same command, `python -m lmforge train BASE OVERRIDES... run.out_dir=...
run.name=ID [--resume]`, with its threads limited through the environment; an executor only
decides where that process runs. All three share one small interface that the sweep's
driver loop uses: `submit` a job, `poll` it for its exit code, `cancel` it (SIGTERM, so
`lmforge train` finishes its step and checkpoints, as it does under Ctrl-C), `close`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.experiments.spec import ExecutorSpec

# Thread pools a trial's process may start: each limited to threads_per_trial.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS")
TERMINATED = 128 + signal.SIGTERM  # `lmforge train`'s exit code after SIGTERM (checkpointed)


@dataclasses.dataclass(frozen=True)
class TrialJob:
    """One trial's process: its command line, environment additions and log file."""

    trial: str
    argv: list[str]
    env: dict[str, str]
    log: str

    @classmethod
    def train(cls, trial: str, train_args: list[str], threads: int, log: Path) -> TrialJob:
        env = {name: str(threads) for name in THREAD_VARIABLES}
        env["PYTHONUNBUFFERED"] = "1"  # the log shows each line as it is written
        return cls(trial, [sys.executable, "-m", "lmforge", "train", *train_args], env, str(log.resolve()))


def run_job(job: TrialJob) -> int:
    """Run a trial's process to its end and return its exit code (in Ray or submitit workers too).

    An interrupt of the worker (Ray's cancel, submitit's SIGINT) becomes SIGTERM to the trial,
    which then checkpoints and exits; the worker waits for it."""
    process = start(job)
    try:
        return process.wait()
    except BaseException:
        process.terminate()
        return process.wait()


def start(job: TrialJob) -> subprocess.Popen:
    """The trial's process, its output appended to its log; in its own session, so a Ctrl-C
    reaches the sweep (which stops the trials in order) rather than every trial at once."""
    Path(job.log).parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "ab") as log:
        return subprocess.Popen(job.argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **job.env},
                                start_new_session=True)


class LocalExecutor:
    """Trials as child processes of the sweep, up to max_parallel at once."""

    def __init__(self, spec: ExecutorSpec, sweep_dir: Path):
        self.capacity = spec.parallel()

    def submit(self, job: TrialJob) -> Any:
        return start(job)

    def poll(self, handle: subprocess.Popen) -> int | None:
        return handle.poll()

    def cancel(self, handle: subprocess.Popen) -> None:
        if handle.poll() is None:
            handle.terminate()

    def close(self) -> None:
        pass


class RayExecutor:
    """Trials as Ray tasks of threads_per_trial CPUs each, on a cluster or a local runtime."""

    def __init__(self, spec: ExecutorSpec, sweep_dir: Path):
        from lmforge.extras import require

        self.ray = require("ray", "lmforge sweep executor.kind=ray")
        self.started = not self.ray.is_initialized()
        if self.started:
            if spec.ray_address:
                self.ray.init(address=spec.ray_address)
            else:  # a local runtime sized for the sweep
                self.ray.init(num_cpus=spec.threads_per_trial * spec.parallel(), include_dashboard=False,
                              log_to_driver=False)
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        self.capacity = spec.max_parallel or max(1, cpus // spec.threads_per_trial)
        self.task = self.ray.remote(num_cpus=spec.threads_per_trial, max_retries=0)(run_job)

    def submit(self, job: TrialJob) -> Any:
        return self.task.remote(job)

    def poll(self, handle: Any) -> int | None:
        ready, _ = self.ray.wait([handle], timeout=0)
        if not ready:
            return None
        try:
            return self.ray.get(handle)
        except Exception:  # the task itself died (worker lost): the trial failed
            return 1

    def cancel(self, handle: Any) -> None:
        self.ray.cancel(handle)  # a KeyboardInterrupt in the task: run_job passes SIGTERM on

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


class SubmititExecutor:
    """Trials as submitit jobs (SLURM by default; `cluster: local` or `debug` on one machine)."""

    def __init__(self, spec: ExecutorSpec, sweep_dir: Path):
        from lmforge.extras import require

        submitit = require("submitit", "lmforge sweep executor.kind=submitit")
        params = dict(spec.submitit)
        cluster = params.pop("cluster", None)
        self.executor = submitit.AutoExecutor(folder=str(sweep_dir / "submitit"), cluster=cluster)
        params.setdefault("cpus_per_task", spec.threads_per_trial)
        try:
            self.executor.update_parameters(**params)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"executor.submitit: {' '.join(str(err).split())[:300]}") from None
        # A scheduler queues what it cannot run: submit as many as asked, else everything at once.
        self.capacity = spec.max_parallel or 1 << 30

    def submit(self, job: TrialJob) -> Any:
        return self.executor.submit(run_job, job)

    def poll(self, handle: Any) -> int | None:
        if not handle.done():
            return None
        try:
            return handle.result()
        except Exception:  # the job failed outside the trial (scheduler, node): the trial failed
            return 1

    def cancel(self, handle: Any) -> None:
        handle.cancel(check=False)

    def close(self) -> None:
        pass


EXECUTORS = {"local": LocalExecutor, "ray": RayExecutor, "submitit": SubmititExecutor}


def make_executor(spec: ExecutorSpec, sweep_dir: Path) -> LocalExecutor | RayExecutor | SubmititExecutor:
    return EXECUTORS[spec.kind](spec, sweep_dir)
