"""Validation loss and bits per byte on held-out windows of a token dataset."""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.data.loader import WindowLoader
from lmforge.train.parallel import autocast


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
