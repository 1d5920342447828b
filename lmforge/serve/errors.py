"""OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}` for every failure.

A client's mistake is an `OpenAIError` with a 4xx status, raised before the tokenizer or the
engine reads the request; a 5xx means overload, a timeout or a bug.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def validation_error(err: ValidationError) -> OpenAIError:
    # 400, as OpenAI answers a wrong type, a value out of range or an unknown argument.
    first = err.errors()[0]
    param = short(".".join(str(p) for p in first["loc"]))
    if first["type"] == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    else:
        message = f"Invalid value for '{param}': {first['msg']}"
    return OpenAIError(400, message, param=param or None, code="invalid_value")


def short(text: str, limit: int = 80) -> str:
    """A client's text quoted back in an error, cut short: a 1 MB key is not echoed whole."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def add_error_handlers(app: FastAPI) -> None:
    """Every error the app answers, in the envelope: ours, unknown routes and methods, and bugs."""

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
        return OpenAIError(405, f"{request.method} is not allowed on {request.url.path}",
                           code="method_not_allowed").response()
