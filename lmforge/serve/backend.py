"""The engine interface every backend implements (lmforge's `Engine`, `VllmEngine`), and what
a request gives back: `RequestOutput` deltas through a `RequestHandle`, gathered into a
`Completion`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.serve.config import EngineConfig
from lmforge.serve.sampling import SamplingParams, TokenLogprob
from lmforge.serve.structured import Grammars, StructuredSpec
from lmforge.tokenizer import LmTokenizer


class RequestError(LmforgeError):
    """A request the engine cannot run (empty prompt, longer than the context, bad token ids)."""


@dataclass
class RequestOutput:
    """What a request produced since its previous output (the last one has `finished`)."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None  # stop | length | cancelled | timeout | error
    num_prompt_tokens: int
    num_output_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_token_id: int | None = None  # the stop token that ended the request (not in token_ids)
    # On the first output only, time.monotonic() when the engine took the request and when it
    # gave it a slot (None where the backend measures queue time itself, as vLLM does).
    queued_at: float | None = None
    scheduled_at: float | None = None


@dataclass
class Completion:
    """A whole request's result, gathered from its outputs."""

    request_id: str
    prompt_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_token_id: int | None = None  # the stop token that ended it (not in token_ids), as vLLM's stop_reason


@dataclass
class EngineStats:
    running: int
    waiting: int
    kv_cache_usage: float  # fraction of cache positions held by running sequences


class RequestHandle:
    """The receiving end of one request: iterate (sync or async) over its outputs, or cancel it."""

    def __init__(self, engine: BaseEngine, request_id: str, prompt_ids: list[int], loop=None):
        self.engine, self.request_id, self.prompt_ids = engine, request_id, prompt_ids
        self._loop = loop
        self._queue: asyncio.Queue | queue.Queue = asyncio.Queue() if loop is not None else queue.Queue()
        self.finished = False

    def _put(self, output: RequestOutput) -> None:  # called on the engine thread
        deliver([(self, output)])

    def cancel(self) -> None:
        if not self.finished:
            self.engine.cancel(self.request_id)

    def __iter__(self) -> Iterator[RequestOutput]:
        while not self.finished:
            output = self._queue.get()
            self.finished = output.finished
            yield output

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                # A consumer that fell behind the engine takes what has piled up as one output
                # (as vLLM's output collector does): one SSE event for several tokens, not several.
                outputs = [await self._queue.get()]
                while not outputs[-1].finished and not self._queue.empty():
                    outputs.append(self._queue.get_nowait())
                output = merge_outputs(outputs)
                self.finished = output.finished
                yield output
        finally:  # the consumer stopped early (client gone): free the slot
            self.cancel()

    def result(self) -> Completion:
        return gather(self.request_id, self.prompt_ids, list(self))


def deliver(outputs: list[tuple[RequestHandle, RequestOutput]]) -> None:
    """Hand outputs to their consumers from the engine thread: one wake-up per event loop for a
    whole step's outputs (each wake-up is a write to the loop's self-pipe), not one per token."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
    for handle, output in outputs:
        if handle._loop is None:
            handle._queue.put(output)
        else:
            by_loop.setdefault(handle._loop, []).append((handle._queue, output))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop is gone: nobody is listening
            pass


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, output in items:
        q.put_nowait(output)


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """Consecutive outputs of one request as one: tokens, text and log-probs joined, the first's
    timing and prompt log-probs, the last's state."""
    if len(outputs) == 1:
        return outputs[0]
    first, last = outputs[0], outputs[-1]
    logprobs = None
    if any(o.logprobs is not None for o in outputs):
        logprobs = [lp for o in outputs for lp in (o.logprobs or [])]
    return dataclasses.replace(
        last, token_ids=[t for o in outputs for t in o.token_ids], text="".join(o.text for o in outputs),
        logprobs=logprobs, prompt_logprobs=next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None),
        queued_at=first.queued_at, scheduled_at=first.scheduled_at)


def gather(request_id: str, prompt_ids: list[int], outputs: Sequence[RequestOutput]) -> Completion:
    if not outputs:
        return Completion(request_id=request_id, prompt_ids=prompt_ids, text="", token_ids=[], finish_reason=None)
    whole = merge_outputs(list(outputs))
    return Completion(request_id=request_id, prompt_ids=prompt_ids, text=whole.text, token_ids=whole.token_ids,
                      finish_reason=whole.finish_reason, logprobs=whole.logprobs,
                      prompt_logprobs=whole.prompt_logprobs, stop_token_id=whole.stop_token_id)


class BaseEngine(ABC):
    """What every backend shares: prompt checks, and `generate` / `stream` on top of `submit`.

    A backend sets `config`, `tokenizer`, `max_len`, `vocab_size`, `device`, `dtype` and
    implements `submit`, `cancel`, `stats`, `start` and `shutdown`.
    """

    config: EngineConfig
    tokenizer: LmTokenizer
    max_len: int
    vocab_size: int
    lora_adapters: dict[str, str] = {}  # LoRA adapters served over the model: name -> adapter dir
    embedding_dim: int | None = None  # width of `embed`'s vectors; None: this backend computes none

    @abstractmethod
    def submit(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request; its outputs arrive through the returned handle."""

    @abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stop a request; its handle ends with finish reason `cancelled`."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """Running and waiting requests and KV-cache use, read at scrape time."""

    @abstractmethod
    def start(self) -> BaseEngine:
        """Start generating (idempotent); returns self."""

    @abstractmethod
    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop; with `drain`, what is running finishes first."""

    def __enter__(self) -> BaseEngine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown(drain=False)

    @property
    def grammars(self) -> Grammars:
        """Structured outputs' compiler (and, for lmforge's engine, masker) for this tokenizer, built on first use."""
        if getattr(self, "_grammars", None) is None:
            self._grammars = Grammars(self.tokenizer, self.vocab_size)
        return self._grammars

    def check_structured(self, spec: StructuredSpec) -> int | None:
        """Token count of the shortest reply `spec` allows (None: unknown); StructuredError if it is invalid."""
        return self.grammars.compile(spec)[1]

    def embed(self, prompts: list[list[int]], pooling: str = "mean") -> list[list[float]]:
        """One L2-normalised vector per prompt (token ids): the model's final hidden states, averaged
        over the tokens (`mean`) or the `last` token's (`lmforge.serve.pooling`)."""
        raise RequestError("this backend does not compute embeddings")

    def encode(self, prompt: str | list[int]) -> list[int]:
        """Text is a document: BOS + text, as in training. Token ids are taken as they are."""
        return self.tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else list(prompt)

    def check_prompt(self, prompt_ids: list[int], max_tokens: int) -> None:
        if not prompt_ids:
            raise RequestError("the prompt is empty (it needs at least one token)")
        bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        room = self.max_len if max_tokens == 0 else self.max_len - 1
        if len(prompt_ids) > room:
            raise RequestError(
                f"the prompt has {len(prompt_ids)} tokens; the model's context is {self.max_len}"
                + (" with at least one kept for the reply" if max_tokens else "")
            )

    def generate(self, prompts: Sequence[str | list[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Run every prompt (batched together) and wait for all of them."""
        self.start()
        handles = [self.submit(p, params) for p in prompts]
        return [h.result() for h in handles]

    async def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they are produced; leaving the loop early cancels it."""
        self.start()
        handle = self.submit(prompt, params, loop=asyncio.get_running_loop())
        async for output in handle:
            yield output
