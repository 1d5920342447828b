"""`lmforge sweep SPEC.yaml`: a base training config run over a search space, as many ordinary runs.

Each trial is `lmforge train BASE OVERRIDES PARAMS run.out_dir=DIR/trials run.name=ID` in its
own process (executors.py), so a trial's run dir is an ordinary run dir that every other
verb reads. One driver loop in this process submits trials up to the executor's capacity,
polls them, records each result in DIR/trials/ID/trial.json, feeds intermediate metric
values to the pruner, and asks the sampler for the next trial. A failing trial is recorded
and the sweep goes on.

Resume (`--resume`): done and pruned trials stay; a trial with a checkpoint continues from
it (`lmforge train --resume`); pending ones start; failed ones rerun with `retry_failed`.
SIGINT/SIGTERM stop launching, pass SIGTERM to the running trials (they checkpoint as
`lmforge train` does) and record them pending, for --resume to continue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError
from lmforge.experiments.executors import TERMINATED, TrialJob, make_executor
from lmforge.experiments.samplers import make_sampler
from lmforge.experiments.spec import SweepSpec, expand_params, load_spec, param_overrides, validate
from lmforge.experiments.sweep_dir import (
    SweepDir,
    TrialRecord,
    log_tail,
    now,
    trial_id,
    trial_metrics,
)
from lmforge.monitor.catalog import flatten, read_metrics
from lmforge.shipped import config_path

__all__ = ["SweepResult", "best_trial", "load_spec", "run"]

log = logging.getLogger(__name__)
# Set in each trial's config below the user's overrides: per-step log lines read better in
# trial.log than a progress bar.
TRIAL_DEFAULTS = ["train.progress=false"]


@dataclasses.dataclass
class SweepResult:
    dir: Path
    status: str  # done | interrupted
    trials: list[TrialRecord]
    best: TrialRecord | None
    signal: int | None = None


def best_trial(trials: list[TrialRecord], mode: str) -> TrialRecord | None:
    scored = [t for t in trials if t.status == "done" and t.metric is not None and math.isfinite(t.metric)]
    if not scored:
        return None
    return (min if mode == "min" else max)(scored, key=lambda t: t.metric)


def status_record(spec: SweepSpec, trials: list[TrialRecord], status: str) -> dict[str, Any]:
    """What sweep.json says: status, counts per trial status, best trial, spec hash."""
    counts = {s: sum(t.status == s for t in trials) for s in ("done", "failed", "pruned", "running", "pending")}
    best = best_trial(trials, spec.mode)
    return {"name": spec.name, "status": status, "sampler": spec.sampler, "metric": spec.metric, "mode": spec.mode,
            "spec_sha256": spec.sha256(), "trials": len(trials), "counts": counts,
            "best": None if best is None else {"id": best.id, "metric": best.metric, "params": best.params}}


def _check_same_sweep(sweep: SweepDir, spec: SweepSpec) -> None:
    """A resumed sweep must be the same sweep (executor and trial count may change)."""
    recorded = sweep.read_status().get("spec_sha256")
    if recorded is None or recorded == spec.sha256():
        return
    old = flatten({k: v for k, v in sweep.read_spec().items() if k in spec.identity()})
    new = flatten(spec.identity())
    changes = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    shown = "; ".join(changes[:4]) or "its spec hash"
    raise ConfigError(f"sweep dir {sweep.path} holds a different sweep ({shown}): pass --overwrite to start over, "
                      "or choose another name")


def run(spec: SweepSpec, resume: bool = False, overwrite: bool = False, retry_failed: bool = False,
        progress: Callable[[TrialRecord], None] | None = None) -> SweepResult:
    """Run (or with `resume`, continue) the sweep `spec` describes; see the module docstring.

    `overwrite` replaces an earlier sweep of that name; `progress` is called with each trial's
    record as it finishes."""
    validate(spec)
    sweep = SweepDir(spec.dir)
    if resume and sweep.is_sweep():
        _check_same_sweep(sweep, spec)
    sweep.claim(resume, overwrite)
    sweep.write_spec(spec.model_dump(mode="json"))
    records = {r.id: r for r in sweep.read_trials()}
    sweep.write_status(status_record(spec, list(records.values()), "running"))
    intermediate = {r.id: _metric_values(sweep, r.id, spec.metric) for r in records.values()}
    sampler = make_sampler(spec, list(records.values()), intermediate)
    driver = _Driver(spec, sweep, records, sampler, retry_failed, progress)
    executor = make_executor(spec.executor, sweep.path)
    try:
        with _stop_on_signals(driver):
            driver.loop(executor)
    finally:
        driver.stop_all(executor)
        executor.close()
    status = "interrupted" if driver.signal is not None else "done"
    trials = sorted(records.values(), key=lambda r: r.number)
    sweep.write_status(status_record(spec, trials, status))
    return SweepResult(sweep.path, status, trials, best_trial(trials, spec.mode), driver.signal)


def _metric_values(sweep: SweepDir, trial: str, metric: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[metric])) for r in read_metrics(sweep.trial_dir(trial))
            if isinstance(r.get(metric), (int, float)) and "step" in r]


@contextlib.contextmanager
def _stop_on_signals(driver: _Driver) -> Iterator[None]:
    """SIGINT/SIGTERM ask the driver to stop (outside the main thread signals are left alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        if driver.signal is None:
            log.warning("received %s: stopping the running trials (they checkpoint); continue with --resume",
                        signal.Signals(signum).name)
        driver.signal = signum

    previous = {s: signal.signal(s, handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclasses.dataclass
class _Running:
    record: TrialRecord
    handle: Any
    started: float
    seen: int = 0  # metric values already reported to the pruner
    pruned: bool = False


class _Driver:
    """The one loop: launch up to capacity, poll, record, ask the sampler for more."""

    def __init__(self, spec: SweepSpec, sweep: SweepDir, records: dict[str, TrialRecord], sampler: Any,
                 retry_failed: bool, progress: Callable[[TrialRecord], None] | None):
        self.spec, self.sweep, self.records, self.sampler = spec, sweep, records, sampler
        self.progress = progress
        self.signal: int | None = None
        self.running: dict[str, _Running] = {}
        self.base = str(config_path(spec.base).resolve())  # the same file from any worker's cwd
        self._plan_list()
        rerun = ("pending", "running", *(("failed",) if retry_failed else ()))
        self.queue = [r for r in sorted(records.values(), key=lambda r: r.number) if r.status in rerun]

    def _plan_list(self) -> None:
        """Grid and random trials are known up front: record the missing ones as pending."""
        number = len(self.records)
        while self.spec.sampler != "optuna" and (params := self.sampler.ask(number)) is not None:
            self._new_record(number, params)
            number += 1

    def _new_record(self, number: int, params: dict[str, Any]) -> TrialRecord:
        ident = trial_id(number)
        overrides = [*TRIAL_DEFAULTS, *self.spec.overrides, *param_overrides(self.spec, params),
                     f"run.out_dir={self.sweep.trials.resolve()}", f"run.name={ident}"]
        record = TrialRecord(ident, number, expand_params(self.spec, params), overrides)
        self.records[ident] = record
        self.sweep.write_trial(record)
        return record

    def _next(self) -> TrialRecord | None:
        if self.queue:
            return self.queue.pop(0)
        if self.spec.sampler == "optuna":
            number = len(self.records)
            params = self.sampler.ask(number)
            return None if params is None else self._new_record(number, params)
        return None

    def loop(self, executor: Any) -> None:
        while self.signal is None:
            while len(self.running) < executor.capacity and self.signal is None:
                record = self._next()
                if record is None:
                    break
                self._launch(executor, record)
            if not self.running:
                return
            time.sleep(self.spec.executor.poll_seconds)
            for ident in list(self.running):
                self._check(executor, ident)

    def _launch(self, executor: Any, record: TrialRecord) -> None:
        resume = ["--resume"] if self.sweep.has_checkpoint(record.id) else []
        self.sampler.start(record)
        job = TrialJob.train(record.id, [self.base, *record.overrides, *resume],
                             self.spec.executor.threads_per_trial, self.sweep.log_path(record.id))
        record.status, record.error, record.attempts = "running", None, record.attempts + 1
        record.started_at, record.finished_at = now(), None
        self.sweep.write_trial(record)
        self.running[record.id] = _Running(record, executor.submit(job), time.monotonic())

    def _check(self, executor: Any, ident: str) -> None:
        """Report new metric values to the pruner (stopping a trial it prunes); record an exit."""
        state = self.running[ident]
        values = _metric_values(self.sweep, ident, self.spec.metric)
        for step, value in values[state.seen:]:
            if not state.pruned and self.sampler.report(state.record, step, value):
                state.pruned = True
                executor.cancel(state.handle)
        state.seen = len(values)
        code = executor.poll(state.handle)
        if code is not None:
            self._finish(state, code)

    def _finish(self, state: _Running, code: int) -> None:
        record = self.running.pop(state.record.id).record
        record.metrics = trial_metrics(self.sweep.run_dir(record.id))
        values = _metric_values(self.sweep, record.id, self.spec.metric)
        record.metric = values[-1][1] if values else None
        record.finished_at = now()
        record.seconds = round((record.seconds or 0.0) + time.monotonic() - state.started, 3)
        if state.pruned:
            record.status = "pruned"
        elif code == 0:
            record.status = "done"
            if record.metric is None:
                record.error = f"the trial never logged {self.spec.metric!r} (train.eval_every, or the data's val split?)"
        elif self.signal is not None and code in (TERMINATED, 128 + signal.SIGINT):
            record.status = "pending"  # interrupted: --resume continues it from its checkpoint
        else:
            record.status = "failed"
            record.error = log_tail(self.sweep.log_path(record.id)) or f"exit code {code}"
        self.sampler.tell(record)
        self.sweep.write_trial(record)
        self.sweep.write_status(status_record(self.spec, list(self.records.values()), "running"))
        if self.progress is not None:
            self.progress(record)

    def stop_all(self, executor: Any) -> None:
        """Pass SIGTERM to every running trial and wait until each has checkpointed and exited."""
        for state in self.running.values():
            executor.cancel(state.handle)
        while self.running:
            time.sleep(min(self.spec.executor.poll_seconds, 0.5))
            for state in list(self.running.values()):
                code = executor.poll(state.handle)
                if code is not None:
                    if self.signal is None:
                        self.signal = signal.SIGTERM  # stopped by an error of the sweep itself
                    self._finish(state, code)
