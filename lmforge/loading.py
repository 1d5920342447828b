"""Resolve what a user names as "a model" into a model and tokenizer, for every verb that takes one.

Accepted alike: a model dir in the Hugging Face layout (`config.json` + safetensors, as
`lmforge export` writes or transformers saves), a run dir (its latest checkpoint), a
checkpoint dir `.../checkpoints/step-N`, or a LoRA adapter dir (merged into its base).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

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


def load_model(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Transformer, LmTokenizer, Path]:
    """Model in eval mode on `device`, its tokenizer, and the model or checkpoint dir it came from.

    `dtype` None keeps what is stored: a model dir's safetensors dtype, fp32 for checkpoints.
    """
    from lmforge.interop.model_dir import is_model_dir, load_model_dir

    if is_model_dir(path):
        model, tokenizer = load_model_dir(path, device, dtype)
        return model, tokenizer, Path(path)
    if is_adapter_dir(path):  # peft adapters over a base model, merged for inference
        from lmforge.align.lora import load_adapter, merge

        wrapped, tokenizer, _ = load_adapter(path)
        return merge(wrapped).to(device=device, dtype=dtype).eval(), tokenizer, Path(path)
    ckpt = resolve_checkpoint(path)
    state = checkpoint.read_state(ckpt)
    tokenizer = load_tokenizer(ckpt.parent.parent / "tokenizer")
    if state.get("lora"):
        return _load_lora(ckpt, state).to(device=device, dtype=dtype).eval(), tokenizer, ckpt
    config = ModelConfig.model_validate(state["model"])
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_rope()
    checkpoint.load(ckpt, model)
    return model.to(device=device, dtype=dtype).eval(), tokenizer, ckpt


def _load_lora(ckpt: Path, state: dict) -> Transformer:
    """A LoRA run's checkpoint holds only adapters: rebuild its base, load them, merge."""
    from lmforge.align.lora import LoraSettings, apply_lora, merge

    base_path = state.get("init_from")
    if not base_path or not Path(base_path).exists():
        raise CheckpointError(f"{ckpt} holds LoRA adapters for base model {base_path!r}, which is not found")
    base, _, _ = load_model(base_path, "cpu", torch.float32)
    wrapped = apply_lora(base, LoraSettings.model_validate(state["lora"]))
    checkpoint.load(ckpt, wrapped, trainable_only=True)
    return merge(wrapped)
