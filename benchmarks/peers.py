"""Peer implementations of lmforge's dense Llama block for the training benchmarks: litgpt's GPT.

Each builder returns (model, loss_fn) with lmforge's weights copied in, so a benchmark compares
the same network doing the same work; or raises ImportError when the peer is not installed
(`pip install litgpt lightning`; the benchmarks then report it as skipped).
"""

from __future__ import annotations

import torch

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer


def litgpt_config(config: ModelConfig):
    from litgpt.config import Config

    return Config(
        name="lmforge-shape", block_size=config.max_seq_len, vocab_size=config.vocab_size,
        padded_vocab_size=config.vocab_size, n_layer=config.n_layers, n_head=config.n_heads,
        n_query_groups=config.n_kv_heads, head_size=config.head_dim, n_embd=config.dim,
        intermediate_size=config.ffn_dim, rotary_percentage=1.0, rope_base=int(config.rope_theta),
        parallel_residual=False, bias=False, norm_class_name="RMSNorm", norm_eps=config.norm_eps,
        mlp_class_name="LLaMAMLP",
    )


def build_litgpt(lm: Transformer):
    """litgpt's `GPT` at lmforge's shape with lmforge's weights; its loss is litgpt's pretraining
    loss (`chunked_cross_entropy` over the logits, as `litgpt pretrain` computes it)."""
    from litgpt.model import GPT
    from litgpt.utils import chunked_cross_entropy

    c = lm.config
    model = GPT(litgpt_config(c))
    q_size, kv_size = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    with torch.no_grad():
        model.transformer.wte.weight.copy_(lm.tok_embeddings.weight)
        for a, b in zip(lm.layers, model.transformer.h, strict=True):
            q, k, v = a.attn.wqkv.weight.split([q_size, kv_size, kv_size], dim=0)
            b.attn.qkv.weight.copy_(torch.cat([q, k, v]))  # litgpt >= 0.5: q, k, v one after another
            b.attn.proj.weight.copy_(a.attn.wo.weight)
            gate, up = a.ffn.w13.weight.chunk(2, dim=0)
            b.mlp.fc_1.weight.copy_(gate)
            b.mlp.fc_2.weight.copy_(up)
            b.mlp.proj.weight.copy_(a.ffn.w2.weight)
            b.norm_1.weight.copy_(a.attn_norm.weight)
            b.norm_2.weight.copy_(a.ffn_norm.weight)
        model.transformer.ln_f.weight.copy_(lm.norm.weight)
        model.lm_head.weight.copy_(lm.output.weight if not c.tie_embeddings else lm.tok_embeddings.weight)

    def loss_fn(net, inputs, targets):
        return chunked_cross_entropy(net(inputs), targets)

    return model, loss_fn


PEERS = {"litgpt": build_litgpt}
