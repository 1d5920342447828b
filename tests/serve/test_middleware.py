"""What every response carries: OpenAI's `x-ratelimit-*` headers and, where configured, CORS headers."""

from __future__ import annotations

import httpx
import openai

from lmforge.cli import main
from lmforge.serve.auth import RateLimiter, duration
from tests.serve.conftest import KEY, MODEL_NAME, OTHER_KEY, make_server

AUTH = {"Authorization": f"Bearer {KEY}"}
BODY = {"model": MODEL_NAME, "prompt": "Sets", "max_tokens": 2}
LIMITS = {"requests_per_minute": 3, "tokens_per_minute": 1000}


def limits_of(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("x-ratelimit-")}


def test_reset_durations_are_written_as_openai_writes_them():
    assert [duration(s) for s in (0, 0.0171, 1, 8.64, 60, 360, 3723.5)] == [
        "0s", "18ms", "1s", "8.64s", "1m0s", "6m0s", "1h2m3.5s"]


def test_a_keys_standing_counts_what_is_in_the_window_and_resets_when_its_last_use_leaves():
    limiter = RateLimiter(requests_per_minute=3, tokens_per_minute=100)
    limiter.acquire("alice", 10, now=0.0)
    limiter.acquire("alice", 20, now=5.0)
    state = limiter.state("alice", now=10.0)
    assert (state["requests"].limit, state["requests"].remaining, state["requests"].reset_s) == (3, 1, 55.0)
    assert (state["tokens"].limit, state["tokens"].remaining, state["tokens"].reset_s) == (100, 70, 55.0)
    assert limiter.state("alice", now=70.0)["requests"].remaining == 3
    assert set(RateLimiter(None, 50).state("bob")) == {"tokens"}  # only the limits that are configured


def test_rate_limit_headers_come_on_replies_streams_and_the_429_that_refuses(serve_model, tmp_path):
    with make_server(serve_model, tmp_path, auth=LIMITS) as served:
        url = served.base_url + "/completions"
        first = httpx.post(url, json=BODY, headers=AUTH)
        assert first.status_code == 200
        headers = limits_of(first)
        assert headers["x-ratelimit-limit-requests"] == "3" and headers["x-ratelimit-remaining-requests"] == "2"
        assert headers["x-ratelimit-limit-tokens"] == "1000"
        # Charged what the request used (prompt + reply), once it is done.
        assert int(headers["x-ratelimit-remaining-tokens"]) == 1000 - first.json()["usage"]["total_tokens"]
        assert headers["x-ratelimit-reset-requests"].endswith("s") and headers["x-ratelimit-reset-requests"] != "0s"
        with httpx.stream("POST", url, json={**BODY, "stream": True}, headers=AUTH) as streamed:
            assert streamed.status_code == 200
            assert limits_of(streamed)["x-ratelimit-remaining-requests"] == "1"
            assert b"[DONE]" in streamed.read()
        httpx.post(url, json=BODY, headers=AUTH).raise_for_status()
        refused = httpx.post(url, json=BODY, headers=AUTH)
        assert refused.status_code == 429 and refused.headers["retry-after"]
        assert limits_of(refused)["x-ratelimit-remaining-requests"] == "0"
        # Another key has its own standing; a request without a valid key gets none.
        other = httpx.get(served.base_url + "/models", headers={"Authorization": f"Bearer {OTHER_KEY}"})
        assert limits_of(other)["x-ratelimit-remaining-requests"] == "3"
        assert limits_of(other)["x-ratelimit-reset-tokens"] == "0s"
        assert limits_of(httpx.post(url, json=BODY, headers={"Authorization": "Bearer nope"})) == {}


def test_the_openai_sdk_reads_the_rate_limit_headers_from_a_raw_response(serve_model, tmp_path):
    with make_server(serve_model, tmp_path, auth=LIMITS) as served:
        client = openai.OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-remaining-requests"] == "2"
        assert raw.parse().choices[0].message.role == "assistant"


def test_a_server_without_rate_limits_sends_no_rate_limit_headers(served):
    response = httpx.post(served.base_url + "/completions", json=BODY, headers=AUTH)
    assert response.status_code == 200 and limits_of(response) == {}


def test_without_allowed_origins_a_server_sends_no_cors_headers(served):
    response = httpx.get(served.url + "/health", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers
    preflight = httpx.options(served.base_url + "/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers


def test_allowed_origins_answer_a_browsers_preflight_and_label_its_replies(serve_model, tmp_path):
    cors = {"allowed_origins": ["https://app.example"], "allowed_methods": ["GET", "POST"]}
    with make_server(serve_model, tmp_path, cors=cors, auth=LIMITS) as served:
        preflight = httpx.options(served.base_url + "/chat/completions", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert preflight.status_code == 200  # answered before the API key is asked for
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
        reply = httpx.post(served.base_url + "/completions", json=BODY,
                           headers={**AUTH, "Origin": "https://app.example"})
        assert reply.status_code == 200
        assert reply.headers["access-control-allow-origin"] == "https://app.example"
        # A page may read the rate-limit headers.
        assert "x-ratelimit-remaining-requests" in reply.headers["access-control-expose-headers"]
        elsewhere = httpx.options(served.base_url + "/chat/completions", headers={
            "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
        assert elsewhere.status_code == 400
        assert "access-control-allow-origin" not in elsewhere.headers


def test_lmforge_serve_takes_vllms_cors_flags_as_json_lists_repeats_or_commas(serve_config_of):
    cors = serve_config_of("m", "--allowed-origins", '["https://a.example", "https://b.example"]',
                           "--allowed-methods", "GET,POST", "--allowed-methods", "OPTIONS", "--allow-credentials").cors
    assert cors.allowed_origins == ["https://a.example", "https://b.example"]
    assert cors.allowed_methods == ["GET", "POST", "OPTIONS"] and cors.allowed_headers == ["*"]
    assert cors.allow_credentials
    assert serve_config_of("m").cors.allowed_origins == []  # the default: no CORS
    assert main(["serve", "m", "--allowed-origins", '["https://a.example", 3]']) == 2  # one line, exit 2
