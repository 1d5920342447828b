"""Attention variants (QK-norm, sliding windows with a per-layer pattern) and MoE layers decode
through the KV cache and the serving engine exactly as a full forward computes."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from lmforge.cli import main
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.model.attention import attention_mask
from lmforge.serve.config import EngineConfig
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams

BASE = dict(vocab_size=128, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)
MOE = dict(num_experts=4, top_k=2, expert_ffn_dim=32)
VARIANTS = {
    "dense": dict(),
    "qk_norm": dict(qk_norm=True),
    "sliding_all_layers": dict(sliding_window=8),
    "sliding_pattern": dict(sliding_window=8, attention_pattern=["sliding", "sliding", "sliding", "full"]),
    "moe_softmax": dict(moe=MOE),
    "moe_sigmoid_shared": dict(moe=dict(MOE, gate="sigmoid", num_shared_experts=1, bias_update_rate=0.001)),
    "everything": dict(qk_norm=True, sliding_window=6, attention_pattern=["sliding", "full"], moe=dict(MOE, dense_layers=[0])),
}


def build(seed: int = 0, **fields) -> Transformer:
    config = ModelConfig(**{**BASE, "init_std": 0.1, **fields})
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "expert_bias"):  # a trained aux-loss-free bias, not zeros
                module.expert_bias.normal_()
    return model


# ---------------------------------------------------------------------------- masks


def reference_mask(seq: int, window: int | None, document_ids: list[int] | None) -> torch.Tensor:
    mask = torch.zeros(seq, seq, dtype=torch.bool)
    for i in range(seq):
        for j in range(seq):
            causal = j <= i
            local = window is None or i - j < window
            same_doc = document_ids is None or document_ids[i] == document_ids[j]
            mask[i, j] = causal and local and same_doc
    return mask


@pytest.mark.parametrize("window", [None, 1, 3, 5])
@pytest.mark.parametrize("packed", [False, True])
def test_the_attention_mask_is_causal_within_the_window_and_the_document(window, packed):
    docs = [0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2]
    document_ids = torch.tensor([docs, sorted(docs, reverse=True)]) if packed else None
    mask = attention_mask(12, torch.device("cpu"), document_ids, window)
    if window is None and not packed:
        assert mask is None  # plain causal: SDPA's is_causal
        return
    rows = [docs, sorted(docs, reverse=True)] if packed else [None]
    assert mask.shape == (len(rows), 1, 12, 12)
    for b, row in enumerate(rows):
        assert torch.equal(mask[b, 0], reference_mask(12, window, row))


def test_a_packed_row_with_sliding_windows_equals_each_document_alone():
    model = build(**VARIANTS["everything"])
    lengths = [5, 14, 9]
    docs = [torch.randint(0, 128, (n,)) for n in lengths]
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    with torch.no_grad():
        packed = model(torch.cat(docs)[None], document_ids=document_ids)[0]
        alone = torch.cat([model(doc[None])[0] for doc in docs])
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_a_sliding_window_changes_the_output_only_past_the_window():
    tokens = torch.randint(0, 128, (1, 20))
    with torch.no_grad():
        full = build(seed=1)(tokens)
        local = build(seed=1, sliding_window=8)(tokens)
    torch.testing.assert_close(local[:, :8], full[:, :8], rtol=0, atol=1e-5)
    assert (local[:, 8:] - full[:, 8:]).abs().amax() > 1e-3


# ---------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_equals_the_full_forward(variant):
    model = build(**VARIANTS[variant])
    config = model.config
    tokens = torch.randint(0, 128, (2, 60))
    cache = KVCache(config, 2, 64)
    with torch.no_grad():
        full = model(tokens)
        # Prefill chunks longer than the window, then one token at a time far past it.
        outs = [model(tokens[:, :13], kv_cache=cache), model(tokens[:, 13:24], positions=torch.arange(13, 24), kv_cache=cache)]
        outs += [model(tokens[:, t : t + 1], positions=torch.tensor([t]), kv_cache=cache) for t in range(24, 60)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)
    for layer in range(config.n_layers):
        window = config.layer_window(layer)
        assert cache.k[layer].shape == cache.v[layer].shape == (2, 2, window or 64, config.head_dim)
        if window is not None:  # the ring holds each row's last `window` positions
            assert sorted(cache.slot_positions[layer][0].tolist()) == list(range(60 - window, 60))


def test_rows_at_different_positions_decode_as_each_row_alone():
    model = build(**VARIANTS["everything"])
    a, b = torch.randint(0, 128, (1, 30)), torch.randint(0, 128, (1, 17))
    cache = KVCache(model.config, 2, 64)
    with torch.no_grad():
        model(a[:, :20], kv_cache=cache.rows([0]))
        model(b[:, :7], kv_cache=cache.rows([1]))
        steps = []
        for i in range(10):  # both rows advance together, each at its own position
            pair = torch.cat([a[:, 20 + i : 21 + i], b[:, 7 + i : 8 + i]])
            steps.append(model(pair, positions=torch.tensor([[20 + i], [7 + i]]), kv_cache=cache.rows([0, 1])))
        got = torch.cat(steps, 1)
        torch.testing.assert_close(got[0], model(a)[0, 20:30], rtol=0, atol=1e-5)
        torch.testing.assert_close(got[1], model(b)[0, 7:17], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- serving engine


def greedy_without_cache(model: Transformer, prompt: list[int], max_tokens: int, stop_ids: set[int]) -> list[int]:
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(max_tokens):
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            out.append(token)
            if token in stop_ids:
                break
            ids.append(token)
    return out


def test_the_engine_on_a_sliding_window_moe_model_decodes_each_prompt_as_alone(trained_tokenizer):
    model = build(seed=2, sliding_window=6, attention_pattern=["sliding", "full"], moe=dict(MOE, num_shared_experts=1))
    gen = torch.Generator().manual_seed(0)
    stops = trained_tokenizer.stop_ids
    allowed = torch.tensor([i for i in range(128) if i not in stops])
    prompts = [allowed[torch.randint(0, len(allowed), (n,), generator=gen)].tolist() for n in (3, 17, 9, 25, 1, 12, 7)]
    engine = Engine(model, trained_tokenizer, EngineConfig(max_num_seqs=3, prefill_chunk_tokens=5, device="cpu"))
    results = engine.run_to_completion(prompts, SamplingParams(max_tokens=24, temperature=0))
    assert engine.steps > 0
    for prompt, result in zip(prompts, results, strict=True):
        expected = greedy_without_cache(model, prompt, 24, stops)
        got = result.token_ids
        assert got == expected[: len(got)] and (len(got) == len(expected) or expected[len(got)] in stops)
        assert len(got) > 8  # generation ran past the window


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(attention_pattern=["sliding", "full"]), "attention_pattern needs sliding_window"),
        (dict(sliding_window=64), "sliding_window 64 is not below max_seq_len 64"),
        (dict(sliding_window=100), "sliding_window 100 is not below max_seq_len 64"),
        (dict(block="gpt2"), "block: unknown block type 'gpt2' \\(registered: .*llama"),
        (dict(sliding_window=8, attention_pattern=["local"]), "attention_pattern"),
    ],
)
def test_an_impossible_attention_config_is_refused_naming_the_key(fields, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**BASE, **fields)


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.attention_pattern=[sliding,full]", "attention_pattern needs sliding_window"),
        ("model.sliding_window=4096", "sliding_window 4096 is not below max_seq_len"),
        ("model.block=nope", "unknown block type 'nope'"),
    ],
)
def test_the_cli_reports_a_bad_attention_option_on_one_line_with_exit_2(override, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "data.dataset=x", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
