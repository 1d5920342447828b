"""The serving moderation policy end to end: real server, real `openai` client, audit log and metrics."""

from __future__ import annotations

import sqlite3

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmforge.safety import rules
from lmforge.safety.moderation import Moderation
from lmforge.safety.policy import PolicyConfig, PolicyModerator
from tests.serve.conftest import KEY, MODEL_NAME, make_server

SAMPLED = {"temperature": 0.8, "seed": 3, "extra_body": {"ignore_eos": True}}  # seeded: the same text every time
SECRET_PROMPT = "Here is my key AKIAQX4B7RZ2LMNO5PQT, what does it do?"


def mkdir(path):
    path.mkdir()
    return path


def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0)


def audit_rows(served) -> list[tuple]:
    served.gateway.audit.flush()
    with sqlite3.connect(served.audit_path) as db:
        return db.execute("SELECT status, finish_reason, moderation FROM requests ORDER BY id").fetchall()


def decisions(served) -> dict[tuple[str, str, str], float]:
    families = text_string_to_metric_families(httpx.get(served.url + "/metrics").text)
    family = next(f for f in families if f.name == "lmforge_moderation_decisions")
    return {(s.labels["direction"], s.labels["category"], s.labels["action"]): s.value
            for s in family.samples if s.name.endswith("_total")}


def test_the_shipped_policy_refuses_secrets_and_redacts_pii_in_prompts(serve_model, tmp_path):
    policy = {"moderation": {"policy": "configs/moderation.yaml", "on_block": "refusal",
                             "refusal_message": "I can't take secrets."}}
    with make_server(serve_model, tmp_path, **policy) as served:
        c = client(served)
        reply = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": SECRET_PROMPT}],
                                          max_tokens=8)
        assert reply.choices[0].message.content == "I can't take secrets."
        assert reply.choices[0].finish_reason == "content_filter" and reply.usage.completion_tokens == 0
        stream = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": SECRET_PROMPT}],
                                           max_tokens=8, stream=True)
        chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "I can't take secrets."
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        # PII in a prompt is replaced before the model sees it (echo shows the prompt it got).
        out = c.completions.create(model=MODEL_NAME, prompt="Mail maria.gonzalez@example-corp.com about lists",
                                   max_tokens=4, temperature=0, echo=True)
        assert out.choices[0].text.startswith("Mail <EMAIL> about lists")
        rows = audit_rows(served)
        assert [r[0] for r in rows] == [200, 200, 200]
        assert rows[0][2].startswith("input block: input blocked: secrets/api_key")
        assert rows[2][2] == "input redact: pii/email: redact"
        counted = decisions(served)
        assert counted[("input", "secrets/api_key", "block")] == 2 and counted[("input", "pii/email", "redact")] == 1


def test_a_blocked_input_can_be_a_400_with_a_moderation_error(serve_model, tmp_path):
    with make_server(serve_model, tmp_path, moderation={"policy": {"backends": ["rules"]}}) as served:
        with pytest.raises(openai.BadRequestError) as caught:
            client(served).completions.create(model=MODEL_NAME, prompt=SECRET_PROMPT, max_tokens=4)
        error = caught.value.response.json()["error"]
        assert error["code"] == "content_filter" and "secrets/api_key" in error["message"]
        assert audit_rows(served)[-1][0] == 400
        assert client(served).completions.create(model=MODEL_NAME, prompt="Lists", max_tokens=2).choices


class Spotter:
    """A backend standing in for a trained classifier that recognises one word, with its place."""

    def __init__(self, category: str, word: str):
        self.categories, self.word = (category,), word

    def scores(self, texts):
        return [{self.categories[0]: float(self.word in t)} for t in texts]

    def spans(self, text):
        at = text.find(self.word)
        return [] if at < 0 else [rules.Span(at, at + len(self.word), self.categories[0], "<REDACTED>")]


def greedy(served, prompt: str, max_tokens: int) -> str:
    return client(served).completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, **SAMPLED).choices[0].text


def late_word(text: str) -> str:
    """A word of the text that first appears after its first 60 characters."""
    for word in text[60:].split():
        if len(word) >= 4 and text.find(word) >= 60:
            return word
    raise AssertionError(f"no late word in {text!r}")


def test_a_stream_that_turns_harmful_is_cut_before_the_bad_window(serve_model, tmp_path):
    prompt, max_tokens = "The list type", 120
    with make_server(serve_model, tmp_path) as plain:
        full = greedy(plain, prompt, max_tokens)
    word = late_word(full)
    policy = PolicyConfig(backends=["rules"], output={"violence": "block", "default": "allow"})
    moderator = PolicyModerator(policy, Moderation([Spotter("violence", word)]))
    with make_server(serve_model, mkdir(tmp_path / "cut"), moderator=moderator, moderation={"stream_window_chars": 16}) as served:
        stream = client(served).completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens,
                                                   stream=True, **SAMPLED)
        events = list(stream)
        sent = "".join(e.choices[0].text for e in events)
        assert events[-1].choices[0].finish_reason == "content_filter"
        assert word not in sent and full.startswith(sent) and len(sent) >= 16
        assert served.engine.stats().running == 0  # the cut choice freed its slot
        assert decisions(served)[("output", "violence", "block")] == 1
        assert audit_rows(served)[-1][1:] == ("content_filter", "output block: output blocked: violence")
        # Non-streamed, the same policy answers with an empty, filtered choice.
        out = client(served).completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=max_tokens, **SAMPLED)
        assert out.choices[0].finish_reason == "content_filter" and out.choices[0].text == ""


def test_a_stream_redacts_what_it_must_and_keeps_the_rest(serve_model, tmp_path):
    messages, max_tokens = [{"role": "user", "content": "Dictionaries are"}], 100

    def chat(served, stream: bool) -> str:
        reply = client(served).chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=max_tokens,
                                                       stream=stream, **SAMPLED)
        if stream:
            return "".join(ch.choices[0].delta.content or "" for ch in reply if ch.choices)
        return reply.choices[0].message.content

    with make_server(serve_model, tmp_path) as plain:
        full = chat(plain, stream=False)
    word = late_word(full)
    policy = PolicyConfig(backends=["rules"], output={"pii": "redact", "default": "allow"})
    moderator = PolicyModerator(policy, Moderation([Spotter("pii/name", word)]))
    with make_server(serve_model, mkdir(tmp_path / "redact"), moderator=moderator, moderation={"stream_window_chars": 8}) as served:
        streamed, whole = chat(served, stream=True), chat(served, stream=False)
    assert whole == full.replace(word, "<REDACTED>", 1)
    assert streamed == whole  # windows and the held-back tail change when text is sent, not what is sent
