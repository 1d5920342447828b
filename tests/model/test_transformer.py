"""The Llama-style decoder: shapes, causality, KV cache, GQA, tying, presets, parameter and FLOP counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmforge.config import build
from lmforge.errors import ConfigError
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.model.presets import PRESETS

VOCAB = 512


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{"preset": "tiny", "vocab_size": VOCAB, "max_seq_len": 64, **overrides})


def build_model(config: ModelConfig, seed: int = 0) -> Transformer:
    model = Transformer(config).eval()
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model


def span(start: int, length: int) -> torch.Tensor:
    """RoPE positions start..start+length-1, shared by every row."""
    return torch.arange(start, start + length)


def tokens(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_forward_gives_logits_per_position_and_a_scalar_loss_near_uniform_at_init():
    model = build_model(tiny())
    x = tokens(3, 17)
    assert model(x).shape == (3, 17, VOCAB)
    loss = model(x, targets=tokens(3, 17, seed=1))
    assert loss.shape == () and abs(loss.item() - math.log(VOCAB)) < 0.1


@torch.no_grad()
def test_logits_to_keep_gives_the_last_positions_logits_of_the_full_forward():
    model = build_model(tiny())
    x = tokens(2, 17)
    torch.testing.assert_close(model(x, logits_to_keep=5), model(x)[:, -5:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(x, targets=x, logits_to_keep=5)


@torch.no_grad()
def test_changing_a_future_token_never_changes_earlier_logits():
    model = build_model(tiny())
    x = tokens(2, 40)
    for position in (0, 13, 39):
        changed = x.clone()
        changed[:, position] = (changed[:, position] + 1) % VOCAB
        before, after = model(x), model(changed)
        assert torch.equal(before[:, :position], after[:, :position])
        assert not torch.equal(before[:, position], after[:, position])


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4], ids=["mqa", "gqa", "mha"])
@torch.no_grad()
def test_kv_cache_decoding_matches_the_full_forward(n_kv_heads):
    config = tiny(n_kv_heads=n_kv_heads)
    model = build_model(config)
    x = tokens(2, 48)
    full = model(x)

    cache = KVCache(config, batch_size=2, max_len=48)
    steps = [model(x[:, :20], kv_cache=cache)]
    steps += [model(x[:, i : i + 1], kv_cache=cache, positions=span(i, 1)) for i in range(20, 48)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)

    # A multi-token chunk after a cached prefix sees the prefix and itself causally.
    cache = KVCache(config, batch_size=2, max_len=48)
    prefix = model(x[:, :11], kv_cache=cache, positions=span(0, 11))
    chunk = model(x[:, 11:30], kv_cache=cache, positions=span(11, 19))
    rest = model(x[:, 30:], kv_cache=cache, positions=span(30, 18))
    torch.testing.assert_close(torch.cat([prefix, chunk, rest], dim=1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_rows_at_different_positions_in_one_forward_match_each_rows_full_forward():
    # Continuous batching: each row its own length, its own cache row, one forward for all.
    config = tiny()
    model = build_model(config)
    x = tokens(3, 40)
    full = model(x)
    cache = KVCache(config, batch_size=4, max_len=40)  # rows 3, 0, 2 serve batch rows 0, 1, 2
    rows, lengths = [3, 0, 2], [7, 19, 30]
    for b, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        model(x[b : b + 1, :n], kv_cache=cache.rows([row]))
    for step in range(10):
        positions = torch.tensor([[n + step] for n in lengths])
        new = x.gather(1, positions)
        logits = model(new, positions=positions, kv_cache=cache.rows(rows))
        expected = full.gather(1, positions[:, :, None].expand(-1, -1, full.shape[-1]))
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_grouped_query_attention_equals_mha_with_each_kv_head_shared_by_its_group():
    gqa_config, mha_config = tiny(n_heads=4, n_kv_heads=2), tiny(n_heads=4, n_kv_heads=4)
    gqa, mha = build_model(gqa_config), build_model(mha_config)
    state = gqa.state_dict()
    head_dim, dim = gqa_config.head_dim, gqa_config.dim
    for i in range(gqa_config.n_layers):
        key = f"layers.{i}.attn.wqkv.weight"
        q, k, v = state[key].split([4 * head_dim, 2 * head_dim, 2 * head_dim])
        # KV head j serves query heads 2j and 2j+1.
        k = k.view(2, head_dim, dim).repeat_interleave(2, dim=0).reshape(4 * head_dim, dim)
        v = v.view(2, head_dim, dim).repeat_interleave(2, dim=0).reshape(4 * head_dim, dim)
        state[key] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    x = tokens(2, 30)
    torch.testing.assert_close(mha(x), gqa(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_num_params_counts_exactly_the_parameters_of_the_built_model(tie_embeddings):
    config = tiny(tie_embeddings=tie_embeddings)
    model = Transformer(config)
    shared = model.output.weight.data_ptr() == model.tok_embeddings.weight.data_ptr()
    assert shared is tie_embeddings
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    assert config.num_params(embedding=False) == config.num_params() - VOCAB * config.dim


def test_tied_output_and_embedding_are_one_tensor_that_trains_as_one():
    model = build_model(tiny(tie_embeddings=True))
    assert model.output.weight is model.tok_embeddings.weight
    model(tokens(1, 8), targets=tokens(1, 8, seed=1)).backward()
    with torch.no_grad():
        model.tok_embeddings.weight.add_(1.0)
    assert torch.equal(model.output.weight, model.tok_embeddings.weight)


def test_init_with_a_seeded_generator_is_reproducible():
    a, b, c = build_model(tiny(), seed=5), build_model(tiny(), seed=5), build_model(tiny(), seed=6)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert not torch.equal(a.tok_embeddings.weight, c.tok_embeddings.weight)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_and_fills_the_keys_not_set_explicitly(name):
    config = ModelConfig(preset=name, vocab_size=1024, max_seq_len=128)
    assert config.max_seq_len == 128 and config.vocab_size == 1024
    for key, value in PRESETS[name].items():
        if key not in ("max_seq_len", "vocab_size"):
            actual = getattr(config, key)
            assert (actual.model_dump() | value == actual.model_dump()) if isinstance(value, dict) else actual == value
    assert config.num_params() > 0 and config.head_dim % 2 == 0


def test_moe_presets_match_the_public_shapes_total_and_active_parameters():
    qwen3 = ModelConfig(preset="qwen3-30b-a3b")  # Qwen3-30B-A3B: 30.5B total, 3.35B active ("3.3B")
    assert round(qwen3.num_params() / 1e9, 1) == 30.5 and round(qwen3.num_params(active=True) / 1e9, 1) == 3.4
    small, moe = ModelConfig(preset="small", vocab_size=4096), ModelConfig(preset="small-moe", vocab_size=4096)
    # small-moe: the same active parameters as small (plus its routers), about 2.3x the total.
    assert abs(moe.num_params(active=True) - small.num_params()) == moe.n_layers * moe.dim * moe.moe.num_experts
    assert moe.num_params() > 2 * small.num_params()
    assert moe.flops_per_token(256) == pytest.approx(small.flops_per_token(256), rel=0.01)


def test_llama3_8b_preset_has_8_billion_parameters_counted_without_building_it():
    config = ModelConfig(preset="llama3-8b")
    assert config.vocab_size == 128256
    assert 7.9e9 < config.num_params() < 8.1e9
    # The exact totals of the released Meta-Llama-3-8B and Llama-3.2-1B checkpoints.
    assert config.num_params() == 8_030_261_248
    assert ModelConfig(preset="llama3-1b").num_params() == 1_235_814_400


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_flops_per_token_is_six_times_the_matmul_weights_plus_attention(tie_embeddings):
    config = tiny(tie_embeddings=tie_embeddings)
    model = Transformer(config)
    matmul_weights = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)
    )  # the tied head counts: it is a matmul even though it shares the embedding
    assert config.flops_per_token(seq_len=1) == pytest.approx(6 * matmul_weights, rel=0.02)
    growth = config.flops_per_token(seq_len=1025) - config.flops_per_token(seq_len=1)
    assert growth == 12 * config.n_layers * config.dim * 1024


def test_flops_per_token_of_llama3_8b_is_close_to_6n_for_short_sequences():
    config = ModelConfig(preset="llama3-8b")
    non_embedding = config.num_params(embedding=False)  # includes the untied output head
    assert config.flops_per_token(seq_len=128) == pytest.approx(6 * non_embedding, rel=0.01)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"dim": 100, "n_heads": 3, "n_kv_heads": 1}, ["dim 100", "n_heads 3"]),
        ({"dim": 64, "n_heads": 4, "n_kv_heads": 3}, ["n_heads 4", "n_kv_heads 3"]),
        ({"dim": 48, "n_heads": 16, "n_kv_heads": 4}, ["head_dim 3"]),
        ({"preset": "llama9-huge"}, ["unknown preset 'llama9-huge'", "tiny"]),
        ({"dim": 0}, ["'dim'"]),
        ({"n_layer": 4}, ["unknown key 'n_layer'", "n_layers"]),
    ],
)
def test_bad_shapes_are_config_errors_naming_the_key(data, named):
    with pytest.raises(ConfigError) as info:
        build(ModelConfig, data)
    for fragment in named:
        assert fragment in str(info.value)


def test_a_sequence_longer_than_max_seq_len_raises():
    model = build_model(tiny(max_seq_len=16))
    model(tokens(1, 16))
    with pytest.raises(ValueError, match="exceeds max_seq_len 16"):
        model(tokens(1, 17))
    with pytest.raises(ValueError, match="exceeds max_seq_len 16"):
        model(tokens(1, 2), positions=span(15, 2))


def test_writing_past_the_kv_cache_raises():
    config = tiny()
    model = build_model(config)
    cache = KVCache(config, batch_size=1, max_len=8)
    model(tokens(1, 8), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 8 positions"):
        model(tokens(1, 1), kv_cache=cache, positions=span(8, 1))


def test_building_without_a_vocab_size_raises():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(ModelConfig(preset="tiny"))
