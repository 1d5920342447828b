"""ASGI middleware: a request-body size limit (413) and request counts by route and status."""

from __future__ import annotations

from fastapi.responses import JSONResponse

KNOWN_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
                "/tokenizer_info", "/health", "/metrics")


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
        route = "/v1/models" if path.startswith("/v1/models") else path if path in KNOWN_ROUTES else "other"
        status = 500

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
