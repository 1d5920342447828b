"""Experiment trackers behind one interface: Weights & Biases and MLflow, both opt-in.

metrics.jsonl and TensorBoard are always written (runs.MetricsLogger); these mirror the
same records. W&B runs in offline mode unless WANDB_MODE says otherwise (no network is
needed; `wandb sync` uploads later); MLflow writes to a local store (SQLite by default).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field

from lmforge.config import Section
from lmforge.errors import ConfigError


class TrackerConfig(Section):
    backends: list[Literal["wandb", "mlflow"]] = Field(default_factory=list)
    project: str = "lmforge"
    mlflow_uri: str | None = Field(None, description="default: sqlite:///<run dir>/mlflow.db")


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class WandbTracker:
    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], project: str):
        try:
            import wandb
        except ImportError:
            raise ConfigError("tracker wandb needs the wandb package: pip install 'lmforge[track]'") from None
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(project=project, name=name, dir=str(run_dir), config=config, reinit=True)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], project: str, uri: str | None):
        try:
            import mlflow
        except ImportError:
            raise ConfigError("tracker mlflow needs the mlflow package: pip install 'lmforge[track]'") from None
        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}")
        mlflow.set_experiment(project)
        self.run = mlflow.start_run(run_name=name)
        flat = _flatten(config)
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): float(v) for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def build_trackers(config: TrackerConfig, run_dir: Path, name: str, run_config: dict[str, Any]) -> list[Tracker]:
    trackers: list[Tracker] = []
    for backend in config.backends:
        if backend == "wandb":
            trackers.append(WandbTracker(run_dir, name, run_config, config.project))
        else:
            trackers.append(MlflowTracker(run_dir, name, run_config, config.project, config.mlflow_uri))
    return trackers
