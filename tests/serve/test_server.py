"""The gateway answers the real `openai` SDK, refuses bad input clearly and keeps serving."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmforge.model.decode import generate_tokens
from lmforge.serve.hooks import Decision
from tests.serve.conftest import KEY, MODEL_NAME, OTHER_KEY, make_server

PROMPTS = [
    "The list type", "Dictionaries are", "import os\n", "An exception is raised when", "Strings are",
    "A module is a file", "The with statement", "Classes provide", "Functions defined with def",
    "The tutorial", "Numbers", "Lambda expressions", "The range function", "Tuples and sequences",
    "Sets are", "Errors and exceptions",
]


def client(served, key=KEY, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key=key, max_retries=0, **kwargs)


def greedy_ids(served, prompt_ids: list[int], max_tokens: int) -> list[int]:
    return list(generate_tokens(served.engine.model, prompt_ids, max_tokens, temperature=0,
                                stop_ids=served.engine.tokenizer.stop_ids))


def greedy_text(served, prompt_ids: list[int], max_tokens: int) -> str:
    return served.engine.tokenizer.decode(greedy_ids(served, prompt_ids, max_tokens))


def wait_idle(served, timeout=10.0) -> None:
    deadline = time.monotonic() + timeout
    while served.engine.stats().running + served.engine.stats().waiting and time.monotonic() < deadline:
        time.sleep(0.02)


def test_models_health_and_greedy_completion_equal_the_reference_decoder(served):
    c = client(served)
    assert [m.id for m in c.models.list().data] == [MODEL_NAME]
    assert httpx.get(served.url + "/health").json()["status"] == "ok"
    out = c.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=20, temperature=0)
    tokenizer = served.engine.tokenizer
    assert out.choices[0].text == greedy_text(served, tokenizer.encode_prompt(PROMPTS[0]), 20)
    assert out.usage.prompt_tokens == len(tokenizer.encode_prompt(PROMPTS[0]))
    # Usage counts the tokens generated (a stop token is not one of them), not a re-encoding of the text.
    assert out.usage.completion_tokens == len(greedy_ids(served, tokenizer.encode_prompt(PROMPTS[0]), 20))
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # Token ids as the prompt, as lm-evaluation-harness sends them.
    ids = tokenizer.encode_prompt(PROMPTS[1])
    by_ids = c.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=10, temperature=0)
    assert by_ids.choices[0].text == greedy_text(served, ids, 10)


def test_chat_streaming_with_usage_equals_the_non_streaming_reply(served):
    c = client(served)
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is a list?"}]
    whole = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0)
    ids = served.engine.tokenizer.encode_chat(messages, add_generation_prompt=True)
    assert whole.choices[0].message.content == greedy_text(served, ids, 24)
    assert whole.choices[0].message.role == "assistant"
    chunks = list(c.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == len(ids)


def test_chat_n_seed_stop_and_logprobs(served):
    c = client(served)
    messages = [{"role": "user", "content": "Tell me about modules."}]
    out = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=1.0, seed=3, n=3,
                                    logprobs=True, top_logprobs=2)
    assert [ch.index for ch in out.choices] == [0, 1, 2]
    again = c.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=1.0, seed=3, n=3,
                                      logprobs=True, top_logprobs=2)
    assert [ch.message.content for ch in out.choices] == [ch.message.content for ch in again.choices]
    assert len({ch.message.content for ch in out.choices}) > 1  # the n choices are sampled independently
    for choice in out.choices:
        entries = choice.logprobs.content
        assert entries and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    free = c.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
    text = free.choices[0].text
    stop = text.strip()[2:5]
    cut = c.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=[stop],
                               extra_body={"ignore_eos": True})
    assert cut.choices[0].text == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_echo_logprobs_with_zero_max_tokens_score_the_prompt(served):
    import torch

    ids = served.engine.tokenizer.encode_prompt(PROMPTS[3])
    out = client(served).completions.create(model=MODEL_NAME, prompt=[ids], max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        expected = torch.log_softmax(served.engine.model(torch.tensor([ids]))[0].float(), -1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(expected[i - 1, ids[i]].item(), abs=1e-4)
        assert max(lp.top_logprobs[i].values()) == pytest.approx(expected[i - 1].max().item(), abs=1e-4)
    assert out.choices[0].text == served.engine.tokenizer.decode(ids)


def test_sixteen_concurrent_streams_are_independent_and_correct(served):
    """Greedy streams equal lmforge's generate; seeded streams equal the same request run alone."""
    tokenizer = served.engine.tokenizer
    sampled = {i: dict(temperature=0.9, top_p=0.95, seed=100 + i) for i in range(1, 16, 2)}
    alone = {}
    c = client(served)
    for i, kwargs in sampled.items():
        alone[i] = c.completions.create(model=MODEL_NAME, prompt=PROMPTS[i], max_tokens=24, **kwargs).choices[0].text

    async def one(aclient, i):
        kwargs = sampled.get(i, dict(temperature=0))
        stream = await aclient.completions.create(model=MODEL_NAME, prompt=PROMPTS[i], max_tokens=24, stream=True, **kwargs)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=served.base_url, api_key=KEY, max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(16)))

    steps = served.engine.steps
    texts = asyncio.run(main())
    assert served.engine.steps - steps < 16 * 25  # they were batched, not run one after another
    for i, text in enumerate(texts):
        if i in sampled:
            assert text == alone[i], i
        else:
            assert text == greedy_text(served, tokenizer.encode_prompt(PROMPTS[i]), 24), i
    wait_idle(served)
    assert served.engine.stats().running == 0


