"""/v1/responses answers the real `openai` SDK as the chat pipeline would, streamed or whole, and
continues a stored conversation."""

from __future__ import annotations

import json
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.serve.conftest import KEY, MODEL_NAME, OTHER_KEY


def client(served, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key=key, max_retries=0)


def chat_text(c: openai.OpenAI, messages: list[dict], max_tokens: int) -> str:
    out = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens, temperature=0)
    return out.choices[0].message.content


def test_a_response_says_what_the_same_chat_completion_says(served):
    c = client(served)
    r = c.responses.create(model=MODEL_NAME, instructions="Answer briefly.", input="The list type",
                           max_output_tokens=12, temperature=0)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "The list type"}]
    assert r.id.startswith("resp_") and r.object == "response" and r.model == MODEL_NAME
    assert r.output_text == chat_text(c, messages, 12)
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    prompt = served.engine.tokenizer.encode_chat(messages, add_generation_prompt=True)
    assert r.usage.input_tokens == len(prompt)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.instructions == "Answer briefly." and r.temperature == 0


def test_a_reply_cut_by_max_output_tokens_is_incomplete(served):
    r = client(served).responses.create(model=MODEL_NAME, input="Strings are", max_output_tokens=3, temperature=0,
                                        metadata={"run": "7"})
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"
    assert r.metadata == {"run": "7"}


def test_streamed_events_come_in_openais_order_and_their_deltas_join_to_the_reply(served):
    c = client(served)
    whole = c.responses.create(model=MODEL_NAME, input="Dictionaries are", max_output_tokens=16, temperature=0)
    events = list(c.responses.create(model=MODEL_NAME, input="Dictionaries are", max_output_tokens=16,
                                     temperature=0, stream=True))
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)
    assert kinds[4 + len(deltas):] == ["response.output_text.done", "response.content_part.done",
                                       "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert "".join(deltas) == events[-4].text == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens == 16
    assert events[0].response.status == "in_progress" and final.id == events[0].response.id
    assert c.responses.retrieve(final.id).output_text == final.output_text  # a streamed response is stored too


def test_previous_response_id_continues_the_stored_conversation(served):
    c = client(served)
    first = c.responses.create(model=MODEL_NAME, input="The list type", max_output_tokens=8, temperature=0)
    second = c.responses.create(model=MODEL_NAME, input="Tuples and sequences", previous_response_id=first.id,
                                max_output_tokens=8, temperature=0)
    conversation = [{"role": "user", "content": "The list type"},
                    {"role": "assistant", "content": first.output_text},
                    {"role": "user", "content": "Tuples and sequences"}]
    prompt = served.engine.tokenizer.encode_chat(conversation, add_generation_prompt=True)
    assert second.usage.input_tokens == len(prompt) > first.usage.input_tokens
    assert second.output_text == chat_text(c, conversation, 8)
    assert second.previous_response_id == first.id
    assert c.responses.retrieve(first.id).output_text == first.output_text
    with pytest.raises(openai.NotFoundError, match="Previous response with id 'resp_nope' not found"):
        c.responses.create(model=MODEL_NAME, input="Sets are", previous_response_id="resp_nope")


def test_a_stored_response_is_private_to_its_key_and_store_false_keeps_nothing(served):
    c = client(served)
    kept = c.responses.create(model=MODEL_NAME, input="Sets are", max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client(served, OTHER_KEY).responses.retrieve(kept.id)
    with pytest.raises(openai.NotFoundError):
        client(served, OTHER_KEY).responses.create(model=MODEL_NAME, input="x", previous_response_id=kept.id)
    unstored = c.responses.create(model=MODEL_NAME, input="Sets are", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)
    c.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(kept.id)


WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}
WEATHER_CHAT = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def tool_server(serve_model, tmp_path_factory):
    """The shared tiny model with a 1024-token context (RoPE tables recomputed, the same weights):
    a tool listing alone outgrows its 128 tokens."""
    from lmforge.model import Transformer
    from tests.serve.conftest import make_server

    model, tokenizer = serve_model
    longer = Transformer(model.config.model_copy(update={"max_seq_len": 1024}))
    longer.load_state_dict(model.state_dict())
    with make_server((longer.eval(), tokenizer), tmp_path_factory.mktemp("rtools"), engine={"max_num_seqs": 4}) as s:
        yield s


def test_a_required_tool_call_is_a_function_call_item_and_its_output_continues_the_conversation(tool_server):
    c = client(tool_server)
    first = c.responses.create(model=MODEL_NAME, input=ASK, tools=[WEATHER], tool_choice="required", temperature=0,
                               max_output_tokens=120, parallel_tool_calls=False)
    calls = [item for item in first.output if item.type == "function_call"]
    assert first.status == "completed" and len(calls) == 1 and first.parallel_tool_calls is False
    chat = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": ASK}], tools=[WEATHER_CHAT],
                                     tool_choice="required", temperature=0, max_tokens=120,
                                     parallel_tool_calls=False)
    assert [(t.function.name, t.function.arguments) for t in chat.choices[0].message.tool_calls] == [
        (call.name, call.arguments) for call in calls]
    for call in calls:
        assert call.call_id.startswith("call_") and call.name == "get_weather"
        assert json.loads(call.arguments)["unit"] in ("celsius", "fahrenheit")
    # The Agents SDK's loop: the tool's result goes back as a function_call_output after the stored response.
    outputs = [{"type": "function_call_output", "call_id": call.call_id, "output": '{"temperature": 18}'}
               for call in calls]
    second = c.responses.create(model=MODEL_NAME, previous_response_id=first.id, input=outputs, tools=[WEATHER],
                                tool_choice="none", temperature=0, max_output_tokens=8)
    messages = [{"role": "user", "content": ASK},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                    for call in calls]},
                *[{"role": "tool", "tool_call_id": o["call_id"], "content": o["output"]} for o in outputs]]
    prompt = tool_server.engine.tokenizer.encode_chat(messages, add_generation_prompt=True, tools=[WEATHER_CHAT])
    assert second.usage.input_tokens == len(prompt)
    # The same conversation sent whole as input items, with nothing stored, reads the same.
    replayed = [{"role": "user", "content": ASK},
                *[{"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments}
                  for call in calls], *outputs]
    whole = c.responses.create(model=MODEL_NAME, input=replayed, tools=[WEATHER], tool_choice="none", temperature=0,
                               max_output_tokens=8, store=False)
    assert whole.usage.input_tokens == second.usage.input_tokens and whole.output_text == second.output_text


def test_a_streamed_tool_call_sends_its_arguments_events_and_the_same_call(tool_server):
    c = client(tool_server)
    kwargs = {"model": MODEL_NAME, "input": ASK, "tools": [WEATHER], "temperature": 0, "max_output_tokens": 120,
              "tool_choice": {"type": "function", "name": "get_weather"}, "parallel_tool_calls": False}
    whole = c.responses.create(**kwargs)
    events = list(c.responses.create(**kwargs, stream=True))
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    # The arguments stream as the model writes them, in more than one piece.
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     *["response.function_call_arguments.delta"] * len(deltas),
                     "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert len(deltas) > 1 and events[2].item.name == "get_weather" and events[2].item.arguments == ""
    call, expected = events[-2].item, whole.output[0]
    assert call.type == expected.type == "function_call" and len(whole.output) == 1
    assert call.name == expected.name and call.arguments == "".join(deltas) == events[-3].arguments == expected.arguments
    assert call.call_id == events[2].item.call_id == events[-1].response.output[0].call_id
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_a_json_schema_text_format_constrains_the_reply(served):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 12}},
              "required": ["answer"], "additionalProperties": False}
    r = client(served).responses.create(
        model=MODEL_NAME, input="Answer in JSON.", temperature=0, max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}})
    assert set(json.loads(r.output_text)) == {"answer"}
    assert r.text.format.type == "json_schema" and r.text.format.name == "answer"


