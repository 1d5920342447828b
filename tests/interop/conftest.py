"""Interop helpers for transformers (the trained run is `trained_run` in tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


def auto_dtype() -> dict:
    """from_pretrained keyword for "the dtype the checkpoint was saved in" (renamed in 5.x)."""
    return {"dtype": "auto"} if TRANSFORMERS_5 else {"torch_dtype": "auto"}


def chat_ids(hf_tokenizer, messages, add_generation_prompt=False) -> list[int]:
    """apply_chat_template's ids (a list in transformers 4.x, an encoding in 5.x)."""
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def real_token_batch(encode, texts: list[str], rows: int = 2, length: int = 96) -> torch.Tensor:
    """[rows, length] token ids from the first documents long enough."""
    batch = [ids[:length] for ids in map(encode, texts) if len(ids) >= length][:rows]
    assert len(batch) == rows
    return torch.tensor(batch)
