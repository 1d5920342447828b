"""Checkpoints with torch.distributed.checkpoint (DCP), written atomically, by every rank.

    checkpoints/step-0000100/   .metadata + __R_0.distcp shards (model, optimizer, RNG)
                                + trainer_state.json (step, loader position, fault state, ...)
    checkpoints/latest          "step-0000100", replaced atomically after the dir is complete

Model and optimizer state go through DCP's state_dict helpers, so their keys are the bare
model's parameter names and tensors carry their global shapes: a checkpoint written by N
processes under FSDP loads into M processes under DDP, FSDP or none (DCP reshards on load).

Each rank writes its shards into `.step-N.tmp`; rank 0 writes `.metadata` once every rank
is done (DCP's own gather), then the trainer state, renames the dir into place, and only
then moves `latest`. A crash mid-save leaves the previous checkpoint as the one to resume
from. `Checkpointer` can also save in the background (dcp.async_save): the state is copied
to host memory before training continues, and the dir is completed when the write ends.
The checkpoint dir must be on a filesystem every rank sees.

Retention keeps the newest `keep` checkpoints and, whatever `keep` says, the one a
rollback would reload (`rollback_floor`: the newest from before a stretch of skipped
steps), so a run that skips bad steps never deletes the checkpoint it must return to.
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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from lmforge import atomic
from lmforge.errors import CheckpointError

log = logging.getLogger(__name__)

LATEST = "latest"
STATE_FILE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d{7,})$")
# Keys every checkpoint's state has (imported ones have no loader); without one it cannot load.
REQUIRED_STATE = ("step", "model", "model_shape")


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


def _distributed() -> bool:
    return dist.is_initialized()


def _is_main() -> bool:
    return not _distributed() or dist.get_rank() == 0


def _barrier() -> None:
    if _distributed() and dist.get_world_size() > 1:
        dist.barrier()


def _state(model: nn.Module, optimizers: list[torch.optim.Optimizer], trainable_only: bool) -> dict[str, Any]:
    options = StateDictOptions(ignore_frozen_params=trainable_only)
    model_state, optim_state = get_state_dict(model, optimizers, options=options)
    return {"model": model_state, "optim": optim_state, "rng": torch.get_rng_state()}


def _temp_dir(directory: Path, step: int) -> Path:
    return directory / f".{step_dir_name(step)}.tmp"


def step_of(path: Path) -> int:
    return int(STEP_DIR.match(path.name).group(1))


def retain(directory: Path, keep: int, rollback_floor: int | None = None) -> None:
    """Delete all but the newest `keep` checkpoints, and never the one a rollback needs:
    the newest from before step `rollback_floor` (the first of a stretch of skipped steps)."""
    protected = checkpoint_before(directory, rollback_floor) if rollback_floor is not None else None
    for old in list_checkpoints(directory)[:-keep]:
        if old != protected:
            shutil.rmtree(old, ignore_errors=True)


def _complete(directory: Path, step: int, trainer_state: dict[str, Any], keep: int,
              rollback_floor: int | None = None) -> Path:
    """Rank 0, after every shard and .metadata are written: state file, rename, `latest`, retention."""
    final, tmp = directory / step_dir_name(step), _temp_dir(directory, step)
    atomic.write_json(tmp / STATE_FILE, trainer_state)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic.write_text(directory / LATEST, final.name + "\n")
    retain(directory, keep, rollback_floor)
    log.info("saved checkpoint %s", final)
    return final


def _prepare(directory: Path, step: int) -> Path:
    tmp = _temp_dir(directory, step)
    if _is_main():
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a crashed save
    _barrier()
    return tmp


def save(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    trainer_state: dict[str, Any],
    keep: int,
    trainable_only: bool = False,
    rollback_floor: int | None = None,
) -> Path:
    """Write a checkpoint (every rank calls this). `trainable_only` (LoRA): only parameters
    that train, not the frozen base. `rollback_floor`: see `retain`."""
    tmp = _prepare(directory, step)
    state = _state(model, optimizers, trainable_only)
    if _distributed():
        dcp.save(state, checkpoint_id=str(tmp))
    else:
        with warnings.catch_warnings():  # DCP warns that it runs without a process group
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
    final = (_complete(directory, step, trainer_state, keep, rollback_floor) if _is_main()
             else directory / step_dir_name(step))
    _barrier()  # no rank goes on (and may read `latest`) before it has moved
    return final


class Checkpointer:
    """Saves a run's checkpoints, in the background when `async_save`: at most one write is
    in flight; the next save, `wait` or `close` completes it first. The trainer keeps
    `rollback_floor` current (the first skipped step a rollback would go back before, or
    None); retention, when a write completes, keeps the checkpoint that rollback needs."""

    def __init__(self, directory: Path, keep: int, async_save: bool = False, trainable_only: bool = False):
        self.directory, self.keep, self.trainable_only = directory, keep, trainable_only
        self.rollback_floor: int | None = None
        self.async_save = async_save
        self._pending: tuple[Any, int, dict[str, Any]] | None = None
        self._group = None
        if async_save and _distributed():
            # Background writes run their collectives on a gloo group of their own, so they
            # never interleave with the training step's collectives (DCP's recommendation).
            self._group = dist.new_group(backend="gloo")

    def save(self, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer],
             trainer_state: dict[str, Any]) -> Path:
        if not self.async_save:
            return save(self.directory, step, model, optimizers, trainer_state, self.keep, self.trainable_only,
                        self.rollback_floor)
        self.wait()
        tmp = _prepare(self.directory, step)
        state = _state(model, optimizers, self.trainable_only)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if _distributed():
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group)
            else:
                future = dcp.async_save(state, checkpoint_id=str(tmp), no_dist=True)
        self._pending = (future, step, dict(trainer_state))
        return self.directory / step_dir_name(step)

    def wait(self) -> Path | None:
        """Complete the write in flight, if any; return its checkpoint dir."""
        if self._pending is None:
            return None
        future, step, trainer_state = self._pending
        self._pending = None
        future.result()  # re-raises a failed write here, in the training thread
        if _is_main():
            return _complete(self.directory, step, trainer_state, self.keep, self.rollback_floor)
        return self.directory / step_dir_name(step)

    def close(self) -> Path | None:
        final = self.wait()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None
        return final


def checkpoint_before(directory: Path, step: int) -> Path | None:
    """The newest complete checkpoint written before `step`."""
    older = [p for p in list_checkpoints(directory) if step_of(p) < step]
    return older[-1] if older else None


def discard_after(directory: Path, path: Path) -> None:
    """Rank 0, on a rollback to `path`: drop newer checkpoints and point `latest` back at it."""
    if not _is_main():
        return
    atomic.write_text(directory / LATEST, path.name + "\n")
    step = step_of(path)
    for newer in list_checkpoints(directory):
        if step_of(newer) > step:
            shutil.rmtree(newer, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    file = path / STATE_FILE
    if not (path / ".metadata").is_file() or not file.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete (missing .metadata or {STATE_FILE})")
    try:
        state = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: {file} is not valid JSON") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: {file} does not hold a JSON object")
    missing = [key for key in REQUIRED_STATE if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is corrupt: {file} lacks {', '.join(map(repr, missing))}")
    return state


def check_model_shape(path: Path, state: dict, expected: dict) -> None:
    saved = state.get("model_shape", {})
    diffs = [f"{k} {saved.get(k)} vs {v}" for k, v in expected.items() if saved.get(k) != v]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was written for a different model config ({', '.join(diffs)} now)"
        )


def _dcp_load(target: dict[str, Any], path: Path) -> None:
    """DCP reads each rank's part of every tensor, whatever world size wrote it."""
    if _distributed():
        dcp.load(target, checkpoint_id=str(path))
        return
    with warnings.catch_warnings():  # DCP warns that it runs without a process group
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(target, checkpoint_id=str(path), no_dist=True)


def _parallel(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, (torch.nn.parallel.DistributedDataParallel, FSDPModule))


def load(
    path: Path,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer] | None = None,
    trainable_only: bool = False,
) -> dict[str, Any]:
    """Load model (and optimizer) state in place; return the trainer state."""
    state = read_state(path)
    base = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    base = base.get_base_model() if hasattr(base, "get_base_model") else base  # under peft
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
    elif not _parallel(model):
        model.load_state_dict(target["model"], strict=not trainable_only)
    else:  # under DDP or FSDP2: DCP's helper maps plain names onto wrapped / sharded params
        set_model_state_dict(model, target["model"], options=StateDictOptions(strict=not trainable_only))
    return state
