"""The OpenAI-compatible FastAPI app in front of the engine, and its routes.

Routes: /v1/models, /v1/completions, /v1/chat/completions (SSE streaming), /tokenize,
/detokenize, /tokenizer_info (what lm-evaluation-harness and vLLM clients call), /health,
/metrics. Every request passes, in order: body size, API key, JSON and schema, limits,
input moderation, rate limit, queue depth (`admission`); then it runs in the engine, and is
counted in /metrics and written to the audit log. Errors are OpenAI-style envelopes
(`errors`).
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from lmforge.serve.backend import BaseEngine
from lmforge.serve.completions import chat_messages, handle_generation
from lmforge.serve.config import ServeConfig
from lmforge.serve.embeddings import add_embeddings_routes
from lmforge.serve.errors import OpenAIError, add_error_handlers
from lmforge.serve.gateway import Gateway
from lmforge.serve.hooks import ModerationHook
from lmforge.serve.middleware import (
    LINEAGE_HEADERS,
    RATE_LIMIT_HEADERS,
    BodyLimitMiddleware,
    LineageHeaders,
    RateLimitHeaders,
    RequestCountMiddleware,
)
from lmforge.serve.protocol import DetokenizeRequest, TokenizeRequest
from lmforge.serve.responses_api import add_responses_routes
from lmforge.serve.tools import prompt_tools


def create_app(engine: BaseEngine, config: ServeConfig, moderator: ModerationHook | None = None,
               model_name: str | None = None, digests: dict[str, str] | None = None) -> FastAPI:
    """The app over a loaded engine; the engine starts with the app and drains when it stops.
    `digests` ({model_digest, release_digest}) go into every response's headers and /v1/models."""
    gateway = Gateway(engine, config, moderator, model_name)
    gateway.digests = dict(digests or {})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        gateway.admission.draining = True  # uvicorn has let open requests finish; stop the engine after them
        await asyncio.to_thread(engine.shutdown, True, config.server.graceful_shutdown_s)
        if gateway.audit is not None:
            gateway.audit.close()

    app = FastAPI(title="lmforge", lifespan=lifespan)
    app.state.gateway = gateway
    # The last added is the outermost: count every response, the 413s of the body limit included.
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.limits.max_body_bytes)
    app.add_middleware(RateLimitHeaders, limiter=gateway.admission.limiter)
    app.add_middleware(RequestCountMiddleware, metrics=gateway.metrics)
    app.add_middleware(LineageHeaders, digests=gateway.digests)
    cors = config.cors
    if cors.allowed_origins:  # outermost: a preflight is answered before the key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=cors.allowed_origins, allow_methods=cors.allowed_methods,
                           allow_headers=cors.allowed_headers, allow_credentials=cors.allow_credentials,
                           expose_headers=RATE_LIMIT_HEADERS + LINEAGE_HEADERS)
    add_error_handlers(app)
    _add_status_routes(app, gateway)
    _add_model_routes(app, gateway)
    _add_tokenizer_routes(app, gateway)
    add_responses_routes(app, gateway)
    add_embeddings_routes(app, gateway)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle_generation(gateway, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle_generation(gateway, request, chat=True)

    return app


def _add_status_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.get("/health")
    async def health():
        if gateway.admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        stats = gateway.engine.stats()
        return {"status": "ok", "running": stats.running, "waiting": stats.waiting}

    @app.get("/metrics")
    async def metrics():
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_model_routes(app: FastAPI, gateway: Gateway) -> None:
    adapters = getattr(gateway.engine, "lora_adapters", {})

    def model_card(adapter: str | None = None) -> dict:
        card = {"id": adapter or gateway.model_name, "object": "model", "created": gateway.created,
                "owned_by": "lmforge", "max_model_len": gateway.engine.max_len}
        if adapter is not None:  # a LoRA adapter over the base, as vLLM lists them
            card.update(root=adapters[adapter], parent=gateway.model_name)
        else:  # which weights answer, and the release record that vouched for them
            card.update(gateway.digests)
        return card

    @app.get("/v1/models")
    async def list_models(request: Request):
        gateway.admission.authenticate(request)
        return {"object": "list", "data": [model_card(), *map(model_card, adapters)]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str, request: Request):
        gateway.admission.authenticate(request)
        return model_card(gateway.admission.check_model(name))


def _add_tokenizer_routes(app: FastAPI, gateway: Gateway) -> None:
    a, tokenizer, max_len = gateway.admission, gateway.tokenizer, gateway.engine.max_len

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        a.authenticate(request)
        return {"eos_token": tokenizer.eos_token, "bos_token": tokenizer.bos_token,
                "pad_token": getattr(tokenizer, "pad_token", None), "chat_template": tokenizer.chat_template,
                "model_max_length": max_len}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        a.authenticate(request)
        body: TokenizeRequest = await a.parse(request, TokenizeRequest)
        a.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise OpenAIError(400, "Send exactly one of 'prompt' or 'messages'.", code="invalid_value")
        if body.messages is not None:
            tokens = tokenizer.encode_chat(chat_messages(body.messages), body.add_generation_prompt,
                                           tools=prompt_tools(body.tools))
        elif body.add_special_tokens:
            tokens = tokenizer.encode_prompt(body.prompt)
        else:
            tokens = tokenizer.encode(body.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        a.authenticate(request)
        body: DetokenizeRequest = await a.parse(request, DetokenizeRequest)
        a.check_model(body.model)
        a.check_token_ids(body.tokens, "tokens")
        return {"prompt": tokenizer.decode(body.tokens)}
