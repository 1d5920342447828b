"""/v1/responses: OpenAI's Responses API (the OpenAI Agents SDK's default) over the chat pipeline.

A request becomes a chat completion request (instructions as the system message, input items
as turns, a previous response's conversation before them) and runs through the same checks,
moderation, rate limits, engine, metrics and audit log as /v1/chat/completions. The reply is
a `response` object, or its SSE events in OpenAI's order. Stored responses (`store`, the
default) keep their conversation in a bounded in-memory LRU (`server.responses_store_size`)
so `previous_response_id` continues it; a server restart forgets them, as it forgets
everything else in memory.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import OrderedDict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import ValidationError

from lmforge.serve.completions import chat_prompts, collect, start_generation
from lmforge.serve.errors import OpenAIError, short, validation_error
from lmforge.serve.gateway import Gateway, Job
from lmforge.serve.protocol import ChatCompletionRequest
from lmforge.serve.protocol_responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    ResponsesRequest,
)
from lmforge.serve.responses import SSE_HEADERS
from lmforge.serve.streaming import stream

# A finish reason -> (status, incomplete_details.reason)
STATUS = {"stop": ("completed", None), "length": ("incomplete", "max_output_tokens"),
          "content_filter": ("incomplete", "content_filter")}


class ResponseStore:
    """Stored responses and their conversations, the least recently used dropped first."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[str, tuple[str | None, dict, list[dict]]] = OrderedDict()

    def put(self, response_id: str, key_id: str | None, response: dict, turns: list[dict]) -> None:
        if self.size == 0:
            return
        self._entries[response_id] = (key_id, response, turns)
        self._entries.move_to_end(response_id)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def get(self, response_id: str, key_id: str | None) -> tuple[dict, list[dict]]:
        """(response, conversation) of a response stored under this API key; 404 otherwise."""
        entry = self._entries.get(response_id)
        if entry is None or entry[0] != key_id:  # another key's response is as good as missing
            raise OpenAIError(404, f"Response with id '{short(response_id)}' not found.", param="response_id",
                              code="not_found")
        self._entries.move_to_end(response_id)
        return entry[1], entry[2]

    def delete(self, response_id: str, key_id: str | None) -> None:
        self.get(response_id, key_id)
        del self._entries[response_id]


def input_turns(body: ResponsesRequest) -> list[dict]:
    """The request's input items as chat turns (the conversation so far is put before them)."""
    if isinstance(body.input, str):
        return [{"role": "user", "content": body.input}]
    turns: list[dict] = []
    for item in body.input:
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function", "function": {"name": item.name, "arguments": item.arguments}}
            if turns and turns[-1]["role"] == "assistant" and turns[-1].get("tool_calls"):
                turns[-1]["tool_calls"].append(call)  # parallel calls are one assistant turn
            else:
                turns.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            turns.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        else:
            turns.append({"role": item.role, "content": item.text()})
    return turns


def chat_request(body: ResponsesRequest, turns: list[dict]) -> ChatCompletionRequest:
    """The chat completion request that produces this response."""
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    fields: dict[str, Any] = {"model": body.model, "messages": system + turns, "user": body.user,
                              "max_completion_tokens": body.max_output_tokens}
    if body.temperature is not None:
        fields["temperature"] = body.temperature
    if body.top_p is not None:
        fields["top_p"] = body.top_p
    _check_supported(body)
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as err:
        raise validation_error(err) from None


def _check_supported(body: ResponsesRequest) -> None:
    if body.tools or any(isinstance(i, FunctionCallItem | FunctionCallOutputItem) for i in body.input or []
                         if not isinstance(body.input, str)):
        raise OpenAIError(400, "Function tools are not supported by this server yet.", param="tools",
                          code="unsupported")
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type != "text":
        raise OpenAIError(400, f"text.format {fmt.type} is not supported by this server yet.", param="text.format",
                          code="unsupported")


