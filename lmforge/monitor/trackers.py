"""Experiment trackers behind one interface: Weights & Biases and MLflow, both opt-in.

metrics.jsonl and TensorBoard are always written (runs.MetricsLogger); these mirror the
same records, under the same names (`train/loss` stays `train/loss`; MLflow only has the
characters it forbids replaced).

Each backend is configured as its users expect:
- W&B: `WANDB_MODE`, `WANDB_PROJECT`, `WANDB_ENTITY` are respected. With no `WANDB_MODE`
  set, a run is online when a W&B login exists (`WANDB_API_KEY` or a netrc entry from
  `wandb login`) and offline otherwise, so a first run needs no network (`wandb sync`
  uploads later).
- MLflow: `trackers.mlflow_uri`, else `MLFLOW_TRACKING_URI`, else a SQLite store in the
  run dir (`sqlite:///<run dir>/mlflow.db`); the experiment is `trackers.project`, else
  `MLFLOW_EXPERIMENT_NAME`, else `lmforge`.

The tracker runs' ids are kept in `<run dir>/trackers.json`: `--resume` reopens the same
tracker runs (curves continue) and `lmforge eval` of that run logs its results to them.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import re
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

from pydantic import Field

from lmforge import atomic
from lmforge.config import Section
from lmforge.errors import ConfigError

log = logging.getLogger(__name__)

TRACKERS_FILE = "trackers.json"
DEFAULT_PROJECT = "lmforge"
ARTIFACTS_DIR = "mlflow-artifacts"
Backend = Literal["wandb", "mlflow"]


class TrackerConfig(Section):
    """Experiment trackers (W&B, MLflow) that receive the config, the metrics and the eval results."""

    backends: list[Backend] = Field(default_factory=list, description="wandb and/or mlflow")
    project: str | None = Field(
        None, description="W&B project / MLflow experiment; default: WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME, else lmforge")
    entity: str | None = Field(None, description="W&B entity (team); default: WANDB_ENTITY")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else sqlite:///<run dir>/mlflow.db")


class Tracker(Protocol):
    backend: str

    def log(self, step: int | None, values: dict[str, float]) -> None: ...
    def ids(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


# ------------------------------------------------------------------------------ the run ids


def read_ids(run_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{backend: its run's ids} recorded in a run dir; {} when none were."""
    path = Path(run_dir) / TRACKERS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is not valid JSON: new tracker runs will be opened", path)
        return {}
    return data if isinstance(data, dict) else {}


def _write_ids(run_dir: Path, trackers: list[Tracker]) -> None:
    ids = read_ids(run_dir)
    ids.update({tracker.backend: tracker.ids() for tracker in trackers})
    atomic.write_json(run_dir / TRACKERS_FILE, ids)


# ------------------------------------------------------------------------------ W&B


def wandb_logged_in() -> bool:
    """A W&B login exists: WANDB_API_KEY, or the netrc entry `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str | None:
    """WANDB_MODE when set; else None (W&B's default: online) with a login, offline without one."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return None if wandb_logged_in() else "offline"


class WandbTracker:
    backend = "wandb"

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], settings: TrackerConfig,
                 stored: dict[str, Any] | None):
        try:
            import wandb
        except ImportError:
            raise ConfigError("tracker wandb needs the wandb package: pip install 'lmforge[track]'") from None
        os.environ.setdefault("WANDB_SILENT", "true")
        stored = stored or {}
        self.run = wandb.init(
            project=settings.project or stored.get("project") or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
            entity=settings.entity or stored.get("entity") or os.environ.get("WANDB_ENTITY") or None,
            name=name, dir=str(run_dir), mode=wandb_mode(), reinit="finish_previous",
            id=stored.get("id"), resume="allow" if stored.get("id") else None,
        )
        if config:
            self.run.config.update(config, allow_val_change=True)

    def log(self, step: int | None, values: dict[str, float]) -> None:
        # Without a step (eval of a finished run), W&B takes its next one: a smaller step is dropped.
        self.run.log(values) if step is None else self.run.log(values, step=step)

    def ids(self) -> dict[str, Any]:
        return {"id": self.run.id, "project": self.run.project, "entity": self.run.entity or None}

    def close(self) -> None:
        self.run.finish()


# ------------------------------------------------------------------------------ MLflow

_MLFLOW_FORBIDDEN = re.compile(r"[^\w./\- :]")


