"""/v1/completions and /v1/chat/completions: from a request body to engine handles to a reply.

In order: API key, body, limits, input moderation, rate limit and queue (`admission`); then
the prompts run in the engine, and the reply is whole (`responses`) or streamed (`streaming`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from lmforge.serve.backend import RequestError, RequestHandle, RequestOutput
from lmforge.serve.errors import OpenAIError
from lmforge.serve.gateway import Gateway, Job
from lmforge.serve.protocol import ChatCompletionRequest, CompletionRequest
from lmforge.serve.responses import SSE_HEADERS, chat_response, completion_response, refusal
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.streaming import stream_chat, stream_completion
from lmforge.serve.structured import StructuredSpec
from lmforge.serve.tools import prompt_tools, tool_structured


def chat_messages(messages) -> list[dict]:
    # "developer" is OpenAI's newer name for the system role; an assistant's tool calls go with its turn.
    out = []
    for m in messages:
        message = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
        out.append(message)
    return out


@dataclass
class Prompts:
    """A request's prompts as text (what moderation reads) and how to encode a (redacted) version."""

    texts: list[str]
    encode: Callable[[list[str]], list[list[int]]]
    max_tokens: int
    logprobs: int | None
    prompt_logprobs: int | None
    structured: StructuredSpec | None = None  # the grammar replies must match (response_format, tools)


def chat_prompts(gateway: Gateway, body: ChatCompletionRequest) -> Prompts:
    a = gateway.admission
    a.check_sequences(body.n)
    messages = chat_messages(body.messages)
    tools = prompt_tools(body.tools)  # listed in the prompt whatever tool_choice says, as OpenAI and vLLM
    forced_calls = tool_structured(body.tools, body.tool_choice, body.parallel_tool_calls)  # 400 for a bad choice

    def encode(texts: list[str]) -> list[list[int]]:
        turns = [dict(m, content=t) for m, t in zip(messages, texts, strict=True)]
        return [gateway.tokenizer.encode_chat(turns, add_generation_prompt=True, tools=tools)]

    # No max_tokens: the rest of the context (the engine stops there), up to limits.max_tokens, as OpenAI and vLLM.
    default = a.limits.default_max_tokens or a.limits.max_tokens
    max_tokens = a.max_tokens(body.max_completion_tokens or body.max_tokens, default)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return Prompts([m["content"] for m in messages], encode, max_tokens, logprobs, None,
                   a.check_structured(body, max_tokens, forced_calls))


def completion_prompts(gateway: Gateway, body: CompletionRequest) -> Prompts:
    a = gateway.admission
    if body.suffix:
        raise OpenAIError(400, "suffix is not supported.", param="suffix", code="unsupported")
    if body.best_of not in (None, body.n):
        raise OpenAIError(400, "best_of other than n is not supported.", param="best_of", code="unsupported")
    raw = body.prompt
    if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
        raw = [raw]
    if not raw:
        raise OpenAIError(400, "The prompt is empty.", param="prompt", code="invalid_value")
    a.check_sequences(len(raw) * body.n)  # before any prompt is decoded or encoded
    for p in raw:
        if not isinstance(p, str):
            a.check_token_ids(p, "prompt")
    originals = [p if isinstance(p, str) else gateway.tokenizer.decode(p) for p in raw]

    def encode(texts: list[str]) -> list[list[int]]:  # token-id prompts stay ids unless redacted
        return [gateway.engine.encode(p if t == original else t)
                for p, t, original in zip(raw, texts, originals, strict=True)]

    prompt_logprobs = body.logprobs if body.echo and body.logprobs is not None else None
    max_tokens = a.max_tokens(body.max_tokens, 16)
    return Prompts(list(originals), encode, max_tokens, body.logprobs, prompt_logprobs,
                   a.check_structured(body, max_tokens))


