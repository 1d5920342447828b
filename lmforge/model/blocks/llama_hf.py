"""The Llama block's Hugging Face layouts: Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Dots1, Mixtral.

All seven share the decoder layer `input_layernorm -> self_attn -> post_attention_layernorm ->
mlp`, so converting is renaming plus splitting (export) or concatenating (import) lmforge's
fused projections: `wqkv` = q_proj | k_proj | v_proj and `w13` = gate_proj | up_proj, by rows.
Experts are written one module per expert, as the published checkpoints are (transformers
5 fuses them itself on load; vLLM and llama.cpp read this layout); the MoE parts are in
llama_moe_hf.py.

Which architecture a model exports to follows from its options; a combination no layout in
transformers expresses is refused by name rather than exported approximately.
"""

from __future__ import annotations

from typing import Any

import torch

from lmforge.model.blocks.llama_moe_hf import (
    experts_from_hf,
    experts_to_hf,
    moe_architecture,
    moe_config_from_hf,
    moe_config_to_hf,
)


def _layer_types(config) -> list[str]:
    return ["sliding_attention" if config.layer_window(i) else "full_attention" for i in range(config.n_layers)]


class LlamaFamilyLayout:
    architectures = {
        "LlamaForCausalLM": "llama",
        "MistralForCausalLM": "mistral",
        "Qwen2ForCausalLM": "qwen2",
        "Qwen3ForCausalLM": "qwen3",
        "Qwen3MoeForCausalLM": "qwen3_moe",
        "Dots1ForCausalLM": "dots1",
        "MixtralForCausalLM": "mixtral",
    }

    # ------------------------------------------------------------------------ config.json

    def export_architecture(self, config) -> str:
        windows = {config.layer_window(i) for i in range(config.n_layers)}
        uniform_window = len(windows) == 1
        biases = (config.qkv_bias, config.attn_out_bias, config.mlp_bias)
        if config.moe is not None:
            return moe_architecture(config, uniform_window, biases)
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

    def config_to_hf(self, config, architecture: str) -> dict[str, Any]:
        hf: dict[str, Any] = {"intermediate_size": config.ffn_dim}
        window = config.sliding_window
        if architecture == "LlamaForCausalLM":
            hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias, pretraining_tp=1)
        elif architecture in ("MistralForCausalLM", "MixtralForCausalLM"):
            hf["sliding_window"] = window
        elif architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Dots1ForCausalLM"):
            # `layer_types` is what transformers reads; max_window_layers says the same to older
            # readers when the sliding layers are the top ones.
            types = _layer_types(config)
            first_sliding = next((i for i, t in enumerate(types) if t == "sliding_attention"), config.n_layers)
            hf.update(sliding_window=window, max_window_layers=first_sliding, layer_types=types)
            if architecture != "Dots1ForCausalLM":
                hf["use_sliding_window"] = window is not None
            if architecture != "Qwen2ForCausalLM":
                hf["attention_bias"] = config.qkv_bias
        elif architecture == "Qwen3MoeForCausalLM":
            hf.update(use_sliding_window=window is not None, sliding_window=window, attention_bias=config.qkv_bias)
        if config.moe is not None:
            hf.update(moe_config_to_hf(config, architecture))
        return hf

    def config_from_hf(self, hf: dict[str, Any], architecture: str) -> dict[str, Any]:
        model_type = self.architectures[architecture]
        fields: dict[str, Any] = {"ffn_dim": hf["intermediate_size"]}
        if model_type == "llama":
            fields["qkv_bias"] = fields["attn_out_bias"] = bool(hf.get("attention_bias", False))
            fields["mlp_bias"] = bool(hf.get("mlp_bias", False))
        elif model_type == "qwen2":
            fields["qkv_bias"] = True
        elif model_type in ("qwen3", "qwen3_moe", "dots1"):
            fields["qk_norm"] = True
            fields["qkv_bias"] = fields["attn_out_bias"] = bool(hf.get("attention_bias", False))
        fields.update(self._window_from_hf(hf, model_type))
        moe = moe_config_from_hf(hf, model_type)
        if moe is not None:
            fields["moe"] = moe
        return fields

    @staticmethod
    def _window_from_hf(hf: dict[str, Any], model_type: str) -> dict[str, Any]:
        window = hf.get("sliding_window")
        if model_type in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window", False):
            window = None
        if model_type == "llama" or not window:
            return {}
        types = hf.get("layer_types")
        if model_type in ("qwen2", "qwen3", "dots1") and types is None:
            first = hf.get("max_window_layers", 62 if model_type == "dots1" else 0)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(hf["num_hidden_layers"])]
        if types is None or all(t == "sliding_attention" for t in types):
            return {"sliding_window": window}
        if all(t == "full_attention" for t in types):
            return {}
        return {"sliding_window": window, "attention_pattern": ["sliding" if t == "sliding_attention" else "full" for t in types]}

    # ---------------------------------------------------------------------------- weights

    def layer_to_hf(self, state: dict[str, torch.Tensor], config, layer: int, architecture: str) -> dict[str, torch.Tensor]:
        out = {"input_layernorm.weight": state["attn_norm.weight"], "post_attention_layernorm.weight": state["ffn_norm.weight"]}
        out.update(attention_to_hf(state, config))
        if architecture == "Qwen2ForCausalLM" and not config.qkv_bias:  # Qwen2 always has q/k/v biases: zero ones add nothing
            q = out["self_attn.q_proj.weight"]
            for name in "qkv":
                out[f"self_attn.{name}_proj.bias"] = torch.zeros(out[f"self_attn.{name}_proj.weight"].shape[0], dtype=q.dtype)
        if config.qk_norm:
            out["self_attn.q_norm.weight"] = state["attn.q_norm.weight"]
            out["self_attn.k_norm.weight"] = state["attn.k_norm.weight"]
        if config.is_moe_layer(layer):
            out.update(experts_to_hf(state, config, architecture))
        else:
            out.update(mlp_to_hf(state, config))
        return out

    def layer_from_hf(self, tensors: dict[str, torch.Tensor], config, layer: int, architecture: str) -> dict[str, torch.Tensor]:
        state = {"attn_norm.weight": tensors["input_layernorm.weight"], "ffn_norm.weight": tensors["post_attention_layernorm.weight"]}
        state.update(attention_from_hf(tensors, config))
        if config.qk_norm:
            state["attn.q_norm.weight"] = tensors["self_attn.q_norm.weight"]
            state["attn.k_norm.weight"] = tensors["self_attn.k_norm.weight"]
        if config.is_moe_layer(layer):
            state.update(experts_from_hf(tensors, config, architecture))
        else:
            state.update(mlp_from_hf(tensors, config))
        return state


