"""`lmforge generate`: sampling with a KV cache (temperature, top-k, top-p, seed, stop at EOS)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from pydantic import Field

from lmforge.config import Section
from lmforge.errors import ConfigError
from lmforge.model import KVCache, Transformer


class SamplingConfig(Section):
    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.8, ge=0, description="0 is greedy")
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None


def sample_next(logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """logits [batch, vocab] -> token ids [batch]."""
    if config.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        # Nucleus sampling (Holtzman et al., 2019): keep the smallest set whose mass >= top_p.
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= config.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_tokens(
    model: Transformer,
    prompt_ids: list[int],
    config: SamplingConfig,
    stop_ids: set[int] | None = None,
) -> Iterator[int]:
    """Yield new token ids one by one until max_tokens, a stop id, or the context is full."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty (it needs at least one token)")
    context = model.config.max_seq_len
    if len(prompt_ids) >= context:
        raise ConfigError(f"prompt has {len(prompt_ids)} tokens; the model's context is {context}")
    device = next(model.parameters()).device
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=device).manual_seed(config.seed)
    budget = min(config.max_tokens, context - len(prompt_ids))
    cache = KVCache(model.config, 1, len(prompt_ids) + budget, device=device, dtype=next(model.parameters()).dtype)
    tokens = torch.tensor([prompt_ids], device=device)
    logits = model(tokens, kv_cache=cache)[:, -1]
    position = len(prompt_ids)
    for _ in range(budget):
        next_id = sample_next(logits, config, generator)
        token = int(next_id.item())
        if stop_ids and token in stop_ids:
            return
        yield token
        if position >= cache.max_len:
            return
        logits = model(next_id.view(1, 1), kv_cache=cache, positions=torch.tensor([position], device=device))[:, -1]
        position += 1


def generate(model: Transformer, tokenizer, prompt: str, config: SamplingConfig) -> str:
    """Continue `prompt` (prefixed with BOS, the document separator, as in training)."""
    new = list(generate_tokens(model, tokenizer.encode_prompt(prompt), config, stop_ids=tokenizer.stop_ids))
    return tokenizer.decode(new)
