"""`lmforge serve`: an OpenAI-compatible HTTP gateway (FastAPI + uvicorn) in front of the engine.

Routes: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming), /tokenize,
/detokenize, /tokenizer_info (what lm-evaluation-harness and vLLM clients call), /health,
/metrics. Every request passes, in order: body size, API key, JSON and schema, limits,
input moderation, rate limit, queue depth; then it runs in the engine, and is counted in
/metrics and written to the audit log. Errors are OpenAI-style
`{"error": {"message", "type", "param", "code"}}` bodies. A client's mistake (bad JSON, a wrong
type, a value out of bounds, a token id outside the vocabulary, a lone surrogate) is a 4xx before
it reaches the tokenizer or the engine; a 5xx means overload, a timeout or a bug.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from lmforge.device import resolve as resolve_device
from lmforge.serve.audit import AuditLog
from lmforge.serve.auth import KeyStore, RateLimiter, retry_after_header
from lmforge.serve.config import ServeConfig
from lmforge.serve.engine import Engine, RequestError, RequestHandle, RequestOutput
from lmforge.serve.hooks import AllowAll, Decision, Moderator, load_moderator
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.middleware import BodyLimitMiddleware, RequestCountMiddleware
from lmforge.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from lmforge.serve.responses import chat_logprobs, completion_logprobs
from lmforge.serve.sampling import SamplingParams

log = logging.getLogger(__name__)

STREAM_HOLDBACK_CHARS = 48  # held back in moderated streams that may redact: longer than most e-mail addresses


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _validation_error(err: ValidationError) -> OpenAIError:
    # 400, as OpenAI answers a wrong type, a value out of range or an unknown argument.
    first = err.errors()[0]
    param = _short(".".join(str(p) for p in first["loc"]))
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    else:
        message = f"Invalid value for '{param}': {first['msg']}"
    return OpenAIError(400, message, param=param or None, code="invalid_value")


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")


def _unencodable(data: Any) -> str | None:
    """The path of the first key or string in the parsed body that UTF-8 cannot encode, or None."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:  # not recursive: the body may be nested as deep as json.loads allows
        path, value = stack.pop()
        if isinstance(value, str) and not _is_utf8(value):
            return path or "body"
        if isinstance(value, dict):
            for key, item in value.items():
                if not _is_utf8(key):
                    return f"{path}.<key>" if path else "<key>"
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.{i}", item) for i, item in enumerate(value))
    return None