class Weather(BaseModel):
    summary: str = Field(max_length=16)


def test_the_openai_agents_sdk_runs_its_tool_loop_against_the_server(tool_server):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)  # nothing leaves the machine
    calls = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "London"]) -> str:  # a bounded argument: the tiny model's strings run on
        """The current weather in a city."""
        calls.append(city)
        return "18 degrees and sunny"

    model = agents.OpenAIResponsesModel(model=MODEL_NAME, openai_client=openai.AsyncOpenAI(
        base_url=tool_server.base_url, api_key=KEY, max_retries=0))
    # A structured output type (text.format json_schema) makes the tiny model's last answer end by
    # itself: an answer cut at max_output_tokens is an error to the SDK.
    agent = agents.Agent(name="weather", instructions="Answer with the weather.", model=model, tools=[get_weather],
                         output_type=Weather,
                         model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=120,
                                                             parallel_tool_calls=False))
    result = agents.Runner.run_sync(agent, ASK, max_turns=4)
    # The forced call ran the Python function; tool_choice then resets to auto and the model answers.
    assert len(calls) >= 1 and set(calls) <= {"Paris", "London"}
    assert isinstance(result.final_output, Weather)
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"] and kinds[-1] == "message_output_item"


@pytest.mark.parametrize("fields", [
    {"input": {"role": "user"}},
    {"input": [{"role": "wizard", "content": "x"}]},
    {"input": [{"type": "input_image", "image_url": "http://x"}]},
    {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
    {"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "[1]"}]},
    {"input": [{"type": "function_call_output", "output": "no call id"}]},
    {"input": []},
    {"input": "x", "max_output_tokens": 0},
    {"input": "x", "max_output_tokens": 10**9},
    {"input": "x", "temperature": 3},
    {"input": "x", "tool_choice": "required"},
    {"input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
    {"input": "x", "tools": [{"type": "web_search"}]},
    {"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}},
    {"input": "x", "metadata": {"k": 1}},
    {"input": "x" * 5000},
    {"input": "x", "model": "gpt-9"},
])
def test_bad_responses_requests_are_4xx_envelopes(served, fields):
    body = {"model": MODEL_NAME, "max_output_tokens": 4, **fields}
    reply = httpx.post(served.base_url + "/responses", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert 400 <= reply.status_code < 500 and set(reply.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_fields_inside_input_items_and_message_parts_are_ignored_not_a_500(served):
    headers = {"Authorization": f"Bearer {KEY}"}
    item = {"role": "user", "content": [{"type": "input_text", "text": "Sets are", "detail": "high"}], "foo": 1}
    reply = httpx.post(served.base_url + "/responses", headers=headers,
                       json={"model": MODEL_NAME, "input": [item], "max_output_tokens": 2})
    assert reply.status_code == 200 and reply.json()["status"] == "incomplete"
    chat = httpx.post(served.base_url + "/chat/completions", headers=headers, json={
        "model": MODEL_NAME, "max_tokens": 2, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Sets are", "cache_control": {"type": "ephemeral"}}]}]})
    assert chat.status_code == 200 and chat.json()["choices"][0]["finish_reason"] == "length"
