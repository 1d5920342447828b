"""Tool calling (OpenAI function calling): tools into the prompt, calls out of the reply.

The format is lmforge's chat format (`lmforge.tokenizer.chat_turns`): the tools are listed in
the system turn, and the model calls one by writing

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

after its content (several blocks, one a line, for parallel calls). This module is the
public interface the chat and Responses APIs share:

- `check_tool_choice(tools, tool_choice)`: the names the reply may call, or a 400;
- `tool_structured(tools, tool_choice, parallel_tool_calls)`: the grammar that forces calls
  ("required" or a named function), None when the model chooses ("auto") or must not ("none");
- `parse_tool_calls(text)`: (content, calls) of a whole reply;
- `ToolCallStream`: a reply's text deltas as chat-completion deltas, calls streamed as OpenAI does.

Tools and choices are taken in the chat API's shape ({"type": "function", "function": {...}})
or the Responses API's flat one ({"type": "function", "name", "parameters"}), as dicts or models.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from lmforge.serve.errors import OpenAIError
from lmforge.serve.protocol import NAME_CHARS, FunctionCall, ToolCall
from lmforge.serve.structured import JSON_OPTIONS, StructuredSpec
from lmforge.tokenizer import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

CALL_ID_CHARS = string.ascii_letters + string.digits
# json.dumps's separators, as the chat format writes calls; keywords llguidance lacks are ignored, not refused.
_JSON_STYLE = {**JSON_OPTIONS, "lenient": True}
# Lark string literals of the block's frame and the line between parallel calls.
_LARK_OPEN, _LARK_CLOSE, _LARK_NEWLINE = (json.dumps(t) for t in (TOOL_CALL_OPEN + "\n", "\n" + TOOL_CALL_CLOSE, "\n"))
# A call's JSON up to its arguments: `{"name": "...", "arguments": ` (what streaming waits for).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*')
_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)(?:" + re.escape(TOOL_CALL_CLOSE) + r"|\Z)", re.S)


def _plain(value: Any) -> Any:
    return value.model_dump(exclude_none=True, by_alias=True) if hasattr(value, "model_dump") else value


def function_definitions(tools: list | None) -> list[dict]:
    """{"name", "description"?, "parameters"?, "strict"?} of each function tool, in either API's shape."""
    out = []
    for tool in tools or []:
        tool = _plain(tool)
        if tool.get("type", "function") == "function":
            out.append(tool["function"] if "function" in tool else {k: v for k, v in tool.items() if k != "type"})
    return out


def prompt_tools(tools: list | None) -> list[dict] | None:
    """The tools as the chat format lists them (`encode_chat(tools=...)`): OpenAI's chat shape."""
    functions = function_definitions(tools)
    return [{"type": "function", "function": f} for f in functions] or None


def _chosen_name(tool_choice: Any) -> str | None:
    choice = _plain(tool_choice)
    if isinstance(choice, dict):
        return (choice.get("function") or {}).get("name") or choice.get("name")
    return None


def check_tool_choice(tools: list | None, tool_choice: Any = None) -> list[str]:
    """The function names the reply may call: all of them ("auto", "required"), one (a named
    choice) or none ("none", or no tools). A choice the tools cannot meet is the client's 400."""
    names = [f["name"] for f in function_definitions(tools)]
    if tool_choice is None or tool_choice == "none":
        return [] if tool_choice == "none" else names
    if not names:
        raise OpenAIError(400, "tool_choice is only allowed when tools are specified.", param="tool_choice",
                          code="invalid_value")
    name = _chosen_name(tool_choice)
    if name is None:
        return names
    if name not in names:
        raise OpenAIError(400, f"tool_choice names the function '{name[:64]}', which is not among the tools.",
                          param="tool_choice", code="invalid_value")
    return [name]


def tool_structured(tools: list | None, tool_choice: Any = None, parallel_tool_calls: bool = True
                    ) -> StructuredSpec | None:
    """A Lark grammar (llguidance) of the reply when calls are forced: one `<tool_call>` block (or,
    if parallel, one or more, a line apart) whose JSON is {"name": a permitted function,
    "arguments": its parameters schema}. "auto" and "none" force nothing: None."""
    allowed = check_tool_choice(tools, tool_choice)
    if tool_choice in (None, "auto", "none") or not allowed:
        return None
    schemas = [_call_schema(f) for f in function_definitions(tools) if f["name"] in allowed]
    schema = {**(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}), "x-guidance": _JSON_STYLE}
    repeat = f" ({_LARK_NEWLINE} call)*" if parallel_tool_calls else ""
    grammar = (
        "%llguidance {}\n"
        f"start: call{repeat}\n"
        f"call: {_LARK_OPEN} arguments {_LARK_CLOSE}\n"
        f"arguments: %json {json.dumps(schema)}\n"
    )
    return StructuredSpec("lark", grammar)


