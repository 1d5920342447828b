"""What a request passes before it may run: API key, JSON body and schema, limits, rate and queue.

Every check here answers a client's mistake with a 4xx before the tokenizer or the engine
reads the request (bad JSON, a wrong type, a value out of bounds, a token id outside the
vocabulary, a lone surrogate); only overload (429, 503) depends on the server's state.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from lmforge.serve.auth import KeyStore, RateLimiter, retry_after_header
from lmforge.serve.backend import BaseEngine, RequestError
from lmforge.serve.config import ServeConfig
from lmforge.serve.errors import OpenAIError, short, validation_error
from lmforge.serve.metrics import ServeMetrics
from lmforge.serve.structured import StructuredError, StructuredSpec, spec_from_request

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 8


def parse_body(raw: bytes, model: type[BaseModel], strict: bool = False) -> Any:
    """The request body as `model`; OpenAIError 400 for anything that is not a valid JSON object of it.

    Fields the API does not know are ignored, each name logged once (as vLLM does: SDK releases
    add fields all the time); `strict` refuses them, as OpenAI does, with its message.
    """
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
        where = short(where)
        raise OpenAIError(400, f"'{where}' holds a lone UTF-16 surrogate; text must be valid Unicode.",
                          param=where, code="invalid_value")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        unknown = [e["loc"] for e in err.errors() if e["type"] == "extra_forbidden"]
        if strict or not unknown:
            raise validation_error(err) from None
    for loc in unknown:
        _drop(data, loc)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


_warned_fields: set[str] = set()


def _drop(data: Any, loc: tuple) -> None:
    """Remove the unknown field at `loc` from the parsed body; log its name the first time."""
    *parents, name = loc
    path = []
    for key in parents:
        # A union's errors name the member tried (`list[TextPart]`, `InputMessage`): not a key of the body.
        if isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data) or (
                isinstance(data, dict) and key in data):
            data = data[key]
            path.append(key)
    if isinstance(data, dict):
        data.pop(name, None)
    field = ".".join(str(k) for k in [*path, name] if not isinstance(k, int))
    if field not in _warned_fields:
        _warned_fields.add(field)
        log.warning("ignoring the request field %r, which this server does not know (server.strict_params "
                    "refuses such requests)", short(field))


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


class Admission:
    """The checks every route shares, with the state they need: keys, rate limiter, limits, queue."""

    def __init__(self, engine: BaseEngine, config: ServeConfig, metrics: ServeMetrics, model_name: str):
        self.engine, self.metrics, self.model_name = engine, metrics, model_name
        auth = config.auth
        self.keys = KeyStore.load(auth.api_keys_file, auth.api_keys_env, auth.api_keys, auth.api_key_env)
        if not self.keys.enabled:
            log.warning("no API keys configured: the server accepts every request")
        self.limiter = RateLimiter(config.auth.requests_per_minute, config.auth.tokens_per_minute)
        self.limits = config.limits
        self.strict_params = config.server.strict_params
        self.max_prompt_tokens = min(self.limits.max_prompt_tokens or engine.max_len, engine.max_len)
        self.capacity = engine.config.max_num_seqs + self.limits.max_queue  # sequences running or queued
        self.draining = False  # set at shutdown: new requests get 503

    def authenticate(self, request: Request) -> str:
        """The id of the request's API key ("anonymous" when the server has no keys); 401 otherwise.

        The response then carries the key's `x-ratelimit-*` headers (`middleware.RateLimitHeaders`)."""
        if not self.keys.enabled:
            request.state.rate_limit_key = "anonymous"
            return "anonymous"
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise OpenAIError(401, "Missing API key: send 'Authorization: Bearer KEY'.", code="invalid_api_key")
        key_id = self.keys.identify(token.strip())
        if key_id is None:
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")
        request.state.rate_limit_key = key_id
        return key_id

    async def parse(self, request: Request, model: type[BaseModel]) -> Any:
        try:
            raw = await request.body()
        except ClientDisconnect:  # the body never came; nobody is left to answer
            raise OpenAIError(499, "The client disconnected before sending the whole body.",
                              code="client_disconnected") from None
        return parse_body(raw, model, self.strict_params)

    def check_model(self, name: str | None) -> str | None:
        """The LoRA adapter a request's `model` names (None: the base model); 404 for any other name."""
        adapters = getattr(self.engine, "lora_adapters", {})
        if name is None or name == self.model_name:
            return None
        if name in adapters:
            return name
        served = ", ".join(f"'{n}'" for n in [self.model_name, *adapters])
        raise OpenAIError(404, f"The model '{short(name)}' does not exist (this server has {served}).",
                          param="model", code="model_not_found")

    def check_token_ids(self, ids: list[int], param: str) -> None:
        """Ids a client sends are checked before anything (the tokenizer, the model) reads them."""
        vocab = self.engine.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise OpenAIError(400, f"Token id {short(str(bad), 24)} is outside the vocabulary (0..{vocab - 1}).",
                              param=param, code="invalid_value")

    def check_sequences(self, count: int) -> None:
        """A request for more sequences than the server ever holds could never run: the client's mistake."""
        if count > self.capacity:
            raise OpenAIError(400, f"The request asks for {count} sequences (prompts x n); this server holds at most "
                              f"{self.capacity}.", param="prompt", code="invalid_value")

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
        vocab = self.engine.vocab_size
        for key, value in (body.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab:
                raise OpenAIError(400, f"logit_bias: {short(key)!r} is not a token id of this model (0..{vocab - 1}).",
                                  param="logit_bias", code="invalid_value")
            if not -100 <= value <= 100:
                raise OpenAIError(400, f"logit_bias: {value} for token {key} is outside [-100, 100].",
                                  param="logit_bias", code="invalid_value")
        bad = [t for t in body.stop_token_ids or [] if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(400, f"stop_token_ids: {bad[0]} is not a token id of this model (0..{vocab - 1}).",
                              param="stop_token_ids", code="invalid_value")
        if body.min_tokens > self.limits.max_tokens:
            raise OpenAIError(400, f"min_tokens is {body.min_tokens}; this server allows at most {self.limits.max_tokens}.",
                              param="min_tokens", code="invalid_value")
        if len(body.stop_list()) > MAX_STOP_SEQUENCES:
            raise OpenAIError(400, f"At most {MAX_STOP_SEQUENCES} stop sequences are allowed.", param="stop",
                              code="invalid_value")

    def check_structured(self, body, max_tokens: int, forced: StructuredSpec | None = None) -> StructuredSpec | None:
        """The structured output a request asks for, compiled once here so a bad schema, regex or
        grammar is a 400 before the request queues; a budget smaller than its shortest reply too.
        `forced`: the grammar of the tool calls tool_choice forces, in place of any other."""
        try:
            spec = forced or spec_from_request(body)
            shortest = None if spec is None else self.engine.check_structured(spec)
        except StructuredError as err:
            raise OpenAIError(400, f"Invalid structured output: {err}", param="tools" if forced else "response_format",
                              code="invalid_value") from None
        if shortest is not None and shortest > max_tokens:
            raise OpenAIError(400, f"max_tokens is {max_tokens}, but the shortest reply matching the requested "
                              f"format takes {shortest} tokens.", param="max_tokens", code="invalid_value")
        return spec

    def admit(self, key_id: str, tokens: int, sequences: int):
        """A rate-limit ticket for `tokens` (settled with the real count later); 429 or 503 when full."""
        ok, wait, ticket = self.limiter.acquire(key_id, tokens)
        if not ok:
            which = "tokens" if self.limiter.tpm is not None and tokens > 0 else "requests"
            self.metrics.rate_limited.labels(which, self.model_name).inc()
            raise OpenAIError(429, f"Rate limit reached for key '{key_id}'; retry in {wait:.1f}s.",
                              type="rate_limit_exceeded", code="rate_limit_exceeded",
                              headers={"Retry-After": retry_after_header(wait)})
        stats = self.engine.stats()
        if self.draining or stats.running + stats.waiting + sequences > self.capacity:
            self.limiter.settle(ticket, 0)
            raise OpenAIError(503, "The server is at capacity; retry shortly.", type="server_error",
                              code="overloaded", headers={"Retry-After": "1"})
        return ticket

    def settle(self, ticket, tokens: int) -> None:
        """Charge the rate limit what the request really used."""
        self.limiter.settle(ticket, tokens)
