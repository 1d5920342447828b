"""Interop fixtures: an lmforge run trained briefly on real text, and helpers for transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.train import trainer  # noqa: E402
from lmforge.train.config import TrainConfig  # noqa: E402

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


@pytest.fixture(scope="session")
def trained_run(pretrain_data, tmp_path_factory) -> Path:
    """A tiny model trained 16 steps on real text, validated and checkpointed at the end."""
    root = tmp_path_factory.mktemp("interop")
    config = TrainConfig.model_validate({
        "run": {"name": "export-me", "out_dir": str(root / "runs"), "seed": 3},
        "model": {"preset": "tiny", "max_seq_len": 128},
        "data": {"dataset": str(pretrain_data["tokens"]), "seq_len": 64},
        "schedule": {"warmup_steps": 2},
        "train": {
            "max_steps": 16, "global_batch_tokens": 1024, "micro_batch_size": 8, "device": "cpu",
            "eval_every": 16, "eval_batches": 2, "checkpoint_every": 0, "progress": False,
        },
    })
    result = trainer.run(config)
    assert result.status == "completed" and result.val_loss is not None
    return result.run_dir