def test_async_chat_without_streaming(served):
    async def main():
        async with openai.AsyncOpenAI(base_url=served.base_url, api_key=KEY, max_retries=0) as aclient:
            return await aclient.chat.completions.create(
                model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0)

    out = asyncio.run(main())
    assert out.object == "chat.completion" and out.choices[0].finish_reason in ("stop", "length")


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(served):
    with pytest.raises(openai.AuthenticationError):
        client(served, key="sk-wrong").models.list()
    missing = httpx.get(served.base_url + "/models")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert client(served, key=OTHER_KEY).models.list().data  # a key stored only as its hash
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = served.base_url + "/completions"
    cases = {
        "malformed": (b'{"model": "x", "prompt": ', 400),
        "not an object": (b"[1, 2]", 400),
        "unknown field, ignored": (json.dumps({"model": MODEL_NAME, "prompt": "a", "frobnicate": 1, "max_tokens": 2}).encode(), 200),
        "negative max_tokens": (json.dumps({"model": MODEL_NAME, "prompt": "a", "max_tokens": -1}).encode(), 400),
        "wrong type": (json.dumps({"model": MODEL_NAME, "prompt": {"a": 1}}).encode(), 400),
        "max_tokens over the limit": (json.dumps({"model": MODEL_NAME, "prompt": "a", "max_tokens": 10**6}).encode(), 400),
        "oversized prompt": (json.dumps({"model": MODEL_NAME, "prompt": "word " * 400}).encode(), 400),
        "bad token id": (json.dumps({"model": MODEL_NAME, "prompt": [10**7]}).encode(), 400),
        "unknown model": (json.dumps({"model": "gpt-9", "prompt": "a"}).encode(), 404),
        "body too large": (b'{"model": "' + b"x" * 2_000_000 + b'"}', 413),
    }
    for name, (body, status) in cases.items():
        response = httpx.post(url, content=body, headers=headers)
        assert response.status_code == status, (name, response.text)
        if status != 200:
            error = response.json()["error"]
            assert error["message"] and error["type"], name
    # Fields newer SDKs send are ignored (vLLM's behaviour), not refused.
    tolerated = client(served).completions.create(model=MODEL_NAME, prompt="a", max_tokens=2,
                                                  extra_body={"frobnicate": 1, "prompt_cache_key": "k"})
    assert tolerated.choices[0].text is not None
    with pytest.raises(openai.BadRequestError, match="prompt has"):
        client(served).chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "word " * 400}])
    assert httpx.post(served.url + "/nowhere", headers=headers).status_code == 404
    out = client(served).completions.create(model=MODEL_NAME, prompt="Lists", max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served, monkeypatch):
    decode = served.engine._decode

    def slow_decode(seqs):  # the tiny model is too fast to disconnect from: ~25 ms a token
        time.sleep(0.025)
        decode(seqs)

    monkeypatch.setattr(served.engine, "_decode", slow_decode)
    body = {"model": MODEL_NAME, "prompt": PROMPTS[5], "max_tokens": 100, "stream": True, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", served.base_url + "/completions", json=body, headers=headers) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 2:
                break
        assert served.engine.stats().running == 1
    deadline = time.monotonic() + 10
    while served.engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert served.engine.stats().running == 0 and served.engine.stats().kv_cache_usage == 0
    time.sleep(0.1)  # the server's side of the stream finishes its bookkeeping
    served.gateway.audit.flush()
    with sqlite3.connect(served.audit_path) as db:
        row = db.execute("SELECT status, completion_tokens FROM requests ORDER BY id DESC LIMIT 1").fetchone()
    assert row[0] == 499 and row[1] < 100


def test_tokenize_detokenize_and_tokenizer_info(served):
    headers = {"Authorization": f"Bearer {KEY}"}
    tokenizer = served.engine.tokenizer
    ids = httpx.post(served.url + "/tokenize", json={"prompt": "The list", "add_special_tokens": False}, headers=headers).json()
    assert ids["tokens"] == tokenizer.encode("The list") and ids["count"] == len(ids["tokens"])
    with_bos = httpx.post(served.url + "/tokenize", json={"prompt": "The list"}, headers=headers).json()["tokens"]
    assert with_bos == tokenizer.encode_prompt("The list")
    text = httpx.post(served.url + "/detokenize", json={"tokens": ids["tokens"]}, headers=headers).json()["prompt"]
    assert text == "The list"
    info = httpx.get(served.url + "/tokenizer_info", headers=headers).json()
    assert info["eos_token"] == tokenizer.eos_token and info["model_max_length"] == served.engine.max_len


def metric_samples(served) -> dict[tuple, float]:
    """Every sample of /metrics: (sample name, sorted labels) -> value."""
    families = text_string_to_metric_families(httpx.get(served.url + "/metrics").text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_metrics_parse_and_count_what_happened(served):
    wait_idle(served)
    before = metric_samples(served)
    out = client(served).completions.create(model=MODEL_NAME, prompt="Sets", max_tokens=5, temperature=0,
                                            extra_body={"ignore_eos": True})
    with pytest.raises(openai.AuthenticationError):
        client(served, key="nope").completions.create(model=MODEL_NAME, prompt="Sets", max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        client(served).completions.create(model=MODEL_NAME, prompt="Sets", max_tokens=-1)
    too_large = httpx.post(served.base_url + "/completions", content=b"x" * 2_000_000,
                           headers={"Authorization": f"Bearer {KEY}"})
    assert too_large.status_code == 413
    after = metric_samples(served)

    def added(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    model = {"model_name": MODEL_NAME}
    for status in ("200", "401", "400", "413"):  # the body limit's answers are counted too
        assert added("lmforge_requests_total", route="/v1/completions", status=status, **model) == 1, status
    assert out.usage.completion_tokens == 5
    # vLLM's names, so vLLM's dashboards and autoscalers read lmforge as they are.
    assert added("vllm:generation_tokens_total", **model) == 5
    assert added("vllm:prompt_tokens_total", **model) == out.usage.prompt_tokens
    assert added("vllm:request_prompt_tokens_sum", **model) == out.usage.prompt_tokens
    assert added("vllm:request_generation_tokens_sum", **model) == 5
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
                      "request_prefill_time_seconds", "request_decode_time_seconds"):
        assert added(f"vllm:{histogram}_count", **model) == 1, histogram
    # Four gaps between five tokens, at most (the engine may hand over two tokens at once).
    assert 1 <= added("vllm:inter_token_latency_seconds_count", **model) <= 4
    assert added("vllm:time_per_output_token_seconds_count", **model) == added(
        "vllm:inter_token_latency_seconds_count", **model)
    assert added("vllm:request_success_total", finished_reason="length", **model) == 1
    assert after[("vllm:num_preemptions_total", tuple(model.items()))] == 0
    assert after[("vllm:num_requests_running", tuple(model.items()))] == 0
    assert after[("vllm:kv_cache_usage_perc", tuple(model.items()))] == 0  # idle: every slot freed
    assert after[("vllm:gpu_cache_usage_perc", tuple(model.items()))] == 0


def test_metrics_use_vllm_buckets_and_the_served_model_name(served):
    client(served).completions.create(model=MODEL_NAME, prompt="Sets", max_tokens=2)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(served.url + "/metrics").text)}
    ttft = families["vllm:time_to_first_token_seconds"]
    assert ttft.type == "histogram"
    bounds = [s.labels["le"] for s in ttft.samples if s.name.endswith("_bucket")]
    assert bounds[:3] == ["0.001", "0.005", "0.01"] and bounds[-2:] == ["2560.0", "+Inf"]
    tokens = families["vllm:request_prompt_tokens"]
    bounds = [float(s.labels["le"]) for s in tokens.samples if s.name.endswith("_bucket")][:-1]
    assert bounds[:4] == [1, 2, 5, 10] and bounds[-1] <= served.engine.max_len
    for family in families.values():
        if family.name.startswith(("vllm:", "lmforge_")):
            assert all(s.labels.get("model_name") == MODEL_NAME for s in family.samples), family.name


def test_audit_log_records_key_names_never_keys(served):
    client(served).completions.create(model=MODEL_NAME, prompt="Sets", max_tokens=3, temperature=0)
    served.gateway.audit.flush()
    with sqlite3.connect(served.audit_path) as db:
        rows = db.execute("SELECT key_id, model, prompt_tokens, status, moderation FROM requests").fetchall()
    assert ("alice", MODEL_NAME) in {(r[0], r[1]) for r in rows if r[3] == 200}
    assert all(r[4] == "allowed" for r in rows if r[3] == 200)
    raw = served.audit_path.read_bytes() + b"".join(p.read_bytes() for p in served.audit_path.parent.glob("audit.sqlite-*"))
    assert KEY.encode() not in raw and OTHER_KEY.encode() not in raw


def test_rate_limits_answer_429_with_retry_after(serve_model, tmp_path):
    with make_server(serve_model, tmp_path, auth={"requests_per_minute": 2}) as served:
        c = client(served)
        for _ in range(2):
            c.completions.create(model=MODEL_NAME, prompt="a", max_tokens=1)
        with pytest.raises(openai.RateLimitError) as caught:
            c.completions.create(model=MODEL_NAME, prompt="a", max_tokens=1)
        assert int(caught.value.response.headers["Retry-After"]) >= 1
        assert client(served, key=OTHER_KEY).completions.create(model=MODEL_NAME, prompt="a", max_tokens=1).choices


def test_a_full_queue_answers_503_and_moderation_hooks_block(serve_model, tmp_path, monkeypatch):
    class Strict:
        block_output = False

        def check_input(self, texts):
            return Decision(False, "forbidden word") if any("forbidden" in t for t in texts) else Decision()

        def check_output(self, text):
            return Decision(False, "too long") if self.block_output and len(text) > 10 else Decision()

    strict = Strict()

    with make_server(serve_model, tmp_path, moderator=strict, engine={"max_num_seqs": 1},
                     limits={"max_queue": 0}, moderation={"stream_window_chars": 1}) as served:
        decode, gate = served.engine._decode, threading.Event()
        # The running request is held at its first decode step until the full queue is seen.
        monkeypatch.setattr(served.engine, "_decode", lambda seqs: (gate.wait(10), decode(seqs)))
        body = {"model": MODEL_NAME, "prompt": "Lists", "max_tokens": 200, "stream": True, "ignore_eos": True}
        headers = {"Authorization": f"Bearer {KEY}"}
        c = client(served)
        with httpx.stream("POST", served.base_url + "/completions", json={**body, "max_tokens": 100},
                          headers=headers) as response:
            # Wait for it to hold the one slot rather than for its first event: a sampled first
            # token may have no text yet (a partial character), and the next one waits at the gate.
            # The response stays open, unread: a closed one would cancel the request.
            assert response.status_code == 200
            deadline = time.monotonic() + 30
            while served.engine.stats().running != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert served.engine.stats().running == 1
            with pytest.raises(openai.InternalServerError) as caught:
                c.completions.create(model=MODEL_NAME, prompt="a", max_tokens=1)
            assert caught.value.status_code == 503 and caught.value.response.headers["Retry-After"]
            gate.set()
        wait_idle(served)
        monkeypatch.setattr(served.engine, "_decode", decode)
        strict.block_output = True
        with pytest.raises(openai.BadRequestError, match="moderation"):
            c.completions.create(model=MODEL_NAME, prompt="a forbidden thing", max_tokens=1)
        out = c.completions.create(model=MODEL_NAME, prompt="Lists", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].finish_reason == "content_filter" and out.choices[0].text == ""
        served.gateway.audit.flush()
        with sqlite3.connect(served.audit_path) as db:
            outcomes = [r[0] for r in db.execute("SELECT moderation FROM requests")]
        assert "input block: forbidden word" in outcomes and "output block: too long" in outcomes


def test_unknown_request_fields_are_ignored_once_logged_or_refused_with_strict_params(caplog):
    from lmforge.serve.admission import parse_body
    from lmforge.serve.errors import OpenAIError
    from lmforge.serve.protocol import ChatCompletionRequest

    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi", "cache": 1}],
                      "frobnicate_once": True, "stream_options": {"include_usage": True, "later": 2}}).encode()
    with caplog.at_level("WARNING", logger="lmforge.serve.admission"):
        body = parse_body(raw, ChatCompletionRequest)
        parse_body(raw, ChatCompletionRequest)
    assert body.messages[0].content == "hi" and body.stream_options.include_usage
    warned = [r.getMessage() for r in caplog.records if "frobnicate_once" in r.getMessage()]
    assert len(warned) == 1  # one line per field name, not per request
    assert any("messages.cache" in r.getMessage() for r in caplog.records)
    with pytest.raises(OpenAIError, match="Unrecognized request argument supplied: ") as err:
        parse_body(raw, ChatCompletionRequest, strict=True)
    assert err.value.status == 400
    # A real mistake beside an unknown field is still the client's error.
    bad = json.dumps({"model": "m", "messages": [], "frobnicate": 1}).encode()
    with pytest.raises(OpenAIError, match="messages"):
        parse_body(bad, ChatCompletionRequest)


def test_logit_bias_and_vllm_sampling_extras_go_through_the_openai_client(served):
    c = client(served)
    free = c.completions.create(model=MODEL_NAME, prompt="Lists", max_tokens=6, temperature=0,
                                extra_body={"ignore_eos": True})
    banned = c.completions.create(model=MODEL_NAME, prompt="Lists", max_tokens=6, temperature=0,
                                  logit_bias={"7": 100}, extra_body={"ignore_eos": True})
    assert banned.choices[0].text != free.choices[0].text
    extras = c.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "Name a list method."}], max_tokens=8,
        temperature=0.7, seed=1, extra_body={"min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 2,
                                             "stop_token_ids": [3]})
    assert extras.choices[0].finish_reason in ("stop", "length")
    for bad, match in (({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"7": 500}}, "logit_bias"),
                       ({"extra_body": {"stop_token_ids": [10**7]}}, "stop_token_ids")):
        with pytest.raises(openai.BadRequestError, match=match):
            c.completions.create(model=MODEL_NAME, prompt="a", max_tokens=2, **bad)
