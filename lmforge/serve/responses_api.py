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
from lmforge.serve.tools import parse_tool_calls, reads_tool_calls

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
    if body.tools:  # the chat API nests a function under "function"
        fields["tools"] = [{"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)}
                           for t in body.tools]
    if body.tool_choice is not None:
        choice = body.tool_choice
        fields["tool_choice"] = choice if isinstance(choice, str) else {"type": "function",
                                                                       "function": {"name": choice.name}}
    if body.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = body.parallel_tool_calls
    fmt = body.text.format if body.text else None
    if fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name or "response", "schema": fmt.schema_, "strict": fmt.strict,
                  "description": fmt.description}
        fields["response_format"] = {"type": "json_schema", "json_schema": {k: v for k, v in schema.items()
                                                                            if v is not None}}
    elif fmt is not None:
        fields["response_format"] = {"type": fmt.type}
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as err:
        raise validation_error(err) from None


class ResponseBuilder:
    """One response: its object, and when streamed its events in OpenAI's order, numbered."""

    def __init__(self, job: Job, body: ResponsesRequest, chat: ChatCompletionRequest, turns: list[dict],
                 store: ResponseStore):
        self.job, self.body, self.turns, self.store = job, body, turns, store
        self.tools = reads_tool_calls(chat)  # replies are read for calls, so streamed whole at their end
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.sequence = 0
        self.text = ""  # what the client has been sent
        self.reason: str | None = None

    def response(self, status: str, output: list[dict], reason: str | None = None) -> dict:
        body = self.body
        fmt = body.text.format if body.text and body.text.format else None
        return {
            "id": self.job.id, "object": "response", "created_at": self.job.created, "status": status,
            "error": {"code": "server_error", "message": "The generation failed or timed out."}
            if status == "failed" else None,
            "incomplete_details": {"reason": reason} if status == "incomplete" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens, "model": self.job.model_name,
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

    def output(self, text: str, status: str) -> tuple[list[dict], dict]:
        """A reply's output items (its text as a message, its tool calls as function_call items) and
        its turn in the conversation."""
        if not self.tools:
            return [self.message(status, text)], {"role": "assistant", "content": text}
        content, calls = parse_tool_calls(text)
        items = [self.message(status, content or "")] if content or not calls else []
        items += [{"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call.id,
                   "name": call.function.name, "arguments": call.function.arguments, "status": "completed"}
                  for call in calls]
        turn: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            turn["tool_calls"] = [call.model_dump() for call in calls]
        return items, turn

    def finished(self, text: str, reason: str | None) -> dict:
        """The whole response once generation ended; stored (with its conversation) when `store`."""
        status, detail = STATUS.get(reason, ("failed", None))
        output, turn = self.output(text, "completed" if status == "completed" else "incomplete")
        response = self.response(status, output, detail)
        if self.body.store and status != "failed":
            self.store.put(self.job.id, self.job.key_id, response, self.turns + [turn])
        return response

    # -- streaming ---------------------------------------------------------------------------

    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def opening(self) -> list[str]:
        started = self.response("in_progress", [])
        events = [self.event("response.created", response=started), self.event("response.in_progress", response=started)]
        if not self.tools:  # the message streams as it comes
            events += self.item_opening(0, self.message("in_progress", None))
        return events

    def item_opening(self, index: int, item: dict) -> list[str]:
        if item["type"] == "function_call":
            return [self.event("response.output_item.added", output_index=index,
                               item={**item, "arguments": "", "status": "in_progress"})]
        return [self.event("response.output_item.added", output_index=index, item=self.message("in_progress", None)),
                self.event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                           part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})]

    def delta(self, text: str, reason: str | None) -> str:
        self.reason = reason or self.reason
        self.text += text
        if not text or self.tools:
            return ""
        return self.event("response.output_text.delta", item_id=self.message_id, output_index=0, content_index=0,
                          delta=text, logprobs=[])

    def item_closing(self, index: int, item: dict) -> list[str]:
        if item["type"] == "function_call":
            where = {"item_id": item["id"], "output_index": index}
            return [self.event("response.function_call_arguments.delta", **where, delta=item["arguments"]),
                    self.event("response.function_call_arguments.done", **where, arguments=item["arguments"]),
                    self.event("response.output_item.done", output_index=index, item=item)]
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        part = item["content"][0]
        events = [self.event("response.output_text.delta", **where, delta=part["text"], logprobs=[])] \
            if self.tools and part["text"] else []
        return [*events, self.event("response.output_text.done", **where, text=part["text"], logprobs=[]),
                self.event("response.content_part.done", **where, part=part),
                self.event("response.output_item.done", output_index=index, item=item)]

    def closing(self) -> list[str]:
        response = self.finished(self.text, self.reason)
        events = []
        for index, item in enumerate(response["output"]):
            if self.tools:  # nothing of a reply read for calls went out before its end
                events += self.item_opening(index, item)
            events += self.item_closing(index, item)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            response["status"], "response.failed")
        return [*events, self.event(kind, response=response)]


def _dump(value) -> Any:
    return value.model_dump(by_alias=True) if hasattr(value, "model_dump") else value


async def handle_responses(gateway: Gateway, store: ResponseStore, request: Request):
    job = Job(gateway, request, chat=True)
    job.route, job.id = "/v1/responses", f"resp_{uuid.uuid4().hex}"
    a = gateway.admission
    try:
        job.key_id = a.authenticate(request)
        body: ResponsesRequest = await a.parse(request, ResponsesRequest)
        job.model_name = a.check_model(body.model) or job.model_name  # a LoRA adapter's name picks it
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
        reply = ResponseBuilder(job, body, chat, turns, store)
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

