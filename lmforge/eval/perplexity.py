"""Validation loss and bits per byte on held-out windows of a token dataset."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.data.loader import WindowLoader
from lmforge.device import autocast
from lmforge.errors import DataError


def bits_per_byte(loss_nats: float, bytes_per_token: float) -> float:
    """Tokenizer-independent: nats per token -> bits per UTF-8 byte of the original text."""
    return loss_nats / math.log(2) / bytes_per_token


@torch.no_grad()
def evaluate_loss(
    model: nn.Module, loader: WindowLoader, batches: int, device: torch.device, dtype: torch.dtype
) -> float:
    """Mean cross-entropy over the first `batches` batches (in order, so every call is comparable)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    available = max(1, loader.num_windows // loader.micro_batch_size)
    for step in range(min(batches, available)):
        inputs, targets = loader.batch(step)
        with autocast(device, dtype):
            loss = model(inputs.to(device), targets.to(device))
        total += loss.item() * inputs.numel()
        count += inputs.numel()
    model.train(was_training)
    return total / count


def text_metrics(nats: float, tokens: int, num_bytes: float, documents: int) -> dict[str, float | int]:
    """Perplexity figures of a total negative log-likelihood over some text."""
    return {
        "bits_per_byte": nats / math.log(2) / max(num_bytes, 1),
        "byte_perplexity": math.exp(nats / max(num_bytes, 1)),
        "token_perplexity": math.exp(nats / max(tokens, 1)),
        "nll_nats": nats,
        "tokens": tokens,
        "bytes": num_bytes,
        "documents": documents,
    }


def evaluate_texts(scorer, texts: list[str]) -> dict[str, float | int]:
    """Bits per byte of raw texts, each scored whole in rolling windows from BOS.

    Bytes are UTF-8 bytes of the texts, so models with different tokenizers compare.
    """
    texts = [t for t in texts if t]
    totals = scorer.text_loglikelihood(texts)
    nats = -sum(logprob for logprob, _ in totals)
    tokens = sum(count for _, count in totals)
    return text_metrics(nats, tokens, sum(len(t.encode("utf-8")) for t in texts), len(texts))


@torch.no_grad()
def evaluate_token_split(
    model: nn.Module, dataset, seq_len: int, batch_size: int = 8, max_windows: int | None = None
) -> dict[str, float | int]:
    """Bits per byte over consecutive windows of a token dataset split (in order, all of it
    unless `max_windows`); bytes per token come from the dataset manifest."""
    device = next(model.parameters()).device
    windows = (dataset.num_tokens - 1) // seq_len
    if max_windows:
        windows = min(windows, max_windows)
    if windows == 0:
        raise DataError(f"{dataset.directory} split {dataset.split!r} is shorter than one window of {seq_len}")
    nats, tokens = 0.0, 0
    for start in range(0, windows, batch_size):
        rows = [torch.from_numpy(dataset.read(w * seq_len, seq_len + 1)) for w in range(start, min(start + batch_size, windows))]
        batch = torch.stack(rows).to(device)
        logits = model(batch[:, :-1]).float()
        nats += torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
        tokens += batch[:, 1:].numel()
    return text_metrics(nats, tokens, tokens * dataset.bytes_per_token, windows)
