"""The MoE side of the Llama block's Hugging Face layouts: Qwen3-MoE, Dots1 (dots.llm1), Mixtral.

Qwen3-MoE and Mixtral route by softmax with nothing else; Dots1 routes as DeepSeek-V3 does:
sigmoid scores, a per-expert `e_score_correction_bias` added for choosing experts only
(lmforge's `expert_bias` buffer), weights from the unbiased scores, renormalised if
`norm_topk_prob` and then scaled by `routed_scaling_factor` (`route_scale`), plus shared
experts of width `moe_intermediate_size * n_shared_experts` (lmforge's too). Its dense layers
are the first `first_k_dense_replace` ones. Routing is lmforge's `route` up to Dots1's 1e-20 in
the renormalisation's denominator (the sigmoid scores are positive). Dots1's group-limited
routing is written off (`n_group = topk_group = 1`) and refused on import when on.
"""

from __future__ import annotations

from typing import Any

import torch

DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_MLP = ("w1", "w3", "w2")  # gate, up, down
NOT_SOFTMAX = ("moe.num_shared_experts > 0", "moe.route_scale != 1", "moe.bias_update_rate > 0 (auxiliary-loss-free bias)")


def moe_architecture(config, uniform_window: bool, biases: tuple[bool, bool, bool]) -> str:
    moe = config.moe
    if config.mlp_bias:
        raise ValueError("mlp_bias: the MoE layouts lmforge exports (Qwen3-MoE, Dots1, Mixtral) have no MLP biases")
    if config.qk_norm and config.qkv_bias != config.attn_out_bias:
        raise ValueError("Qwen3-MoE's and Dots1's biases are all of q/k/v/o or none")
    if config.qk_norm and moe.gate == "sigmoid":
        return _dots1_architecture(config)
    if moe.gate != "softmax":
        raise ValueError(f"moe.gate {moe.gate} without qk_norm: Mixtral routes by softmax (Dots1, sigmoid, needs qk_norm)")
    deepseek = (moe.num_shared_experts > 0, moe.route_scale != 1.0, moe.bias_update_rate > 0)
    for bad, what in zip(deepseek, NOT_SOFTMAX, strict=True):
        if bad:
            raise ValueError(f"{what} with moe.gate softmax: Qwen3-MoE and Mixtral have no place for it "
                             "(Dots1 has, with moe.gate sigmoid and qk_norm)")
    if not uniform_window:
        raise ValueError("a per-layer attention_pattern: Qwen3-MoE and Mixtral, the softmax MoE layouts, have no place for it")
    if config.qk_norm:
        return "Qwen3MoeForCausalLM"
    if any(biases) or moe.dense_layers or not moe.norm_topk:
        raise ValueError(
            "an MoE model without qk_norm exports as Mixtral, which has no biases, no dense layers and "
            "always renormalises the top-k weights (moe.norm_topk: true)"
        )
    return "MixtralForCausalLM"


def _dots1_architecture(config) -> str:
    moe = config.moe
    dense = sorted(moe.dense_layers)
    if dense != list(range(len(dense))):
        raise ValueError(f"moe.dense_layers {dense}: Dots1's dense layers are the first k (first_k_dense_replace)")
    if moe.num_experts < 2:
        raise ValueError("moe.num_experts 1: Dots1's router takes the top two scores of its expert group")
    return "Dots1ForCausalLM"


def hf_aux_coef(config, lmforge_coef: float | None = None, hf_coef: float | None = None) -> float:
    """lmforge's load-balancing weight <-> transformers' `router_aux_loss_coef`.

    lmforge's loss is 1 per MoE layer at even load, summed over layers; transformers' (Mixtral,
    Qwen3-MoE `load_balancing_loss_func`) is top_k at even load, over all layers at once. So the
    same pull on each router is lmforge_coef = hf_coef * top_k / moe_layers.
    """
    moe_layers = max(1, sum(config.is_moe_layer(i) for i in range(config.n_layers)))
    if lmforge_coef is not None:
        return lmforge_coef * moe_layers / config.moe.top_k
    return hf_coef * config.moe.top_k / moe_layers


def moe_config_to_hf(config, architecture: str) -> dict[str, Any]:
    moe = config.moe
    hf: dict[str, Any] = dict(num_experts_per_tok=moe.top_k, output_router_logits=False,
                              router_aux_loss_coef=round(hf_aux_coef(config, lmforge_coef=moe.aux_loss_coef), 10))
    if architecture == "MixtralForCausalLM":
        hf.update(num_local_experts=moe.num_experts, intermediate_size=config.expert_ffn_dim, router_jitter_noise=0.0)
    elif architecture == "Dots1ForCausalLM":
        hf.update(n_routed_experts=moe.num_experts, n_shared_experts=moe.num_shared_experts,
                  moe_intermediate_size=config.expert_ffn_dim, norm_topk_prob=moe.norm_topk,
                  routed_scaling_factor=float(moe.route_scale), first_k_dense_replace=len(moe.dense_layers),
                  n_group=1, topk_group=1)
    else:
        hf.update(num_experts=moe.num_experts, moe_intermediate_size=config.expert_ffn_dim,
                  norm_topk_prob=moe.norm_topk, decoder_sparse_step=1, mlp_only_layers=sorted(moe.dense_layers))
    return hf


