"""Fixtures for trainer tests: a tokenizer and token dataset from the bundled corpus."""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest

from lmforge.data.tokenize import TokenizeConfig
from lmforge.data.tokenize import run as tokenize_run
from lmforge.tokenizer import TokenizerTrainConfig, run_train
from lmforge.train.config import TrainConfig

BUNDLED = Path(__file__).resolve().parents[2] / "lmforge" / "data" / "corpus" / "python_docs.jsonl.gz"


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory) -> dict[str, Path]:
    """~400 real documents -> 1024-token BPE -> token dataset with a 10% validation split."""
    if not BUNDLED.is_file():
        pytest.skip("bundled corpus missing")
    root = tmp_path_factory.mktemp("pretrain")
    subset = root / "docs.jsonl"
    with gzip.open(BUNDLED, "rt", encoding="utf-8") as src, open(subset, "w") as dst:
        for line in itertools.islice(src, 400):
            dst.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    run_train(TokenizerTrainConfig(inputs=[str(subset)], out=str(root / "tokenizer"), vocab_size=1024))
    tokenize_run(
        TokenizeConfig(
            inputs=[str(subset)], tokenizer=str(root / "tokenizer"), out=str(root / "tokens"),
            val_fraction=0.1, num_workers=1,
        )
    )
    return {"docs": subset, "tokenizer": root / "tokenizer", "tokens": root / "tokens"}


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
