"""/v1/embeddings answers the real `openai` SDK with the served model's pooled, normalised hidden states."""

from __future__ import annotations

import base64
import sqlite3
import struct

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from tests.serve.conftest import KEY, MODEL_NAME, make_server

TEXTS = ["The list type", "Dictionaries are a mapping from keys to values", "import os\n"]


def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.base_url, api_key=KEY, max_retries=0)


def direct(served, ids: list[int], pooling: str) -> torch.Tensor:
    """The vector computed from the model alone: one prompt, no batch, no padding."""
    with torch.inference_mode():
        hidden = served.engine.model.hidden_states(torch.tensor([ids]))[0].float()
    return F.normalize(hidden.mean(0) if pooling == "mean" else hidden[-1], dim=-1)


def test_float_and_base64_embeddings_agree_and_equal_the_models_pooled_hidden_states(served):
    c = client(served)
    floats = c.embeddings.create(model=MODEL_NAME, input=TEXTS, encoding_format="float")
    packed = c.embeddings.create(model=MODEL_NAME, input=TEXTS, encoding_format="base64")
    default = c.embeddings.create(model=MODEL_NAME, input=TEXTS)  # the SDK asks for base64 and decodes it
    tokenizer = served.engine.tokenizer
    assert [d.index for d in floats.data] == [0, 1, 2]
    for text, f, b, d in zip(TEXTS, floats.data, packed.data, default.data, strict=True):
        vector = torch.tensor(f.embedding)
        assert len(f.embedding) == served.engine.model.config.dim
        unpacked = struct.unpack(f"<{len(f.embedding)}f", base64.b64decode(b.embedding))
        assert torch.equal(vector.float(), torch.tensor(unpacked)) and torch.equal(vector, torch.tensor(d.embedding))
        assert torch.allclose(vector, direct(served, tokenizer.encode_prompt(text), "mean"), atol=1e-5)
        assert vector.norm().item() == pytest.approx(1.0, abs=1e-5)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(
        len(tokenizer.encode_prompt(t)) for t in TEXTS)
    # Token ids are embedded as they are: the same vector as their text.
    by_ids = c.embeddings.create(model=MODEL_NAME, input=tokenizer.encode_prompt(TEXTS[1]))
    assert torch.allclose(torch.tensor(by_ids.data[0].embedding), torch.tensor(floats.data[1].embedding), atol=1e-5)


def test_last_token_pooling_gives_the_last_positions_state_not_the_mean(serve_model, tmp_path):
    with make_server(serve_model, tmp_path, server={"embedding_pooling": "last"}) as served:
        out = client(served).embeddings.create(model=MODEL_NAME, input=TEXTS[:2])
        ids = served.engine.tokenizer.encode_prompt(TEXTS[1])
        last = torch.tensor(out.data[1].embedding)
        assert torch.allclose(last, direct(served, ids, "last"), atol=1e-5)
        assert not torch.allclose(last, direct(served, ids, "mean"), atol=1e-3)


def test_bad_dimensions_empty_input_and_token_ids_outside_the_vocabulary_are_400(served):
    c = client(served)
    dim = served.engine.model.config.dim
    assert len(c.embeddings.create(model=MODEL_NAME, input="x", dimensions=dim).data[0].embedding) == dim
    with pytest.raises(openai.BadRequestError, match="dimensions") as err:
        c.embeddings.create(model=MODEL_NAME, input="x", dimensions=dim // 2)
    assert err.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError, match="empty"):
        c.embeddings.create(model=MODEL_NAME, input=[])
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary"):
        c.embeddings.create(model=MODEL_NAME, input=[[1, 2, 10**9]])
    with pytest.raises(openai.BadRequestError, match="context_length|tokens"):
        c.embeddings.create(model=MODEL_NAME, input=[[1] * (served.engine.max_len + 1)])


def test_embeddings_count_in_the_token_rate_limit_the_audit_log_and_the_metrics(serve_model, tmp_path):
    ids = list(range(10, 40))  # 30 tokens
    with make_server(serve_model, tmp_path, auth={"tokens_per_minute": 40}) as served:
        c = client(served)
        assert c.embeddings.create(model=MODEL_NAME, input=[ids]).usage.prompt_tokens == 30
        with pytest.raises(openai.RateLimitError):
            c.embeddings.create(model=MODEL_NAME, input=[ids])  # 60 tokens in the minute: over 40
        metrics = httpx.get(served.url + "/metrics").text
    assert f'vllm:prompt_tokens_total{{model_name="{MODEL_NAME}"}} 30.0' in metrics
    assert 'route="/v1/embeddings",status="200"' in metrics.replace(", ", ",")
    with sqlite3.connect(served.audit_path) as db:
        rows = db.execute("SELECT route, key_id, prompt_tokens, status FROM requests ORDER BY id").fetchall()
    assert rows == [("/v1/embeddings", "alice", 30, 200), ("/v1/embeddings", "alice", 30, 429)]


@pytest.mark.parametrize("fields", [
    {"input": [[]]}, {"input": [""] * 2049}, {"input": [1.5]}, {"input": [True]}, {"input": ["a", 1]},
    {"input": {"text": "a"}}, {"input": [[-1]]}, {"input": "x", "encoding_format": "int8"},
    {"input": "x", "dimensions": 0}, {"input": "x", "model": "gpt-9"}, {"input": [[1, 2], "x"]},
])
def test_bad_embeddings_requests_are_4xx_envelopes(served, fields):
    reply = httpx.post(served.base_url + "/embeddings", json={"model": MODEL_NAME, **fields},
                       headers={"Authorization": f"Bearer {KEY}"})
    assert 400 <= reply.status_code < 500 and set(reply.json()["error"]) == {"message", "type", "param", "code"}