def moe_config_from_hf(hf: dict[str, Any], model_type: str) -> dict[str, Any] | None:
    """lmforge's `moe` section for an MoE model_type; None for a dense one. The load-balancing
    weight is converted to lmforge's per-layer sum (`hf_aux_coef`)."""
    moe = _moe_fields(hf, model_type)
    if moe is not None:
        moe_layers = max(1, hf["num_hidden_layers"] - len(moe.get("dense_layers", [])))
        moe["aux_loss_coef"] = round(moe["aux_loss_coef"] * moe["top_k"] / moe_layers, 10)
    return moe


def _moe_fields(hf: dict[str, Any], model_type: str) -> dict[str, Any] | None:
    if model_type == "mixtral":
        return dict(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], norm_topk=True,
                    aux_loss_coef=hf.get("router_aux_loss_coef", 0.01))
    if model_type == "qwen3_moe":
        step = hf.get("decoder_sparse_step", 1)
        dense = set(hf.get("mlp_only_layers") or [])
        dense |= {i for i in range(hf["num_hidden_layers"]) if (i + 1) % step}
        # transformers 5 saves Qwen3-MoE's `num_experts` under its attribute-map name.
        experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
        return dict(num_experts=experts, top_k=hf["num_experts_per_tok"],
                    expert_ffn_dim=hf["moe_intermediate_size"], norm_topk=bool(hf.get("norm_topk_prob", False)),
                    aux_loss_coef=hf.get("router_aux_loss_coef", 0.001), dense_layers=sorted(dense))
    if model_type == "dots1":
        groups, kept = hf.get("n_group") or 1, hf.get("topk_group") or 1
        if kept < groups:
            raise ValueError(f"n_group {groups} with topk_group {kept}: group-limited routing is not supported")
        experts = hf["n_routed_experts"] if "n_routed_experts" in hf else hf["num_local_experts"]
        first_dense = min(hf.get("first_k_dense_replace") or 0, hf["num_hidden_layers"])
        # No update rate in the checkpoint: the imported bias routes, and stays as it is unless set.
        return dict(num_experts=experts, top_k=hf["num_experts_per_tok"], expert_ffn_dim=hf["moe_intermediate_size"],
                    num_shared_experts=hf.get("n_shared_experts") or 0, gate="sigmoid",
                    norm_topk=bool(hf.get("norm_topk_prob", False)), route_scale=hf.get("routed_scaling_factor", 1.0),
                    aux_loss_coef=hf.get("router_aux_loss_coef", 0.001), dense_layers=list(range(first_dense)))
    return None


# ---------------------------------------------------------------------------- weights


def experts_to_hf(state: dict[str, torch.Tensor], config, architecture: str) -> dict[str, torch.Tensor]:
    mixtral = architecture == "MixtralForCausalLM"
    prefix, names = ("block_sparse_moe.", MIXTRAL_MLP) if mixtral else ("mlp.", DENSE_MLP)
    out = {f"{prefix}gate.weight": state["ffn.router.weight"]}
    bias = state["ffn.expert_bias"]
    if architecture == "Dots1ForCausalLM":
        out["mlp.gate.e_score_correction_bias"] = bias
        for name, tensor in zip(DENSE_MLP, _shared(state, config), strict=True):
            out[f"mlp.shared_experts.{name}.weight"] = tensor
    elif bias.device.type != "meta" and bias.any():
        raise ValueError("a non-zero moe expert_bias: Qwen3-MoE and Mixtral have no place for it")
    for e, (w13, w2) in enumerate(zip(state["ffn.experts.w13"], state["ffn.experts.w2"], strict=True)):
        gate, up = w13.chunk(2)
        for name, tensor in zip(names, (gate, up, w2), strict=True):
            out[f"{prefix}experts.{e}.{name}.weight"] = tensor
    return out


def _shared(state: dict[str, torch.Tensor], config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The shared experts' gate, up and down; zero-width ones without shared experts (Dots1 always has them)."""
    if config.moe.num_shared_experts:
        gate, up = state["ffn.shared.w13.weight"].chunk(2)
        return gate, up, state["ffn.shared.w2.weight"]
    dtype = state["ffn.router.weight"].dtype
    return torch.zeros(0, config.dim, dtype=dtype), torch.zeros(0, config.dim, dtype=dtype), torch.zeros(config.dim, 0, dtype=dtype)


def experts_from_hf(tensors: dict[str, torch.Tensor], config, architecture: str) -> dict[str, torch.Tensor]:
    mixtral = architecture == "MixtralForCausalLM"
    prefix, (gate, up, down) = ("block_sparse_moe.", MIXTRAL_MLP) if mixtral else ("mlp.", DENSE_MLP)
    experts = range(config.moe.num_experts)
    state = {"ffn.router.weight": tensors[f"{prefix}gate.weight"]}
    state["ffn.experts.w13"] = torch.stack(
        [torch.cat([tensors[f"{prefix}experts.{e}.{gate}.weight"], tensors[f"{prefix}experts.{e}.{up}.weight"]]) for e in experts]
    )
    state["ffn.experts.w2"] = torch.stack([tensors[f"{prefix}experts.{e}.{down}.weight"] for e in experts])
    if architecture != "Dots1ForCausalLM":
        state["ffn.expert_bias"] = torch.zeros(config.moe.num_experts)
        return state
    state["ffn.expert_bias"] = tensors["mlp.gate.e_score_correction_bias"].float()
    if config.moe.num_shared_experts:
        shared = "mlp.shared_experts."
        state["ffn.shared.w13.weight"] = torch.cat([tensors[f"{shared}gate_proj.weight"], tensors[f"{shared}up_proj.weight"]])
        state["ffn.shared.w2.weight"] = tensors[f"{shared}down_proj.weight"]
    return state
