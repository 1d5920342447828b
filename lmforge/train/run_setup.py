"""Whether a run may use its run dir, and what it records there before the first step.

A run dir belongs to one run (lmforge/store/run_dir.py): `resume` continues it from its
latest checkpoint with the same tokenizer; without checkpoints the same config starts it
over; anything else is refused unless `overwrite`, which starts it over from nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import yaml

from lmforge import atomic
from lmforge.config import to_yaml
from lmforge.errors import CheckpointError, ConfigError, TokenizerError
from lmforge.monitor.catalog import flatten
from lmforge.store import checkpoint, hashes
from lmforge.store.model_dir import tokenizer_files
from lmforge.store.run_dir import RunDir
from lmforge.tokenizer import LmTokenizer, load_tokenizer
from lmforge.train import distributed
from lmforge.train.config import TrainingRun

log = logging.getLogger(__name__)

# Config keys that do not change what a run computes: a rerun may differ in them.
_NOT_THE_RUN = frozenset({"run.out_dir", "train.progress", "train.resume", "train.profile"})
# Lineage that identifies a run's inputs beside its config (the same paths may hold new data).
_INPUT_HASHES = ("dataset_manifest_sha256", "dataset_sha256", "parent_weights_sha256")


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What this run does with its run dir."""

    latest: Path | None  # the run dir's newest complete checkpoint (None with overwrite)
    resume: bool  # continue from `latest` (when there is one)
    overwrite: bool  # asked to replace an earlier run (False on a torchrun relaunch)
    start_over: bool  # rank 0 clears the run dir before writing to it


