"""Resolve what a user names as "a model" into a model and tokenizer, for every verb that takes one.

Accepted alike: a model dir in the Hugging Face layout (`config.json` + safetensors, as
`lmforge export` writes or transformers saves), a run dir (its latest checkpoint), a
checkpoint dir `.../checkpoints/step-N`, or a LoRA adapter dir (merged into its base).

Weights are only ever paired with the tokenizer they were trained with: a checkpoint
records its tokenizer's hash (older ones: the run's manifest does), an exported model
dir's card records the hash of its tokenizer.json, and a load whose tokenizer differs
is refused rather than decoding garbage.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from pydantic import ValidationError

from lmforge.device import resolve as resolve_device
from lmforge.errors import CheckpointError
from lmforge.model import ModelConfig, Transformer
from lmforge.tokenizer import LmTokenizer, load_tokenizer
from lmforge.train import checkpoint


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model not found: {path}")
    if checkpoint.STEP_DIR.match(path.name):
        return path
    for directory in (path / "checkpoints", path):
        if directory.is_dir():
            latest = checkpoint.latest_checkpoint(directory)
            if latest is not None:
                return latest
    raise CheckpointError(
        f"{path} is not a model dir, run dir or checkpoint (no config.json or checkpoints/latest inside)"
    )


def resolve_model(path: str | os.PathLike) -> Path:
    """The model dir or checkpoint dir that `path` names."""
    from lmforge.interop.model_dir import is_model_dir

    if is_model_dir(path) or is_adapter_dir(path):
        return Path(path)
    return resolve_checkpoint(path)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


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
    from lmforge.interop.export import TOKENIZER_JSON_HASH, read_card_lineage
    from lmforge.interop.model_dir import MODEL_CARD_FILE

    card = path / MODEL_CARD_FILE
    return read_card_lineage(card).get(TOKENIZER_JSON_HASH) if card.is_file() else None


def _manifest_tokenizer_hash(run_dir: Path) -> str | None:
    """Checkpoints written before they recorded their tokenizer: the run's manifest did."""
    from lmforge.runs import RunDir

    return RunDir(run_dir).read_manifest().get("tokenizer_hash")


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
    from lmforge.interop.model_dir import is_model_dir, load_model_dir

    device = resolve_device(device)  # a device this machine lacks is a one-line error, before any loading
    if is_model_dir(path):
        model, tokenizer = load_model_dir(path, device, dtype)
        check_tokenizer(tokenizer, _model_dir_tokenizer_hash(Path(path)), Path(path))
        return model, tokenizer, Path(path)
    if is_adapter_dir(path):  # peft adapters over a base model, merged for inference
        from lmforge.align.lora import load_adapter, merge

        wrapped, tokenizer, _ = load_adapter(path, base=base)
        return merge(wrapped).to(device=device, dtype=dtype).eval(), tokenizer, Path(path)
    ckpt = resolve_checkpoint(path)
    state = checkpoint.read_state(ckpt)
    run_dir = ckpt.parent.parent
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    check_tokenizer(tokenizer, state.get("tokenizer_hash") or _manifest_tokenizer_hash(run_dir), ckpt)
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
    from lmforge.align.lora import LoraSettings, apply_lora, load_base, merge

    record = {"path": state.get("init_from"), "relative": state.get("init_from_relative"),
              "sha256": state.get("init_from_weights_sha256")}
    model, _, _ = load_base(f"checkpoint {ckpt} (LoRA adapters)", record, ckpt.parent.parent, base)
    wrapped = apply_lora(model, LoraSettings.model_validate(state["lora"]))
    checkpoint.load(ckpt, wrapped, trainable_only=True)
    return merge(wrapped)
