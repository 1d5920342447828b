"""The sweep dir: one home for its paths and records.

    DIR/sweep.yaml               the resolved spec
    DIR/sweep.json               status, counts, best trial, spec hash (marks DIR as an lmforge sweep)
    DIR/trials/<id>/             the trial's ordinary run dir (run.out_dir=DIR/trials, run.name=<id>)
    DIR/trials/<id>/trial.json   the trial's record (TrialRecord): params, status, metric, metrics
    DIR/trials/<id>/trial.log    the trial's stdout and stderr
    DIR/submitit/                submitit's job folder (executor.kind: submitit)

Readers of trial.json (the scaling fit, the report) rely on `status`, `metric` and
`metrics.{params,tokens,flops}`; all writes are atomic.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from lmforge import atomic
from lmforge.errors import CheckpointError, ConfigError, OutputError
from lmforge.store.checkpoint import latest_checkpoint
from lmforge.store.run_dir import RunDir

SPEC_FILE = "sweep.yaml"
STATUS_FILE = "sweep.json"
TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"
LOG_FILE = "trial.log"
KIND = "sweep"  # sweep.json's "kind", and atomic's output marker
# What lmforge writes into a sweep dir: what --overwrite removes. Other files stay.
SWEEP_ENTRIES = (SPEC_FILE, STATUS_FILE, TRIALS_DIR, "submitit", "report.html", atomic.MARKER_FILE)
FIT_DIR = "scaling"  # `lmforge scaling fit`'s default output: a fit of trials that --overwrite removes
STATUSES = ("pending", "running", "done", "failed", "pruned")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass
class TrialRecord:
    """One trial: what it ran with and what came of it (DIR/trials/<id>/trial.json)."""

    id: str
    number: int
    params: dict[str, Any]  # space key -> value; a bundle's name -> index, plus the keys it sets
    overrides: list[str]  # the key=value list `lmforge train` ran with
    status: str = "pending"
    metric: float | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    error: str | None = None
    attempts: int = 0
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def trial_id(number: int) -> str:
    return f"t{number:04d}"


class SweepDir:
    """Paths inside out_dir/<name>/ and the reads and writes of its records."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @property
    def spec_path(self) -> Path:
        return self.path / SPEC_FILE

    @property
    def status_path(self) -> Path:
        return self.path / STATUS_FILE

    @property
    def trials(self) -> Path:
        return self.path / TRIALS_DIR

    @property
    def submitit(self) -> Path:
        return self.path / "submitit"

    def trial_dir(self, trial: str) -> Path:
        return self.trials / trial

    def run_dir(self, trial: str) -> RunDir:
        return RunDir(self.trial_dir(trial))

    def log_path(self, trial: str) -> Path:
        return self.trial_dir(trial) / LOG_FILE

    def has_checkpoint(self, trial: str) -> bool:
        try:
            return latest_checkpoint(self.run_dir(trial).checkpoints) is not None
        except CheckpointError:  # a broken pointer: `lmforge train --resume` names it in the trial's error
            return True

    # ------------------------------------------------------------------ records

    def is_sweep(self) -> bool:
        return self.read_status().get("kind") == KIND

    def has_contents(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def read_status(self) -> dict[str, Any]:
        return atomic.read_json(self.status_path)

    def read_spec(self) -> dict[str, Any]:
        try:
            data = yaml.safe_load(self.spec_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_spec(self, spec_data: dict[str, Any]) -> None:
        atomic.write_text(self.spec_path, yaml.safe_dump(spec_data, sort_keys=False))

    def write_status(self, status: dict[str, Any]) -> None:
        atomic.write_json(self.status_path, {"kind": KIND, **status, "updated_at": now()})
        atomic.mark_output_dir(self.path, KIND)

    def write_trial(self, record: TrialRecord) -> None:
        atomic.write_json(self.trial_dir(record.id) / TRIAL_FILE, record.to_dict())

    def read_trial(self, trial: str) -> TrialRecord | None:
        data = atomic.read_json(self.trial_dir(trial) / TRIAL_FILE)
        return TrialRecord.from_dict(data) if data.get("id") else None

    def read_trials(self) -> list[TrialRecord]:
        """Every recorded trial, by number."""
        if not self.trials.is_dir():
            return []
        found = [self.read_trial(p.name) for p in sorted(self.trials.iterdir()) if p.is_dir()]
        return sorted((r for r in found if r is not None), key=lambda r: r.number)

    def claim(self, resume: bool, overwrite: bool) -> None:
        """Whether this sweep may use the dir: new, resumed (--resume) or replaced (--overwrite);
        only a dir that sweep.json marks as an lmforge sweep is ever replaced."""
        if resume and overwrite:
            raise ConfigError("--resume continues the sweep in its dir and --overwrite replaces it: pass one of them")
        if not self.has_contents():
            return
        if not self.is_sweep():
            raise OutputError(f"refusing to use {self.path} for a sweep: it holds something that is not an "
                              "lmforge sweep (no sweep.json); choose another name or out_dir")
        if overwrite:
            self.clear()
        elif not resume:
            raise OutputError(f"sweep dir {self.path} already holds a sweep: pass --resume to continue it, "
                              "--overwrite to start over, or choose another name")
        atomic.check_output_dir(self.path, KIND, overwrite=True, allow_run_dir=True)  # cwd and writability

    def clear(self) -> None:
        """Remove what lmforge wrote here (the sweep started over); other files stay."""
        for name in SWEEP_ENTRIES:
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        fit = self.path / FIT_DIR
        if fit.is_dir() and atomic.output_kind(fit) == FIT_DIR:  # only a fit lmforge wrote
            shutil.rmtree(fit)


# ------------------------------------------------------------------ what a trial's run dir says


def last_value(records: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in reversed(records) if isinstance(r.get(key), (int, float))), None)


def trial_metrics(run: RunDir) -> dict[str, Any]:
    """The trial's last val_loss/val_bpb/loss/step, its parameter counts and tokens trained on.

    `params` counts the non-embedding parameters (all but the token embedding and the output
    head, as in Kaplan et al., 2020); `flops` is the usual 6 * params * tokens estimate.
    """
    from lmforge.monitor.catalog import read_metrics

    records = read_metrics(run.path)
    out: dict[str, Any] = {key: last_value(records, key) for key in ("val_loss", "val_bpb", "loss", "step")}
    tokens = last_value(records, "tokens_seen")
    params = params_total = None
    model = (run.read_config() or {}).get("model")
    if isinstance(model, dict):
        from lmforge.model.config import ModelConfig

        shape = ModelConfig.model_validate(model)
        vocab = shape.vocab_size or 0
        params_total = shape.num_params()
        params = shape.num_params(embedding=False) - (0 if shape.tie_embeddings else vocab * shape.dim)
    out.update(params=params, params_total=params_total, tokens=tokens,
               flops=6.0 * params * tokens if params is not None and tokens is not None else None)
    return out


def log_tail(path: Path, lines: int = 12) -> str | None:
    """The last lines of a trial's log (its error, when it failed)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    tail = [line.rsplit("\r", 1)[-1] for line in text.strip().splitlines()[-lines:]]
    return "\n".join(tail) or None
