"""ModelConfig: the shape of a decoder (its block type, attention pattern, dense or mixture-of-experts
FFNs), its parameter counts (total and active) and training FLOPs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lmforge.config import Section
from lmforge.model.presets import PRESETS


class RopeScaling(Section):
    """Context extension of RoPE frequencies, as in HF `rope_scaling` (for imported models).

    linear: positions divided by `factor` (Chen et al., 2023, position interpolation).
    llama3: low frequencies divided by `factor`, high ones kept, a smooth ramp between
    (Llama 3.1 report, section 3.4; HF `_compute_llama3_parameters`).
    """

    type: Literal["linear", "llama3"]
    factor: float = Field(gt=0)
    low_freq_factor: float = Field(1.0, gt=0)
    high_freq_factor: float = Field(4.0, gt=0)
    original_max_seq_len: int = Field(8192, ge=1)


class MoEConfig(Section):
    """A mixture-of-experts FFN: token-choice top-k routing over SwiGLU experts, dropless.

    Load balancing: `aux_loss_coef` is the Switch Transformer auxiliary loss (Fedus et al.,
    2021, eq. 4); `bias_update_rate` > 0 is DeepSeek-V3's auxiliary-loss-free balancing
    (a per-expert bias, added to the scores for choosing experts only, moved after every
    step towards equal load; Wang et al., 2024). Both may be on, as in DeepSeek-V3.
    """

    num_experts: int = Field(8, ge=1)
    top_k: int = Field(2, ge=1, description="experts per token")
    expert_ffn_dim: int | None = Field(None, ge=1, description="each expert's hidden size; None: model.ffn_dim")
    num_shared_experts: int = Field(0, ge=0, description="experts every token goes through (DeepSeekMoE)")
    gate: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk: bool = Field(True, description="renormalise the k chosen weights to sum to 1")
    route_scale: float = Field(1.0, gt=0, description="multiplies the routed output (DeepSeek-V3's routed_scaling_factor)")
    aux_loss_coef: float = Field(0.01, ge=0, description="load-balancing loss weight; 0: off")
    bias_update_rate: float = Field(0.0, ge=0, description="auxiliary-loss-free bias step per optimizer step; "
                                    "0: the bias stays as it is (zero unless trained or imported)")
    router_z_loss_coef: float = Field(0.001, ge=0, description="router z-loss weight (ST-MoE, Zoph et al., 2022)")
    dense_layers: list[int] = Field(default_factory=list, description="layers with a dense FFN of model.ffn_dim")


class ModelConfig(Section):
    """The model's shape: a named preset, or every size and architecture choice."""

    preset: str | None = Field(None, description=f"one of: {', '.join(PRESETS)}")
    vocab_size: int | None = Field(None, ge=1, description="None: the tokenizer's, padded to 64")
    dim: int = Field(256, ge=8)
    n_layers: int = Field(4, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int = Field(2, ge=1, description="grouped-query attention: KV heads shared by groups")
    ffn_dim: int = Field(704, ge=1, description="SwiGLU hidden size")
    max_seq_len: int = Field(512, ge=2)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = False
    # Layout variants of the Llama family, so imported checkpoints map exactly:
    # Qwen2 has q/k/v biases, some Llamas have attention/MLP biases, some models (Mistral
    # Nemo, Qwen3) use a head width other than dim / n_heads.
    head_size: int | None = Field(None, ge=2, description="per-head width; None: dim // n_heads")
    qkv_bias: bool = False
    attn_out_bias: bool = False
    mlp_bias: bool = False
    init_std: float = Field(0.02, gt=0)
    # Architecture choices beyond the Llama layout (blocks registered in lmforge/model/blocks/).
    block: str = Field("llama", description="the block type of every layer (lmforge/model/blocks/)")
    qk_norm: bool = Field(False, description="RMSNorm on each head's queries and keys (Qwen3, OLMo-2)")
    sliding_window: int | None = Field(None, ge=1, description="local attention span of 'sliding' layers")
    attention_pattern: list[Literal["full", "sliding"]] | None = Field(
        None, min_length=1, description="tiled over the layers, e.g. [sliding, sliding, sliding, full]; "
        "None: every layer sliding when sliding_window is set"
    )
    z_loss: float = Field(0.0, ge=0, description="output-logit z-loss weight (PaLM: 1e-4); 0: off")
    moe: MoEConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Preset values fill every key the user did not set explicitly."""
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r} (allowed: {', '.join(PRESETS)})")
            merged = {**PRESETS[name], **data}
            # A nested section (moe) set alongside a preset overrides the preset's keys one by one.
            for key, value in PRESETS[name].items():
                if isinstance(value, dict) and isinstance(data.get(key), dict):
                    merged[key] = {**value, **data[key]}
            return merged
        return data

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        if self.head_size is None and self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        self._check_architecture()
        return self

    def _check_architecture(self) -> None:
        from lmforge.model.blocks import block_names  # the registry imports this module

        if self.block not in block_names():
            raise ValueError(f"block: unknown block type {self.block!r} (registered: {', '.join(block_names())})")
        if self.attention_pattern is not None and self.sliding_window is None:
            raise ValueError("attention_pattern needs sliding_window (the span of its 'sliding' layers)")
        if self.attention_pattern is not None and "sliding" not in self.attention_pattern:
            raise ValueError("attention_pattern has no 'sliding' layer: drop sliding_window, or put 'sliding' in it")
        if self.sliding_window is not None and self.sliding_window >= self.max_seq_len:
            raise ValueError(
                f"sliding_window {self.sliding_window} is not below max_seq_len {self.max_seq_len}: "
                "the window would never bind (drop it, or make it smaller)"
            )
        moe = self.moe
        if moe is not None:
            if moe.top_k > moe.num_experts:
                raise ValueError(f"moe.top_k {moe.top_k} exceeds moe.num_experts {moe.num_experts}")
            wrong = [i for i in moe.dense_layers if not 0 <= i < self.n_layers]
            if wrong:
                raise ValueError(f"moe.dense_layers: layer {wrong[0]} does not exist (n_layers {self.n_layers})")

    def layer_window(self, layer: int) -> int | None:
        """The attention span of `layer`: its sliding window, or None for full causal attention."""
        if self.sliding_window is None:
            return None
        pattern = self.attention_pattern or ["sliding"]
        return self.sliding_window if pattern[layer % len(pattern)] == "sliding" else None

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer not in self.moe.dense_layers

    @property
    def expert_ffn_dim(self) -> int:
        return (self.moe.expert_ffn_dim if self.moe else None) or self.ffn_dim

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    def shape(self) -> dict:
        """The fields that define the weights (what a checkpoint must match)."""
        keys = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")
        shape = {k: getattr(self, k) for k in keys}
        # Variants appear only when used, so checkpoints from before they existed still match.
        variants = ("head_size", "qkv_bias", "attn_out_bias", "mlp_bias", "qk_norm")
        shape.update({k: getattr(self, k) for k in variants if getattr(self, k)})
        if self.block != "llama":
            shape["block"] = self.block
        if self.moe is not None:
            moe = self.moe
            shape["moe"] = dict(num_experts=moe.num_experts, expert_ffn_dim=self.expert_ffn_dim,
                                num_shared_experts=moe.num_shared_experts, dense_layers=sorted(moe.dense_layers))
        return shape

    def to_dict(self) -> dict[str, Any]:
        """The config as HF tools (peft) read `model.config`: a dict with HF's name for tying."""
        return {**self.model_dump(mode="json"), "tie_word_embeddings": self.tie_embeddings}

    def num_params(self, embedding: bool = True, active: bool = False) -> int:
        """Parameters in all; `active`: those one token uses (its top-k and shared experts only)."""
        from lmforge.model.blocks import block_type  # the registry imports this module

        vocab = self.vocab_size or 0
        total = self.dim + block_type(self.block).num_params(self, active)  # final norm + layers
        head = 0 if self.tie_embeddings else vocab * self.dim
        return total + head + (vocab * self.dim if embedding else 0)

    def attention_params(self) -> int:
        """The q/k/v and output projections of one layer, with their biases (QK-norm is the block's)."""
        qkv = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        return self.dim * qkv + self.n_heads * self.head_dim * self.dim + qkv * self.qkv_bias + self.dim * self.attn_out_bias

    def ffn_params(self, layer: int, active: bool = False) -> int:
        """The FFN of `layer`: dense SwiGLU, or router + experts (+ shared experts)."""
        if not self.is_moe_layer(layer):
            return 3 * self.dim * self.ffn_dim + (2 * self.ffn_dim + self.dim) * self.mlp_bias
        moe = self.moe
        assert moe is not None
        expert = 3 * self.dim * self.expert_ffn_dim
        routed = moe.top_k if active else moe.num_experts
        return self.dim * moe.num_experts + expert * (routed + moe.num_shared_experts)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight a token uses (its
        active parameters) plus attention.

        Attention scores and values add 12 * dim_attn * context per layer (PaLM, appendix B),
        the context of a sliding layer capped at its window; the embedding lookup is not a
        matmul and is not counted.
        """
        vocab = self.vocab_size or 0
        matmul_params = self.num_params(embedding=False, active=True) + (vocab * self.dim if self.tie_embeddings else 0)
        context = sum(min(seq_len, self.layer_window(i) or seq_len) for i in range(self.n_layers))
        return 6.0 * matmul_params + 12.0 * self.n_heads * self.head_dim * context
