"""/v1/responses answers the real `openai` SDK as the chat pipeline would, streamed or whole, and
continues a stored conversation."""

from __future__ import annotations

import openai
import pytest

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
