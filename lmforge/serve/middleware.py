"""ASGI middleware: a request-body size limit (413), request counts by route and status, and
the `x-ratelimit-*` headers of authenticated responses."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from lmforge.serve.auth import RateLimiter, duration

KNOWN_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/models",
                "/tokenize", "/detokenize", "/tokenizer_info", "/health", "/metrics")
PREFIXED = ("/v1/models", "/v1/responses")  # /v1/models/{name}, /v1/responses/{id}: counted under the route
RATE_LIMIT_HEADERS = [f"x-ratelimit-{part}-{limit}" for limit in ("requests", "tokens")
                      for part in ("limit", "remaining", "reset")] + ["retry-after"]
LINEAGE_HEADERS = ["x-lmforge-model-digest", "x-lmforge-release-digest"]


def _too_large(max_bytes: int) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": f"The request body exceeds {max_bytes} bytes.", "type": "invalid_request_error",
                   "param": None, "code": "request_too_large"}},
        status_code=413,
    )


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await _too_large(self.max_bytes)(scope, receive, send)
            return await self.app(scope, receive, send)
        # Chunked upload: read it (up to the limit) before the app sees it, then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _too_large(self.max_bytes)(scope, receive, send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


class RequestCountMiddleware:
    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        prefix = next((p for p in PREFIXED if path.startswith(p + "/")), None)
        route = prefix or (path if path in KNOWN_ROUTES else "other")  # a bounded label set, whatever clients send
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(route, str(status), self.metrics.model_name).inc()


class RateLimitHeaders:
    """OpenAI's `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` on every response to a request
    whose key was authenticated (`request.state.rate_limit_key`), for the limits that are configured.

    Computed when the response starts: a reply's own use is counted (a stream's as its estimate,
    prompt + max_tokens, until it ends), and a 429 shows what refused it."""

    def __init__(self, app, limiter: RateLimiter):
        self.app, self.limiter = app, limiter

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (self.limiter.rpm is None and self.limiter.tpm is None):
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})  # request.state of the routes below

        async def send_with_headers(message):
            key = state.get("rate_limit_key")
            if message["type"] == "http.response.start" and key is not None:
                headers = list(message.get("headers", []))
                for name, limit in self.limiter.state(key).items():
                    headers += [(f"x-ratelimit-limit-{name}".encode(), str(limit.limit).encode()),
                                (f"x-ratelimit-remaining-{name}".encode(), str(limit.remaining).encode()),
                                (f"x-ratelimit-reset-{name}".encode(), duration(limit.reset_s).encode())]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class LineageHeaders:
    """`x-lmforge-model-digest` and `x-lmforge-release-digest` on every response: which weights
    answered, and which release record vouched for them (`lmforge verify` walks on from either)."""

    def __init__(self, app, digests: dict[str, str]):
        self.app = app
        self.headers = [(f"x-lmforge-{key.replace('_', '-')}".encode(), value.encode()) for key, value in digests.items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.headers:
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
