"""The OLMo-2 block type (lmforge/model/blocks/olmo2.py): it builds, decodes with the KV cache as
its full forward does, trains, exports to transformers' Olmo2ForCausalLM and imports from it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lmforge.interop import export, importer
from lmforge.interop.export import ExportConfig
from lmforge.interop.importer import ImportConfig
from lmforge.model import KVCache, ModelConfig, Transformer
from lmforge.model.blocks import block_type
from lmforge.store.loading import load_model
from lmforge.train import trainer
from lmforge.train.config import TrainConfig
from tests.interop.conftest import real_token_batch
from tests.interop.test_import import SMALL, foreign_tokenizer  # noqa: F401 (a fixture)

VOCAB = 256


def olmo2(**fields) -> ModelConfig:
    return ModelConfig(**{"preset": "tiny", "vocab_size": VOCAB, "max_seq_len": 64, "block": "olmo2",
                          "qk_norm": True, **fields})


def model_of(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():  # norms start at one: random ones show each is applied where it should be
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.3)
    return model


@pytest.mark.parametrize("fields", [
    {}, {"qk_norm": False}, {"tie_embeddings": True, "qkv_bias": True, "attn_out_bias": True},
    {"moe": {"num_experts": 4, "top_k": 2, "expert_ffn_dim": 32, "dense_layers": [0]}},
])
def test_the_model_builds_olmo2_blocks_and_counts_exactly_their_parameters(fields):
    config = olmo2(**fields)
    model = Transformer(config)
    assert all(type(layer) is block_type("olmo2").module for layer in model.layers)
    attn = model.layers[0].attn
    if config.qk_norm:  # one norm over all heads' widths, not one per head
        assert attn.q_norm.weight.shape == (config.n_heads * config.head_dim,)
        assert attn.k_norm.weight.shape == (config.n_kv_heads * config.head_dim,)
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    if config.moe is not None:  # a token's parameters: 2 of the 4 experts of the MoE layer
        expert = 3 * config.dim * config.expert_ffn_dim
        assert config.num_params(active=True) == config.num_params() - 2 * expert


def test_the_norms_follow_each_sublayer_with_the_residual_stream_left_unnormalised():
    """Zero sublayer outputs leave x unchanged: there is no pre-norm on the residual path."""
    config = olmo2()
    block = Transformer(config).layers[0]
    with torch.no_grad():
        block.attn.wo.weight.zero_()
        block.ffn.w2.weight.zero_()
    x = torch.randn(1, 5, config.dim) * 7
    cos, sin = torch.ones(5, config.head_dim), torch.zeros(5, config.head_dim)
    assert torch.equal(block(x, cos, sin), x)


@pytest.mark.parametrize("fields", [{}, {"sliding_window": 6, "attention_pattern": ["sliding", "full"]}])
def test_decoding_with_the_kv_cache_gives_the_full_forward_logits(fields):
    config = olmo2(**fields)
    model = model_of(config)
    tokens = torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(config, 2, 64)
        steps = [model(tokens[:, :11], kv_cache=cache)]
        steps += [model(tokens[:, t:t + 1], positions=torch.tensor([t]), kv_cache=cache) for t in range(11, 30)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5


def test_a_packed_row_computes_what_its_documents_compute_alone():
    model = model_of(olmo2())
    a, b = (torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(n)) for n in (9, 14))
    document_ids = torch.tensor([[0] * 9 + [1] * 14])
    with torch.no_grad():
        packed = model(torch.cat([a, b], dim=1), document_ids=document_ids)
        alone = torch.cat([model(a), model(b)], dim=1)
    assert (packed - alone).abs().max().item() < 1e-5


def test_export_refuses_what_transformers_olmo2_cannot_express():
    layout = block_type("olmo2").hf
    for fields, reason in [({"qk_norm": False}, "qk_norm"), ({"sliding_window": 8}, "sliding"),
                           ({"moe": {"num_experts": 4}}, "mixture"), ({"mlp_bias": True}, "MLP")]:
        with pytest.raises(ValueError, match=reason):
            layout.export_architecture(olmo2(**fields))


# ------------------------------------------------------------------- training and interop


@pytest.fixture(scope="module")
def olmo2_run(pretrain_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("olmo2")
    config = TrainConfig.model_validate({
        "run": {"name": "olmo2", "out_dir": str(root / "runs"), "seed": 3},
        "model": {"preset": "tiny", "max_seq_len": 128, "block": "olmo2", "qk_norm": True},
        "data": {"dataset": str(pretrain_data["tokens"]), "seq_len": 64},
        "schedule": {"warmup_steps": 2},
        "train": {"max_steps": 30, "global_batch_tokens": 1024, "micro_batch_size": 8, "device": "cpu",
                  "eval_every": 0, "checkpoint_every": 0, "progress": False},
    })
    return trainer.run(config)


def test_a_short_training_run_makes_the_loss_fall(olmo2_run):
    assert olmo2_run.status == "completed" and olmo2_run.checkpoint is not None
    losses = olmo2_run.losses
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses


def test_the_trained_model_exports_to_transformers_olmo2_with_the_same_logits(olmo2_run, corpus_texts, tmp_path):
    result = export.run(ExportConfig(model=str(olmo2_run.run_dir), out=str(tmp_path / "hf")))
    ours, tokenizer, _ = load_model(olmo2_run.run_dir)
    assert ours.config.block == "olmo2"
    theirs = AutoModelForCausalLM.from_pretrained(result.out).eval()
    assert type(theirs).__name__ == "Olmo2ForCausalLM" and theirs.dtype == torch.float32
    tokens = real_token_batch(tokenizer.encode_prompt, corpus_texts, rows=2, length=120)
    with torch.no_grad():
        expected, got = ours(tokens), theirs(tokens).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert result.params == sum(p.numel() for p in theirs.parameters())


def test_an_olmo2_made_by_transformers_imports_with_the_same_logits(foreign_tokenizer, corpus_texts, tmp_path):  # noqa: F811
    config = AutoConfig.for_model("olmo2", **SMALL, bos_token_id=0, eos_token_id=1, pad_token_id=1,
                                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    torch.manual_seed(0)
    theirs = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases start at zero and norms at one: random ones test their mapping
        for name, param in theirs.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.normal_(0.5 if "norm" in name else 0.0, 0.3)
    theirs.save_pretrained(tmp_path / "hf")
    foreign_tokenizer.save_pretrained(tmp_path / "hf")
    result = importer.run(ImportConfig(source=str(tmp_path / "hf"), out=str(tmp_path / "lm")))
    assert result.architecture == "Olmo2ForCausalLM"
    ours, tokenizer, _ = load_model(tmp_path / "lm")
    assert ours.config.block == "olmo2" and ours.config.qk_norm and ours.config.qkv_bias
    tokens = real_token_batch(tokenizer.encode_prompt, corpus_texts, rows=2, length=120)
    with torch.no_grad():
        expected, got = theirs(tokens).logits, ours(tokens)
    assert (got - expected).abs().max().item() < 1e-4
    assert ours.config.num_params() == sum(p.numel() for p in theirs.parameters())
