"""The trainer's MoE bookkeeping: counters that start at zero, loads counted once under
activation checkpointing, biases kept in fp32, alerts that name the model's layers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmforge.model import ModelConfig, Transformer
from lmforge.model.blocks.llama_moe_hf import hf_aux_coef
from lmforge.monitor.alerts import AlertConfig, AlertMonitor
from lmforge.store import hf
from lmforge.train.distributed import DistEnv
from lmforge.train.expert_balance import ExpertBalance
from lmforge.train.parallel import apply_activation_checkpointing

CONFIG = dict(vocab_size=64, dim=32, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=32,
              moe=dict(num_experts=4, top_k=2, dense_layers=[0]))


def test_a_model_loaded_onto_empty_memory_starts_its_expert_counters_at_zero():
    with torch.device("meta"):
        model = Transformer(ModelConfig(**CONFIG))
    model.to_empty(device="cpu")
    for layer in model.layers[1:]:
        layer.ffn.expert_load.fill_(1e9)  # what uninitialised memory may hold
    balance = ExpertBalance(model, DistEnv())
    assert all(float(layer.ffn.expert_load.sum()) == 0 for layer in model.layers[1:])
    assert balance.layer_ids == [1, 2]  # the model's layer indices, the dense layer 0 skipped


def test_activation_checkpointing_counts_each_token_once_and_leaves_no_losses_behind():
    model = Transformer(ModelConfig(**CONFIG)).train()
    apply_activation_checkpointing(model, "full")
    balance = ExpertBalance(model, DistEnv())
    tokens = torch.randint(0, 64, (2, 16))
    loss = model(tokens, tokens)
    aux = model.pop_aux_losses()
    (loss + sum(aux.values())).backward()
    assert model.pop_aux_losses() == {}
    assert [float(layer.ffn.expert_load.sum()) for layer in model.layers[1:]] == [2 * 16 * 2] * 2
    balance.after_step(applied=True)
    metrics = balance.metrics()
    assert metrics["expert_load_layers"] == [1, 2] and len(metrics["expert_load"]) == 2


def test_casting_a_moe_model_to_bf16_keeps_the_expert_bias_in_fp32():
    model = Transformer(ModelConfig(**CONFIG))
    model.layers[1].ffn.expert_bias.fill_(1e-3)
    model.to(torch.bfloat16)
    assert model.layers[1].ffn.expert_bias.dtype == torch.float32
    assert float(model.layers[1].ffn.expert_bias[0]) == pytest.approx(1e-3, rel=1e-6)
    assert model.layers[1].ffn.router.weight.dtype == torch.bfloat16


def test_the_load_balancing_weight_is_converted_to_transformers_meaning_and_back():
    config = ModelConfig(**{**CONFIG, "qk_norm": True, "moe": {**CONFIG["moe"], "norm_topk": False}})
    written = hf.config_to_hf(config, torch.float32, {})
    # lmforge sums one loss per MoE layer (1 at even load); transformers' is top_k at even load, once.
    assert written["router_aux_loss_coef"] == pytest.approx(0.01 * 2 / 2)
    assert hf_aux_coef(config, hf_coef=written["router_aux_loss_coef"]) == pytest.approx(0.01)
    back = hf.config_from_hf(written, Path("."))
    assert back.moe.aux_loss_coef == pytest.approx(0.01)


def test_unbalanced_experts_raise_one_alert_per_kind_naming_the_models_layers(tmp_path):
    monitor = AlertMonitor(tmp_path, AlertConfig())
    load = [[0.05, 1.0, 1.0, 1.95], [3.5, 0.2, 0.2, 0.1]]
    fired = monitor.observe_experts(10, load, [1, 2])
    kinds = sorted(a["alert"] for a in fired)
    assert kinds == ["expert_dominating", "expert_starving"]
    starving = next(a for a in fired if a["alert"] == "expert_starving")
    assert starving["experts"] == [[1, 0, 0.05]] and "layer 1 expert 0" in starving["message"]
    assert monitor.observe_experts(20, load, [1, 2]) == []  # the same experts: no repeat
    monitor.observe_experts(30, [[1.0] * 4, [1.0] * 4], [1, 2])  # recovered
    assert len(monitor.observe_experts(40, load, [1, 2])) == 2  # unbalanced again: alerts again


def test_an_attention_pattern_without_a_sliding_layer_is_refused():
    with pytest.raises(ValueError, match="attention_pattern has no 'sliding' layer"):
        ModelConfig(**{**CONFIG, "sliding_window": 8, "attention_pattern": ["full"]})
