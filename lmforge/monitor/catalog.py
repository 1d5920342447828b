"""`lmforge runs list | show | compare`: what is in a directory of runs, read from the run dirs alone.

A run dir is recognised by its `config.yaml` or `manifest.json`; everything shown comes
from the files the trainer writes (metrics.jsonl, checkpoints/, eval/*.json, manifest).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge import atomic
from lmforge.errors import DataError
from lmforge.store.checkpoint import LATEST
from lmforge.store.run_dir import RunDir


@dataclass
class RunSummary:
    name: str
    path: Path
    kind: str | None
    status: str
    step: int | None
    max_steps: int | None
    tokens: int | None
    last_loss: float | None
    best_val_loss: float | None
    best_val_bpb: float | None
    checkpoint: str | None
    parent: str | None
    created_at: str | None
    evals: dict[str, float] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def is_run_dir(path: Path) -> bool:
    run = RunDir(path)
    return path.is_dir() and (run.config_path.is_file() or run.manifest_path.is_file())


def find_runs(root: str | os.PathLike) -> list[Path]:
    """Run dirs at `root` itself, or one or two levels below it, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"runs dir not found: {root}")
    if is_run_dir(root):
        return [root]
    found = [p for p in root.iterdir() if is_run_dir(p)]
    found += [q for p in root.iterdir() if p.is_dir() and not is_run_dir(p) for q in p.iterdir() if is_run_dir(q)]
    return sorted(found)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    file = RunDir(path).metrics_path
    if not file.is_file():
        return []
    records = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the rest is still good
    return records


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def summarize(path: str | os.PathLike) -> RunSummary:
    path = Path(path)
    if not is_run_dir(path):
        raise DataError(f"{path} is not a run dir (no config.yaml or manifest.json)")
    run = RunDir(path)
    config = _read_yaml(run.config_path)
    manifest = atomic.read_json(run.manifest_path)
    metrics = read_metrics(path)
    train = [r for r in metrics if "loss" in r]
    val = [r for r in metrics if "val_loss" in r]
    latest = run.checkpoints / LATEST
    checkpoint = latest.read_text().strip() if latest.is_file() else None
    max_steps = config.get("train", {}).get("max_steps")
    step = train[-1]["step"] if train else None
    if checkpoint and checkpoint.startswith("step-"):
        step = max(step or 0, int(checkpoint.removeprefix("step-")))
    status = "no steps" if step is None else "completed" if max_steps and step >= max_steps else "partial"
    evals = {}
    for file in sorted(run.eval_dir.glob("*.json")):
        result = atomic.read_json(file)
        for metric, value in result.get("metrics", {}).items():
            if isinstance(value, dict) and isinstance(value.get("value"), (int, float)):
                evals[f"{file.stem}/{metric}"] = value["value"]
    tokens = train[-1].get("tokens_seen") if train else None
    best = min(val, key=lambda r: r["val_loss"]) if val else None
    return RunSummary(
        name=path.name, path=path, kind=manifest.get("kind"), status=status, step=step, max_steps=max_steps,
        tokens=tokens, last_loss=train[-1]["loss"] if train else None,
        best_val_loss=best["val_loss"] if best else None, best_val_bpb=best.get("val_bpb") if best else None,
        checkpoint=checkpoint, parent=manifest.get("parent"), created_at=manifest.get("created_at"),
        evals=evals, config=config,
    )


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(runs: list[RunSummary]) -> list[tuple[str, list[Any]]]:
    """Only the config keys whose values differ between the runs (run.name excluded)."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat) - {"run.name"})
    return [(k, [f.get(k) for f in flat]) for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1]


def metric_rows(runs: list[RunSummary]) -> list[tuple[str, list[Any]]]:
    rows = [
        ("status", [r.status for r in runs]),
        ("step", [r.step for r in runs]),
        ("tokens", [r.tokens for r in runs]),
        ("last loss", [r.last_loss for r in runs]),
        ("best val loss", [r.best_val_loss for r in runs]),
        ("best val bpb", [r.best_val_bpb for r in runs]),
    ]
    for name in sorted(set().union(*(r.evals for r in runs))):
        rows.append((name, [r.evals.get(name) for r in runs]))
    return rows


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)
