"""`engine.backend: vllm`: the same gateway in front of vLLM, for GPU fleets.

An exported model dir (`lmforge export`, a `LlamaForCausalLM` / `Qwen2ForCausalLM` layout)
is what vLLM loads. The gateway keeps doing its part with lmforge's tokenizer (chat format,
prompt checks, token counts, moderation); prompts reach vLLM as token ids, and vLLM's
outputs come back as the engine's `RequestOutput` deltas, so streaming, `n`, stop strings,
penalties, seeds, logprobs and `echo` behave as with the built-in engine.

vLLM's `AsyncLLMEngine` runs on an event loop of its own in a background thread; requests
are handed to it with `run_coroutine_threadsafe`, and outputs flow back through the same
`RequestHandle` the built-in engine uses. Needs `pip install vllm` (CUDA).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch

from lmforge import device as devices
from lmforge import extras
from lmforge.errors import ConfigError
from lmforge.serve.backend import BaseEngine, EngineStats, RequestHandle, RequestOutput
from lmforge.serve.config import EngineConfig, LoraConfig
from lmforge.serve.sampling import SamplingParams, TokenLogprob
from lmforge.serve.structured import StructuredSpec
from lmforge.store.loading import local_path
from lmforge.store.model_dir import is_model_dir, read_model_config
from lmforge.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "cancelled"}


def _token_logprob(token_id: int, entry: dict | None, top: int) -> TokenLogprob | None:
    """vLLM's {token id: Logprob(logprob, rank, decoded_token)} for one position -> TokenLogprob."""
    if not entry:
        return None
    chosen = entry.get(token_id)
    ranked = sorted(entry.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
    alternatives = [(tid, float(lp.logprob)) for tid, lp in ranked if lp.rank is not None and lp.rank <= top]
    return TokenLogprob(token_id, float(chosen.logprob) if chosen is not None else float("-inf"), alternatives[:top])


class VllmEngine(BaseEngine):
    """`BaseEngine` over `vllm.AsyncLLMEngine`; thread-safe `submit` like the built-in engine."""

    def __init__(self, path: str | Path, config: EngineConfig, lora: LoraConfig | None = None):
        vllm = extras.require("vllm", "engine.backend=vllm")

        path = local_path(path)  # a Hub id: its snapshot
        if not is_model_dir(path):
            raise ConfigError(f"engine.backend=vllm serves a model dir; {path} is not one (lmforge export RUN --out DIR)")
        model_config = read_model_config(path)
        self.config, self.path = config, path
        self.tokenizer = load_tokenizer(path)
        self.max_len = min(config.max_model_len or model_config.max_seq_len, model_config.max_seq_len)
        self.vocab_size = model_config.vocab_size
        self.device, self.dtype = "cuda", devices.dtype_name(devices.inference_dtype(config.dtype, torch.device("cuda")))
        self.model = None
        args = {"model": str(path), "tokenizer": str(path), "max_model_len": self.max_len,
                "max_num_seqs": config.max_num_seqs, "dtype": self.dtype, "seed": 0,
                "enforce_eager": not config.compile, **_lora_args(lora), **config.vllm_args}
        self.lora_adapters = dict(lora.adapters) if lora else {}
        self._vllm_module = vllm
        self._args = vllm.AsyncEngineArgs(**args)
        self._engine = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._active: dict[str, asyncio.Future] = {}
        self._ids = itertools.count()
        self._kv_read = (float("-inf"), 0.0)  # (when, value): stats() runs per request, a registry read per second

    @classmethod
    def from_path(cls, path: str, config: EngineConfig | None = None, lora: LoraConfig | None = None) -> VllmEngine:
        return cls(path, config or EngineConfig(backend="vllm"), lora)

    # -- lifecycle: vLLM's engine lives on its own event loop ---------------------------------

    def start(self) -> VllmEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run_loop, name="lmforge-vllm", daemon=True)
            self._thread.start()
            self._ready.wait()
            if self._error is not None:
                raise ConfigError(f"vLLM could not start on {self.path}: {self._error}") from self._error
        return self

    def _run_loop(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._engine = self._vllm_module.AsyncLLMEngine.from_engine_args(self._args)
        except Exception as err:  # noqa: BLE001 - reported by start()
            self._error = err
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        if self._loop is None:
            return
        if drain and self._active:
            deadline = time.monotonic() + (timeout or 30.0)
            while self._active and time.monotonic() < deadline:
                time.sleep(0.05)
        for request_id in list(self._active):
            self.cancel(request_id)
        stop = getattr(self._engine, "shutdown", None)
        if callable(stop):
            stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread, self._loop = None, None

    # -- requests ------------------------------------------------------------------------

    def sampling_params(self, params: SamplingParams):
        return self._vllm_module.SamplingParams(
            n=1, max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
            top_k=params.top_k or -1, seed=params.seed, stop=list(params.stop) or None,
            stop_token_ids=sorted(set(self.tokenizer.stop_ids) | set(params.stop_token_ids)), ignore_eos=params.ignore_eos,
            min_p=params.min_p, repetition_penalty=params.repetition_penalty, min_tokens=params.min_tokens,
            logit_bias=params.logit_bias or None,
            presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
            logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs,
            structured_outputs=self.structured_outputs(params.structured),
        )

    def structured_outputs(self, spec: StructuredSpec | None):
        """lmforge's constraint as vLLM's StructuredOutputsParams (vLLM >= 0.10.2; its guidance backend is
        llguidance, as lmforge's engine)."""
        if spec is None:
            return None
        from vllm.sampling_params import StructuredOutputsParams

        value = {"json_schema": {"json": spec.value}, "json_object": {"json_object": True}, "regex": {"regex": spec.value},
                 "choice": {"choice": list(spec.value or [])}, "lark": {"grammar": spec.value}}[spec.kind]
        return StructuredOutputsParams(**value)

    def submit(self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None,
               loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        params = params or SamplingParams()
        prompt_ids = self.encode(prompt)
        self.check_prompt(prompt_ids, params.max_tokens)
        self.start()
        request_id = request_id or f"req-{next(self._ids)}"
        handle = RequestHandle(self, request_id, prompt_ids, loop)
        future = asyncio.run_coroutine_threadsafe(self._generate(handle, prompt_ids, params), self._loop)
        self._active[request_id] = future
        future.add_done_callback(lambda _: self._active.pop(request_id, None))
        return handle

    async def _generate(self, handle: RequestHandle, prompt_ids: list[int], params: SamplingParams) -> None:
        rid, text_sent, tokens_sent = handle.request_id, 0, 0
        deadline = time.monotonic() + params.timeout_s if params.timeout_s else None
        prompt_logprobs_sent = False

        def emit(token_ids, text, logprobs, finished, reason, prompt_logprobs=None):
            handle._put(RequestOutput(rid, token_ids, text, logprobs, finished, reason, len(prompt_ids),
                                      tokens_sent, prompt_logprobs))

        if params.max_tokens == 0:  # scoring a prompt (echo): vLLM needs at least one token; ask for one, send none
            params = dataclasses.replace(params, max_tokens=1)
            scoring_only = True
        else:
            scoring_only = False
        try:
            generator = self._engine.generate({"prompt_token_ids": prompt_ids}, self.sampling_params(params), rid,
                                              lora_request=self._lora_request(params.adapter))
            async for result in generator:
                out = result.outputs[0]
                prompt_lp = None
                if params.prompt_logprobs is not None and not prompt_logprobs_sent and result.prompt_logprobs is not None:
                    prompt_lp = [None if i == 0 else _token_logprob(t, entry, params.prompt_logprobs)
                                 for i, (t, entry) in enumerate(zip(prompt_ids, result.prompt_logprobs, strict=False))]
                    prompt_logprobs_sent = True
                if scoring_only:
                    if result.finished or prompt_lp is not None:
                        await self._engine.abort(rid)
                        emit([], "", None, True, "length", prompt_lp)
                        return
                    continue
                new_ids = list(out.token_ids[tokens_sent:])
                new_text = out.text[text_sent:]
                logprobs = None
                if params.logprobs is not None and out.logprobs is not None:
                    logprobs = [_token_logprob(t, entry, params.logprobs)
                                for t, entry in zip(new_ids, out.logprobs[tokens_sent:], strict=False)]
                tokens_sent, text_sent = len(out.token_ids), len(out.text)
                finished = result.finished
                reason = FINISH_REASONS.get(out.finish_reason or "", out.finish_reason) if finished else None
                if not finished and deadline is not None and time.monotonic() > deadline:
                    await self._engine.abort(rid)
                    finished, reason = True, "timeout"
                emit(new_ids, new_text, logprobs, finished, reason, prompt_lp)
                if finished:
                    return
            emit([], "", None, True, "cancelled")
        except asyncio.CancelledError:
            emit([], "", None, True, "cancelled")
        except Exception:  # noqa: BLE001 - one failed request must not stop the server
            log.exception("vLLM failed on request %s", rid)
            emit([], "", None, True, "error")

    def _lora_request(self, name: str | None):
        """vLLM's LoRARequest for a served adapter (ids 1..n, in lora.adapters' order); None: the base."""
        if name is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(name, list(self.lora_adapters).index(name) + 1, self.lora_adapters[name])

    def cancel(self, request_id: str) -> None:
        future = self._active.get(request_id)
        if future is not None and self._loop is not None:
            asyncio.run_coroutine_threadsafe(self._engine.abort(request_id), self._loop)

    def stats(self) -> EngineStats:
        running = len(self._active)
        return EngineStats(running=min(running, self.config.max_num_seqs),
                           waiting=max(0, running - self.config.max_num_seqs),
                           kv_cache_usage=self._kv_cache_usage())

    def _kv_cache_usage(self) -> float:
        when, value = self._kv_read
        if time.monotonic() - when > 1.0:
            value = kv_usage(self.metrics_registry())
            self._kv_read = (time.monotonic(), value)
        return value

    def metrics_registry(self):
        """Where vLLM records its `vllm:*` series (its stat logger's, in-process): /metrics shows
        them instead of lmforge's measure of the same (`ServeMetrics.render`)."""
        try:  # vLLM's choice: the default registry, or its multiprocess files when PROMETHEUS_MULTIPROC_DIR is set
            from vllm.v1.metrics.prometheus import get_prometheus_registry
        except ImportError:  # a vLLM before v1's metrics: the default registry
            import prometheus_client

            return prometheus_client.REGISTRY
        return get_prometheus_registry()


def kv_usage(registry: Any) -> float:
    """vLLM's KV-cache use, as its stat logger last set it (the highest of its engines'); 0 before
    the first step. The newer name first; vLLM before 0.9 has only the older one."""
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
        values = [s.value for family in registry.collect() if family.name == name for s in family.samples]
        if values:
            return float(max(values))
    return 0.0


VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts


def _lora_args(lora: LoraConfig | None) -> dict[str, Any]:
    """vLLM's engine arguments for serving `lora.adapters` (their base is not checked by hash here)."""
    if lora is None or not lora.adapters:
        return {}
    ranks = []
    for name, path in lora.adapters.items():
        try:
            ranks.append(json.loads((Path(path) / "adapter_config.json").read_text())["r"])
        except (OSError, ValueError, KeyError):
            raise ConfigError(f"lora.adapters.{name}: {path} is not a LoRA adapter dir (no adapter_config.json)") from None
    rank = lora.max_rank or max(ranks)
    return {"enable_lora": True, "max_loras": len(lora.adapters),
            "max_lora_rank": next((r for r in VLLM_LORA_RANKS if r >= rank), rank)}
