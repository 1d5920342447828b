"""README's "Add your own block" example runs as printed: its code registers a block type that
builds, decodes with the KV cache, counts its parameters and learns real text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lmforge.errors import CheckpointError
from lmforge.model import KVCache, ModelConfig, Transformer, blocks
from lmforge.store import hf

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    """The first ```python block under the "Add your own block" heading."""
    text = README.read_text(encoding="utf-8")
    heading = re.search(r"^#+ Add your own block\s*$", text, re.MULTILINE)
    assert heading, "README has no 'Add your own block' section"
    code = re.search(r"^```python\n(.*?)^```", text[heading.end():], re.MULTILINE | re.DOTALL)
    assert code, "the section has no ```python example"
    return code.group(1)


@pytest.fixture
def parallel(monkeypatch) -> str:
    """Exec the example into a copy of the registry, so the block is gone after the test."""
    blocks.block_names()  # discover the built-in ones first
    monkeypatch.setattr(blocks, "_REGISTRY", dict(blocks._REGISTRY))
    exec(compile(readme_example(), str(README), "exec"), {"__name__": "readme_example"})
    assert "parallel" in blocks.block_names()
    return "parallel"


def test_the_example_block_builds_decodes_and_counts_its_parameters(parallel):
    config = ModelConfig(preset="tiny", vocab_size=256, max_seq_len=64, block=parallel)
    torch.manual_seed(0)
    model = Transformer(config).eval()
    assert type(model.layers[0]).__name__ == "ParallelBlock"
    assert config.num_params() == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        full = model(tokens)
        cache = KVCache(config, 2, 64)
        steps = [model(tokens[:, :8], kv_cache=cache)]
        steps += [model(tokens[:, t:t + 1], positions=torch.tensor([t]), kv_cache=cache) for t in range(8, 20)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-5
    with pytest.raises(CheckpointError, match="no Hugging Face layout"):
        hf.config_to_hf(config, torch.float32, {})


def test_the_example_block_learns_real_text(parallel, trained_tokenizer, corpus_texts):
    ids = torch.tensor([i for text in corpus_texts[:60] for i in trained_tokenizer.encode(text)])
    vocab = -(-trained_tokenizer.vocab_size // 64) * 64
    config = ModelConfig(preset="tiny", vocab_size=vocab, max_seq_len=64, block=parallel)
    torch.manual_seed(0)
    model = Transformer(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(25):
        starts = torch.randint(0, len(ids) - 65, (8,), generator=generator)
        rows = torch.stack([ids[s:s + 65] for s in starts.tolist()])
        loss = model(rows[:, :-1], targets=rows[:, 1:])
        loss.backward()
        if not losses:  # every parameter takes part
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, losses
