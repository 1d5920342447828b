"""Named model shapes: data, not code. `vocab_size: None` takes the tokenizer's (padded)."""

PRESETS: dict[str, dict] = {
    # Test size: a forward/backward takes milliseconds on one CPU core.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=256),
    # Quickstart size: learns real English structure in a few CPU minutes.
    "small": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704, max_seq_len=512),
    "50m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=1024),
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048, max_seq_len=2048),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, ffn_dim=2816, max_seq_len=2048),
    # Quickstart-size mixture of experts: "small" with 8 experts of a quarter of its FFN, 2 per
    # token, so its active parameters equal small's and its total is about 3x.
    "small-moe": dict(
        dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704, max_seq_len=512,
        moe=dict(num_experts=8, top_k=2, expert_ffn_dim=352),
    ),
    # Llama-3.2-1B shape (tied embeddings, 128k vocabulary).
    "llama3-1b": dict(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192, max_seq_len=8192,
        vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=True,
    ),
    # Llama-3-8B shape.
    "llama3-8b": dict(
        dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336, max_seq_len=8192,
        vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False,
    ),
    # Qwen3-30B-A3B shape (QK-norm; 128 experts of 768, 8 per token: 30.5B total, 3.3B active);
    # exports to Qwen3-MoE. Context capped at 4096 for training recipes (the model's is 40960).
    "qwen3-30b-a3b": dict(
        dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_size=128, ffn_dim=6144, max_seq_len=4096,
        vocab_size=151936, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=False, qk_norm=True,
        # aux_loss_coef: Qwen3-MoE's router_aux_loss_coef 0.001 in lmforge's per-layer terms (x 8 / 48).
        moe=dict(num_experts=128, top_k=8, expert_ffn_dim=768, norm_topk=True, aux_loss_coef=0.001 * 8 / 48),
    ),
}