def sampling_params(gateway: Gateway, body, prompts: Prompts, seed_offset: int) -> SamplingParams:
    seed = None if body.seed is None else body.seed + seed_offset  # n choices must differ
    return SamplingParams(
        max_tokens=prompts.max_tokens, temperature=body.temperature, top_p=body.top_p,
        top_k=None if body.top_k in (None, -1, 0) else body.top_k, seed=seed, stop=body.stop_list(),
        ignore_eos=body.ignore_eos, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, logprobs=prompts.logprobs, prompt_logprobs=prompts.prompt_logprobs,
        min_p=body.min_p, repetition_penalty=body.repetition_penalty, min_tokens=body.min_tokens,
        stop_token_ids=list(body.stop_token_ids or []),
        logit_bias={int(k): v for k, v in (body.logit_bias or {}).items()},
        timeout_s=gateway.admission.limits.request_timeout_s, structured=prompts.structured,
        adapter=gateway.admission.check_model(body.model),  # a LoRA adapter's name picks it
    )


def _encoded(gateway: Gateway, job: Job, prompts: Prompts) -> list[list[int]]:
    ids = prompts.encode(prompts.texts)
    for prompt in ids:
        gateway.admission.check_prompt(prompt, prompts.max_tokens)
    job.prompt_tokens = sum(len(p) for p in ids)
    return ids


def _submit(gateway: Gateway, job: Job, body, prompts: Prompts, ids: list[list[int]]) -> list[RequestHandle]:
    """One engine handle per prompt and choice (n); all or none."""
    loop = asyncio.get_running_loop()
    handles: list[RequestHandle] = []
    try:
        for prompt in ids:
            for j in range(body.n):
                params = sampling_params(gateway, body, prompts, j)
                handles.append(gateway.engine.submit(prompt, params, f"{job.id}-{len(handles)}", loop=loop))
    except RequestError as err:
        for h in handles:
            h.cancel()
        raise OpenAIError(503, str(err), type="server_error", code="overloaded") from None
    return handles


async def start_generation(gateway: Gateway, job: Job, body, prompts: Prompts
                           ) -> tuple[list[RequestHandle] | None, list[list[int]]]:
    """Encode, moderate the input, take a rate-limit ticket and submit: (engine handles, prompt ids).
    The handles are None when moderation blocked the input and `on_block: refusal` answers it with a reply."""
    a = gateway.admission
    ids = _encoded(gateway, job, prompts)
    if gateway.moderates:
        decision = await gateway.moderate(job, "input", prompts.texts)
        if not decision.allowed:
            if gateway.config.moderation.on_block == "refusal":
                return None, ids
            raise OpenAIError(400, f"The input was refused by moderation: {decision.reason or 'policy'}.",
                              code="content_filter", param="input")
        if decision.redacted is not None and decision.redacted != prompts.texts:
            prompts.texts = decision.redacted
            ids = _encoded(gateway, job, prompts)
    job.ticket = a.admit(job.key_id, job.prompt_tokens + prompts.max_tokens * body.n * len(ids),
                         body.n * len(ids))
    handles = _submit(gateway, job, body, prompts, ids)
    gateway.metrics.prompt_tokens.labels(job.model_name).inc(job.prompt_tokens)
    return handles, ids


async def handle_generation(gateway: Gateway, request: Request, chat: bool):
    job = Job(gateway, request, chat)
    a = gateway.admission
    with job.audited():
        job.key_id = a.authenticate(request)
        body = await a.parse(request, ChatCompletionRequest if chat else CompletionRequest)
        job.model_name = a.check_model(body.model) or job.model_name  # an adapter's requests: its own series
        a.check_sampling(body)
        prompts = chat_prompts(gateway, body) if chat else completion_prompts(gateway, body)
        handles, ids = await start_generation(gateway, job, body, prompts)
        if handles is None:
            return refusal(job, body, len(ids) * body.n)
        if body.stream:
            events = stream_chat(job, body, handles) if chat else stream_completion(job, body, handles, prompts.texts)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        results = await collect(job, handles)
        if chat:
            response = await chat_response(job, body, results)
        else:
            response = await completion_response(job, body, results, prompts.texts, ids)
        job.audit(200)
        return response


async def collect(job: Job, handles: list[RequestHandle]) -> list[list[RequestOutput]]:
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
    job.gateway.metrics.e2e.labels(job.model_name).observe(time.monotonic() - job.arrival)
    reasons = {outs[-1].finish_reason for outs in outputs if outs}
    if "timeout" in reasons:
        raise OpenAIError(504, "The request took longer than the server's timeout.", type="server_error", code="timeout")
    if "error" in reasons:
        raise OpenAIError(500, "The engine failed while generating; see the server log.", type="server_error",
                          code="engine_error")
    return outputs
