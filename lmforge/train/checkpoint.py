"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically.

    checkpoints/step-0000100/   .metadata + shards (model, optimizer) + trainer_state.json
    checkpoints/latest          "step-0000100", replaced atomically after the dir is complete

A checkpoint is written under a temp name and renamed when whole; `latest` moves only
after that, so a crash mid-save leaves the previous checkpoint as the one to resume from.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

from lmforge import atomic
from lmforge.errors import CheckpointError

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (renamed into place, with state and DCP metadata), oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = directory / name
    if not STEP_DIR.match(name) or not path.is_dir():
        raise CheckpointError(f"{pointer} points to {name!r}, which is not a checkpoint dir")
    return path


def save(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    trainer_state: dict[str, Any],
    keep: int,
    trainable_only: bool = False,
) -> Path:
    """`trainable_only` (LoRA): save only parameters that train, not the frozen base."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / step_dir_name(step)
    tmp = directory / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    model_state, optim_state = get_state_dict(model, optimizers, options=options)
    state = {"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}
    with warnings.catch_warnings():  # DCP warns that it runs without a process group
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
    atomic.write_json(tmp / STATE_FILE, trainer_state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic.write_text(directory / LATEST, final.name + "\n")
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    log.info("saved checkpoint %s", final)
    return final


def read_state(path: Path) -> dict[str, Any]:
    file = path / STATE_FILE
    if not (path / ".metadata").is_file() or not file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (missing .metadata or {STATE_FILE})")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"checkpoint {path} is corrupt: {file} is not valid JSON") from None


def check_model_shape(path: Path, state: dict, expected: dict) -> None:
    saved = state.get("model_shape", {})
    diffs = [f"{k} {saved.get(k)} vs {v}" for k, v in expected.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written for a different model config ({', '.join(diffs)} now)"
        )


def _dcp_load(target: dict[str, Any], path: Path) -> None:
    with warnings.catch_warnings():  # DCP warns that it runs without a process group
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(target, checkpoint_id=str(path), no_dist=True)


def load(
    path: Path,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer] | None = None,
    trainable_only: bool = False,
) -> dict[str, Any]:
    """Load model (and optimizer) state in place; return the trainer state."""
    state = read_state(path)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft
    check_model_shape(path, state, base.config.shape())
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    if optimizers:
        model_state, optim_state = get_state_dict(model, optimizers, options=options)
        target = {"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}
    else:
        target = {"model": get_state_dict(model, [], options=options)[0]}
    try:
        _dcp_load(target, path)
    # DCP raises many types for missing or truncated shards; its CheckpointException
    # derives from BaseException and carries the real error in its last traceback line.
    except (Exception, CheckpointException) as err:
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else type(err).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({reason[:200]})") from None
    if optimizers:
        set_state_dict(
            model, optimizers, model_state_dict=target["model"], optim_state_dict=target["optim"], options=options
        )
        torch.set_rng_state(target["rng"])
    else:
        model.load_state_dict(target["model"], strict=not trainable_only)
    return state
