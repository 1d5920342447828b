"""Mixture of experts: top-k routing, the dropless expert computation, its auxiliary losses,
the output z-loss, and the config checks that guard them."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import lmforge.model.moe as moe_module
from lmforge.cli import main
from lmforge.model import ModelConfig, Transformer
from lmforge.model.config import MoEConfig
from lmforge.model.feedforward import FeedForward
from lmforge.model.losses import linear_cross_entropy
from lmforge.model.moe import MoE, load_balancing_loss, route

BASE = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64)


def moe_layer(seed: int = 0, **moe) -> MoE:
    config = ModelConfig(**BASE, moe=dict(num_experts=4, top_k=2, expert_ffn_dim=32, **moe))
    layer = MoE(config)
    layer.init_weights(0.1, 0.1, torch.Generator().manual_seed(seed))
    return layer


# ---------------------------------------------------------------------------- routing


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_each_token_gets_k_distinct_experts_whose_normalised_weights_sum_to_route_scale(gate):
    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(1))
    moe = MoEConfig(num_experts=6, top_k=3, gate=gate, norm_topk=True, route_scale=2.5)
    scores, indices, weights = route(logits, moe)
    assert indices.shape == weights.shape == (50, 3)
    assert all(len(set(row)) == 3 for row in indices.tolist())
    torch.testing.assert_close(weights.sum(-1), torch.full((50,), 2.5))
    expected_scores = logits.softmax(-1) if gate == "softmax" else logits.sigmoid()
    torch.testing.assert_close(scores, expected_scores)
    # The chosen experts are the k highest-scoring ones.
    assert torch.equal(indices.sort(-1).values, scores.topk(3, -1).indices.sort(-1).values)


@pytest.mark.parametrize("gate", ["softmax", "sigmoid"])
def test_without_normalisation_the_weights_are_the_raw_scores_times_route_scale(gate):
    logits = torch.randn(20, 5, generator=torch.Generator().manual_seed(2))
    moe = MoEConfig(num_experts=5, top_k=2, gate=gate, norm_topk=False, route_scale=1.5)
    scores, indices, weights = route(logits, moe)
    torch.testing.assert_close(weights, scores.gather(-1, indices) * 1.5)
    assert not torch.allclose(weights.sum(-1), torch.full((20,), 1.5))


@pytest.mark.parametrize("norm_topk", [True, False])
def test_the_expert_bias_changes_which_experts_are_chosen_but_not_their_weights(norm_topk):
    logits = torch.randn(30, 4, generator=torch.Generator().manual_seed(3))
    moe = MoEConfig(num_experts=4, top_k=2, gate="sigmoid", norm_topk=norm_topk)
    _, plain, _ = route(logits, moe)
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])  # expert 3 wins every token's choice
    scores, indices, weights = route(logits, moe, bias)
    assert (indices == 3).any(-1).all() and not (plain == 3).any(-1).all()
    chosen = scores.gather(-1, indices)  # the scores without the bias
    expected = chosen / chosen.sum(-1, keepdim=True) if norm_topk else chosen
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(scores, logits.sigmoid())


# ---------------------------------------------------------------------------- dropless experts


def test_one_expert_with_top_1_equals_the_dense_feedforward_with_its_weights():
    config = ModelConfig(**BASE, moe=dict(num_experts=1, top_k=1, norm_topk=True))
    layer = MoE(config)
    layer.init_weights(0.1, 0.1, torch.Generator().manual_seed(0))
    dense = FeedForward(config.dim, config.ffn_dim)
    with torch.no_grad():
        dense.w13.weight.copy_(layer.experts.w13[0])
        dense.w2.weight.copy_(layer.experts.w2[0])
    x = torch.randn(3, 7, config.dim)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-5, atol=1e-6)


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """For each token, sum over its chosen experts of weight * SwiGLU_e(x), one token at a time."""
    flat = x.reshape(-1, x.shape[-1])
    hidden = layer.experts.w2.shape[-1]
    out = torch.zeros_like(flat)
    for t, token in enumerate(flat):
        logits = layer.router.weight @ token
        scores = logits.softmax(-1) if layer.moe.gate == "softmax" else logits.sigmoid()
        top = scores.topk(layer.moe.top_k).indices
        weights = scores[top] / scores[top].sum() if layer.moe.norm_topk else scores[top]
        for e, w in zip(top.tolist(), weights * layer.moe.route_scale, strict=True):
            w13 = layer.experts.w13[e]
            gate, up = w13[:hidden] @ token, w13[hidden:] @ token
            out[t] += w * (layer.experts.w2[e] @ (F.silu(gate) * up))
        if layer.shared is not None:
            out[t] += layer.shared(token)
    return out.view(x.shape)


def without_grouped_mm():
    return types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if k != "grouped_mm" and not k.startswith("__")})


@pytest.mark.parametrize("path", ["grouped_mm", "loop"])
@pytest.mark.parametrize("options", [dict(), dict(gate="sigmoid", norm_topk=False, route_scale=2.0, num_shared_experts=1)])
def test_the_moe_output_equals_a_per_token_loop_over_its_chosen_experts(path, options, monkeypatch):
    layer = moe_layer(**options)
    x = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(4))
    calls = []
    if path == "loop":
        monkeypatch.setattr(moe_module, "F", without_grouped_mm())
    elif hasattr(F, "grouped_mm"):
        real = F.grouped_mm
        monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(1) or real(*a, **k))
    else:
        pytest.skip("this torch has no grouped_mm")
    with torch.no_grad():
        got = layer(x)
    assert len(calls) == (2 if path == "grouped_mm" else 0)  # w13 and w2, one grouped matmul each
    torch.testing.assert_close(got, naive_moe(layer, x), rtol=1e-5, atol=1e-6)


def test_a_shape_not_16_byte_aligned_falls_back_to_the_loop_with_the_same_result():
    config = ModelConfig(**{**BASE, "dim": 62, "n_heads": 1, "n_kv_heads": 1},
                         moe=dict(num_experts=4, top_k=2, expert_ffn_dim=30))
    layer = MoE(config)
    layer.init_weights(0.1, 0.1, torch.Generator().manual_seed(5))
    x = torch.randn(11, 62)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive_moe(layer, x), rtol=1e-5, atol=1e-6)


def test_experts_that_receive_no_tokens_leave_the_output_and_gradients_well_defined():
    layer = moe_layer()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[1] = 5.0  # with all-positive inputs, experts 1 and one other win
    x = torch.rand(5, 64, requires_grad=True)
    out = layer(x)
    torch.testing.assert_close(out, naive_moe(layer, x), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(layer.experts.w13.grad).all()


# ---------------------------------------------------------------------------- auxiliary losses


def test_the_load_balancing_loss_is_e_times_the_sum_of_load_share_times_mean_probability():
    scores = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    indices = torch.tensor([[0, 1], [1, 2]])
    # f = [1, 2, 1] / 4; P = column means [0.3, 0.45, 0.25]; 3 * (0.075 + 0.225 + 0.0625)
    torch.testing.assert_close(load_balancing_loss(scores, indices, 3), torch.tensor(1.0875))
    # Sigmoid scores are normalised per token first: [0.8, 0.8, 0.4] -> [0.4, 0.4, 0.2].
    sigmoid = torch.tensor([[0.8, 0.8, 0.4], [0.4, 0.4, 0.2]])
    torch.testing.assert_close(load_balancing_loss(sigmoid, torch.tensor([[0], [2]]), 3), torch.tensor(3 * (0.2 + 0.1)))
    # Equal load and uniform probabilities give 1.
    uniform = torch.full((4, 4), 0.25)
    torch.testing.assert_close(load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [3]]), 4), torch.tensor(1.0))


def test_the_router_z_loss_is_its_coefficient_times_the_mean_squared_log_partition():
    layer = moe_layer(router_z_loss_coef=0.01, aux_loss_coef=0.1).train()
    x = torch.randn(3, 5, 64)
    layer(x)
    logits = x.reshape(-1, 64) @ layer.router.weight.t()
    expected_z = 0.01 * torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(layer.aux_losses["router_z_loss"], expected_z)
    scores, indices, _ = route(logits, layer.moe)
    torch.testing.assert_close(layer.aux_losses["moe_aux_loss"], 0.1 * load_balancing_loss(scores, indices, 4))


def moe_model(**moe) -> Transformer:
    config = ModelConfig(**{**BASE, "n_layers": 3}, moe=dict(num_experts=4, top_k=2, expert_ffn_dim=32, dense_layers=[1], **moe))
    torch.manual_seed(0)
    return Transformer(config)


def test_pop_aux_losses_sums_the_moe_layers_then_clears_and_only_trains():
    model = moe_model(aux_loss_coef=0.02, router_z_loss_coef=0.003)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, args, out: inputs.__setitem__(mod, args[0]))
             for m in model.modules() if isinstance(m, MoE)]
    assert len(hooks) == 2  # layer 1 is dense
    tokens = torch.randint(0, 128, (2, 12))
    model.train()
    model(tokens)
    expected = {"moe_aux_loss": 0.0, "router_z_loss": 0.0}
    for layer, x in inputs.items():
        logits = x.reshape(-1, 64) @ layer.router.weight.t()
        scores, indices, _ = route(logits, layer.moe)
        expected["moe_aux_loss"] += 0.02 * load_balancing_loss(scores, indices, 4)
        expected["router_z_loss"] += 0.003 * torch.logsumexp(logits, -1).square().mean()
    losses = model.pop_aux_losses()
    assert set(losses) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value)
    assert model.pop_aux_losses() == {}
    with torch.no_grad():
        model(tokens)
    assert model.pop_aux_losses() == {}
    model.eval()
    model(tokens)
    assert model.pop_aux_losses() == {}


def test_aux_losses_of_two_forwards_add_up_until_popped():
    model = moe_model().train()
    tokens = torch.randint(0, 128, (2, 8))
    model(tokens)
    once = {k: v.detach() for k, v in model.pop_aux_losses().items()}
    model(tokens)
    model(tokens)
    twice = model.pop_aux_losses()
    for name, value in once.items():
        torch.testing.assert_close(twice[name], 2 * value)


def test_the_aux_loss_gradient_reaches_the_router_weights():
    model = moe_model(aux_loss_coef=0.01, router_z_loss_coef=0.0).train()
    model(torch.randint(0, 128, (2, 12)))
    losses = model.pop_aux_losses()
    assert set(losses) == {"moe_aux_loss"}
    losses["moe_aux_loss"].backward()
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for layer in layers:
        assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    # The loss depends on routing only: the last MoE layer's experts feed no router.
    assert layers[-1].experts.w13.grad is None


# ---------------------------------------------------------------------------- output z-loss


def test_output_z_loss_leaves_the_cross_entropy_and_adds_its_gradient():
    gen = torch.Generator().manual_seed(6)
    hidden = (torch.randn(2, 7, 16, generator=gen) * 3).requires_grad_()
    weight = torch.randn(40, 16, generator=gen).requires_grad_()
    targets = torch.randint(0, 40, (2, 7), generator=gen)
    targets[0, 2] = -100
    plain, _ = linear_cross_entropy(hidden, weight, targets, chunk_size=3)
    loss, z = linear_cross_entropy(hidden, weight, targets, chunk_size=3, z_loss=0.1)
    torch.testing.assert_close(loss, plain)
    got = torch.autograd.grad(loss, (hidden, weight))

    logits = hidden.reshape(-1, 16) @ weight.t()
    flat = targets.reshape(-1)
    valid = flat != -100
    lse = torch.logsumexp(logits, -1)
    expected_z = (lse.square() * valid).sum() / valid.sum()
    naive = F.cross_entropy(logits, flat, ignore_index=-100) + 0.1 * expected_z
    expected = torch.autograd.grad(naive, (hidden, weight))
    torch.testing.assert_close(z, expected_z.detach())
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_a_model_with_z_loss_trains_on_the_same_loss_and_logs_the_z_term():
    config = ModelConfig(**BASE, z_loss=1e-3)
    torch.manual_seed(0)
    model = Transformer(config).train()
    tokens = torch.randint(0, 128, (2, 10))
    loss = model(tokens[:, :-1], tokens[:, 1:])
    with torch.no_grad():
        plain = model(tokens[:, :-1], tokens[:, 1:])
        lse = torch.logsumexp(model(tokens[:, :-1]), -1)
    torch.testing.assert_close(loss, plain)
    torch.testing.assert_close(model.pop_aux_losses()["z_loss"], 1e-3 * lse.square().mean())


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "moe,message",
    [
        (dict(num_experts=4, top_k=5), "moe.top_k 5 exceeds moe.num_experts 4"),
        (dict(num_experts=4, top_k=2, dense_layers=[2]), "moe.dense_layers: layer 2 does not exist"),
        (dict(num_experts=4, top_k=2, dense_layers=[-1]), "moe.dense_layers: layer -1 does not exist"),
    ],
)
def test_an_impossible_moe_config_is_refused_naming_the_key(moe, message):
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**BASE, moe=moe)


def test_the_cli_refuses_top_k_above_num_experts_on_one_line_with_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "moe.yaml").write_text("data: {dataset: x}\nmodel: {moe: {num_experts: 8}}\n")
    assert main(["train", "moe.yaml", "model.moe.top_k=9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "moe.top_k 9" in err[0], err
    assert "Traceback" not in err[0]