def plan_run(run_dir: RunDir, config: TrainingRun, tokenizer: LmTokenizer, manifest: dict[str, Any],
             resume: bool, overwrite: bool, extra_state: dict[str, Any] | None = None) -> RunPlan:
    """Resolve --resume/--overwrite and train.resume against what the run dir holds (see claim_run_dir)."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the run dir and --overwrite replaces it: pass one of them")
    relaunched = distributed.restart_count() > 0
    # A torchrun relaunch repeats the command line: the first attempt did the overwrite, this one resumes it.
    overwrite = overwrite and not relaunched
    latest = None if overwrite else checkpoint.latest_checkpoint(run_dir.checkpoints)
    policy = config.train.resume
    resume = not overwrite and (resume or policy == "always" or (policy == "auto" and relaunched))
    start_over = claim_run_dir(run_dir, config, tokenizer, manifest, latest, resume, overwrite, extra_state)
    return RunPlan(latest, resume, overwrite, start_over)


def _saved_tokenizer_hash(run_dir: RunDir) -> str | None:
    if not (run_dir.tokenizer / "tokenizer.json").is_file():
        return None
    try:
        return load_tokenizer(run_dir.tokenizer).hash()
    except TokenizerError:
        return "unreadable"


def run_changes(run_dir: RunDir, config: TrainingRun, tokenizer: LmTokenizer, manifest: dict[str, Any]) -> list[str]:
    """How the run recorded in `run_dir` differs from this one: config keys, tokenizer, inputs."""
    changes = []
    saved = _saved_tokenizer_hash(run_dir)
    if saved is not None and saved != tokenizer.hash():
        changes.append(f"tokenizer {saved[:12]} -> {tokenizer.hash()[:12]}")
    lineage = run_dir.read_manifest()
    changes += [f"{key} {lineage[key][:12]} -> {manifest[key][:12]}" for key in _INPUT_HASHES
                if lineage.get(key) and manifest.get(key) and lineage[key] != manifest[key]]
    recorded = run_dir.read_config()
    if recorded is None:
        return [*changes, f"no readable {run_dir.path / 'config.yaml'}"]
    old, new = flatten(recorded), flatten(yaml.safe_load(to_yaml(config)))
    return changes + [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted((set(old) | set(new)) - _NOT_THE_RUN)
                      if old.get(key) != new.get(key)]


def claim_run_dir(run_dir: RunDir, config: TrainingRun, tokenizer: LmTokenizer, manifest: dict[str, Any],
                  latest: Path | None, resume: bool, overwrite: bool, extra_state: dict[str, Any] | None = None) -> bool:
    """Whether this run may use `run_dir` (a one-line error if not) and must first clear it.

    Continued: a run with checkpoints, with `resume`, the same tokenizer and the same hashes
    in `extra_state` (`*_sha256`: e.g. a fine-tune's starting weights); the checkpoint checks
    the model's shape, the data loader its position. Started over: anything, with
    `overwrite`; or a run with the same config and inputs that wrote no checkpoint (a rerun
    never appends to stale metrics). Refused: the rest, naming what differs."""
    if overwrite:
        return run_dir.has_contents()
    if latest is not None and resume:
        _check_resumable(run_dir, latest, tokenizer, extra_state)
        return False
    if not run_dir.has_contents():
        return False
    changes = run_changes(run_dir, config, tokenizer, manifest)
    shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
    if latest is not None:
        if changes:
            raise ConfigError(f"run dir {run_dir.path} holds another run ({shown}): pass --overwrite to replace it, "
                              "or choose another run.name")
        raise ConfigError(f"run dir {run_dir.path} already has checkpoints: pass --resume to continue it, "
                          "--overwrite to start over, or choose another run.name")
    if changes:
        raise ConfigError(f"run dir {run_dir.path} holds an earlier run without checkpoints ({shown}): "
                          "pass --overwrite to replace it, or choose another run.name")
    return True


def _check_resumable(run_dir: RunDir, latest: Path, tokenizer: LmTokenizer, extra_state: dict[str, Any] | None) -> None:
    """A checkpoint continues only with the tokenizer and the starting weights it was trained with."""
    state = checkpoint.read_state(latest)
    recorded = state.get("tokenizer_hash") or _saved_tokenizer_hash(run_dir)
    if recorded is not None and recorded != tokenizer.hash():
        raise CheckpointError(
            f"cannot resume {run_dir.path}: it was trained with tokenizer {recorded[:12]}, this run's "
            f"{tokenizer.path or 'tokenizer'} is {tokenizer.hash()[:12]} (pass --overwrite to start over, "
            "or choose another run.name)"
        )
    for key, value in (extra_state or {}).items():
        if key.endswith("_sha256") and state.get(key) and value and state[key] != value:
            raise CheckpointError(f"cannot resume from {latest}: its {key} is {state[key][:12]}, this run's is "
                                  f"{value[:12]} (pass --overwrite to start over, or choose another run.name)")


def record_run(run_dir: RunDir, plan: RunPlan, config: TrainingRun, tokenizer: LmTokenizer, max_seq_len: int,
               lineage: dict[str, Any]) -> None:
    """Rank 0, before the first step: clear the run dir if the plan says so, then write the
    resolved config, the tokenizer (once) and the manifest."""
    if plan.start_over:
        log.info("starting %s over (%s)", run_dir.path, "--overwrite" if plan.overwrite else "same config, no checkpoint")
        run_dir.clear()
    run_dir.write_config(config)
    if not (run_dir.tokenizer / "tokenizer.json").is_file():
        save_tokenizer(tokenizer, run_dir, max_seq_len)
    run_dir.write_manifest({**lineage, "config_sha256": hashes.sha256_file(run_dir.config_path)})


def save_tokenizer(tokenizer: LmTokenizer, run_dir: RunDir, max_seq_len: int) -> None:
    """The run's tokenizer; imported ones keep their tokenizer_config (BOS/EOS, template)."""
    if tokenizer.native:
        tokenizer.save(run_dir.tokenizer)
        return
    for name, text in tokenizer_files(tokenizer, max_seq_len).items():
        atomic.write_text(run_dir.tokenizer / name, text)
