"""Named model shapes: data, not code. `vocab_size: None` takes the tokenizer's (padded)."""

PRESETS: dict[str, dict] = {
    # Test size: a forward/backward takes milliseconds on one CPU core.
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=192, max_seq_len=256),
    # Quickstart size: learns real English structure in a few CPU minutes.
    "small": dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=704, max_seq_len=512),
    "50m": dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1408, max_seq_len=1024),
    "125m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048, max_seq_len=2048),
    "350m": dict(dim=1024, n_layers=24, n_heads=16, n_kv_heads=8, ffn_dim=2816, max_seq_len=2048),
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
}
