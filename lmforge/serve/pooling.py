"""Text vectors from a causal LM (for /v1/embeddings): its final hidden states, pooled and L2-normalised.

These are the served model's own representations, not those of a model trained for embeddings
(no contrastive objective): fine for deduplication or a rough nearest-neighbour search over
one model's inputs, weaker than a dedicated embedding model for retrieval. Mean pooling
averages every token's state (the usual choice for a decoder without an embedding head);
last-token pooling takes the final position, the only one that has attended to the whole
text (as E5-Mistral / SFR-Embedding do after training for it).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from lmforge.model import Transformer

Pooling = Literal["mean", "last"]


@torch.inference_mode()
def embed_prompts(model: Transformer, prompts: list[list[int]], pooling: Pooling = "mean",
                  max_batch_tokens: int = 16384) -> list[list[float]]:
    """One unit vector per prompt (token ids), in the order given.

    Prompts run in batches of similar length, padded on the right to the longest: attention is
    causal, so padding after a prompt changes none of its positions. No KV cache is used, so
    this may run beside the engine's step loop on the same weights.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    vectors: list[list[float]] = [[] for _ in prompts]
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(prompts[order[end]]) <= max_batch_tokens:
            end += 1
        rows = [prompts[i] for i in order[start:end]]
        lengths = torch.tensor([len(r) for r in rows], device=device)
        tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for b, row in enumerate(rows):
            tokens[b, : len(row)] = torch.tensor(row)
        hidden = model.hidden_states(tokens.to(device)).float()  # [batch, width, dim], after the final norm
        if pooling == "last":
            pooled = hidden[torch.arange(len(rows), device=device), lengths - 1]
        else:
            keep = torch.arange(hidden.shape[1], device=device)[None, :] < lengths[:, None]
            pooled = (hidden * keep[..., None]).sum(1) / lengths[:, None]
        for i, vector in zip(order[start:end], F.normalize(pooled, dim=-1).cpu().tolist(), strict=True):
            vectors[i] = vector
        start = end
    return vectors
