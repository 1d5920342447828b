"""The inference engine: a slot KV cache, continuous batching, chunked prefill, per-request sampling.

A background thread runs steps. Each step
1. drops cancelled and timed-out requests and admits waiting ones into free cache slots,
2. decodes one token for every running sequence in one batched forward (each row at its
   own position, attending to its own cache),
3. computes up to `prefill_chunk_tokens` prompt tokens of admitted sequences, so a long
   prompt is spread over several steps instead of stalling the running streams.
Requests join and leave the batch between steps. Results stream back through a
`RequestHandle` (a sync or an async iterator of `RequestOutput` deltas); those types and
`BaseEngine`, the interface every backend implements, live in `lmforge.serve.backend`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from lmforge.device import compile_unavailable, inference_dtype, log_choice
from lmforge.device import resolve as resolve_device
from lmforge.model import Transformer
from lmforge.serve.backend import (
    BaseEngine,
    Completion,
    EngineStats,
    RequestError,
    RequestHandle,
    RequestOutput,
    deliver,
)
from lmforge.serve.config import EngineConfig, LoraConfig
from lmforge.serve.kv_cache import SlotKVCache
from lmforge.serve.lora import AdapterSet, load_with_adapters
from lmforge.serve.pooling import Pooling, embed_prompts
from lmforge.serve.sampling import (
    Sampler,
    SamplingParams,
    TextTracker,
    TokenLogprob,
    token_logprobs,
)
from lmforge.serve.structured import GrammarState
from lmforge.tokenizer import LmTokenizer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Sequence:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: Sampler
    tracker: TextTracker
    handle: RequestHandle
    deadline: float | None
    slot: int | None = None
    computed: int = 0  # tokens whose keys/values are in the cache
    next_token: int | None = None  # sampled, not yet fed
    output_ids: list[int] = field(default_factory=list)
    new_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_logprobs_sent: bool = False
    queued_at: float = field(default_factory=time.monotonic)
    scheduled_at: float | None = None  # when it got a cache slot
    timing_sent: bool = False  # queued_at/scheduled_at go out on the first output only
    stop_token_id: int | None = None
    grammar: GrammarState | None = None  # structured outputs: the matcher the reply must stay inside


class Engine(BaseEngine):
    """Continuous-batching generation over one model. Thread-safe: `submit` from anywhere."""

    def __init__(self, model: Transformer, tokenizer: LmTokenizer, config: EngineConfig | None = None,
                 adapters: AdapterSet | None = None):
        self.config = config or EngineConfig()
        self.adapters = adapters or AdapterSet()  # LoRA adapters served over the model (`serve.lora`)
        self.adapters.install(model)
        self.lora_adapters = dict(self.adapters.paths)
        self.model, self.tokenizer = model.eval(), tokenizer
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_len = min(self.config.max_model_len or model.config.max_seq_len, model.config.max_seq_len)
        self.vocab_size = model.config.vocab_size
        self.slots = SlotKVCache(model.config, self.config.max_num_seqs, self.max_len, self.device, self.dtype)
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._incoming: deque[_Sequence] = deque()
        self._cancels: set[str] = set()
        self._outbox: list[tuple[RequestHandle, RequestOutput]] = []  # this step's outputs, delivered together
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self.steps = 0
        if self.config.compile and self.adapters:
            log.warning("engine.compile: not with LoRA adapters (lora.adapters); decoding uncompiled")
        self.blocks = self._compiled_blocks() if self.config.compile and not self.adapters else None

    def _compiled_blocks(self):
        """The blocks wrapped by torch.compile (dynamic shapes: batch and cache length vary), or
        None with a warning where compile cannot run; the model itself is left as it is."""
        reason = compile_unavailable(self.device)
        if reason is not None:
            log.warning("engine.compile: torch.compile is unavailable here (%s); decoding uncompiled", reason)
            return None
        return [torch.compile(block, dynamic=True) for block in self.model.layers]

    @classmethod
    def from_path(cls, path: str, config: EngineConfig | None = None, lora: LoraConfig | None = None) -> BaseEngine:
        """Load a model dir, run dir or checkpoint onto the configured device (bf16 on CUDA by default),
        with `lora`'s adapters over it.

        With `backend: vllm`, the model dir is served by vLLM instead (`lmforge.serve.vllm_engine`)."""
        config, lora = config or EngineConfig(), lora or LoraConfig()
        if config.backend == "vllm":
            from lmforge.serve.vllm_engine import VllmEngine

            return VllmEngine.from_path(path, config, lora)
        device = resolve_device(config.device, "engine.device")  # one line, not a traceback, if it is missing
        dtype = inference_dtype(config.dtype, device)
        model, tokenizer, adapters = load_with_adapters(path, device, dtype, lora.adapters, lora.max_rank)
        log_choice("engine.device", config.device, device, dtype)
        return cls(model, tokenizer, config, adapters)

    # -- the public API ------------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the step loop; with `drain`, running and waiting requests finish first."""
        with self._cond:
            self._stopping, self._drain = True, drain
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() and drain:  # drain took too long: cancel what is left
                self.shutdown(drain=False, timeout=10)
            self._thread = None

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestHandle:
        """Queue a request. Pass the running event loop (or use `stream`) to iterate asynchronously."""
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt)
        self.check_prompt(prompt_ids, params.max_tokens)
        self.adapters.check(params.adapter)
        request_id = request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(self, request_id, prompt_ids, loop)
        stop = list(params.stop)
        deadline = time.monotonic() + params.timeout_s if params.timeout_s else None
        seq = _Sequence(
            request_id, prompt_ids, params,
            Sampler(params, self.vocab_size, self.device, prompt_ids, self.tokenizer.stop_ids),
            TextTracker(self.tokenizer, prompt_ids, stop), handle, deadline,
        )
        if params.structured is not None:
            seq.grammar = self.grammars.state(params.structured, self._budget(seq))
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]  # the first token has nothing to be predicted from
        with self._cond:
            if self._stopping:
                raise RequestError("the engine is shutting down")
            self._incoming.append(seq)
            self._cond.notify()
        return handle

    def cancel(self, request_id: str) -> None:
        with self._cond:
            self._cancels.add(request_id)
            self._cond.notify()

    def stats(self) -> EngineStats:
        running = list(self._running)
        used = sum(s.computed for s in running)
        return EngineStats(
            running=len(running),
            waiting=len(self._waiting) + len(self._incoming),
            kv_cache_usage=used / (self.config.max_num_seqs * self.max_len),
        )

    @property
    def embedding_dim(self) -> int:
        return self.model.config.dim

    def embed(self, prompts: list[list[int]], pooling: Pooling = "mean") -> list[list[float]]:
        """Unit vectors of the prompts' final hidden states (`lmforge.serve.pooling`), computed in
        the calling thread outside the KV cache, beside the step loop."""
        return embed_prompts(self.model, prompts, pooling)

    # -- the step loop (engine thread only) ------------------------------------------------

    def run_to_completion(self, prompts: Sequence[str | list[int]],
                          params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Offline batch generation in the calling thread, as vLLM's `LLM.generate`: no engine
        thread, so evaluation on ranks that step in lock-step (FSDP) stays in step. `params`: one
        for all prompts, or one per prompt (RL rollouts: a seed per completion)."""
        per_prompt = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(per_prompt)} sampling params")
        handles = [self.submit(prompt, p) for prompt, p in zip(prompts, per_prompt, strict=True)]
        while self._thread is None:  # with the engine thread running, it does the stepping
            with self._cond:
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                cancels, self._cancels = self._cancels, set()
                if not (self._running or self._waiting):
                    break
            try:
                self._step(cancels)
            finally:
                self._deliver()
        return [handle.result() for handle in handles]

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._incoming or self._running or self._waiting or self._stopping):
                    self._cond.wait()
                self._waiting.extend(self._incoming)
                self._incoming.clear()
                cancels, self._cancels = self._cancels, set()
                if self._stopping and not self._drain:
                    cancels |= {s.id for s in (*self._running, *self._waiting)}
                idle = not (self._running or self._waiting)
                if self._stopping and idle:
                    return
            try:
                self._step(cancels)
            except Exception:  # a bug or out-of-memory: fail what is running, keep serving
                log.exception("engine step failed; failing the running requests")
                for seq in list(self._running):
                    self._finish(seq, "error")
            finally:
                self._deliver()

    @torch.inference_mode()
    def _step(self, cancels: set[str]) -> None:
        now = time.monotonic()
        for seq in [*self._running, *self._waiting]:
            if seq.id in cancels:
                self._finish(seq, "cancelled")
            elif seq.deadline is not None and now > seq.deadline:
                self._finish(seq, "timeout")
        while self._waiting and self.slots.has_free():
            seq = self._waiting.popleft()
            seq.slot = self.slots.allocate()
            seq.scheduled_at = time.monotonic()
            self._running.append(seq)
        decoding = sorted((s for s in self._running if s.next_token is not None), key=lambda s: s.slot)
        prefilling = [s for s in self._running if s.computed < len(s.prompt_ids)]
        if decoding:
            self._decode(decoding)
        if prefilling:
            self._prefill(prefilling)
        self.steps += 1

    def _decode(self, seqs: list[_Sequence]) -> None:
        tokens = torch.tensor([[s.next_token] for s in seqs], device=self.device)
        positions = torch.tensor([[s.computed] for s in seqs], device=self.device)
        slots = [s.slot for s in seqs]
        cache = self.slots.rows(slots, positions.new_tensor(slots)[:, None])
        self.adapters.select([s.params.adapter for s in seqs])  # each row's LoRA adapter, for this forward
        hidden = self.model.hidden_states(tokens, positions, cache, blocks=self.blocks)
        logits = self.model.output(hidden[:, -1]).float()
        for s in seqs:
            s.computed += 1
            s.next_token = None
        self._sample(seqs, logits)

    def _prefill(self, seqs: list[_Sequence]) -> None:
        budget = self.config.prefill_chunk_tokens
        rows: list[tuple[_Sequence, int, int]] = []
        for s in seqs:
            if budget <= 0:
                break
            n = min(len(s.prompt_ids) - s.computed, budget)
            rows.append((s, s.computed, n))
            budget -= n
        width = max(n for _, _, n in rows)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        write = torch.full((len(rows), width), self.slots.scratch, dtype=torch.long)
        for b, (s, start, n) in enumerate(rows):
            tokens[b, :n] = torch.tensor(s.prompt_ids[start : start + n])
            positions[b, :n] = torch.arange(start, start + n)
            write[b, :n] = s.slot
        cache = self.slots.rows([s.slot for s, _, _ in rows], write.to(self.device))
        self.adapters.select([s.params.adapter for s, _, _ in rows])  # each row's LoRA adapter
        hidden = self.model.hidden_states(tokens.to(self.device), positions.to(self.device), cache)
        done, last = [], []
        for b, (s, start, n) in enumerate(rows):
            s.computed += n
            if s.prompt_logprobs is not None:
                # Position i predicts prompt token i + 1; the prompt's last position predicts the reply.
                scored = min(n, len(s.prompt_ids) - 1 - start)
                if scored > 0:
                    targets = torch.tensor(s.prompt_ids[start + 1 : start + 1 + scored], device=self.device)
                    self.adapters.select([s.params.adapter])
                    logits = self.model.output(hidden[b, :scored]).float()
                    s.prompt_logprobs.extend(token_logprobs(logits, targets, s.params.prompt_logprobs))
            if s.computed == len(s.prompt_ids):
                if s.params.max_tokens == 0:
                    self._finish(s, "length")
                else:
                    done.append(s)
                    last.append(hidden[b, n - 1])
        if done:
            self.adapters.select([s.params.adapter for s in done])
            self._sample(done, self.model.output(torch.stack(last)).float())

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        """logits [len(seqs), vocab] (fp32): pick each row's token, record log-probs, emit."""
        forced, sampled = self._constrain(seqs, logits)
        plain = [i for i, s in enumerate(seqs) if s.sampler.greedy_plain and s.grammar is None]
        greedy = dict(zip(plain, logits[plain].argmax(-1).tolist(), strict=True)) if plain else {}
        chosen = [forced[i] if i in forced else greedy[i] if i in greedy else self._choose(s, sampled[i])
                  for i, s in enumerate(seqs)]
        wants = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        logprobs: dict[int, TokenLogprob] = {}
        if wants:
            top = max(seqs[i].params.logprobs for i in wants)
            rows = token_logprobs(logits[wants], torch.tensor([chosen[i] for i in wants], device=logits.device), top)
            for i, row in zip(wants, rows, strict=True):
                row.top = row.top[: seqs[i].params.logprobs]
                logprobs[i] = row
        for i, (s, token) in enumerate(zip(seqs, chosen, strict=True)):
            self._append(s, token, logprobs.get(i))

    def _constrain(self, seqs: list[_Sequence], logits: torch.Tensor) -> tuple[dict[int, int], torch.Tensor]:
        """Structured outputs: the tokens rows must take to close in budget, and the logits to sample
        from, masked to what each constrained row's grammar allows (log-probs stay the model's own)."""
        constrained = [i for i, s in enumerate(seqs) if s.grammar is not None]
        if not constrained:
            return {}, logits
        forced = {}
        for i in constrained:
            token = seqs[i].grammar.forced_token()
            if token is not None:
                forced[i] = token
        rows = [i for i in constrained if i not in forced]
        if rows:
            logits = logits.clone()
            masked = logits[rows]
            self.grammars.mask([seqs[i].grammar for i in rows], masked)
            logits[rows] = masked
        return forced, logits

    @staticmethod
    def _choose(s: _Sequence, logits: torch.Tensor) -> int:
        """Sample one row; a constrained row near the end of its budget resamples (up to 3 times)
        a token after which its reply could not close in time, then closes it."""
        token = s.sampler.sample(logits)
        if s.grammar is None:
            return token
        for _ in range(3):
            if s.grammar.fits(token):
                return token
            logits[token] = float("-inf")
            token = s.sampler.sample(logits)
        return token if s.grammar.fits(token) else s.grammar.close_now()

    def _budget(self, s: _Sequence) -> int:
        return min(s.params.max_tokens, self.max_len - len(s.prompt_ids))

    def _append(self, s: _Sequence, token: int, logprob: TokenLogprob | None) -> None:
        ends = token in self.tokenizer.stop_ids and not s.params.ignore_eos
        if ends or token in s.params.stop_token_ids:
            s.stop_token_id = token
            self._finish(s, "stop")
            return
        if s.grammar is not None and not s.grammar.consume(token):
            log.error("request %s: token %d is outside its grammar (%s)", s.id, token, s.grammar.matcher.get_error())
            self._finish(s, "error")
            return
        s.output_ids.append(token)
        s.new_ids.append(token)
        if logprob is not None:
            s.new_logprobs.append(logprob)
        s.sampler.observe(token)
        s.tracker.add(token)
        if s.tracker.stopped:
            self._finish(s, "stop")
        elif s.grammar is not None and s.grammar.finished:
            self._finish(s, s.grammar.finished)
        elif len(s.output_ids) >= self._budget(s):
            self._finish(s, "length")
        else:
            s.next_token = token
            # The first token goes out at once (time to first token); later ones every stream_interval.
            if len(s.new_ids) >= self.config.stream_interval or len(s.output_ids) == 1:
                self._emit(s, finished=False, reason=None)

    def _emit(self, s: _Sequence, finished: bool, reason: str | None) -> None:
        prompt_logprobs = None
        if s.prompt_logprobs is not None and not s.prompt_logprobs_sent:
            prompt_logprobs, s.prompt_logprobs_sent = s.prompt_logprobs, True
        self._outbox.append((s.handle, RequestOutput(
            request_id=s.id,
            token_ids=s.new_ids,
            text=s.tracker.flush(final=finished),
            logprobs=s.new_logprobs if s.params.logprobs is not None else None,
            finished=finished,
            finish_reason=reason,
            num_prompt_tokens=len(s.prompt_ids),
            num_output_tokens=len(s.output_ids),
            prompt_logprobs=prompt_logprobs,
            stop_token_id=s.stop_token_id if finished else None,
            queued_at=None if s.timing_sent else s.queued_at,
            scheduled_at=None if s.timing_sent else s.scheduled_at,
        )))
        s.timing_sent = True
        s.new_ids, s.new_logprobs = [], []

    def _deliver(self) -> None:
        outbox, self._outbox = self._outbox, []
        deliver(outbox)

    def _finish(self, s: _Sequence, reason: str) -> None:
        if s.slot is not None:
            self._running.remove(s)
            self.slots.release(s.slot)
            s.slot = None
        elif s in self._waiting:
            self._waiting.remove(s)
        s.next_token = None
        self._emit(s, finished=True, reason=reason)
