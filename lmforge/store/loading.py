"""Resolve what a user names as "a model" into a model and tokenizer, for every verb that takes one.

Accepted alike: a model dir in the Hugging Face layout (`config.json` + safetensors, as
`lmforge export` writes or transformers saves), a run dir (its latest checkpoint), a
checkpoint dir `.../checkpoints/step-N`, a LoRA adapter dir (merged into its base), or a
Hugging Face Hub id `org/name[@revision]` that names no local path (`lmforge.hub`: its
snapshot in the Hub cache, downloaded unless cached; records such as eval results and
release.json then live beside that snapshot).

Weights are only ever paired with the tokenizer they were trained with: a checkpoint
records its tokenizer's hash (older ones: the run's manifest does), an exported model
dir's card records the hash of its tokenizer.json, and a load whose tokenizer differs
is refused rather than decoding garbage.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from pydantic import ValidationError

from lmforge import hub
from lmforge.device import resolve as resolve_device
from lmforge.errors import CheckpointError
from lmforge.model import ModelConfig, Transformer
from lmforge.store import adapter, checkpoint, model_dir
from lmforge.store.run_dir import EVAL_DIR, RunDir
from lmforge.tokenizer import LmTokenizer, load_tokenizer

log = logging.getLogger(__name__)


def local_path(path: str | os.PathLike) -> Path:
    """`path` itself, or the Hub snapshot a model id `org/name[@revision]` names."""
    return hub.resolve(path, "model", hub.MODEL_FILES, CheckpointError)


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    path = local_path(path)
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    if checkpoint.STEP_DIR.match(path.name):
        return path
    for directory in (RunDir(path).checkpoints, path):
        if directory.is_dir():
            latest = checkpoint.latest_checkpoint(directory)
            if latest is not None:
                return latest
    raise CheckpointError(
        f"{path} is not a model dir, run dir or checkpoint (no config.json or checkpoints/latest inside)"
    )


def resolve_model(path: str | os.PathLike) -> Path:
    """The model dir or checkpoint dir that `path` names."""
    path = local_path(path)
    if model_dir.is_model_dir(path) or adapter.is_adapter_dir(path):
        return Path(path)
    return resolve_checkpoint(path)


def records_dir(path: str | os.PathLike) -> Path:
    """The dir that holds a model's records (eval results, release record, card): a model dir
    itself, or the run dir of a run dir or checkpoint (a Hub id: its snapshot)."""
    path = local_path(path)
    if model_dir.is_model_dir(path):
        return path
    return RunDir.of_checkpoint(resolve_checkpoint(path)).path


def eval_dir(path: str | os.PathLike) -> Path:
    """Where a model's evaluation results live: `eval/` in its model dir or run dir."""
    return records_dir(path) / EVAL_DIR


def check_tokenizer(tokenizer: LmTokenizer, recorded: str | None, weights: Path) -> None:
    """Refuse weights whose recorded tokenizer hash is not the hash of the tokenizer beside them."""
    if not recorded:
        return
    actual = tokenizer.hash()
    if actual != recorded:
        raise CheckpointError(
            f"tokenizer {tokenizer.path} does not match the weights in {weights}: they were trained with "
            f"tokenizer {recorded[:12]}, this one is {actual[:12]} (was it replaced?)"
        )


def _model_dir_tokenizer_hash(path: Path) -> str | None:
    """The hash of its tokenizer that `lmforge export` recorded in a model dir's card, if any."""
    card = path / model_dir.MODEL_CARD_FILE
    return model_dir.read_card_lineage(card).get(model_dir.TOKENIZER_JSON_HASH) if card.is_file() else None


