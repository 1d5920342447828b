"""Structured outputs: every reply matches its schema, regex or choices, whatever its budget."""

from __future__ import annotations

import json
import threading
from typing import Annotated

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams
from lmforge.serve.structured import StructuredSpec
from tests.serve.conftest import KEY, MODEL_NAME
from tests.serve.test_server import client, greedy_text

pytest.importorskip("llguidance")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "languages": {"type": "array", "items": {"type": "string", "enum": ["python", "c", "rust"]}},
        "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "languages", "address"],
    "additionalProperties": False,
}


class Person(BaseModel):
    """Bounded, so even a small model's reply ends by itself (finish `stop`), which `parse` needs."""

    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=150)
    tags: list[Annotated[str, Field(max_length=8)]] = Field(max_length=3)


def _schema_format(schema: dict, name: str = "person") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_every_budget_gives_a_reply_that_parses_and_validates(serve_model):
    """The closing walk: from the shortest reply's length up, a cut reply still validates (finish
    `length`), sampled or greedy, batched together."""
    model, tokenizer = serve_model
    engine = Engine(model, tokenizer)
    spec = StructuredSpec("json_schema", PERSON)
    shortest = engine.check_structured(spec)
    assert shortest is not None and shortest > 10
    prompt = tokenizer.encode_prompt("A person record:")
    params = [SamplingParams(max_tokens=budget, temperature=temperature, seed=budget, structured=spec)
              for budget in range(shortest, shortest + 30, 5) for temperature in (0.0, 1.0)]
    results = engine.run_to_completion([prompt] * len(params), params)
    for p, result in zip(params, results, strict=True):
        jsonschema.validate(json.loads(result.text), PERSON)
        assert len(result.token_ids) <= p.max_tokens
        assert result.finish_reason in ("stop", "length")
    assert any(r.finish_reason == "length" for r in results)
    assert engine.grammars.mask_seconds > 0


def test_choice_regex_and_json_object_constrain_the_engine(serve_model):
    model, tokenizer = serve_model
    engine = Engine(model, tokenizer)
    prompt = tokenizer.encode_prompt("The answer is")
    specs = [StructuredSpec("choice", ("yes", "no", "it depends")), StructuredSpec("regex", r"[0-9]{3}-[0-9]{4}"),
             StructuredSpec("json_object"), StructuredSpec("lark", 'start: "a" B\nB: /[xyz]{2,4}/')]
    for seed in range(4):
        texts = [c.text for c in engine.run_to_completion(
            [prompt] * len(specs), [SamplingParams(max_tokens=40, temperature=1.0, seed=seed, structured=s) for s in specs])]
        assert texts[0] in ("yes", "no", "it depends")
        assert len(texts[1]) == 8 and texts[1][3] == "-" and texts[1].replace("-", "").isdigit()
        assert isinstance(json.loads(texts[2]), dict)
        assert texts[3][0] == "a" and 3 <= len(texts[3]) <= 5 and set(texts[3][1:]) <= set("xyz")


def test_the_openai_sdk_parses_a_strict_json_schema_reply_into_its_model(served):
    c = client(served)
    messages = [{"role": "user", "content": "Describe a person."}]
    parse = c.chat.completions.parse if hasattr(c.chat.completions, "parse") else c.beta.chat.completions.parse
    for temperature in (0.0, 1.0):
        reply = parse(model=MODEL_NAME, messages=messages, response_format=Person, temperature=temperature,
                      seed=7, max_tokens=200)
        assert reply.choices[0].finish_reason == "stop"
        person = reply.choices[0].message.parsed
        assert isinstance(person, Person) and len(person.name) <= 12 and 0 <= person.age <= 150


def test_json_schema_replies_validate_streamed_cut_short_and_beside_free_requests(served):
    c = client(served)
    messages = [{"role": "user", "content": "Who are you?"}]
    fmt = _schema_format(PERSON)
    free_ids = served.engine.tokenizer.encode_chat(messages, add_generation_prompt=True)
    expected_free = greedy_text(served, free_ids, 24)
    results, errors = {}, []

    def run(i):
        try:
            if i % 2:  # an unconstrained request in the same batch is untouched by the others' masks
                results[i] = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24,
                                                       temperature=0).choices[0].message.content
            else:
                reply = c.chat.completions.create(model=MODEL_NAME, messages=messages, response_format=fmt,
                                                  max_tokens=60 + 7 * i, temperature=1.0, seed=i)
                results[i] = (reply.choices[0].message.content, reply.choices[0].finish_reason)
        except Exception as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i, value in results.items():
        if i % 2:
            assert value == expected_free
        else:
            jsonschema.validate(json.loads(value[0]), PERSON)
    # Streamed: the deltas join to a reply that validates.
    stream = c.chat.completions.create(model=MODEL_NAME, messages=messages, response_format=fmt, max_tokens=70,
                                       temperature=1.0, seed=3, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_and_vllm_constraints_through_chat_and_completions(served):
    c = client(served)
    messages = [{"role": "user", "content": "Pick one."}]
    obj = c.chat.completions.create(model=MODEL_NAME, messages=messages, response_format={"type": "json_object"},
                                    max_tokens=40, temperature=1.0, seed=1)
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    choice = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=1.0, seed=2,
                                       extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert choice.choices[0].message.content in ("red", "green", "blue")
    legacy = c.completions.create(model=MODEL_NAME, prompt="The code is", max_tokens=10, temperature=1.0, seed=3,
                                  extra_body={"guided_regex": "[A-Z]{2}[0-9]{2}"})
    text = legacy.choices[0].text
    assert len(text) == 4 and text[:2].isupper() and text[2:].isdigit()
    schema = c.completions.create(model=MODEL_NAME, prompt="Record:", max_tokens=90, temperature=0,
                                  extra_body={"response_format": _schema_format(PERSON)})  # vLLM takes it here too
    jsonschema.validate(json.loads(schema.choices[0].text), PERSON)


def test_bad_structured_requests_answer_400_with_the_reason(served):
    c = client(served)
    messages = [{"role": "user", "content": "Hi"}]
    cases = [
        ({"response_format": _schema_format({"type": "no-such-type"})}, "no-such-type"),
        ({"response_format": {"type": "json_schema"}}, "json_schema"),
        ({"extra_body": {"guided_regex": "[a-"}}, "regex"),
        ({"response_format": {"type": "json_object"}, "extra_body": {"guided_choice": ["a", "b"]}}, "one structured"),
        ({"response_format": _schema_format(PERSON), "max_tokens": 5}, "shortest reply"),
    ]
    for kwargs, words in cases:
        kwargs.setdefault("max_tokens", 20)
        with pytest.raises(openai.BadRequestError) as err:
            c.chat.completions.create(model=MODEL_NAME, messages=messages, **kwargs)
        assert words in err.value.message
    # The server keeps serving.
    ok = openai.OpenAI(base_url=served.base_url, api_key=KEY).chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")
