"""Trainer fixtures: a TrainConfig factory over the `pretrain_data` dataset (tests/conftest.py)."""

from __future__ import annotations

import pytest

from lmforge.train.config import TrainConfig


@pytest.fixture
def make_config(pretrain_data, tmp_path):
    """A TrainConfig for the tiny preset with keyword overrides per section."""

    def make(name: str = "run", **sections) -> TrainConfig:
        data = {
            "run": {"name": name, "out_dir": str(tmp_path / "runs"), "seed": 7},
            "model": {"preset": "tiny", "max_seq_len": 128},
            "data": {"dataset": str(pretrain_data["tokens"]), "seq_len": 64},
            "schedule": {"warmup_steps": 5},
            "train": {
                "max_steps": 12, "global_batch_tokens": 1024, "micro_batch_size": 8,
                "eval_every": 0, "eval_batches": 4, "checkpoint_every": 0, "log_every": 1,
                "progress": False,
            },
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return TrainConfig.model_validate(data)

    return make