def _is_utf8(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short(text: str, limit: int = 80) -> str:
    """A client's text quoted back in an error, cut short: a 1 MB key is not echoed whole."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Gateway:
    """What the routes share: the engine, limits, keys, metrics, audit log and moderator."""

    def __init__(self, engine: Engine, config: ServeConfig, moderator: Moderator | None = None,
                 model_name: str | None = None):
        self.engine, self.config, self.tokenizer = engine, config, engine.tokenizer
        self.model_name = model_name or config.server.model_name or Path(config.model or "lmforge").name
        self.keys = KeyStore.load(config.auth.api_keys_file, config.auth.api_keys_env)
        if not self.keys.enabled:
            log.warning("no API keys configured: the server accepts every request")
        self.limiter = RateLimiter(config.auth.requests_per_minute, config.auth.tokens_per_minute)
        self.metrics = ServeMetrics(engine)
        self.audit = AuditLog(config.audit.path) if config.audit.path else None
        m = config.moderation
        self.moderator = moderator or load_moderator(m.hook, m.options, m.policy)
        batched = getattr(self.moderator, "check_outputs", None)
        self.output_checks = _Batcher(batched) if callable(batched) else None
        self.limits = config.limits
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens or engine.max_len, engine.max_len)
        self.created = int(time.time())
        self.draining = False

    # -- checks shared by the routes --------------------------------------------------------

    def authenticate(self, request: Request) -> str:
        if not self.keys.enabled:
            return "anonymous"
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, "Missing API key: send 'Authorization: Bearer KEY'.", code="invalid_api_key")
        key_id = self.keys.identify(token.strip())
        if key_id is None:
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key_id

    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        try:
            raw = await request.body()
        except ClientDisconnect:  # the body never came; nobody is left to answer
            raise OpenAIError(499, "The client disconnected before sending the whole body.",
                              code="client_disconnected") from None
        try:
            data = json.loads(raw, parse_constant=_not_json)
        except ValueError as err:  # JSONDecodeError, bad UTF-8, NaN, an integer past 4300 digits
            raise OpenAIError(400, f"The request body is not valid JSON: {err}", code="invalid_json") from None
        except RecursionError:
            raise OpenAIError(400, "The request body is not valid JSON: nested too deeply.", code="invalid_json") from None
        if not isinstance(data, dict):
            raise OpenAIError(400, "The request body must be a JSON object.", code="invalid_json")
        where = _unencodable(data)
        if where is not None:
            # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer (and no UTF-8
            # writer: responses, the audit log) can take.
            where = _short(where)
            raise OpenAIError(400, f"'{where}' holds a lone UTF-16 surrogate; text must be valid Unicode.",
                              param=where, code="invalid_value")
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise _validation_error(err) from None

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise OpenAIError(404, f"The model '{_short(name)}' does not exist (this server has '{self.model_name}').",
                              param="model", code="model_not_found")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """Ids a client sends are checked before anything (the tokenizer, the model) reads them."""
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise OpenAIError(400, f"Token id {_short(str(bad), 24)} is outside the vocabulary (0..{vocab - 1}).",
                              param=param, code="invalid_value")

    def check_sequences(self, count: int) -> None:
        """A request for more sequences than the server ever holds could never run: the client's mistake."""
        capacity = self.engine.config.max_num_seqs + self.limits.max_queue
        if count > capacity:
            raise OpenAIError(400, f"The request asks for {count} sequences (prompts x n); this server holds at most "
                              f"{capacity}.", param="prompt", code="invalid_value")

    def check_prompt(self, ids: list[int], max_tokens: int) -> None:
        if not ids:
            raise OpenAIError(400, "The prompt is empty (it needs at least one token).", param="prompt",
                              code="invalid_value")
        if len(ids) > self.max_prompt_tokens:
            raise OpenAIError(400, f"The prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}.",
                              param="prompt", code="context_length_exceeded")
        try:
            self.engine.check_prompt(ids, max_tokens)
        except RequestError as err:
            raise OpenAIError(400, str(err), param="prompt", code="context_length_exceeded") from None

    def max_tokens(self, asked: int | None, default: int) -> int:
        value = default if asked is None else asked
        if value > self.limits.max_tokens:
            raise OpenAIError(400, f"max_tokens is {value}; this server allows at most {self.limits.max_tokens}.",
                              param="max_tokens", code="invalid_value")
        return value

    def check_sampling(self, body) -> None:
        if body.n > self.limits.max_n:
            raise OpenAIError(400, f"n is {body.n}; this server allows at most {self.limits.max_n}.", param="n",
                              code="invalid_value")
        if body.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported.", param="logit_bias", code="unsupported")
        if len(body.stop_list()) > 8:
            raise OpenAIError(400, "At most 8 stop sequences are allowed.", param="stop", code="invalid_value")

    @property
    def moderates(self) -> bool:
        return not isinstance(self.moderator, AllowAll)

    async def moderate(self, job: _Job, direction: str, texts: list[str], final: bool = True) -> Decision:
        """The moderator's decision on a request's input texts or one choice's output so far.

        Counted (Prometheus, audit) when `final` or blocking: a stream is checked at every
        window, but only its last check or its block is a decision about the reply."""
        if direction == "input":
            decision = await self._call(self.moderator.check_input, texts)
        elif self.output_checks is not None:
            decision = await self.output_checks.check(texts[0])
        else:
            decision = await self._call(self.moderator.check_output, texts[0])
        if final or not decision.allowed:
            for category, action in decision.actions.items():
                self.metrics.moderation.labels(direction, category, action).inc()
            if not decision.allowed and not decision.actions:  # a hook that gives no categories
                for category in decision.categories or ["unspecified"]:
                    self.metrics.moderation.labels(direction, category, "block").inc()
            if decision.action != "allow":
                job.moderation.append(f"{direction} {decision.action}: {decision.reason or ', '.join(decision.categories)}")
        return decision

    async def _call(self, fn, arg):
        if not self.moderates:
            return fn(arg)
        return await asyncio.to_thread(fn, arg)  # a classifier must not block the event loop

    def admit(self, key_id: str, tokens: int, sequences: int):
        ok, wait, ticket = self.limiter.acquire(key_id, tokens)
        if not ok:
            which = "tokens" if self.limiter.tpm is not None and tokens > 0 else "requests"
            self.metrics.rate_limited.labels(which).inc()
            raise OpenAIError(429, f"Rate limit reached for key '{key_id}'; retry in {wait:.1f}s.",
                              type="rate_limit_exceeded", code="rate_limit_exceeded",
                              headers={"Retry-After": retry_after_header(wait)})
        stats = self.engine.stats()
        capacity = self.engine.config.max_num_seqs + self.limits.max_queue
        if self.draining or stats.running + stats.waiting + sequences > capacity:
            self.limiter.settle(ticket, 0)
            raise OpenAIError(503, "The server is at capacity; retry shortly.", type="server_error",
                              code="overloaded", headers={"Retry-After": "1"})
        return ticket

    def sampling(self, body, max_tokens: int, seed_offset: int, logprobs: int | None,
                 prompt_logprobs: int | None) -> SamplingParams:
        seed = None if body.seed is None else body.seed + seed_offset  # n choices must differ
        return SamplingParams(
            max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
            top_k=None if body.top_k in (None, -1, 0) else body.top_k, seed=seed, stop=body.stop_list(),
            ignore_eos=body.ignore_eos, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            timeout_s=self.limits.request_timeout_s,
        )

    def record(self, **fields) -> None:
        if self.audit is not None:
            self.audit.record(model=self.model_name, **fields)


class _Batcher:
    """Output checks of all streams gathered into one call (`check_outputs(texts)`).

    A check waits for the batch in flight; whatever arrived meanwhile goes in the next one,
    so with many streams each backend runs once per batch instead of once per stream (the
    profanity model costs ~3 ms a call, nearly the same for one text or twenty)."""

    def __init__(self, check_many):
        self.check_many = check_many
        self.pending: list[tuple[str, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None

    async def check(self, text: str) -> Decision:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((text, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                decisions = await asyncio.to_thread(self.check_many, [text for text, _ in batch])
            except Exception as err:  # noqa: BLE001 - every waiting stream hears about it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), decision in zip(batch, decisions, strict=True):
                if not future.done():
                    future.set_result(decision)


def create_app(engine: Engine, config: ServeConfig, moderator: Moderator | None = None,
               model_name: str | None = None) -> FastAPI:
    gateway = Gateway(engine, config, moderator, model_name)

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        gateway.draining = True  # uvicorn has let open requests finish; stop the engine after them
        await asyncio.to_thread(engine.shutdown, True, config.server.graceful_shutdown_s)
        if gateway.audit is not None:
            gateway.audit.close()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.gateway = gateway
    # The last added is the outermost: count every response, the 413s of the body limit included.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.limits.max_body_bytes)
    app.add_middleware(RequestCountMiddleware, metrics=gateway.metrics)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, err: OpenAIError):
        return err.response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):
        # A bug, never the client's mistake (those are OpenAIErrors): the envelope for the client,
        # the traceback for the log (Starlette re-raises it to uvicorn after this answer).
        return OpenAIError(500, "The server failed on this request; see the server log.", type="server_error",
                           code="internal_error").response()

    @app.exception_handler(404)
    async def _not_found(request: Request, err):
        return OpenAIError(404, f"Unknown route {request.url.path}", code="not_found").response()

    @app.exception_handler(405)
    async def _bad_method(request: Request, err):
        return OpenAIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed").response()

    @app.get("/health")
    async def health():
        if gateway.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        stats = engine.stats()
        return {"status": "ok", "running": stats.running, "waiting": stats.waiting}

    @app.get("/metrics")
    async def metrics():
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": gateway.model_name, "object": "model", "created": gateway.created, "owned_by": "lmforge",
                "max_model_len": engine.max_len}

    @app.get("/v1/models")
    async def list_models(request: Request):
        gateway.authenticate(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        gateway.authenticate(request)
        gateway.check_model(name)
        return model_card()

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        gateway.authenticate(request)
        t = gateway.tokenizer
        return {"eos_token": t.eos_token, "bos_token": t.bos_token, "pad_token": getattr(t, "pad_token", None),
                "chat_template": t.chat_template, "model_max_length": engine.max_len}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        gateway.authenticate(request)
        body: TokenizeRequest = await gateway.parse(request, TokenizeRequest)
        gateway.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "Send exactly one of 'prompt' or 'messages'.", code="invalid_value")
        if body.messages is not None:
            tokens = gateway.tokenizer.encode_chat(chat_messages(body.messages), body.add_generation_prompt)
        elif body.add_special_tokens:
            tokens = gateway.tokenizer.encode_prompt(body.prompt)
        else:
            tokens = gateway.tokenizer.encode(body.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": engine.max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        gateway.authenticate(request)
        body: DetokenizeRequest = await gateway.parse(request, DetokenizeRequest)
        gateway.check_model(body.model)
        gateway.check_token_ids(body.tokens, "tokens")
        return {"prompt": gateway.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle_generation(gateway, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle_generation(gateway, request, chat=True)

    return app


def chat_messages(messages) -> list[dict[str, str]]:
    # "developer" is OpenAI's newer name for the system role.
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class _Job:
    """One generation request in flight: its prompts, handles and bookkeeping for metrics/audit."""

    def __init__(self, gateway: Gateway, request: Request, chat: bool):
        self.gateway, self.request, self.chat = gateway, request, chat
        self.arrival = time.monotonic()
        self.route = "/v1/chat/completions" if chat else "/v1/completions"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.key_id: str | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.moderation: list[str] = []  # what moderation did, for the audit log
        self.finish_reasons: list[str] = []
        self.ticket = None
        self.first_token_at: float | None = None

    def audit(self, status: int, error: str | None = None) -> None:
        g = self.gateway
        g.limiter.settle(self.ticket, self.prompt_tokens + self.completion_tokens)
        g.record(request_id=self.id, key_id=self.key_id, route=self.route, prompt_tokens=self.prompt_tokens,
                 completion_tokens=self.completion_tokens, latency_ms=(time.monotonic() - self.arrival) * 1000,
                 status=status, finish_reason=",".join(sorted(set(self.finish_reasons))) or None,
                 moderation="; ".join(self.moderation) or "allowed", error=error)

    def observe(self, output: RequestOutput, last_at: dict[int, float], index: int) -> None:
        now = time.monotonic()
        m = self.gateway.metrics
        if output.token_ids:
            if self.first_token_at is None:
                self.first_token_at = now
                m.ttft.observe(now - self.arrival)
            elif index in last_at:
                m.itl.observe((now - last_at[index]) / len(output.token_ids))
            last_at[index] = now
            self.completion_tokens += len(output.token_ids)
            m.generation_tokens.inc(len(output.token_ids))
        if output.finished and output.finish_reason:
            self.finish(output.finish_reason)

    def finish(self, reason: str) -> None:
        self.finish_reasons.append(reason)
        self.gateway.metrics.finished.labels(reason).inc()


async def handle_generation(gateway: Gateway, request: Request, chat: bool):
    job = _Job(gateway, request, chat)
    try:
        job.key_id = gateway.authenticate(request)
        body = await gateway.parse(request, ChatCompletionRequest if chat else CompletionRequest)
        gateway.check_model(body.model)
        gateway.check_sampling(body)
        if chat:
            gateway.check_sequences(body.n)
            messages = chat_messages(body.messages)
            texts = [m["content"] for m in messages]

            def encode(texts: list[str]) -> list[list[int]]:
                turns = [dict(m, content=t) for m, t in zip(messages, texts, strict=True)]
                return [gateway.tokenizer.encode_chat(turns, add_generation_prompt=True)]

            limit = gateway.max_tokens(body.max_completion_tokens or body.max_tokens, gateway.limits.default_max_tokens)
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            prompt_logprobs = None
        else:
            if body.suffix:
                raise OpenAIError(400, "suffix is not supported.", param="suffix", code="unsupported")
            if body.best_of not in (None, body.n):
                raise OpenAIError(400, "best_of other than n is not supported.", param="best_of", code="unsupported")
            raw = body.prompt
            if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
                raw = [raw]
            if not raw:
                raise OpenAIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
            gateway.check_sequences(len(raw) * body.n)  # before any prompt is decoded or encoded
            for p in raw:
                if not isinstance(p, str):
                    gateway.check_token_ids(p, "prompt")
            texts = [p if isinstance(p, str) else gateway.tokenizer.decode(p) for p in raw]

            def encode(texts: list[str]) -> list[list[int]]:  # token-id prompts stay ids unless redacted
                return [gateway.engine.encode(p if t == original else t)
                        for p, t, original in zip(raw, texts, originals, strict=True)]

            originals = list(texts)
            limit = gateway.max_tokens(body.max_tokens, 16)
            logprobs = body.logprobs
            prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
        prompts = encode(texts)
        for ids in prompts:
            gateway.check_prompt(ids, limit)
        job.prompt_tokens = sum(len(p) for p in prompts)
        if gateway.moderates:
            decision = await gateway.moderate(job, "input", texts)
            if not decision.allowed:
                if gateway.config.moderation.on_block == "refusal":
                    return refusal(job, body, len(prompts) * body.n)
                raise OpenAIError(400, f"The input was refused by moderation: {decision.reason or 'policy'}.",
                                  code="content_filter", param="input")
            if decision.redacted is not None and decision.redacted != texts:
                texts, prompts = decision.redacted, encode(decision.redacted)
                for ids in prompts:
                    gateway.check_prompt(ids, limit)
                job.prompt_tokens = sum(len(p) for p in prompts)
        job.ticket = gateway.admit(job.key_id, job.prompt_tokens + limit * body.n * len(prompts),
                                   body.n * len(prompts))
        loop = asyncio.get_running_loop()
        handles: list[RequestHandle] = []
        try:
            for ids in prompts:
                for j in range(body.n):
                    params = gateway.sampling(body, limit, j, logprobs, prompt_logprobs)
                    handles.append(gateway.engine.submit(ids, params, f"{job.id}-{len(handles)}", loop=loop))
        except RequestError as err:
            for h in handles:
                h.cancel()
            raise OpenAIError(503, str(err), type="server_error", code="overloaded") from None
        gateway.metrics.prompt_tokens.inc(job.prompt_tokens)
        if body.stream:
            stream = stream_chat(job, body, handles) if chat else stream_completion(job, body, handles, texts)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        results = await collect(job, handles)
        response = await (chat_response(job, body, results) if chat else completion_response(job, body, results, texts, prompts))
        job.audit(200)
        return response
    except OpenAIError as err:
        job.audit(err.status, err.message)
        raise
    except asyncio.CancelledError:  # the client disconnected before a non-streamed reply
        job.audit(499, "client disconnected")
        raise


async def collect(job: _Job, handles: list[RequestHandle]) -> list[list[RequestOutput]]:
    """Every handle's outputs; a client that disconnects meanwhile cancels them all."""
    outputs: list[list[RequestOutput]] = [[] for _ in handles]
    last_at: dict[int, float] = {}

    async def drain(i: int, handle: RequestHandle):
        async for out in handle:
            job.observe(out, last_at, i)
            outputs[i].append(out)

    task = asyncio.gather(*(drain(i, h) for i, h in enumerate(handles)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                task.result()
                break
            if await job.request.is_disconnected():
                raise asyncio.CancelledError
    finally:
        if not task.done():
            task.cancel()
            for h in handles:
                h.cancel()
    job.gateway.metrics.e2e.observe(time.monotonic() - job.arrival)
    reasons = {outs[-1].finish_reason for outs in outputs if outs}
    if "timeout" in reasons:
        raise OpenAIError(504, "The request took longer than the server's timeout.", type="server_error", code="timeout")
    if "error" in reasons:
        raise OpenAIError(500, "The engine failed while generating; see the server log.", type="server_error",
                          code="engine_error")
    return outputs


def _usage(job: _Job) -> dict:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


async def _moderated(job: _Job, text: str, reason: str | None) -> tuple[str, str | None]:
    if not job.gateway.moderates:
        return text, reason
    decision = await job.gateway.moderate(job, "output", [text])
    if not decision.allowed:
        if reason in job.finish_reasons:
            job.finish_reasons.remove(reason)
        job.finish("content_filter")
        return "", "content_filter"
    return (decision.redacted[0] if decision.redacted else text), reason


def refusal(job: _Job, body, choices: int):
    """A blocked input answered as a reply (`moderation.on_block: refusal`): the engine never runs."""
    g = job.gateway
    message = g.config.moderation.refusal_message
    job.finish_reasons = ["content_filter"] * choices
    g.metrics.finished.labels("content_filter").inc(choices)
    head = {"id": job.id, "created": job.created, "model": g.model_name}
    if job.chat:
        whole = [{"index": i, "message": {"role": "assistant", "content": message}, "logprobs": None,
                  "finish_reason": "content_filter"} for i in range(choices)]
        parts = [{"index": i, "delta": {"role": "assistant", "content": message}, "logprobs": None,
                  "finish_reason": "content_filter"} for i in range(choices)]
    else:
        whole = parts = [{"index": i, "text": message, "logprobs": None, "finish_reason": "content_filter"}
                         for i in range(choices)]
    job.audit(200)
    if not body.stream:
        return {**head, "object": "chat.completion" if job.chat else "text_completion", "choices": whole,
                "usage": _usage(job)}
    kind = "chat.completion.chunk" if job.chat else "text_completion"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        for part in parts:
            yield _sse({**head, "object": kind, "choices": [part], **({"usage": None} if include_usage else {})})
        if include_usage:
            yield _sse({**head, "object": kind, "choices": [], "usage": _usage(job)})
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def completion_response(job, body, results, texts, prompts) -> dict:
    g = job.gateway
    choices = []
    for index, outs in enumerate(results):
        p = index // body.n
        text = "".join(o.text for o in outs)
        text, reason = await _moderated(job, text, outs[-1].finish_reason)
        logprobs = None
        if body.logprobs is not None:
            prompt_lp = next((o.prompt_logprobs for o in outs if o.prompt_logprobs is not None), None)
            logprobs = completion_logprobs(
                g.tokenizer, [lp for o in outs for lp in (o.logprobs or [])],
                prompts[p] if body.echo else None, prompt_lp,
            )
        if body.echo:
            text = texts[p] + text
        choices.append({"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason})
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": g.model_name,
            "choices": choices, "usage": _usage(job)}


async def chat_response(job, body, results) -> dict:
    g = job.gateway
    choices = []
    for index, outs in enumerate(results):
        text, reason = await _moderated(job, "".join(o.text for o in outs), outs[-1].finish_reason)
        logprobs = None
        if body.logprobs:
            logprobs = {"content": chat_logprobs(g.tokenizer, [lp for o in outs for lp in (o.logprobs or [])])}
        choices.append({"index": index, "message": {"role": "assistant", "content": text},
                        "logprobs": logprobs, "finish_reason": reason})
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": g.model_name,
            "choices": choices, "usage": _usage(job)}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(choice index, output) from every handle as they come."""
    if len(handles) == 1:
        async for out in handles[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, handle):
        async for out in handle:
            await queue.put((i, out))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            i, out = await queue.get()
            remaining -= out.finished
            yield i, out
    finally:
        for t in tasks:
            t.cancel()


async def _stream(job: _Job, body, handles: list[RequestHandle], chunk) -> AsyncIterator[str]:
    """SSE events: `chunk(index, text, output, finish_reason)` builds each; usage and [DONE] last."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    status, error = 200, None
    last_at: dict[int, float] = {}
    blocked: set[int] = set()
    checks = job.gateway.moderates
    window = job.gateway.config.moderation.stream_window_chars
    # A moderator that may redact output keeps the tail back: a value split across windows is
    # then still unsent when the check that sees all of it replaces it.
    holdback = STREAM_HOLDBACK_CHARS if getattr(job.gateway.moderator, "redacts_output", False) else 0
    raw = {i: "" for i in range(len(handles))}       # generated text (moderated streams only)
    released = {i: "" for i in range(len(handles))}  # what the client has been sent of it
    checked = dict.fromkeys(range(len(handles)), 0)
    held: dict[int, list[RequestOutput]] = {i: [] for i in range(len(handles))}
    try:
        async for index, out in _merged(handles):
            # Moderated choices record their finish reason when they end here: a blocked one
            # ends as content_filter, not as the cancellation that follows.
            job.observe(dataclasses.replace(out, finish_reason=None) if checks else out, last_at, index)
            if index in blocked:
                continue
            reason = out.finish_reason if out.finished else None
            if checks and reason in ("timeout", "error"):
                job.finish(reason)
            if reason in ("timeout", "error"):
                status, error = (504, "timeout") if reason == "timeout" else (500, "engine error")
                yield _sse({"error": {"message": f"generation stopped: {error}", "type": "server_error",
                                      "param": None, "code": reason}})
                continue
            text = out.text
            if checks:
                # Moderated in windows: text is held until a check of everything so far passes it
                # (the tail stays held, so a redaction can still reach it), and a check that
                # blocks ends the choice before the bad window is sent.
                raw[index] += text
                held[index].append(out)
                if not reason and len(raw[index]) - checked[index] < window:
                    continue
                checked[index] = len(raw[index])
                decision = await job.gateway.moderate(job, "output", [raw[index]], final=reason is not None)
                if not decision.allowed:
                    blocked.add(index)
                    handles[index].cancel()
                    text, reason = "", "content_filter"
                else:
                    visible = decision.redacted[0] if decision.redacted else raw[index]
                    upto = len(visible) if reason else max(len(released[index]), len(visible) - holdback)
                    text, released[index] = visible[len(released[index]):upto], visible[:upto]
                out = _joined(held[index])
                held[index] = []
                if reason:
                    job.finish(reason)
            if text or reason or out.logprobs:
                event = chunk(index, text, out, reason)
                if include_usage:
                    event["usage"] = None
                yield _sse(event)
        job.gateway.metrics.e2e.observe(time.monotonic() - job.arrival)
        if include_usage:
            yield _sse({"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                        "created": job.created, "model": job.gateway.model_name, "choices": [], "usage": _usage(job)})
        yield _sse("[DONE]")
    except (asyncio.CancelledError, GeneratorExit):  # the client went away: free the slots
        status, error = 499, "client disconnected"
        raise
    finally:
        for h in handles:
            h.cancel()
        job.audit(status, error)


def _joined(outputs: list[RequestOutput]) -> RequestOutput:
    """Outputs held back by moderation as one: their log-probs together, the last one's state."""
    last = outputs[-1]
    logprobs = [lp for o in outputs for lp in (o.logprobs or [])] if any(o.logprobs is not None for o in outputs) else None
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return dataclasses.replace(last, token_ids=[t for o in outputs for t in o.token_ids], text="".join(o.text for o in outputs),
                               logprobs=logprobs, prompt_logprobs=prompt_logprobs)


def stream_chat(job: _Job, body, handles: list[RequestHandle]) -> AsyncIterator[str]:
    g = job.gateway
    started: set[int] = set()

    def chunk(index, text, out, reason):
        delta: dict[str, Any] = {}
        if index not in started:
            started.add(index)
            delta["role"] = "assistant"
        if text or not reason:
            delta["content"] = text
        logprobs = {"content": chat_logprobs(g.tokenizer, out.logprobs)} if body.logprobs and out.logprobs else None
        return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": g.model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

    return _stream(job, body, handles, chunk)


def stream_completion(job: _Job, body, handles: list[RequestHandle], texts: list[str]) -> AsyncIterator[str]:
    g = job.gateway
    echoed: set[int] = set()

    def chunk(index, text, out, reason):
        logprobs = None
        if body.logprobs is not None:
            prompt_ids = handles[index].prompt_ids if body.echo and out.prompt_logprobs is not None else None
            logprobs = completion_logprobs(g.tokenizer, out.logprobs or [], prompt_ids, out.prompt_logprobs)
        if body.echo and index not in echoed:
            echoed.add(index)
            text = texts[index // body.n] + text
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": g.model_name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}

    return _stream(job, body, handles, chunk)


def release_gate(model: str) -> dict:
    """The model's passing release record, made for these very weights; CheckpointError otherwise."""
    from lmforge.eval.runner import model_hash
    from lmforge.loading import load_model
    from lmforge.safety.release import check_released

    check_released(model)  # cheap checks first: a record exists and it passed
    weights, _, _ = load_model(model, "cpu")  # the stored dtype, as `lmforge release` hashed it
    record = check_released(model, model_hash(weights))
    log.info("release record: policy %r passed on %s", record.get("policy"), record.get("created_at"))
    return record


def run(config: ServeConfig) -> None:
    """Load the model, start the engine and serve until SIGINT/SIGTERM (which drain first)."""
    import uvicorn

    m = config.moderation
    moderator = load_moderator(m.hook, m.options, m.policy)  # a bad policy fails before the model loads
    if config.engine.backend == "lmforge":
        resolve_device(config.engine.device, "engine.device")  # so does a device this machine lacks
    if config.allow_unreleased:
        log.warning("serving %s without checking its release record (--allow-unreleased)", config.model)
    else:
        release_gate(config.model)
    engine = Engine.from_path(config.model, config.engine)
    app = create_app(engine, config, moderator=moderator)
    gateway: Gateway = app.state.gateway
    log.info("serving %s as %r on http://%s:%d (device %s, %s)", config.model, gateway.model_name,
             config.server.host, config.server.port, engine.device, str(engine.dtype).removeprefix("torch."))
    uvicorn.run(app, host=config.server.host, port=config.server.port, log_level=config.server.log_level,
                timeout_graceful_shutdown=int(config.server.graceful_shutdown_s) or None)
