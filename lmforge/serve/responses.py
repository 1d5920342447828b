"""OpenAI's response shapes: whole completions and chat replies, refusals, SSE events, and
log-probs in the two layouts (legacy completions and chat)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

from lmforge.serve.backend import RequestOutput
from lmforge.serve.gateway import Job
from lmforge.serve.sampling import TokenLogprob
from lmforge.serve.tools import chat_message, reads_tool_calls
from lmforge.tokenizer import LmTokenizer

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict | str) -> str:
    """One server-sent event: a JSON object, or the literal `[DONE]`."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def completion_response(job: Job, body, results: list[list[RequestOutput]], texts: list[str],
                              prompts: list[list[int]]) -> dict:
    g = job.gateway
    choices = []
    for index, outs in enumerate(results):
        p = index // body.n
        text, reason = await job.moderated_output("".join(o.text for o in outs), outs[-1].finish_reason)
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
    return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model_name,
            "choices": choices, "usage": job.usage}


async def chat_response(job: Job, body, results: list[list[RequestOutput]]) -> dict:
    g = job.gateway
    choices = []
    for index, outs in enumerate(results):
        text, reason = await job.moderated_output("".join(o.text for o in outs), outs[-1].finish_reason)
        logprobs = None
        if body.logprobs:
            logprobs = {"content": chat_logprobs(g.tokenizer, [lp for o in outs for lp in (o.logprobs or [])])}
        message = {"role": "assistant", "content": text}
        if reads_tool_calls(body):
            message, reason = chat_message(text, reason)
        choices.append({"index": index, "message": message, "logprobs": logprobs, "finish_reason": reason})
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": job.model_name,
            "choices": choices, "usage": job.usage}


def refusal(job: Job, body, choices: int) -> dict | StreamingResponse:
    """A blocked input answered as a reply (`moderation.on_block: refusal`): the engine never runs."""
    g = job.gateway
    message = g.config.moderation.refusal_message
    job.finish_reasons = ["content_filter"] * choices
    g.metrics.success.labels(job.model_name, "content_filter").inc(choices)
    head = {"id": job.id, "created": job.created, "model": job.model_name}
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
                "usage": job.usage}
    kind = "chat.completion.chunk" if job.chat else "text_completion"
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        for part in parts:
            yield sse({**head, "object": kind, "choices": [part], **({"usage": None} if include_usage else {})})
        if include_usage:
            yield sse({**head, "object": kind, "choices": [], "usage": job.usage})
        yield sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def completion_logprobs(
    tokenizer: LmTokenizer,
    generated: list[TokenLogprob],
    prompt_ids: list[int] | None = None,
    prompt_logprobs: list[TokenLogprob | None] | None = None,
) -> dict:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"}; with `prompt_ids` (echo) the
    prompt's tokens come first, the very first with null log-probs (nothing predicts it)."""
    entries: list[tuple[int, float | None, list | None]] = []
    for i, token in enumerate(prompt_ids or []):
        lp = prompt_logprobs[i] if prompt_logprobs and i < len(prompt_logprobs) else None
        entries.append((token, lp.logprob if lp else None, lp.top if lp else None))
    entries += [(lp.token_id, lp.logprob, lp.top) for lp in generated]
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0
    for token, logprob, top in entries:
        text = tokenizer.decode([token])
        tokens.append(text)
        token_logprobs.append(logprob)
        if top is None:
            top_logprobs.append(None)
        else:
            # The chosen token first, then the top ones (which win if two render alike).
            table = {text: logprob}
            table.update({tokenizer.decode([t]): v for t, v in top})
            top_logprobs.append(table)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(tokenizer: LmTokenizer, generated: list[TokenLogprob]) -> list[dict]:
    def entry(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in generated]
