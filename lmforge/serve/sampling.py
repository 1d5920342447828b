"""Per-request sampling: parameters, penalties, log-probs, and text that stops at stop strings.

Each request samples from its own row of the batch's logits with its own
`torch.Generator`, through `lmforge.model.decode.sample_next` (which the reference decoder
uses too): a seeded request draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from pydantic import Field

from lmforge.config import Section
from lmforge.model.decode import sample_next
from lmforge.serve.structured import StructuredSpec
from lmforge.tokenizer import LmTokenizer


class SamplingConfig(Section):
    """Sampling settings as a config-file section (quickstart's `sampling`); `params()` is the request."""

    max_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.8, ge=0, description="0 is greedy")
    top_k: int | None = Field(None, ge=1)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None

    def params(self) -> SamplingParams:
        return SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                              top_p=self.top_p, seed=self.seed)


@dataclass
class SamplingParams:
    """What one request asks for (OpenAI's names; `top_k`, `ignore_eos` as in vLLM)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's extensions: min-p filtering, a multiplicative repetition penalty over prompt and
    # output (CTRL, Keskar et al., 2019), end-of-text held off for min_tokens, more stop tokens.
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    stop_token_ids: list[int] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)  # OpenAI's: added to the logits
    structured: StructuredSpec | None = None  # a grammar the reply must match (response_format, tools)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-prob and the top k
    prompt_logprobs: int | None = None  # the same for every prompt token (completions `echo`)
    timeout_s: float | None = None
    adapter: str | None = None  # the LoRA adapter (its name in lora.adapters) the request runs with; None: the base

    def __post_init__(self):
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


SAMPLING_EPS = 1e-5  # temperatures below this are greedy, as in vLLM


class Sampler:
    """One request's sampling state: its generator, token counts for penalties, its parameters."""

    def __init__(self, params: SamplingParams, vocab_size: int, device: torch.device,
                 prompt_ids: list[int] | None = None, end_ids: frozenset[int] | set[int] = frozenset()):
        self.params = params
        # Dividing logits by a temperature near 0 overflows them to inf, and the softmax to NaN,
        # which would fail the whole batch's step; the limit of such a temperature is greedy anyway.
        self.temperature = 0.0 if params.temperature < SAMPLING_EPS else params.temperature
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(params.seed)
        self.counts = None
        if params.presence_penalty or params.frequency_penalty:
            self.counts = torch.zeros(vocab_size, device=device)
        self.seen = None  # tokens of the prompt and the output, for the repetition penalty
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device)
            self.seen[torch.tensor(prompt_ids or [], dtype=torch.long, device=device)] = True
        self.bias = None
        if params.logit_bias:
            self.bias = torch.zeros(vocab_size, device=device)
            self.bias[torch.tensor(list(params.logit_bias), device=device)] = torch.tensor(
                list(params.logit_bias.values()), device=device)
        # Tokens that end the reply, held off until min_tokens are out.
        self.end_ids = sorted(set(end_ids) | set(params.stop_token_ids)) if params.min_tokens else []
        self.generated = 0

    @property
    def greedy_plain(self) -> bool:
        """Greedy with nothing per-row to apply: can share one batched argmax."""
        p = self.params
        return (self.temperature == 0 and self.counts is None and self.seen is None and self.bias is None
                and not p.min_tokens)

    def sample(self, logits: torch.Tensor) -> int:
        """logits [vocab] (fp32) -> token id."""
        p = self.params
        if self.bias is not None:
            logits = logits + self.bias
        if self.seen is not None:
            # Seen tokens' logits are divided by the penalty when positive, multiplied when negative.
            penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
            logits = torch.where(self.seen, penalized, logits)
        if self.counts is not None:
            # OpenAI's penalties: subtract count * frequency + (count > 0) * presence, over output tokens.
            logits = logits - self.counts * p.frequency_penalty - (self.counts > 0).float() * p.presence_penalty
        if self.end_ids and self.generated < p.min_tokens:
            held = logits.index_fill(0, torch.tensor(self.end_ids, device=logits.device), float("-inf"))
            if not torch.isneginf(held).all():  # a grammar that allows only the end wins over min_tokens
                logits = held
        if p.min_p > 0 and self.temperature > 0:
            # Min-p (Nguyen et al., 2024): drop tokens under min_p x the top token's probability,
            # judged at the sampling temperature: logit < max + T * log(min_p).
            floor = logits.max() + self.temperature * math.log(p.min_p)
            logits = logits.masked_fill(logits < floor, float("-inf"))
        return int(sample_next(logits[None], self.temperature, p.top_k, p.top_p, self.generator)[0])

    def observe(self, token: int) -> None:
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1
        if self.seen is not None:
            self.seen[token] = True


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """Raw model log-probs (before temperature and penalties, as vLLM reports them) of `tokens`
    under `logits` [n, vocab], with the `top` most likely alternatives of each."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
    if top > 0:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        tops = [list(zip(i, v, strict=True)) for i, v in zip(ids.tolist(), values.tolist(), strict=True)]
    else:
        tops = [[] for _ in chosen]
    return [TokenLogprob(t, lp, tp) for t, lp, tp in zip(tokens.tolist(), chosen, tops, strict=True)]


class TextTracker:
    """Incremental detokenization with stop strings.

    Text is decoded over a small window of earlier tokens (as vLLM does) so tokenizers whose
    decoders depend on context (leading spaces) and multi-token UTF-8 characters come out
    right; text that could still become a stop string is held back until it cannot.
    """

    def __init__(self, tokenizer: LmTokenizer, prompt_ids: list[int], stop: list[str]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-4:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""  # all output text so far (cut at a stop string once one is seen)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def add(self, token: int) -> None:
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            before = len(self.text)
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            if self.stop:
                self._check_stop(max(0, before - self.hold))

    def _check_stop(self, search_from: int) -> None:
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def flush(self, final: bool) -> str:
        """Text not yet handed out; unless `final`, minus a tail that might start a stop string."""
        if final and not self.stopped and self.read_offset < len(self.ids):
            # An incomplete character at the end stays as U+FFFD, as a full decode gives it.
            prefix = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self.tokenizer.decode(self.ids[self.prefix_offset :])[len(prefix):]
            self.read_offset = len(self.ids)
            if self.stop:
                self._check_stop(max(0, self.sent - self.hold))
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