def load_model(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    base: str | os.PathLike | None = None,
) -> tuple[Transformer, LmTokenizer, Path]:
    """Model in eval mode on `device`, its tokenizer, and the model or checkpoint dir it came from.

    `dtype` None keeps what is stored: a model dir's safetensors dtype, fp32 for checkpoints.
    `base`: for LoRA adapters, where their base model is now (its weights' hash must match).
    """
    device = resolve_device(device)  # a device this machine lacks is a one-line error, before any loading
    path = local_path(path)
    if model_dir.is_model_dir(path):
        model, tokenizer = model_dir.load_model_dir(path, device, dtype)
        check_tokenizer(tokenizer, _model_dir_tokenizer_hash(Path(path)), Path(path))
        return model, tokenizer, Path(path)
    if adapter.is_adapter_dir(path):  # peft adapters over a base model, merged for inference
        wrapped, tokenizer, _ = load_adapter(path, base=base)
        return adapter.merge(wrapped).to(device=device, dtype=dtype).eval(), tokenizer, Path(path)
    ckpt = resolve_checkpoint(path)
    state = checkpoint.read_state(ckpt)
    run_dir = RunDir.of_checkpoint(ckpt)
    tokenizer = load_tokenizer(run_dir.tokenizer)
    check_tokenizer(tokenizer, state.get("tokenizer_hash") or run_dir.read_manifest().get("tokenizer_hash"), ckpt)
    if state.get("lora"):
        return _load_lora(ckpt, state, base).to(device=device, dtype=dtype).eval(), tokenizer, ckpt
    try:
        config = ModelConfig.model_validate(state["model"])
    except ValidationError as err:
        reason = err.errors()[0]["msg"] if err.errors() else "invalid"
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: its model config is invalid ({reason})") from None
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_rope()
    checkpoint.load(ckpt, model)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, ckpt


def _load_lora(ckpt: Path, state: dict, base: str | os.PathLike | None = None) -> Transformer:
    """A LoRA run's checkpoint holds only adapters: find its base (verified by hash), load them, merge."""
    record = {"path": state.get("init_from"), "relative": state.get("init_from_relative"),
              "sha256": state.get("init_from_weights_sha256")}
    model, _, _ = load_base(f"checkpoint {ckpt} (LoRA adapters)", record, RunDir.of_checkpoint(ckpt).path, base)
    wrapped = adapter.apply_lora(model, adapter.LoraSettings.model_validate(state["lora"]))
    checkpoint.load(ckpt, wrapped, trainable_only=True)
    return adapter.merge(wrapped)


def load_base(what: str, record: dict[str, str | None], anchor: Path, base: str | os.PathLike | None = None,
              device="cpu"):
    """(base model in fp32, tokenizer, path) for adapters described by `what`, verified by hash.

    `record`: base_record's keys as stored; `anchor`: the dir its relative path starts from;
    `base`: a path the user gives (a moved base), tried instead of the recorded ones."""
    expected = record.get("sha256")
    recorded = record.get("path")
    if base is not None:
        candidates = [local_path(base)]
    else:
        candidates = [Path(p) for p in (recorded, record.get("relative") and anchor / record["relative"]) if p]
    found = [c for c in dict.fromkeys(candidates) if c.exists()]
    if not found:
        where = base if base is not None else recorded
        raise CheckpointError(f"{what} applies to base model {where!r}, which is not found: move it back, "
                              "or give the base's new path as `base`")
    mismatch = None
    for path in found:
        model, tokenizer, _ = load_model(path, device, torch.float32)
        if expected is None:
            log.warning("%s records no hash of its base weights (written by an older lmforge): "
                        "trusting %s unchecked", what, path)
            return model, tokenizer, path
        actual = adapter.weights_hash(model)
        if actual == expected:
            return model, tokenizer, path
        mismatch = mismatch or (path, actual)
    path, actual = mismatch
    raise CheckpointError(
        f"{what} was trained on base weights {expected[:12]}, but {path} holds other weights ({actual[:12]}): "
        "the base was overwritten or retrained; give the original base as `base`"
    )


def load_adapter(directory: str | os.PathLike, device="cpu", base: str | os.PathLike | None = None):
    """(peft model over its base, tokenizer, base path) from an adapter dir; `base` overrides
    where the base is looked for (its weights must still be the ones the adapters were trained on).
    Either layout loads: HF module names (`adapter_hf`), or lmforge's own as older adapters hold."""
    directory = Path(directory)
    if not adapter.is_adapter_dir(directory):
        raise CheckpointError(f"{directory} is not a LoRA adapter dir (no adapter_config.json)")
    record = adapter.read_base_file(directory)
    model, tokenizer, path = load_base(f"adapter {directory}", record, directory, base, device)
    return adapter.load_into(model, adapter.read_adapter(directory, model.config)), tokenizer, path
