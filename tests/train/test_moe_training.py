"""Training mixture-of-experts models (with QK-norm and a local/global attention pattern): the same losses on one or two processes (FSDP2), with
activation checkpointing, and after a resume; the expert load is logged, balanced and reported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmforge.monitor import report
from tests.train.test_distributed import Runs, losses_of

MOE = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_ffn_dim=96",
       "model.moe.bias_update_rate=0.01", "model.qk_norm=true", "model.sliding_window=32",
       "model.attention_pattern=[sliding,full]"]


@pytest.fixture(scope="module")
def runs(pretrain_data, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("moe"), pretrain_data["tokens"])


@pytest.fixture(scope="module")
def single(runs) -> list[float]:
    result = runs.in_process("single", *MOE)
    assert result.status == "completed"
    return result.losses


def test_a_moe_model_learns_and_logs_the_load_of_every_expert_of_every_layer(single, runs):
    assert single[-1] < single[0] - 0.3
    records = _records(runs.run_dir("single"))
    loads = [r for r in records if "expert_load" in r]
    assert loads and all(len(r["expert_load"]) == 2 and len(r["expert_load"][0]) == 4 for r in loads)
    for r in loads:  # shares x experts: a layer's loads average to 1
        np.testing.assert_allclose(np.mean(r["expert_load"], axis=1), 1.0, atol=1e-3)
        assert r["expert_load_min"] <= 1.0 <= r["expert_load_max"]
    assert all("moe_aux_loss" in r and "router_z_loss" in r for r in records if "grad_norm" in r)


def test_the_report_of_a_moe_run_plots_the_expert_load(single, runs, tmp_path):
    page = report.render(runs.run_dir("single"), tmp_path / "report")
    assert (tmp_path / "report" / "expert_load.png").is_file()
    assert (tmp_path / "report" / "expert_load_range.png").is_file()
    assert "expert load" in page.read_text()


def test_fsdp_on_two_processes_trains_a_moe_model_to_the_same_losses_as_one_process(single, runs):
    runs.torchrun("fsdp", "parallel.strategy=fsdp", *MOE)
    np.testing.assert_allclose(losses_of(runs.run_dir("fsdp")), single, rtol=1e-5, atol=1e-5)
    one = [r for r in _records(runs.run_dir("single")) if "expert_load" in r]
    two = [r for r in _records(runs.run_dir("fsdp")) if "expert_load" in r]
    # Loads are summed over ranks: the two runs count the same tokens per expert.
    np.testing.assert_allclose([r["expert_load"] for r in two], [r["expert_load"] for r in one], atol=1e-3)


def test_ddp_on_two_processes_trains_a_moe_model_to_the_same_losses_and_expert_loads(single, runs):
    runs.torchrun("ddp", "parallel.strategy=ddp", *MOE)
    np.testing.assert_allclose(losses_of(runs.run_dir("ddp")), single, rtol=1e-5, atol=1e-5)
    one = [r["expert_load"] for r in _records(runs.run_dir("single")) if "expert_load" in r]
    two = [r["expert_load"] for r in _records(runs.run_dir("ddp")) if "expert_load" in r]
    np.testing.assert_allclose(two, one, atol=1e-3)


def test_activation_checkpointing_leaves_a_moe_models_losses_unchanged(single, runs):
    result = runs.in_process("ac", *MOE, "parallel.activation_checkpointing=full")
    np.testing.assert_allclose(result.losses, single, rtol=1e-5, atol=1e-5)


def test_a_resumed_moe_run_continues_with_the_same_losses_and_balancing_biases(single, runs):
    runs.copy_until("single", "resumed", 4)
    result = runs.in_process("resumed", *MOE, resume=True)  # routing depends on the restored biases
    np.testing.assert_allclose(result.losses, single[4:], rtol=1e-5, atol=1e-5)


def _records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
