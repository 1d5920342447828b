"""/v1/embeddings: the served model's final hidden states, pooled and L2-normalised, per input.

A causal LM's hidden states are not a trained embedding model's (`lmforge.serve.pooling` says
what they are good for). Inputs are strings (a document: BOS + text, as in training) or token
ids, each at most the context long, at most `MAX_EMBEDDING_INPUTS` of them. A request counts
in the rate limits (its tokens), the metrics and the audit log like a generation; it runs in
a worker thread beside the engine's step loop, not in its batch, and is not moderated (there
is no reply to check, and OpenAI does not moderate embeddings either).
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
import uuid

from fastapi import FastAPI, Request

from lmforge.serve.backend import RequestError
from lmforge.serve.errors import OpenAIError
from lmforge.serve.gateway import Gateway, Job
from lmforge.serve.protocol_responses import MAX_EMBEDDING_INPUTS, EmbeddingRequest


def input_ids(gateway: Gateway, body: EmbeddingRequest) -> list[list[int]]:
    """The request's inputs as token ids, each checked against the vocabulary and the context."""
    a, raw = gateway.admission, body.input
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise OpenAIError(400, "The input is empty.", param="input", code="invalid_value")
    if len(raw) > MAX_EMBEDDING_INPUTS:
        raise OpenAIError(400, f"The input has {len(raw)} items; at most {MAX_EMBEDDING_INPUTS} are allowed.",
                          param="input", code="invalid_value")
    ids = []
    for item in raw:
        if isinstance(item, str):
            ids.append(gateway.engine.encode(item))
        else:
            a.check_token_ids(item, "input")
            ids.append(list(item))
        a.check_prompt(ids[-1], 0)  # the whole context may be input: nothing is generated
    return ids


def encoded(vector: list[float], encoding_format: str) -> list[float] | str:
    """As OpenAI sends it: a list of floats, or base64 of little-endian float32s."""
    if encoding_format == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


async def handle_embeddings(gateway: Gateway, request: Request) -> dict:
    job = Job(gateway, request, chat=False)
    job.route, job.id = "/v1/embeddings", f"embd-{uuid.uuid4().hex[:24]}"
    a, engine = gateway.admission, gateway.engine
    with job.audited():
        job.key_id = a.authenticate(request)
        body: EmbeddingRequest = await a.parse(request, EmbeddingRequest)
        if a.check_model(body.model) is not None:
            raise OpenAIError(400, f"Embeddings come from the base model '{gateway.model_name}', not a LoRA adapter.",
                              param="model", code="unsupported")
        if engine.embedding_dim is None:
            raise OpenAIError(400, "This server's backend does not compute embeddings.", param="model",
                              code="unsupported")
        if body.dimensions is not None and body.dimensions != engine.embedding_dim:
            raise OpenAIError(400, f"dimensions is {body.dimensions}; this model's embeddings have "
                              f"{engine.embedding_dim} (they cannot be shortened).", param="dimensions",
                              code="invalid_value")
        ids = input_ids(gateway, body)
        job.prompt_tokens = sum(len(p) for p in ids)
        job.ticket = a.admit(job.key_id, job.prompt_tokens, 0)
        try:
            vectors = await asyncio.to_thread(engine.embed, ids, gateway.config.server.embedding_pooling)
        except RequestError as err:
            raise OpenAIError(400, str(err), param="model", code="unsupported") from None
        metrics = gateway.metrics
        metrics.prompt_tokens.labels(job.model_name).inc(job.prompt_tokens)
        metrics.e2e.labels(job.model_name).observe(time.monotonic() - job.arrival)
        data = [{"object": "embedding", "index": i, "embedding": encoded(v, body.encoding_format)}
                for i, v in enumerate(vectors)]
        job.audit(200)
        return {"object": "list", "data": data, "model": gateway.model_name,
                "usage": {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens}}


def add_embeddings_routes(app: FastAPI, gateway: Gateway) -> None:
    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        return await handle_embeddings(gateway, request)