def mlflow_name(name: str) -> str:
    """A metric or param name MLflow accepts, changed only where it must be."""
    parts = [part for part in _MLFLOW_FORBIDDEN.sub("_", name).split("/") if part]
    return "/".join("_" if part in (".", "..") else part for part in parts) or "_"


class MlflowTracker:
    backend = "mlflow"

    def __init__(self, run_dir: Path, name: str, config: dict[str, Any], settings: TrackerConfig,
                 stored: dict[str, Any] | None):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("tracker mlflow needs the mlflow package: pip install 'lmforge[track]'") from None
        stored = stored or {}
        self.uri = (settings.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or stored.get("tracking_uri")
                    or f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}")
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
        except Exception as error:  # noqa: BLE001 - MLflow refuses a URI with its own exception types
            raise ConfigError(f"MLflow tracking URI {self.uri}: {str(error).splitlines()[0]}") from None
        self.run_id = self._reopen(stored.get("run_id")) or self._create(name, settings)
        self._log_params(config)

    def _reopen(self, run_id: str | None) -> str | None:
        if not run_id:
            return None
        try:
            self.client.update_run(run_id, status="RUNNING")
        except Exception:  # noqa: BLE001 - any store error means: that run is not here
            log.warning("MLflow run %s is not in %s: opening a new one", run_id, self.uri)
            return None
        return run_id

    def _create(self, name: str, settings: TrackerConfig) -> str:
        experiment = settings.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        found = self.client.get_experiment_by_name(experiment)
        if found:
            return self.client.create_run(found.experiment_id, run_name=name).info.run_id
        # A SQLite store keeps artifacts (config.json) in ./mlruns of the working dir unless told:
        # beside the database instead. A tracking server decides for itself.
        location = None
        if self.uri.startswith("sqlite:///"):
            location = (Path(self.uri.removeprefix("sqlite:///")).parent / ARTIFACTS_DIR).resolve().as_uri()
        experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        return self.client.create_run(experiment_id, run_name=name).info.run_id

    def _log_params(self, config: dict[str, Any]) -> None:
        """The resolved config: as config.json, and as params (MLflow keeps a param's first value)."""
        if not config:
            return
        from mlflow.entities import Param

        self.client.log_dict(self.run_id, config, "config.json")
        logged = self.client.get_run(self.run_id).data.params
        params = [Param(mlflow_name(k), str(v)[:500]) for k, v in _flatten(config).items()]
        fresh = [p for p in params if p.key not in logged]
        for start in range(0, len(fresh), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=fresh[start:start + 100])

    def log(self, step: int | None, values: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_name(k), float(v), now, step or 0) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def ids(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "tracking_uri": self.uri}

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ------------------------------------------------------------------------------ opening


def build_trackers(config: TrackerConfig, run_dir: Path, name: str, run_config: dict[str, Any],
                   resume: bool = False) -> list[Tracker]:
    """Open the configured trackers for a run dir and record their ids there. With `resume`,
    the tracker runs recorded in the run dir are reopened (curves continue)."""
    stored = read_ids(run_dir) if resume else {}
    trackers: list[Tracker] = []
    for backend in config.backends:
        kind = WandbTracker if backend == "wandb" else MlflowTracker
        trackers.append(kind(Path(run_dir), name, run_config, config, stored.get(backend)))
    if trackers:
        _write_ids(Path(run_dir), trackers)
    return trackers


def log_eval_results(run_dir: Path, name: str, values: dict[str, float], step: int | None,
                     config: TrackerConfig | None = None) -> list[str]:
    """Log eval metrics to the tracker runs recorded in `run_dir` (and to `config`'s backends,
    a run of their own when none is recorded); return the backends they went to."""
    config = config or TrackerConfig()
    stored = read_ids(run_dir)
    backends = list(dict.fromkeys([*config.backends, *(b for b in stored if b in ("wandb", "mlflow"))]))
    if not backends or not values:
        return []
    trackers = build_trackers(config.model_copy(update={"backends": backends}), run_dir, name, {}, resume=True)
    for tracker in trackers:
        # W&B's step only grows: eval values carry their step as `eval/step` instead.
        if tracker.backend == "wandb":
            tracker.log(None, {**values, **({"eval/step": step} if step is not None else {})})
        else:
            tracker.log(step, values)
        tracker.close()
    return backends
