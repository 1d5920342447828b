"""The Llama block's Hugging Face layouts: Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral.

All six share the decoder layer `input_layernorm -> self_attn -> post_attention_layernorm ->
mlp`, so converting is renaming plus splitting (export) or concatenating (import) lmforge's
fused projections: `wqkv` = q_proj | k_proj | v_proj and `w13` = gate_proj | up_proj, by rows.
Experts are written one module per expert, as the published checkpoints are (transformers
5 fuses them itself on load; vLLM and llama.cpp read this layout).

Which architecture a model exports to follows from its options; a combination no layout in
transformers expresses is refused by name rather than exported approximately.
"""

from __future__ import annotations

from typing import Any

import torch

DENSE_MLP = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_MLP = ("w1", "w3", "w2")  # gate, up, down


def _layer_types(config) -> list[str]:
    return ["sliding_attention" if config.layer_window(i) else "full_attention" for i in range(config.n_layers)]


class LlamaFamilyLayout:
    architectures = {
        "LlamaForCausalLM": "llama",
        "MistralForCausalLM": "mistral",
        "Qwen2ForCausalLM": "qwen2",
        "Qwen3ForCausalLM": "qwen3",
        "Qwen3MoeForCausalLM": "qwen3_moe",
        "MixtralForCausalLM": "mixtral",
    }

    # ------------------------------------------------------------------------ config.json

    def export_architecture(self, config) -> str:
        windows = {config.layer_window(i) for i in range(config.n_layers)}
        uniform_window = len(windows) == 1
        biases = (config.qkv_bias, config.attn_out_bias, config.mlp_bias)
        if config.moe is not None:
            return self._moe_architecture(config, uniform_window, biases)
        if config.qk_norm:
            if config.qkv_bias != config.attn_out_bias or config.mlp_bias:
                raise ValueError("qk_norm exports as Qwen3, whose biases are all of q/k/v/o or none, and no MLP bias")
            return "Qwen3ForCausalLM"
        if config.sliding_window is not None:
            if config.attn_out_bias or config.mlp_bias:
                raise ValueError("sliding-window layers with output or MLP biases have no transformers layout")
            if uniform_window and not config.qkv_bias:
                return "MistralForCausalLM"
            return "Qwen2ForCausalLM"  # per-layer `layer_types`; q/k/v biases (zero if the model has none)
        if config.attn_out_bias != config.qkv_bias:
            if config.attn_out_bias or config.mlp_bias:
                raise ValueError("an attention output bias without q/k/v biases has no Llama-family layout in transformers")
            return "Qwen2ForCausalLM"  # q/k/v biases only: Qwen2's layout
        return "LlamaForCausalLM"

    @staticmethod
    def _moe_architecture(config, uniform_window: bool, biases: tuple[bool, bool, bool]) -> str:
        moe = config.moe
        unsupported = [
            (moe.gate != "softmax", f"moe.gate {moe.gate}"),
            (moe.num_shared_experts > 0, "moe.num_shared_experts > 0"),
            (moe.route_scale != 1.0, "moe.route_scale != 1"),
            (moe.bias_update_rate > 0, "moe.bias_update_rate > 0 (auxiliary-loss-free bias)"),
            (not uniform_window, "a per-layer attention_pattern"),
            (config.mlp_bias, "mlp_bias"),
        ]
        for bad, what in unsupported:
            if bad:
                raise ValueError(f"{what}: Qwen3-MoE and Mixtral, the MoE layouts lmforge exports, have no place for it")
        if config.qk_norm:
            if config.qkv_bias != config.attn_out_bias:
                raise ValueError("Qwen3-MoE's biases are all of q/k/v/o or none")
            return "Qwen3MoeForCausalLM"
        if any(biases) or moe.dense_layers or not moe.norm_topk:
            raise ValueError(
                "an MoE model without qk_norm exports as Mixtral, which has no biases, no dense layers and "
                "always renormalises the top-k weights (moe.norm_topk: true)"
            )
        return "MixtralForCausalLM"

    def config_to_hf(self, config, architecture: str) -> dict[str, Any]:
        hf: dict[str, Any] = {"intermediate_size": config.ffn_dim}
        window = config.sliding_window
        if architecture == "LlamaForCausalLM":
            hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias, pretraining_tp=1)
        elif architecture in ("MistralForCausalLM", "MixtralForCausalLM"):
            hf["sliding_window"] = window
        elif architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM"):
            # `layer_types` is what transformers reads; max_window_layers says the same to older
            # readers when the sliding layers are the top ones.
            types = _layer_types(config)
            first_sliding = next((i for i, t in enumerate(types) if t == "sliding_attention"), config.n_layers)
            hf.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=first_sliding,
                      layer_types=types)
            if architecture == "Qwen3ForCausalLM":
                hf["attention_bias"] = config.qkv_bias
        elif architecture == "Qwen3MoeForCausalLM":
            hf.update(use_sliding_window=window is not None, sliding_window=window, attention_bias=config.qkv_bias)
        if config.moe is not None:
            moe = config.moe
            hf.update(num_experts_per_tok=moe.top_k, router_aux_loss_coef=moe.aux_loss_coef, output_router_logits=False)
            if architecture == "MixtralForCausalLM":
                hf.update(num_local_experts=moe.num_experts, intermediate_size=config.expert_ffn_dim, router_jitter_noise=0.0)
            else:
                hf.update(num_experts=moe.num_experts, moe_intermediate_size=config.expert_ffn_dim,
                          norm_topk_prob=moe.norm_topk, decoder_sparse_step=1, mlp_only_layers=sorted(moe.dense_layers))
        return hf

    def config_from_hf(self, hf: dict[str, Any], architecture: str) -> dict[str, Any]:
        model_type = self.architectures[architecture]
        fields: dict[str, Any] = {"ffn_dim": hf["intermediate_size"]}
        if model_type == "llama":
            fields["qkv_bias"] = fields["attn_out_bias"] = bool(hf.get("attention_bias", False))
            fields["mlp_bias"] = bool(hf.get("mlp_bias", False))
        elif model_type == "qwen2":
            fields["qkv_bias"] = True
        elif model_type in ("qwen3", "qwen3_moe"):
            fields["qk_norm"] = True
            fields["qkv_bias"] = fields["attn_out_bias"] = bool(hf.get("attention_bias", False))
        fields.update(self._window_from_hf(hf, model_type))
        if model_type == "mixtral":
            fields["moe"] = dict(num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"], norm_topk=True,
                                 aux_loss_coef=hf.get("router_aux_loss_coef", 0.01))
        elif model_type == "qwen3_moe":
            step = hf.get("decoder_sparse_step", 1)
            dense = set(hf.get("mlp_only_layers") or [])
            dense |= {i for i in range(hf["num_hidden_layers"]) if (i + 1) % step}
            # transformers 5 saves Qwen3-MoE's `num_experts` under its attribute-map name.
            experts = hf["num_experts"] if "num_experts" in hf else hf["num_local_experts"]
            fields["moe"] = dict(num_experts=experts, top_k=hf["num_experts_per_tok"],
                                 expert_ffn_dim=hf["moe_intermediate_size"], norm_topk=bool(hf.get("norm_topk_prob", False)),
                                 aux_loss_coef=hf.get("router_aux_loss_coef", 0.001), dense_layers=sorted(dense))
        return fields

    @staticmethod
    def _window_from_hf(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
        window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
            window = None
        if model_type == "llama" or not window:
            return {}
        types = hf.get("layer_types")
        if model_type in ("qwen2", "qwen3") and types is None:
            first = hf.get("max_window_layers", 0)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(hf["num_hidden_layers"])]
        if types is None or all(t == "sliding_attention" for t in types):
            return {"sliding_window": window}
        if all(t == "full_attention" for t in types):
            return {}
        return {"sliding_window": window, "attention_pattern": ["sliding" if t == "sliding_attention" else "full" for t in types]}

    # ---------------------------------------------------------------------------- weights

    def layer_to_hf(self, state: dict[str, torch.Tensor], config, layer: int, architecture: str) -> dict[str, torch.Tensor]:
        out = {"input_layernorm.weight": state["attn_norm.weight"], "post_attention_layernorm.weight": state["ffn_norm.weight"]}
        q_rows, kv_rows = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        q, k, v = state["attn.wqkv.weight"].split([q_rows, kv_rows, kv_rows])
        out.update({"self_attn.q_proj.weight": q, "self_attn.k_proj.weight": k, "self_attn.v_proj.weight": v})
        if config.qkv_bias:
            q, k, v = state["attn.wqkv.bias"].split([q_rows, kv_rows, kv_rows])
        elif architecture == "Qwen2ForCausalLM":  # Qwen2 always has q/k/v biases: zero ones add nothing
            q, k, v = (torch.zeros(n, dtype=q.dtype) for n in (q_rows, kv_rows, kv_rows))
        if config.qkv_bias or architecture == "Qwen2ForCausalLM":
            out.update({"self_attn.q_proj.bias": q, "self_attn.k_proj.bias": k, "self_attn.v_proj.bias": v})
        out["self_attn.o_proj.weight"] = state["attn.wo.weight"]
        if config.attn_out_bias:
            out["self_attn.o_proj.bias"] = state["attn.wo.bias"]
        if config.qk_norm:
            out["self_attn.q_norm.weight"] = state["attn.q_norm.weight"]
            out["self_attn.k_norm.weight"] = state["attn.k_norm.weight"]
        if config.is_moe_layer(layer):
            out.update(self._experts_to_hf(state, architecture))
            return out
        for suffix in ["weight"] + (["bias"] if config.mlp_bias else []):
            gate, up = state[f"ffn.w13.{suffix}"].chunk(2)
            out[f"mlp.gate_proj.{suffix}"], out[f"mlp.up_proj.{suffix}"] = gate, up
            out[f"mlp.down_proj.{suffix}"] = state[f"ffn.w2.{suffix}"]
        return out

    @staticmethod
    def _experts_to_hf(state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
        mixtral = architecture == "MixtralForCausalLM"
        prefix, names = ("block_sparse_moe.", MIXTRAL_MLP) if mixtral else ("mlp.", DENSE_MLP)
        out = {f"{prefix}gate.weight": state["ffn.router.weight"]}
        for e, (w13, w2) in enumerate(zip(state["ffn.experts.w13"], state["ffn.experts.w2"], strict=True)):
            gate, up = w13.chunk(2)
            for name, tensor in zip(names, (gate, up, w2), strict=True):
                out[f"{prefix}experts.{e}.{name}.weight"] = tensor
        return out

    def layer_from_hf(self, tensors: dict[str, torch.Tensor], config, layer: int, architecture: str) -> dict[str, torch.Tensor]:
        state = {"attn_norm.weight": tensors["input_layernorm.weight"], "ffn_norm.weight": tensors["post_attention_layernorm.weight"]}
        for suffix in ["weight"] + (["bias"] if config.qkv_bias else []):
            state[f"attn.wqkv.{suffix}"] = torch.cat([tensors[f"self_attn.{p}_proj.{suffix}"] for p in "qkv"])
        for suffix in ["weight"] + (["bias"] if config.attn_out_bias else []):
            state[f"attn.wo.{suffix}"] = tensors[f"self_attn.o_proj.{suffix}"]
        if config.qk_norm:
            state["attn.q_norm.weight"] = tensors["self_attn.q_norm.weight"]
            state["attn.k_norm.weight"] = tensors["self_attn.k_norm.weight"]
        if config.is_moe_layer(layer):
            mixtral = architecture == "MixtralForCausalLM"
            prefix, (gate, up, down) = ("block_sparse_moe.", MIXTRAL_MLP) if mixtral else ("mlp.", DENSE_MLP)
            experts = range(config.moe.num_experts)
            state["ffn.router.weight"] = tensors[f"{prefix}gate.weight"]
            state["ffn.experts.w13"] = torch.stack(
                [torch.cat([tensors[f"{prefix}experts.{e}.{gate}.weight"], tensors[f"{prefix}experts.{e}.{up}.weight"]]) for e in experts]
            )
            state["ffn.experts.w2"] = torch.stack([tensors[f"{prefix}experts.{e}.{down}.weight"] for e in experts])
            state["ffn.expert_bias"] = torch.zeros(config.moe.num_experts)
            return state
        for suffix in ["weight"] + (["bias"] if config.mlp_bias else []):
            state[f"ffn.w13.{suffix}"] = torch.cat([tensors[f"mlp.gate_proj.{suffix}"], tensors[f"mlp.up_proj.{suffix}"]])
            state[f"ffn.w2.{suffix}"] = tensors[f"mlp.down_proj.{suffix}"]
        return state
