"""Hostile clients: malformed requests of every kind, mixed with valid ones, from several clients at once.

A client's mistake is never the server's error: every malformed request is answered 4xx in
OpenAI's error envelope, every valid one mixed in is answered 200, the server logs no traceback,
still answers afterwards, keeps its audit log and does not grow in memory.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import random
import resource
import socket
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from tests.serve.conftest import KEY, MODEL_NAME, make_server

CLIENTS = 8
ROUNDS = 3  # of the mixed load below, after one round that warms up allocators and caches
MiB = 1 << 20


@dataclass
class Case:
    name: str
    kind: str  # valid | malformed | dropped
    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] | None = None
    stream: bool = False
    chunked: bool = False
    truncated: bool = False  # the client sends part of the body, then goes away


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


def completion(**fields) -> bytes:
    return body(**{"model": MODEL_NAME, "prompt": "The list type", "max_tokens": 4, **fields})


def chat(**fields) -> bytes:
    return body(**{"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields})


def raw(text: str) -> bytes:
    """JSON written by hand: `\\ud800` stays an escape in the bytes, as a hostile client sends it."""
    return text.replace("MODEL", MODEL_NAME).encode()


def cases() -> list[Case]:
    c, chat_path, tok, detok = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
    valid = [
        Case("text prompt", "valid", "POST", c, completion(temperature=0)),
        Case("token-id prompt", "valid", "POST", c, completion(prompt=[1, 200, 300, 5])),
        Case("two prompts, n=2", "valid", "POST", c, completion(prompt=["Sets", "Lists"], n=2, seed=1)),
        Case("echo logprobs, max_tokens 0", "valid", "POST", c, completion(max_tokens=0, echo=True, logprobs=2)),
        Case("chat", "valid", "POST", chat_path, chat(temperature=0.7, seed=5)),
        Case("chat stream", "valid", "POST", chat_path, chat(stream=True), stream=True),
        Case("completion stream", "valid", "POST", c, completion(stream=True, logprobs=1), stream=True),
        Case("emoji as a surrogate pair", "valid", "POST", chat_path,
             raw('{"model": "MODEL", "max_tokens": 4, "messages": [{"role": "user", "content": "hi \\ud83d\\ude00"}]}')),
        Case("temperature 1e-300 is greedy", "valid", "POST", c, completion(temperature=1e-300)),
        Case("seed at the int64 bound", "valid", "POST", c, completion(seed=2**63 - 1, n=2)),
        Case("tokenize", "valid", "POST", tok, body(prompt="The list type")),
        Case("detokenize", "valid", "POST", detok, body(tokens=[1, 200, 300])),
        Case("models", "valid", "GET", "/v1/models"),
    ]
    malformed = [
        # Token ids that are negative or outside the vocabulary (1024 in the tiny model).
        Case("negative id", "malformed", "POST", c, completion(prompt=[5, -1, 7])),
        Case("id past the vocabulary", "malformed", "POST", c, completion(prompt=[10**7])),
        Case("id past int64", "malformed", "POST", c, completion(prompt=[2**64 + 1])),
        Case("bad id in a batch", "malformed", "POST", c, completion(prompt=[[1, 2], [3, -4]])),
        Case("empty id prompt", "malformed", "POST", c, completion(prompt=[[]])),
        Case("detokenize a negative id", "malformed", "POST", detok, body(tokens=[-3])),
        Case("detokenize a huge id", "malformed", "POST", detok, body(tokens=[10**40])),
        # Lone UTF-16 surrogates, sent as JSON escapes.
        Case("surrogate in chat", "malformed", "POST", chat_path,
             raw('{"model": "MODEL", "messages": [{"role": "user", "content": "a\\ud800b"}]}')),
        Case("low surrogate in chat parts", "malformed", "POST", chat_path,
             raw('{"model": "MODEL", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}')),
        Case("surrogate in a prompt", "malformed", "POST", c, raw('{"model": "MODEL", "prompt": ["ok", "x\\udbff"]}')),
        Case("surrogate in stop", "malformed", "POST", c, raw('{"model": "MODEL", "prompt": "a", "stop": ["\\ud800"]}')),
        Case("surrogate in model", "malformed", "POST", c, raw('{"model": "\\ud800", "prompt": "a"}')),
        Case("surrogate in user", "malformed", "POST", chat_path,
             raw('{"model": "MODEL", "user": "\\udc00", "messages": [{"role": "user", "content": "a"}]}')),
        Case("surrogate in a key", "malformed", "POST", c, raw('{"model": "MODEL", "prompt": "a", "\\ud800": 1}')),
        Case("surrogate to tokenize", "malformed", "POST", tok, raw('{"prompt": "\\ud800"}')),
        # Wrong types.
        Case("prompt an object", "malformed", "POST", c, completion(prompt={"a": 1})),
        Case("float ids", "malformed", "POST", c, completion(prompt=[1.5, 2])),
        Case("boolean ids", "malformed", "POST", c, completion(prompt=[True, False])),
        Case("mixed prompt list", "malformed", "POST", c, completion(prompt=["a", 1])),
        Case("messages a string", "malformed", "POST", chat_path, chat(messages="hi")),
        Case("unknown role", "malformed", "POST", chat_path, chat(messages=[{"role": "wizard", "content": "x"}])),
        Case("no messages", "malformed", "POST", chat_path, chat(messages=[])),
        Case("temperature a word", "malformed", "POST", c, completion(temperature="hot")),
        Case("n a word", "malformed", "POST", chat_path, chat(n="many")),
        Case("stop a number", "malformed", "POST", c, completion(stop=5)),
        Case("stream a list", "malformed", "POST", c, completion(stream=[1])),
        Case("logprobs a string", "malformed", "POST", c, completion(logprobs="x")),
        Case("unknown field", "valid", "POST", c, completion(frobnicate=1)),  # ignored, as vLLM
        Case("unknown nested field", "valid", "POST", chat_path, chat(stream_options={"include_usage": True, "x": 1})),
        Case("no model", "malformed", "POST", c, body(prompt="a")),
        Case("unknown model", "malformed", "POST", c, completion(model="gpt-9")),
        Case("body an array", "malformed", "POST", c, b"[1, 2]"),
        Case("body null", "malformed", "POST", chat_path, b"null"),
        # Absurd sizes.
        Case("max_tokens 10^9", "malformed", "POST", c, completion(max_tokens=10**9)),
        Case("negative max_tokens", "malformed", "POST", c, completion(max_tokens=-1)),
        Case("n 10^6", "malformed", "POST", chat_path, chat(n=10**6)),
        Case("logprobs 10^6", "malformed", "POST", c, completion(logprobs=10**6)),
        Case("top_logprobs 50", "malformed", "POST", chat_path, chat(logprobs=True, top_logprobs=50)),
        Case("10,000 prompts", "malformed", "POST", c, completion(prompt=["a"] * 10_000, max_tokens=1)),
        Case("1,000 stop strings", "malformed", "POST", c, completion(stop=["x"] * 1000)),
        Case("a 10k-character stop string", "malformed", "POST", c, completion(stop="y" * 10_000)),
        Case("a 10k-character model", "malformed", "POST", c, completion(model="m" * 10_000)),
        Case("seed 10^30", "malformed", "POST", c, completion(seed=10**30)),
        Case("top_k 10^12", "malformed", "POST", c, completion(top_k=10**12)),
        Case("5,000 messages", "malformed", "POST", chat_path, chat(messages=[{"role": "user", "content": "a"}] * 5000)),
        Case("a prompt past the context", "malformed", "POST", c, completion(prompt="word " * 20_000)),
        Case("a 4,400-digit integer", "malformed", "POST", c, raw('{"model": "MODEL", "prompt": "a", "max_tokens": '
                                                                  + "9" * 4400 + "}")),
        Case("a 2 MB body", "malformed", "POST", c, completion(prompt="z" * 2_000_000)),
        Case("a 2 MB chunked body", "malformed", "POST", c, completion(prompt="z" * 2_000_000), chunked=True),
        # Not JSON at all.
        Case("not JSON", "malformed", "POST", c, b"hello"),
        Case("empty body", "malformed", "POST", chat_path, b""),
        Case("bad UTF-8", "malformed", "POST", c, b'{"model": "\xff\xfe", "prompt": "a"}'),
        Case("truncated JSON", "malformed", "POST", c, b'{"model": "x", "prompt": '),
        Case("NaN", "malformed", "POST", c, raw('{"model": "MODEL", "prompt": "a", "temperature": NaN}')),
        Case("nested 100,000 deep", "malformed", "POST", c, b"[" * 100_000 + b"]" * 100_000),
        # Wrong route, method or key.
        Case("no such route", "malformed", "POST", "/v1/embeddings", completion()),
        Case("GET a POST route", "malformed", "GET", c),
        Case("no key", "malformed", "POST", c, completion(), headers={"Authorization": ""}),
        Case("wrong key", "malformed", "POST", chat_path, chat(), headers={"Authorization": "Bearer sk-nope"}),
    ]
    dropped = [
        Case("chat stream dropped", "dropped", "POST", chat_path, chat(max_tokens=60, stream=True, ignore_eos=True),
             stream=True),
        Case("completion stream dropped", "dropped", "POST", c,
             completion(max_tokens=60, n=2, stream=True, ignore_eos=True), stream=True),
        Case("upload dropped", "dropped", "POST", c, completion(), truncated=True),
    ]
    return valid * 3 + malformed + dropped * 3  # ~100 requests, about a third of them valid


def send_truncated(url: str, case: Case) -> tuple[int, bytes]:
    """Headers announcing the whole body, half of it, then a closed socket (below any HTTP client)."""
    host, port = url.removeprefix("http://").split(":")
    head = (f"{case.method} {case.path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(case.body)}\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + case.body[: len(case.body) // 2])
    return 200, b""  # nobody is left to answer; what counts is the server's log and health


def send(http: httpx.Client, case: Case) -> tuple[int, bytes]:
    if case.truncated:
        return send_truncated(str(http.base_url).rstrip("/"), case)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(case.headers or {})}
    content = case.body
    if case.chunked:
        data = case.body

        def pieces():  # no Content-Length: the server counts what arrives
            for i in range(0, len(data), 64 * 1024):
                yield data[i : i + 64 * 1024]

        content = pieces()
    with http.stream(case.method, case.path, content=content, headers=headers) as response:
        if case.kind == "dropped":
            for line in response.iter_lines():  # the first event, then the client goes away
                if line.startswith("data: "):
                    break
            return response.status_code, b""
        return response.status_code, response.read()


def problem(case: Case, status: int, content: bytes) -> str | None:
    """What is wrong with the answer to `case`, or None."""
    if case.kind in ("valid", "dropped"):
        if status != 200:
            return f"{case.name}: {status} {content[:200]!r}"
        if case.stream and case.kind == "valid" and not content.rstrip().endswith(b"data: [DONE]"):
            return f"{case.name}: the stream did not end with [DONE]"
        return None
    if not 400 <= status < 500:
        return f"{case.name}: {status} {content[:200]!r}"
    try:
        error = json.loads(content)["error"]
    except (ValueError, KeyError, TypeError):
        return f"{case.name}: {status} without an error envelope: {content[:200]!r}"
    if not (error.get("message") and error.get("type") and "param" in error and "code" in error):
        return f"{case.name}: incomplete error envelope {error}"
    return None


def run_load(url: str, load: list[Case]) -> list[str]:
    local = threading.local()

    def one(case: Case) -> str | None:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=url, timeout=120)
        try:
            return problem(case, *send(local.http, case))
        except httpx.HTTPError as err:  # a connection closed without an answer
            return f"{case.name}: {type(err).__name__}: {err}"

    with ThreadPoolExecutor(CLIENTS) as pool:
        problems = [p for p in pool.map(one, load) if p]
    return problems


def rss() -> int:
    """This process's resident memory (the server runs in it), in bytes."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak, which also stays flat when nothing leaks
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Errors(logging.Handler):
    """Log records at ERROR and above (a traceback in the server's log is one)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_malformed_requests_get_4xx_valid_ones_200_and_the_server_stays_up_and_flat(serve_model, tmp_path):
    errors = Errors()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn", "lmforge", "fastapi")]
    with make_server(serve_model, tmp_path, engine={"max_num_seqs": 8}) as served:
        for logger in loggers:
            logger.addHandler(errors)
        try:
            mix = cases()
            rng = random.Random(0)
            problems = run_load(served.url, rng.sample(mix, len(mix)))  # warm-up
            gc.collect()
            before = rss()
            load = [case for _ in range(ROUNDS) for case in mix]
            rng.shuffle(load)
            problems += run_load(served.url, load)
            gc.collect()
            after = rss()
        finally:
            for logger in loggers:
                logger.removeHandler(errors)
        assert not problems, "\n".join(problems)
        assert not errors.records, "\n".join(errors.format(r) for r in errors.records[:5])

        # Still serving, every slot of the dropped streams freed.
        deadline = time.monotonic() + 30
        while served.engine.stats().running + served.engine.stats().waiting and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served.engine.stats().running == 0 and served.engine.stats().kv_cache_usage == 0
        assert httpx.get(served.url + "/health").json()["status"] == "ok"
        after_load = httpx.post(served.base_url + "/completions", content=completion(temperature=0),
                                headers={"Authorization": f"Bearer {KEY}"})
        assert after_load.status_code == 200 and after_load.json()["choices"][0]["text"]

        # The audit log kept writing through it all: one row for every generation request.
        served.gateway.audit.flush(30)
        generation = {"/v1/completions", "/v1/chat/completions"}
        answered = sum(1 for case in [*mix, *load] if case.kind == "valid" and case.path in generation) + 1
        with sqlite3.connect(served.audit_path) as db:
            ok = db.execute("SELECT count(*) FROM requests WHERE status = 200").fetchone()[0]
            refused = db.execute("SELECT count(*) FROM requests WHERE status BETWEEN 400 AND 499").fetchone()[0]
        assert ok >= answered and refused > 0

        # Memory: what a round leaves behind would show over the rounds (bodies of up to 2 MB,
        # KV-cache slots, prompts); a loaded 2-core machine moves RSS by a few MiB on its own.
        growth = after - before
        assert growth < max(0.10 * before, 64 * MiB), f"RSS grew {growth / MiB:.0f} MiB from {before / MiB:.0f} MiB"