# The q/k/v/o projections and the dense SwiGLU as every Llama-family layout names them (OLMo-2's too).


def attention_to_hf(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """`attn.wqkv` split by rows into q_proj | k_proj | v_proj, `attn.wo` as o_proj, with their biases."""
    out = {}
    rows = [config.n_heads * config.head_dim] + [config.n_kv_heads * config.head_dim] * 2
    for suffix in ["weight"] + (["bias"] if config.qkv_bias else []):
        for name, tensor in zip("qkv", state[f"attn.wqkv.{suffix}"].split(rows), strict=True):
            out[f"self_attn.{name}_proj.{suffix}"] = tensor
    for suffix in ["weight"] + (["bias"] if config.attn_out_bias else []):
        out[f"self_attn.o_proj.{suffix}"] = state[f"attn.wo.{suffix}"]
    return out


def attention_from_hf(tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    state = {}
    for suffix in ["weight"] + (["bias"] if config.qkv_bias else []):
        state[f"attn.wqkv.{suffix}"] = torch.cat([tensors[f"self_attn.{p}_proj.{suffix}"] for p in "qkv"])
    for suffix in ["weight"] + (["bias"] if config.attn_out_bias else []):
        state[f"attn.wo.{suffix}"] = tensors[f"self_attn.o_proj.{suffix}"]
    return state


def mlp_to_hf(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """`ffn.w13` split into gate_proj | up_proj, `ffn.w2` as down_proj, with their biases."""
    out = {}
    for suffix in ["weight"] + (["bias"] if config.mlp_bias else []):
        gate, up = state[f"ffn.w13.{suffix}"].chunk(2)
        out[f"mlp.gate_proj.{suffix}"], out[f"mlp.up_proj.{suffix}"] = gate, up
        out[f"mlp.down_proj.{suffix}"] = state[f"ffn.w2.{suffix}"]
    return out


def mlp_from_hf(tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    state = {}
    for suffix in ["weight"] + (["bias"] if config.mlp_bias else []):
        state[f"ffn.w13.{suffix}"] = torch.cat([tensors[f"mlp.gate_proj.{suffix}"], tensors[f"mlp.up_proj.{suffix}"]])
        state[f"ffn.w2.{suffix}"] = tensors[f"mlp.down_proj.{suffix}"]
    return state
