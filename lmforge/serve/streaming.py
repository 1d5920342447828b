"""Streamed replies (SSE), with output moderation in windows and a held-back tail.

A moderated stream holds each choice's text until a check of everything generated so far
passes it; a check that blocks ends the choice (`content_filter`) before the bad window is
sent. A moderator that may redact output also keeps the last `STREAM_HOLDBACK_CHARS` back,
so a value split across windows is still unsent when the check that sees all of it
replaces it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from lmforge.serve.backend import RequestHandle, RequestOutput, merge_outputs
from lmforge.serve.gateway import Job
from lmforge.serve.responses import chat_logprobs, completion_logprobs, sse
from lmforge.serve.tools import ToolCallStream, finish_reason, reads_tool_calls

STREAM_HOLDBACK_CHARS = 48  # held back in moderated streams that may redact: longer than most e-mail addresses

# chunk(index, text, output, finish_reason) -> one event's JSON object, or SSE text as it is to be sent
Chunk = Callable[[int, str, RequestOutput, "str | None"], "dict | str"]


async def merged(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, RequestOutput]]:
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


class _ModeratedChoice:
    """One streamed choice under output moderation: what was generated, checked and released."""

    def __init__(self, holdback: int):
        self.holdback = holdback
        self.raw = ""        # generated text
        self.released = ""   # what the client has been sent of it
        self.checked = 0     # len(raw) at the last check
        self.held: list[RequestOutput] = []

    def add(self, out: RequestOutput, window: int, finished: bool) -> bool:
        """Take an output; True when a check is due (a full window, or the choice's end)."""
        self.raw += out.text
        self.held.append(out)
        return finished or len(self.raw) - self.checked >= window

    async def release(self, job: Job, finished: bool) -> tuple[bool, str, RequestOutput]:
        """(allowed, text to send now, the held outputs as one) after a check of everything so far."""
        self.checked = len(self.raw)
        decision = await job.gateway.moderate(job, "output", [self.raw], final=finished)
        text = ""
        if decision.allowed:
            visible = decision.redacted[0] if decision.redacted else self.raw
            upto = len(visible) if finished else max(len(self.released), len(visible) - self.holdback)
            text, self.released = visible[len(self.released):upto], visible[:upto]
        out, self.held = merge_outputs(self.held), []
        return decision.allowed, text, out


async def stream(job: Job, body, handles: list[RequestHandle], chunk: Chunk,
                 ending: Callable[[], list[str]] | None = None) -> AsyncIterator[str]:
    """SSE events: `chunk(index, text, output, finish_reason)` builds each; usage and [DONE] last,
    or what `ending()` gives (the Responses API's closing events)."""
    g = job.gateway
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    status, error = 200, None
    last_at: dict[int, float] = {}
    blocked: set[int] = set()
    checks = g.moderates
    window = g.config.moderation.stream_window_chars
    holdback = STREAM_HOLDBACK_CHARS if getattr(g.moderator, "redacts_output", False) else 0
    choices = [_ModeratedChoice(holdback) for _ in handles]
    try:
        async for index, out in merged(handles):
            # Moderated choices record their finish reason when they end here: a blocked one
            # ends as content_filter, not as the cancellation that follows.
            job.observe(dataclasses.replace(out, finish_reason=None) if checks else out, last_at, index)
            if index in blocked:
                continue
            reason = out.finish_reason if out.finished else None
            if reason in ("timeout", "error"):
                if checks:
                    job.finish(reason)
                status, error = (504, "timeout") if reason == "timeout" else (500, "engine error")
                yield sse({"error": {"message": f"generation stopped: {error}", "type": "server_error",
                                     "param": None, "code": reason}})
                continue
            text = out.text
            if checks:
                if not choices[index].add(out, window, reason is not None):
                    continue
                allowed, text, out = await choices[index].release(job, reason is not None)
                if not allowed:
                    blocked.add(index)
                    handles[index].cancel()
                    reason = "content_filter"
                if reason:
                    job.finish(reason)
            if text or reason or out.logprobs:
                event = chunk(index, text, out, reason)
                if include_usage and isinstance(event, dict):
                    event["usage"] = None
                if event:  # SSE text may be empty: nothing to send yet
                    yield event if isinstance(event, str) else sse(event)
        g.metrics.e2e.labels(job.model_name).observe(time.monotonic() - job.arrival)
        if ending is not None:
            for event in ending():
                yield event
            return
        if include_usage:
            yield sse({"id": job.id, "object": "chat.completion.chunk" if job.chat else "text_completion",
                       "created": job.created, "model": job.model_name, "choices": [], "usage": job.usage})
        yield sse("[DONE]")
    except (asyncio.CancelledError, GeneratorExit):  # the client went away: free the slots
        status, error = 499, "client disconnected"
        raise
    finally:
        for h in handles:
            h.cancel()
        job.audit(status, error)


def stream_chat(job: Job, body, handles: list[RequestHandle]) -> AsyncIterator[str]:
    g = job.gateway
    started: set[int] = set()
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    tool_calls = [ToolCallStream() for _ in handles] if reads_tool_calls(body) else None

    def event(index: int, delta: dict[str, Any], logprobs, reason) -> dict:
        if index not in started:
            started.add(index)
            delta = {"role": "assistant", **delta}
        return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": job.model_name,
                "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}]}

    def chunk(index, text, out, reason):
        logprobs = {"content": chat_logprobs(g.tokenizer, out.logprobs)} if body.logprobs and out.logprobs else None
        if tool_calls is None:
            return event(index, {"content": text} if text or not reason else {}, logprobs, reason)
        # With tools: content and call deltas as the parser releases them, one event each.
        calls = tool_calls[index]
        deltas = calls.feed(text) + (calls.finish() if reason else [])
        reason = finish_reason(reason, bool(calls.calls))
        if not deltas and (reason or logprobs):
            deltas = [{}]
        events = [event(index, delta, logprobs if i == 0 else None, reason if i == len(deltas) - 1 else None)
                  for i, delta in enumerate(deltas)]
        return "".join(sse({**e, "usage": None} if include_usage else e) for e in events)

    return stream(job, body, handles, chunk)


def stream_completion(job: Job, body, handles: list[RequestHandle], texts: list[str]) -> AsyncIterator[str]:
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
        return {"id": job.id, "object": "text_completion", "created": job.created, "model": job.model_name,
                "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}]}

    return stream(job, body, handles, chunk)
