"""/v1/responses: OpenAI's Responses API (the OpenAI Agents SDK's default) over the chat pipeline.

A request becomes a chat completion request (instructions as the system message, input items
as turns, a previous response's conversation before them) and runs through the same checks,
moderation, rate limits, engine, metrics and audit log as /v1/chat/completions. The reply is
a `response` object, or its SSE events in OpenAI's order. Stored responses (`store`, the
default) keep their conversation in a bounded in-memory LRU (`server.responses_store_size`)
so `previous_response_id` continues it (without its `instructions`, as OpenAI: each request
states its own); a server restart forgets them, as it forgets everything else in memory. Tools,
tool_choice and text.format become the chat request's, so tool calls and structured outputs
work as in chat completions (`tools`, `structured`).
"""

from __future__ import annotations

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
from lmforge.serve.tools import ToolCallStream, parse_tool_calls, reads_tool_calls

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
        self.tools = reads_tool_calls(chat)  # replies are read for tool calls
        self.call_stream = ToolCallStream()  # a streamed reply's text and calls, as they come
        self.items: list[dict] = []  # a streamed reply's output items so far
        self.open = False  # whether the last of them is still growing
        self.sequence = 0
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

    def message(self, status: str, text: str | None, item_id: str | None = None) -> dict:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex}", "status": status, "role": "assistant",
                "content": content}

    @staticmethod
    def function_call(call_id: str, name: str, arguments: str, status: str) -> dict:
        return {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call_id, "name": name,
                "arguments": arguments, "status": status}

    def output(self, text: str, status: str) -> list[dict]:
        """A whole reply's output items: its text as a message, its tool calls as function_call items."""
        if not self.tools:
            return [self.message(status, text)]
        content, calls = parse_tool_calls(text)
        items = [self.message(status, content or "")] if content or not calls else []
        return items + [self.function_call(c.id, c.function.name, c.function.arguments, "completed") for c in calls]

    def finished(self, text: str, reason: str | None, items: list[dict] | None = None) -> dict:
        """The whole response once generation ended (`items`: as streamed); stored, with its
        conversation, when `store`."""
        status, detail = STATUS.get(reason, ("failed", None))
        if items is None:
            items = self.output(text, "completed" if status == "completed" else "incomplete")
        response = self.response(status, items, detail)
        if self.body.store and status != "failed":
            self.store.put(self.job.id, self.job.key_id, response, self.turns + [_turn(items)])
        return response

    # -- streaming: items open and close as the reply's text and calls come ------------------

    def event(self, kind: str, **fields) -> str:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n"

    def opening(self) -> list[str]:
        started = self.response("in_progress", [])
        events = [self.event("response.created", response=started), self.event("response.in_progress", response=started)]
        if not self.tools:  # one message, open from the start
            events += self._open(self.message("in_progress", ""))
        return events

    def delta(self, text: str, reason: str | None) -> str:
        self.reason = reason or self.reason
        if not text:
            return ""
        return "".join(self._apply(self.call_stream.feed(text) if self.tools else [{"content": text}]))

    def closing(self) -> list[str]:
        events = self._apply(self.call_stream.finish()) if self.tools else []
        status, _ = STATUS.get(self.reason, ("failed", None))
        if not self.items:  # nothing came: an empty message
            events += self._open(self.message("in_progress", ""))
        events += self._close("completed" if status == "completed" else "incomplete")
        response = self.finished("", self.reason, self.items)
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            response["status"], "response.failed")
        return [*events, self.event(kind, response=response)]

    def _apply(self, deltas: list[dict]) -> list[str]:
        """Events for chat-style deltas ({"content"} or {"tool_calls"}, as `ToolCallStream` makes them)."""
        events: list[str] = []
        for delta in deltas:
            if delta.get("content"):
                if not (self.open and self.items[-1]["type"] == "message"):
                    events += self._close("completed") + self._open(self.message("in_progress", ""))
                index, item = len(self.items) - 1, self.items[-1]
                item["content"][0]["text"] += delta["content"]
                events.append(self.event("response.output_text.delta", item_id=item["id"], output_index=index,
                                         content_index=0, delta=delta["content"], logprobs=[]))
            for call in delta.get("tool_calls", []):
                if "id" in call:  # a call begins
                    events += self._close("completed") + self._open(
                        self.function_call(call["id"], call["function"]["name"], "", "in_progress"))
                elif call["function"].get("arguments"):
                    index, item = len(self.items) - 1, self.items[-1]
                    item["arguments"] += call["function"]["arguments"]
                    events.append(self.event("response.function_call_arguments.delta", item_id=item["id"],
                                             output_index=index, delta=call["function"]["arguments"]))
        return events

    def _open(self, item: dict) -> list[str]:
        self.items.append(item)
        self.open, index = True, len(self.items) - 1
        if item["type"] == "function_call":
            return [self.event("response.output_item.added", output_index=index, item=item)]
        return [self.event("response.output_item.added", output_index=index, item={**item, "content": []}),
                self.event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                           part=item["content"][0])]

    def _close(self, status: str) -> list[str]:
        if not self.open:
            return []
        self.open, index, item = False, len(self.items) - 1, self.items[-1]
        if item["type"] == "function_call":  # a call the reply ended inside is not one to run
            item["status"] = "completed" if _json_object(item["arguments"]) else "incomplete"
            return [self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                               arguments=item["arguments"]),
                    self.event("response.output_item.done", output_index=index, item=item)]
        item["status"] = status
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        part = item["content"][0]
        return [self.event("response.output_text.done", **where, text=part["text"], logprobs=[]),
                self.event("response.content_part.done", **where, part=part),
                self.event("response.output_item.done", output_index=index, item=item)]


def _json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _turn(items: list[dict]) -> dict:
    """A reply's output items as the assistant's turn in the stored conversation; calls that did
    not finish are left out (they could not be answered)."""
    content = "".join(part["text"] for item in items if item["type"] == "message" for part in item["content"])
    calls = [{"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in items if item["type"] == "function_call" and item["status"] == "completed"]
    turn: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        turn["tool_calls"] = calls
    return turn

def _dump(value) -> Any:
    return value.model_dump(by_alias=True) if hasattr(value, "model_dump") else value


async def handle_responses(gateway: Gateway, store: ResponseStore, request: Request):
    job = Job(gateway, request, chat=True)
    job.route, job.id = "/v1/responses", f"resp_{uuid.uuid4().hex}"
    a = gateway.admission
    with job.audited():
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

