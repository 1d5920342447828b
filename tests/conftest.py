"""Shared fixtures: real text from the bundled corpus, a tokenizer and a token dataset built from it.

Everything is session-scoped and built once: a slice of ~150 real documents keeps the
tokenizer and the dataset small enough for a fast suite on two CPU cores.
"""

from __future__ import annotations

import gzip
import itertools
import json
from pathlib import Path

import pytest

from lmforge.data.tokenize import TokenizeConfig
from lmforge.data.tokenize import run as tokenize_run
from lmforge.data.tokenizer_train import TokenizerTrainConfig, run_train
from lmforge.tokenizer import LmTokenizer
from lmforge.train import trainer
from lmforge.train.config import TrainConfig

BUNDLED_CORPUS = (
    Path(__file__).resolve().parents[1] / "lmforge" / "data" / "corpus" / "python_docs.jsonl.gz"
)
SUBSET_DOCUMENTS = 150


def bundled_corpus() -> Path:
    """The corpus ships inside the package: its absence is a broken checkout, a failure, not a skip."""
    assert BUNDLED_CORPUS.is_file(), f"bundled corpus not found: {BUNDLED_CORPUS}"
    return BUNDLED_CORPUS


def read_jsonl_texts(path: str | Path) -> list[str]:
    """The "text" field of every record of a jsonl(.gz) file, in order."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    """The bundled real-text corpus (jsonl.gz of {"id", "text"} records)."""
    return bundled_corpus()


@pytest.fixture(scope="session")
def corpus_subset(corpus_path, tmp_path_factory) -> Path:
    """A plain jsonl file with the first ~150 documents of the bundled corpus."""
    out = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    with (
        gzip.open(corpus_path, "rt", encoding="utf-8") as src,
        open(out, "w", encoding="utf-8") as dst,
    ):
        for line in itertools.islice(src, SUBSET_DOCUMENTS):
            dst.write(line if line.endswith("\n") else line + "\n")
    return out


@pytest.fixture(scope="session")
def corpus_texts(corpus_subset) -> list[str]:
    """The texts of `corpus_subset`, in file order."""
    return read_jsonl_texts(corpus_subset)


@pytest.fixture(scope="session")
def trained_tokenizer(corpus_subset, tmp_path_factory) -> LmTokenizer:
    """A 1024-token byte-level BPE trained on `corpus_subset` (saved; `.path` is its file)."""
    out = tmp_path_factory.mktemp("tokenizer")
    return run_train(
        TokenizerTrainConfig(inputs=[str(corpus_subset)], out=str(out), vocab_size=1024)
    )


@pytest.fixture(scope="session")
def token_dataset(corpus_subset, trained_tokenizer, tmp_path_factory) -> Path:
    """The token dataset dir of `corpus_subset` with a 10% validation split."""
    out = tmp_path_factory.mktemp("tokens") / "dataset"
    tokenize_run(
        TokenizeConfig(
            inputs=[str(corpus_subset)],
            tokenizer=str(trained_tokenizer.path),
            out=str(out),
            val_fraction=0.1,
            num_workers=1,
        )
    )
    return out


@pytest.fixture(scope="session")
def pretrain_data(tmp_path_factory) -> dict[str, Path]:
    """~400 real documents -> 1024-token BPE -> token dataset with a 10% validation split."""
    root = tmp_path_factory.mktemp("pretrain")
    subset = root / "docs.jsonl"
    with gzip.open(bundled_corpus(), "rt", encoding="utf-8") as src, open(subset, "w") as dst:
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


@pytest.fixture(scope="session")
def trained_run(pretrain_data, tmp_path_factory) -> Path:
    """A tiny model trained 150 steps (~5 s) on real text, validated and checkpointed at the end."""
    root = tmp_path_factory.mktemp("interop")
    config = TrainConfig.model_validate({
        "run": {"name": "export-me", "out_dir": str(root / "runs"), "seed": 3},
        "model": {"preset": "tiny", "max_seq_len": 128},
        "data": {"dataset": str(pretrain_data["tokens"]), "seq_len": 64},
        "schedule": {"warmup_steps": 2},
        "train": {
            "max_steps": 150, "global_batch_tokens": 1024, "micro_batch_size": 8, "device": "cpu",
            "eval_every": 150, "eval_batches": 2, "checkpoint_every": 0, "progress": False,
        },
    })
    result = trainer.run(config)
    assert result.status == "completed" and result.val_loss is not None
    return result.run_dir


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(process, port: int, timeout: float = 90.0) -> None:
    """Poll `lmforge serve`'s /health until it answers; fail with its stderr if it exits first."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, process.stderr.read()[-2000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, f"lmforge serve did not come up on port {port}"
        time.sleep(0.2)
