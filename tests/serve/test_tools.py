"""Tool calling through the real `openai` SDK: forced calls parse and match their schema, results go
back to the model, streamed calls reassemble; and the parser, stream and grammar on their own."""

from __future__ import annotations

import json
import random

import httpx
import openai
import pytest

from lmforge.model import Transformer
from lmforge.serve.tools import ToolCallStream, parse_tool_calls, tool_structured
from lmforge.tokenizer import tool_call_text
from tests.serve.conftest import KEY, MODEL_NAME, make_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "The sum of two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                    "b": {"type": "integer", "minimum": 0, "maximum": 99}},
                   "required": ["a", "b"], "additionalProperties": False}}}
TOOLS = [WEATHER, ADD]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def served(serve_model, tmp_path_factory):
    """The shared tiny model with a 1024-token context (its RoPE tables recomputed; the weights are
    the same): a tool listing alone outgrows its 128 tokens with a 1024-token vocabulary."""
    model, tokenizer = serve_model
    longer = Transformer(model.config.model_copy(update={"max_seq_len": 1024}))
    longer.load_state_dict(model.state_dict())
    with make_server((longer.eval(), tokenizer), tmp_path_factory.mktemp("tools"), engine={"max_num_seqs": 4}) as server:
        yield server


def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0)


def valid_arguments(name: str, arguments: str) -> bool:
    """The call's arguments parse and match its tool's schema (required keys, types, enum, nothing else)."""
    value = json.loads(arguments)
    if name == "get_weather":
        return (set(value) == {"city", "unit"} and isinstance(value["city"], str) and len(value["city"]) <= 20
                and value["unit"] in ("celsius", "fahrenheit"))
    return set(value) == {"a", "b"} and all(type(value[k]) is int and 0 <= value[k] <= 99 for k in "ab")