def _call_schema(function: dict) -> dict:
    parameters = function.get("parameters") or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def new_call_id() -> str:
    """OpenAI's form: call_ and 24 random letters and digits."""
    return "call_" + "".join(secrets.choice(CALL_ID_CHARS) for _ in range(24))


def _arguments_text(body: str, start: int, arguments: dict) -> str:
    """The arguments as the model wrote them (what a stream sends), or re-serialized when the
    text between `"arguments": ` and the closing brace is not exactly them."""
    raw = body[start: body.rstrip().rfind("}")].rstrip()  # the block's JSON parsed: its last "}" closes it
    try:
        if json.loads(raw) == arguments:
            return raw
    except ValueError:
        pass
    return json.dumps(arguments, ensure_ascii=False)


def _is_name(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= NAME_CHARS


def _parse_call(body: str) -> ToolCall | None:
    """A block's JSON as a call, or None when it is not {"name": string, "arguments": object}."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not (isinstance(value, dict) and _is_name(value.get("name")) and isinstance(value.get("arguments"), dict)):
        return None
    head = _HEAD.match(body)
    arguments = _arguments_text(body, head.end(), value["arguments"]) if head else json.dumps(
        value["arguments"], ensure_ascii=False)
    return ToolCall(id=new_call_id(), type="function", function=FunctionCall(name=value["name"], arguments=arguments))


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole reply. Content is the text outside the call blocks, without the
    whitespace next to them (None when nothing is left); a block that is not a valid call stays
    content, and a last block the reply ended inside counts when its JSON is whole."""
    calls: list[ToolCall] = []
    pieces: list[str] = []
    position = 0
    for match in _BLOCK.finditer(text):
        body = match.group(1)
        if not match.group(0).endswith(TOOL_CALL_CLOSE):  # the reply ended in the block, maybe in its close
            body = body[: len(body) - _partial_suffix(body, TOOL_CALL_CLOSE)]
        call = _parse_call(body)
        if call is None:
            continue
        before = text[position:match.start()]
        pieces.append((before.lstrip() if calls else before).rstrip())
        calls.append(call)
        position = match.end()
    if not calls:
        return text, []
    pieces.append(text[position:].lstrip())
    return "".join(pieces) or None, calls


def finish_reason(reason: str | None, called: bool) -> str | None:
    """OpenAI's "tool_calls" for a reply that ended by itself after making calls."""
    return "tool_calls" if called and reason == "stop" else reason


def reads_tool_calls(body: Any) -> bool:
    """Whether a request's replies are read for tool calls: it has tools, and tool_choice is not "none"."""
    return bool(function_definitions(getattr(body, "tools", None))) and getattr(body, "tool_choice", None) != "none"


def chat_message(text: str, reason: str | None) -> tuple[dict, str | None]:
    """A whole reply as an OpenAI assistant message with its calls, and the choice's finish reason."""
    content, calls = parse_tool_calls(text)
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [call.model_dump() for call in calls]
    return message, finish_reason(reason, bool(calls))


def _partial_suffix(text: str, token: str) -> int:
    """Length of the longest end of `text` that begins `token` (so may still become it)."""
    return next((k for k in range(min(len(text), len(token) - 1), 0, -1) if text.endswith(token[:k])), 0)


def _arguments_holdback(text: str) -> int:
    """How much of a call's arguments so far to hold back: what may yet be the call's end
    (whitespace, the closing brace, whitespace, the start of `</tool_call>`)."""
    rest = text[: len(text) - _partial_suffix(text, TOOL_CALL_CLOSE)].rstrip()
    if rest.endswith("}"):
        rest = rest[:-1].rstrip()
    return len(text) - len(rest)


@dataclass
class ToolCallStream:
    """One choice's text deltas in, chat-completion deltas out: {"content": ...} for text, and per
    call a first {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}
    followed by argument deltas. Text that may begin `<tool_call>` (or be the whitespace before
    one) is held back until it is known; `finish()` releases what is left at the reply's end.
    The content and calls sent add up to what `parse_tool_calls` makes of the whole text, but for
    a block whose name was streamed and whose JSON then broke off: it stays a call here."""

    calls: list[ToolCall] = field(default_factory=list)  # the calls announced so far
    _text: str = ""           # held text: reply text, or the body of the open block
    _before: str = ""         # held text before the open block
    _in_call: bool = False
    _after_call: bool = False  # no content since the last call: its leading whitespace is dropped
    _arguments_at: int = -1   # where the open block's arguments start, once its name is known
    _sent: int = 0            # how much of the open block's arguments was sent

    def feed(self, text: str) -> list[dict]:
        self._text += text
        deltas: list[dict] = []
        while True:
            if not self._in_call:
                at = self._text.find(TOOL_CALL_OPEN)
                if at < 0:
                    self._send_text(deltas, self._text, final=False)
                    return deltas
                self._before, self._text = self._text[:at], self._text[at + len(TOOL_CALL_OPEN):]
                self._in_call = True
                continue
            end = self._text.find(TOOL_CALL_CLOSE)
            body = self._text if end < 0 else self._text[:end]
            self._open_block(deltas, body)
            if end < 0:
                if self._arguments_at >= 0:
                    arguments = body[self._arguments_at:]
                    self._arguments(deltas, arguments[: len(arguments) - _arguments_holdback(arguments)])
                return deltas
            self._text = self._text[end + len(TOOL_CALL_CLOSE):]
            self._close_block(deltas, body, TOOL_CALL_CLOSE)

    def finish(self) -> list[dict]:
        """The deltas of what was held back when the reply ends (a block it ended inside counts
        when its JSON is whole, as in `parse_tool_calls`)."""
        deltas: list[dict] = []
        if self._in_call:
            body, self._text = self._text, ""
            self._close_block(deltas, body, "")
        self._send_text(deltas, self._text, final=True)
        return deltas

    def _send_text(self, deltas: list[dict], text: str, final: bool) -> None:
        """Send `text` as content but for what may still begin a block; keep that in `_text`."""
        if self._after_call:
            text = text.lstrip()
        cut = len(text) if final else len(text[: len(text) - _partial_suffix(text, TOOL_CALL_OPEN)].rstrip())
        if cut:
            deltas.append({"content": text[:cut]})
            self._after_call = False
        self._text = text[cut:]

    def _open_block(self, deltas: list[dict], body: str) -> None:
        """Announce the open block's call once its name is known."""
        head = _HEAD.match(body) if self._arguments_at < 0 else None
        if head is None or head.end() == len(body):  # more whitespace may come before the arguments
            return
        try:
            name = json.loads(head.group(1))
        except ValueError:  # a bad escape: the block is judged whole when it ends
            return
        if _is_name(name):
            self._announce(deltas, name)
            self._arguments_at = head.end()

    def _announce(self, deltas: list[dict], name: str) -> None:
        before, self._before = self._before, ""
        if self._after_call:
            before = before.lstrip()
        if before.rstrip():  # the content just before the call
            deltas.append({"content": before.rstrip()})
        call = ToolCall(id=new_call_id(), type="function", function=FunctionCall(name=name, arguments=""))
        self.calls.append(call)
        deltas.append({"tool_calls": [{"index": len(self.calls) - 1, "id": call.id, "type": "function",
                                       "function": {"name": name, "arguments": ""}}]})

    def _arguments(self, deltas: list[dict], upto: str) -> None:
        if len(upto) > self._sent:
            piece, self._sent = upto[self._sent:], len(upto)
            self.calls[-1].function.arguments += piece
            deltas.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": piece}}]})

    def _close_block(self, deltas: list[dict], body: str, close: str) -> None:
        """The block ended: the rest of its arguments, or the whole call, or (not a call) its text."""
        self._in_call = False
        if self._arguments_at >= 0:
            end = body.rstrip().rfind("}")
            self._arguments(deltas, body[self._arguments_at: end].rstrip() if end >= self._arguments_at else
                            body[self._arguments_at:].rstrip())
        else:
            call = _parse_call(body)
            if call is None:  # not a call: the block is text, and what follows is read again
                block, self._before = self._before + TOOL_CALL_OPEN + body + close, ""
                rest, self._text = self._text, ""
                self._send_text(deltas, block, final=True)
                self._text = rest
                return
            self._announce(deltas, call.function.name)
            self._arguments(deltas, call.function.arguments)
        self._arguments_at, self._sent, self._after_call = -1, 0, True
