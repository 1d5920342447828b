"""Resolve what a user names as "a model" into a model and tokenizer for inference.

Accepted today: a run dir (its latest checkpoint) or a checkpoint dir `.../checkpoints/step-N`.
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
    raise CheckpointError(f"{path} is not a run dir or checkpoint (no checkpoints/latest inside)")


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu"
) -> tuple[Transformer, LmTokenizer, Path]:
    """Model in eval mode on `device`, its tokenizer, and the checkpoint it came from."""
    ckpt = resolve_checkpoint(path)
    state = checkpoint.read_state(ckpt)
    config = ModelConfig.model_validate(state["model"])
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()
    checkpoint.load(ckpt, model)
    tokenizer = load_tokenizer(ckpt.parent.parent / "tokenizer")
    return model.to(device).eval(), tokenizer, ckpt