def test_a_required_tool_call_parses_matches_its_schema_and_its_result_gets_a_reply(served):
    c = client(served)
    reply = c.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice="required",
                                      temperature=0, max_tokens=120)
    choice = reply.choices[0]
    # Parallel calls: the untrained model may call until its budget ends, every call still whole.
    assert choice.finish_reason in ("tool_calls", "length") and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and len(call.id) == 5 + 24
        assert call.function.name in ("get_weather", "add") and valid_arguments(call.function.name, call.function.arguments)
    # The assistant's calls and a tool's result go back; the model answers in words.
    results = [{"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'} for call in choice.message.tool_calls]
    follow_up = c.chat.completions.create(
        model=MODEL_NAME, messages=[*ASK, choice.message.model_dump(exclude_none=True), *results], tools=TOOLS,
        temperature=0, max_tokens=8)
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert follow_up.usage.prompt_tokens > reply.usage.prompt_tokens + 10


def test_a_named_tool_choice_calls_that_function_once_without_parallel_calls(served):
    reply = client(served).chat.completions.create(
        model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add"}},
        parallel_tool_calls=False, temperature=0, max_tokens=100)
    calls = reply.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "add" and valid_arguments("add", calls[0].function.arguments)
    assert reply.choices[0].finish_reason == "tool_calls"


def test_streamed_tool_call_deltas_reassemble_into_the_same_call(served):
    c = client(served)
    kwargs = dict(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                  parallel_tool_calls=False, temperature=0, max_tokens=100)
    whole = c.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in c.chat.completions.create(stream=True, **kwargs):
        choice = chunk.choices[0]
        reasons.append(choice.finish_reason)
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:  # the first delta of a call: its id and name, no arguments yet
                assert delta.index not in calls and delta.type == "function" and delta.function.arguments == ""
                calls[delta.index] = {"id": delta.id, "name": delta.function.name, "arguments": ""}
            else:
                calls[delta.index]["arguments"] += delta.function.arguments
    assert list(calls) == [0] and reasons[-1] == "tool_calls"
    assert (calls[0]["name"], calls[0]["arguments"]) == (whole.function.name, whole.function.arguments)
    assert valid_arguments("get_weather", calls[0]["arguments"])


def test_tool_choice_auto_returns_a_valid_reply_and_none_reads_no_calls(served):
    c = client(served)
    for choice in ("auto", "none"):
        reply = c.chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, tool_choice=choice,
                                          temperature=0, max_tokens=16)
        message = reply.choices[0].message
        assert message.role == "assistant" and (message.content is not None or message.tool_calls)
        assert reply.choices[0].finish_reason in (("stop", "length", "tool_calls") if choice == "auto" else ("stop", "length"))
        assert choice == "auto" or not message.tool_calls


def test_tokenize_with_tools_counts_the_prompt_a_chat_request_runs(served):
    reply = client(served).chat.completions.create(model=MODEL_NAME, messages=ASK, tools=TOOLS, max_tokens=1)
    body = {"messages": ASK, "tools": TOOLS}
    tokens = httpx.post(served.url + "/tokenize", json=body, headers={"Authorization": f"Bearer {KEY}"}).json()
    assert tokens["count"] == reply.usage.prompt_tokens
    assert tokens["tokens"] == served.engine.tokenizer.encode_chat(ASK, True, tools=TOOLS)


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "no_such_tool"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools.0.function.name"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
])
def test_tool_requests_the_tools_cannot_serve_are_400s_naming_the_field(served, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client(served).chat.completions.create(model=MODEL_NAME, messages=ASK, max_tokens=4, **extra)
    assert err.value.status_code == 400 and err.value.body["param"].startswith(param)


@pytest.mark.parametrize(("message", "problem"), [
    ({"role": "tool", "content": "18"}, "tool_call_id"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{not json"}}]}, "JSON object"),
    ({"role": "user", "content": "x", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}]}, "only assistant"),
])
def test_malformed_tool_messages_are_400s(served, message, problem):
    with pytest.raises(openai.BadRequestError, match=problem):
        client(served).chat.completions.create(model=MODEL_NAME, messages=[*ASK, message], max_tokens=4)


# ----------------------------------------------------------------- the parts on their own

CALL = tool_call_text("get_weather", {"city": "Paris", "nested": {"list": [1, {"brace": "}"}]}})
SUM = tool_call_text("add", {"a": 1, "b": 2})


@pytest.mark.parametrize(("text", "content", "calls"), [
    (CALL, None, [("get_weather", '{"city": "Paris", "nested": {"list": [1, {"brace": "}"}]}}')]),
    ("Let me check.\n" + CALL + "\n" + SUM, "Let me check.", [("get_weather", None), ("add", '{"a": 1, "b": 2}')]),
    ("no calls <tool", "no calls <tool", []),
    ("x <tool_call>not json</tool_call> y", "x <tool_call>not json</tool_call> y", []),
    ('<tool_call>\n{"name": "add", "arguments": {"a":1}}', None, [("add", '{"a":1}')]),  # ended inside the block
    ('<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>', None, [("add", '{"a": 1}')]),
])
def test_parse_tool_calls_splits_content_from_calls_and_leaves_malformed_blocks_as_text(text, content, calls):
    got_content, got = parse_tool_calls(text)
    assert got_content == content and [c.function.name for c in got] == [name for name, _ in calls]
    for call, (_, arguments) in zip(got, calls, strict=True):
        assert call.id.startswith("call_") and len(call.id) == 29 and json.loads(call.function.arguments)
        assert arguments is None or call.function.arguments == arguments
    assert len({c.id for c in got}) == len(got)


def test_the_stream_sends_what_parse_tool_calls_finds_however_the_text_is_split():
    rng = random.Random(0)
    texts = [CALL, "  Sure.\n\n" + CALL + "\n\n" + SUM + "\n after", "pre <tool_call>bad</tool_call>\n" + SUM,
             CALL[:-5], "plain text with a < sign", "ends with <tool_c"]
    for text in texts:
        content, calls = parse_tool_calls(text)
        expected = (content or "" if calls else text, [(c.function.name, c.function.arguments) for c in calls])
        for _ in range(50):
            stream, deltas, at = ToolCallStream(), [], 0
            while at < len(text):
                step = rng.randint(1, 7)
                deltas += stream.feed(text[at: at + step])
                at += step
            deltas += stream.finish()
            got_calls: dict[int, list] = {}
            for delta in deltas:
                for part in delta.get("tool_calls", []):
                    if "id" in part:
                        got_calls[part["index"]] = [part["function"]["name"], ""]
                    else:
                        got_calls[part["index"]][1] += part["function"]["arguments"]
            got = ("".join(d.get("content", "") for d in deltas), [tuple(v) for _, v in sorted(got_calls.items())])
            assert got == expected, text


def test_the_forced_grammar_takes_the_trained_format_only(trained_tokenizer):
    llguidance = pytest.importorskip("llguidance")
    tokenizer = llguidance.LLTokenizer(trained_tokenizer.tk.to_str(), n_vocab=trained_tokenizer.vocab_size,
                                       eos_token=trained_tokenizer.eos_id)
    good = tool_call_text("get_weather", {"city": "Paris", "unit": "celsius"})
    other = tool_call_text("add", {"a": 1, "b": 2})

    def matches(spec, text):
        matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_lark(spec.value), log_level=0)
        return matcher.consume_tokens(trained_tokenizer.encode(text)) and matcher.is_accepting()

    required = tool_structured(TOOLS, "required", True)
    assert matches(required, good) and matches(required, good + "\n" + other)
    assert not matches(required, good.replace('"city": ', '"city":'))  # json.dumps's separators only
    assert not matches(required, tool_call_text("get_weather", {"city": "Paris"}))  # "unit" is required
    assert not matches(tool_structured(TOOLS, "required", False), good + "\n" + other)
    named = tool_structured(TOOLS, {"type": "function", "function": {"name": "add"}})
    assert matches(named, other) and not matches(named, good)
    assert tool_structured(TOOLS, "auto") is None and tool_structured(TOOLS, "none") is None