class ResponseBuilder:
    """One response: its object, and when streamed its events in OpenAI's order, numbered."""

    def __init__(self, job: Job, body: ResponsesRequest, turns: list[dict], store: ResponseStore):
        self.job, self.body, self.turns, self.store = job, body, turns, store
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.sequence = 0
        self.text = ""  # what the client has been sent
        self.reason: str | None = None

    def response(self, status: str, output: list[dict], reason: str | None = None) -> dict:
        body, g = self.body, self.job.gateway
        fmt = body.text.format if body.text and body.text.format else None
        return {
            "id": self.job.id, "object": "response", "created_at": self.job.created, "status": status,
            "error": {"code": "server_error", "message": "The generation failed or timed out."}
            if status == "failed" else None,
            "incomplete_details": {"reason": reason} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": g.model_name,
            "output": output, "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": body.store, "temperature": 1.0 if body.temperature is None else body.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": _dump(body.tool_choice) or "auto", "tools": [_dump(t) for t in body.tools or []],
            "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled",
            "metadata": body.metadata or {}, "user": body.user, "background": False, "service_tier": "default",
            "usage": self.usage() if status != "in_progress" else None,
        }

    def usage(self) -> dict:
        job = self.job
        return {"input_tokens": job.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": job.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": job.prompt_tokens + job.completion_tokens}

    def message(self, status: str, text: str | None) -> dict:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": self.message_id, "status": status, "role": "assistant", "content": content}

    def finished(self, text: str, reason: str | None) -> dict:
        """The whole response once generation ended; stored (with its conversation) when `store`."""
        status, detail = STATUS.get(reason, ("failed", None))
        output = [self.message("completed" if status == "completed" else "incomplete", text)]
        response = self.response(status, output, detail)
        if self.body.store and status != "failed":
            self.store.put(self.job.id, self.job.key_id, response,
                           self.turns + [{"role": "assistant", "content": text}])
        return response

    # -- streaming ---------------------------------------------------------------------------

    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def opening(self) -> list[str]:
        started = self.response("in_progress", [])
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        return [self.event("response.created", response=started),
                self.event("response.in_progress", response=started),
                self.event("response.output_item.added", output_index=0, item=self.message("in_progress", None)),
                self.event("response.content_part.added", **where,
                           part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def delta(self, text: str, reason: str | None) -> str:
        self.reason = reason or self.reason
        if not text:
            return ""
        self.text += text
        return self.event("response.output_text.delta", item_id=self.message_id, output_index=0, content_index=0,
                          delta=text, logprobs=[])

    def closing(self) -> list[str]:
        response = self.finished(self.text, self.reason)
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        item = response["output"][0]
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            response["status"], "response.failed")
        return [self.event("response.output_text.done", **where, text=self.text, logprobs=[]),
                self.event("response.content_part.done", **where, part=item["content"][0]),
                self.event("response.output_item.done", output_index=0, item=item),
                self.event(kind, response=response)]


def _dump(value) -> Any:
    return value.model_dump(by_alias=True) if hasattr(value, "model_dump") else value


async def handle_responses(gateway: Gateway, store: ResponseStore, request: Request):
    job = Job(gateway, request, chat=True)
    job.route, job.id = "/v1/responses", f"resp_{uuid.uuid4().hex}"
    a = gateway.admission
    try:
        job.key_id = a.authenticate(request)
        body: ResponsesRequest = await a.parse(request, ResponsesRequest)
        a.check_model(body.model)
        history: list[dict] = []
        if body.previous_response_id is not None:
            try:
                _, history = store.get(body.previous_response_id, job.key_id)
            except OpenAIError:  # OpenAI's words for this case
                raise OpenAIError(404, f"Previous response with id '{short(body.previous_response_id)}' not found.",
                                  param="previous_response_id", code="previous_response_not_found") from None
        turns = history + input_turns(body)
        chat = chat_request(body, turns)
        a.check_sampling(chat)
        prompts = chat_prompts(gateway, chat)
        handles, _ = await start_generation(gateway, job, chat, prompts)
        reply = ResponseBuilder(job, body, turns, store)
        if handles is None:
            return _refused(job, body, reply)
        if body.stream:
            return StreamingResponse(_events(job, chat, handles, reply), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        results = await collect(job, handles)
        outs = results[0]
        text, reason = await job.moderated_output("".join(o.text for o in outs), outs[-1].finish_reason)
        response = reply.finished(text, reason)
        job.audit(200)
        return response
    except OpenAIError as err:
        job.audit(err.status, err.message)
        raise
    except asyncio.CancelledError:  # the client disconnected before a non-streamed reply
        job.audit(499, "client disconnected")
        raise


async def _events(job: Job, chat: ChatCompletionRequest, handles, reply: ResponseBuilder):
    for event in reply.opening():
        yield event
    async for event in stream(job, chat, handles, lambda index, text, out, reason: reply.delta(text, reason),
                              ending=reply.closing):
        yield event


def _refused(job: Job, body: ResponsesRequest, reply: ResponseBuilder):
    """A blocked input answered as a reply (`moderation.on_block: refusal`): the engine never runs."""
    g = job.gateway
    message = g.config.moderation.refusal_message
    job.finish("content_filter")
    job.audit(200)
    if not body.stream:
        return reply.finished(message, "stop")

    async def events():
        for event in [*reply.opening(), reply.delta(message, "stop"), *reply.closing()]:
            yield event

    return StreamingResponse(events(), media_type="text/event-stream", headers=SSE_HEADERS)


def add_responses_routes(app: FastAPI, gateway: Gateway) -> None:
    store = ResponseStore(gateway.config.server.responses_store_size)
    a = gateway.admission

    @app.post("/v1/responses")
    async def create_response(request: Request):
        return await handle_responses(gateway, store, request)

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request):
        response, _ = store.get(response_id, a.authenticate(request))
        return response

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request):
        store.delete(response_id, a.authenticate(request))
        return {"id": response_id, "object": "response", "deleted": True}

