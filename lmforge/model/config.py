"""ModelConfig: the shape of a Llama-style decoder, its parameter count and training FLOPs."""

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


class ModelConfig(Section):
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

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Preset values fill every key the user did not set explicitly."""
        if isinstance(data, dict) and data.get("preset") is not None:
            name = data["preset"]
            if name not in PRESETS:
                raise ValueError(f"unknown preset {name!r} (allowed: {', '.join(PRESETS)})")
            return {**PRESETS[name], **data}
        return data

    @model_validator(mode="after")
    def _check_shape(self) -> ModelConfig:
        if self.head_size is None and self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")
        return self

    @property
    def head_dim(self) -> int:
        return self.head_size or self.dim // self.n_heads

    def shape(self) -> dict:
        """The fields that define the weights (what a checkpoint must match)."""
        keys = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "tie_embeddings")
        shape = {k: getattr(self, k) for k in keys}
        # Variants appear only when used, so checkpoints from before they existed still match.
        variants = ("head_size", "qkv_bias", "attn_out_bias", "mlp_bias")
        shape.update({k: getattr(self, k) for k in variants if getattr(self, k)})
        return shape

    def to_dict(self) -> dict[str, Any]:
        """The config as HF tools (peft) read `model.config`: a dict with HF's name for tying."""
        return {**self.model_dump(mode="json"), "tie_word_embeddings": self.tie_embeddings}

    def num_params(self, embedding: bool = True) -> int:
        vocab = self.vocab_size or 0
        qkv = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        attn = self.dim * qkv + self.n_heads * self.head_dim * self.dim
        attn += qkv * self.qkv_bias + self.dim * self.attn_out_bias
        ffn = 3 * self.dim * self.ffn_dim + (2 * self.ffn_dim + self.dim) * self.mlp_bias
        block = attn + ffn + 2 * self.dim
        total = self.n_layers * block + self.dim  # final norm
        head = 0 if self.tie_embeddings else vocab * self.dim
        return total + head + (vocab * self.dim if embedding else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight plus attention.

        Attention scores and values add 12 * layers * dim * seq_len (PaLM, appendix B);
        the embedding lookup is not a matmul and is not counted.
        """
        vocab = self.vocab_size or 0
        matmul_params = self.num_params(embedding=False) + (vocab * self.dim if self.tie_embeddings else 0)
        return 6.0 * matmul_params + 12.0 * self.n_layers * self.n_heads * self.head_dim * seq_len
