"""Drawing tokens from logits, and a reference decoder: one sequence, the model's KV cache.

Users decode through the serving engine (`lmforge.serve.engine.Engine`: `lmforge generate`,
`chat`, `serve`). `generate_tokens` below is the plainest correct loop over the model's
forward, kept as the reference the engine is tested against (and for greedy generation in
`lmforge.eval`, which sits below `serve` in the layers). Both sample through `sample_next`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lmforge.errors import ConfigError
from lmforge.model.kv_cache import KVCache
from lmforge.model.transformer import Transformer


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [batch, vocab] -> token ids [batch]; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # Nucleus sampling (Holtzman et al., 2019): keep the smallest set whose mass >= top_p.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: set[int] | None = None,
) -> Iterator[int]:
    """Reference decoder: yield new token ids one by one until `max_tokens`, a stop id, or
    the context is full."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty (it needs at least one token)")
    context = model.config.max_seq_len
    if len(prompt_ids) >= context:
        raise ConfigError(f"prompt has {len(prompt_ids)} tokens; the model's context is {context}")
    param = next(model.parameters())
    generator = None
    if seed is not None:
        generator = torch.Generator(device=param.device).manual_seed(seed)
    budget = min(max_tokens, context - len(prompt_ids))
    cache = KVCache(model.config, 1, len(prompt_ids) + budget, device=param.device, dtype=param.dtype)
    logits = model(torch.tensor([prompt_ids], device=param.device), kv_cache=cache)[:, -1]
    for position in range(len(prompt_ids), len(prompt_ids) + budget):
        next_id = sample_next(logits, temperature, top_k, top_p, generator)
        token = int(next_id.item())
        if stop_ids and token in stop_ids:
            return
        yield token
        if position + 1 >= len(prompt_ids) + budget:
            return
        positions = torch.tensor([position], device=param.device)
        logits = model(next_id.view(1, 1), positions=positions, kv_cache=cache)[:, -1]
