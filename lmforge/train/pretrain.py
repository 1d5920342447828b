"""Pretraining: next-token prediction on a token dataset, as an objective for the trainer.

`prepare` reads the dataset and its tokenizer, sizes the vocabulary and the gradient
accumulation, and returns what `train.trainer.fit` needs to train a fresh model on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.data.loader import TokenDataset, WindowLoader
from lmforge.errors import ConfigError, DataError
from lmforge.eval.perplexity import bits_per_byte, evaluate_loss
from lmforge.model import Transformer
from lmforge.store import token_dataset
from lmforge.tokenizer import LmTokenizer, load_tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.distributed import DistEnv
from lmforge.train.objective import LoaderState, accumulation


class PretrainObjective(LoaderState):
    """Next-token prediction on windows of a token dataset; validation loss and bits per byte."""

    kind = "pretrain"

    sharded = True  # batches are this rank's block of each step's windows

    def __init__(self, config: TrainConfig, train_data: TokenDataset, val_data: TokenDataset | None, accum: int,
                 rank: int = 0, world_size: int = 1):
        self.seq_len = config.data.seq_len
        self.tokens_per_step = config.train.global_batch_tokens
        self.loader = WindowLoader(
            train_data, self.seq_len, config.train.micro_batch_size, accum, config.run.seed, rank, world_size
        )
        self.val_data = val_data
        self.val_loader = (
            WindowLoader(val_data, self.seq_len, config.train.micro_batch_size, shuffle=False) if val_data else None
        )
        self.eval_batches = config.train.eval_batches

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        inputs, targets = self.loader.batch(step, micro_step)
        return {"inputs": inputs, "targets": targets}

    def loss(self, model, batch):
        return model(batch["inputs"], batch["targets"]), {}

    def validate(self, model, device, dtype) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        val_loss = evaluate_loss(model, self.val_loader, self.eval_batches, device, dtype)
        return {"val_loss": val_loss, "val_bpb": bits_per_byte(val_loss, self.val_data.bytes_per_token)}


def prepare(config: TrainConfig, env: DistEnv) -> tuple[LmTokenizer, PretrainObjective, Callable[[], nn.Module], dict[str, Any]]:
    """The tokenizer, this rank's objective, a builder of the freshly initialised model and the
    run's lineage. Fills `config.model.vocab_size` from the tokenizer when unset."""
    train_data = TokenDataset(config.data.dataset, "train")
    has_val = train_data.manifest["splits"].get("val", {}).get("tokens", 0) > config.data.seq_len
    val_data = TokenDataset(config.data.dataset, "val") if has_val else None
    tokenizer = load_tokenizer(config.data.tokenizer or train_data.manifest["tokenizer"]["path"])
    if tokenizer.hash() != train_data.tokenizer_hash:
        raise DataError(
            f"tokenizer {tokenizer.path} does not match dataset {config.data.dataset} "
            "(it was tokenized with a different tokenizer)"
        )
    resolve_vocab(config, tokenizer.vocab_size)
    accum = grad_accum_steps(config, env.world_size)
    objective = PretrainObjective(config, train_data, val_data, accum, env.rank, env.world_size)

    def build_model() -> nn.Module:
        generator = torch.Generator().manual_seed(config.run.seed)
        with torch.device("meta"):
            model = Transformer(config.model)
        model.to_empty(device="cpu")
        model.init_weights(generator)
        return model

    manifest = {
        "kind": "pretrain",
        "parent": None,
        "dataset": str(Path(config.data.dataset).resolve()),
        "dataset_manifest_sha256": token_dataset.manifest_hash(config.data.dataset),
    }
    return tokenizer, objective, build_model, manifest


def resolve_vocab(config: TrainConfig, tokenizer_vocab: int) -> TrainConfig:
    """Fill model.vocab_size from the tokenizer, padded to a multiple of 64 for fast matmuls."""
    if config.model.vocab_size is None:
        config.model.vocab_size = math.ceil(tokenizer_vocab / 64) * 64
    elif config.model.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size {config.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}"
        )
    return config


def grad_accum_steps(config: TrainConfig, world_size: int = 1) -> int:
    return accumulation(config.train, config.data.seq_len, world_size)
