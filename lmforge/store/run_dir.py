"""Run dirs: resolved config, lineage manifest, metrics.jsonl and TensorBoard events.

    runs/<name>/config.yaml         the resolved config
    runs/<name>/manifest.json       lineage: versions, git commit, dataset/tokenizer hashes, parent
    runs/<name>/metrics.jsonl       one JSON object per logged step
    runs/<name>/tb/                 TensorBoard events
    runs/<name>/tokenizer/          the tokenizer the run was trained with
    runs/<name>/checkpoints/        step-NNNNNNN/ (DCP) and a `latest` pointer

A run dir belongs to one run. `lmforge train` (sft, dpo) continues it only with --resume
(from its latest checkpoint, with the same tokenizer), starts it over when it holds the
same config and no checkpoint yet, and otherwise refuses unless --overwrite, which
removes what lmforge wrote there (`RUN_ENTRIES`) and nothing else.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch
import yaml

from lmforge import __version__, atomic
from lmforge.config import to_yaml

CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
TOKENIZER_DIR = "tokenizer"
EVAL_DIR = "eval"

# What lmforge writes into a run dir (the trainer, eval, report, release, alerts and
# trackers): what `--overwrite` removes. Files a user put there are left alone.
RUN_ENTRIES = (
    CONFIG_FILE, MANIFEST_FILE, METRICS_FILE, "tb", TOKENIZER_DIR, CHECKPOINTS_DIR, "alerts.jsonl",
    "profile", "adapter", EVAL_DIR, "report", "release.json", "model_card.md", "mlflow.db", "wandb",
    "trackers.json", "mlflow-artifacts",
)


def git_commit() -> str | None:
    """The commit of the lmforge source tree, when it runs from a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def lineage(**extra: Any) -> dict[str, Any]:
    return {
        "lmforge_version": __version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "host": socket.gethostname(),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


class RunDir:
    """Paths inside `runs/<name>/` and the reads and writes of its files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | os.PathLike) -> RunDir:
        """The run dir a checkpoint dir (`RUN/checkpoints/step-N`) belongs to."""
        return cls(Path(checkpoint).parent.parent)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    @property
    def tokenizer(self) -> Path:
        return self.path / TOKENIZER_DIR

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_FILE

    @property
    def eval_dir(self) -> Path:
        return self.path / EVAL_DIR

    def write_config(self, config) -> None:
        atomic.write_text(self.config_path, to_yaml(config))

    def write_manifest(self, manifest: dict) -> None:
        atomic.write_json(self.manifest_path, manifest)

    def read_config(self) -> dict | None:
        """The resolved config the run was started with, as plain data; None without config.yaml."""
        path = self.config_path
        if not path.is_file():
            return None
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def read_manifest(self) -> dict:
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def has_contents(self) -> bool:
        """Whether an earlier run left anything here."""
        return any((self.path / name).exists() for name in RUN_ENTRIES)

    def clear(self) -> None:
        """Remove everything lmforge wrote here (a run started over); other files stay."""
        for name in RUN_ENTRIES:
            path = self.path / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_step: int) -> None:
        """On resume, drop records logged after the checkpoint: the resumed run writes them again."""
        kept = [r for r in self.read_metrics() if r.get("step", -1) <= last_step]
        atomic.write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))


class MetricsLogger:
    """Appends one JSON line per record (flushed at once) and mirrors scalars to TensorBoard."""

    def __init__(self, run: RunDir, tensorboard: bool = True):
        self._file = open(run.metrics_path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run.path / "tb"))

    def log(self, step: int, **values: float) -> None:
        record = {"step": step, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
