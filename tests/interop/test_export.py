"""`lmforge export`: the model dir loads in transformers unchanged and behaves like lmforge's model."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmforge.errors import CheckpointError, OutputError
from lmforge.interop import export
from lmforge.interop.export import ExportConfig
from lmforge.model import ModelConfig, Transformer
from lmforge.model.config import RopeScaling
from lmforge.model.decode import generate_tokens
from lmforge.store import hashes
from lmforge.store.loading import load_model
from lmforge.store.model_dir import save_model_dir
from tests.interop.conftest import auto_dtype, chat_ids, real_token_batch

CHAT = [
    {"role": "system", "content": "You answer questions about the Python standard library."},
    {"role": "user", "content": "What does `os.path.join` do?"},
    {"role": "assistant", "content": "It joins path components with the right separator."},
    {"role": "user", "content": "Ünïcode and tabs\tare fine?"},
]


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "model"
    result = export.run(ExportConfig(model=str(trained_run), out=str(out)))
    assert result.out == out and result.files == ["model.safetensors"]
    return out


def test_transformers_loads_the_export_with_no_custom_code_and_the_same_logits(trained_run, exported, corpus_texts):
    ours, tokenizer, _ = load_model(trained_run)
    theirs = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM" and theirs.dtype == torch.float32
    tokens = real_token_batch(tokenizer.encode_prompt, corpus_texts, rows=2, length=120)
    with torch.no_grad():
        expected, got = ours(tokens), theirs(tokens).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4


def test_greedy_generation_gives_the_same_tokens_in_transformers(trained_run, exported, corpus_texts):
    ours, tokenizer, _ = load_model(trained_run)
    theirs = AutoModelForCausalLM.from_pretrained(exported).eval()
    for text in corpus_texts[:3]:
        prompt = tokenizer.encode_prompt(text)[:24]
        mine = list(generate_tokens(ours, prompt, 30, temperature=0, stop_ids=tokenizer.stop_ids))
        with torch.no_grad():
            out = theirs.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False)[0, len(prompt):].tolist()
        stops = [i for i, t in enumerate(out) if t in tokenizer.stop_ids]
        assert mine == (out[: stops[0]] if stops else out)


def test_auto_tokenizer_encodes_prompts_and_chats_like_lmforge(trained_run, exported, corpus_texts):
    _, tokenizer, _ = load_model(trained_run)
    theirs = AutoTokenizer.from_pretrained(exported)
    for text in [*corpus_texts[:5], "héllo wörld ✓ 你好", "  leading spaces\n\nand lines"]:
        assert theirs(text)["input_ids"] == tokenizer.encode_prompt(text)
        assert theirs.decode(tokenizer.encode(text)) == text
    for generation_prompt in (False, True):
        assert chat_ids(theirs, CHAT, generation_prompt) == tokenizer.encode_chat(CHAT, generation_prompt)
    assert chat_ids(theirs, CHAT[:2], True)[-1] == tokenizer.token_id("<|assistant|>")
    assert theirs.eos_token == "<|endoftext|>" and theirs.pad_token == "<|pad|>"


def test_config_and_generation_config_describe_the_model(trained_run, exported):
    ours, tokenizer, _ = load_model(trained_run)
    config = json.loads((exported / "config.json").read_text())
    c = ours.config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (c.dim, c.n_layers, c.n_heads)
    assert (config["num_key_value_heads"], config["intermediate_size"]) == (c.n_kv_heads, c.ffn_dim)
    assert config["rope_theta"] == c.rope_theta and config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "float32" and config["vocab_size"] == c.vocab_size
    generation = json.loads((exported / "generation_config.json").read_text())
    assert set(generation["eos_token_id"]) == tokenizer.stop_ids and generation["bos_token_id"] == tokenizer.bos_id


def test_model_card_records_lineage_training_config_and_evals(trained_run, exported, pretrain_data):
    card = (exported / "model_card.md").read_text()
    assert card == (exported / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    lineage = front["lmforge"]
    _, tokenizer, _ = load_model(trained_run)
    assert lineage["dataset_manifest_sha256"] == hashes.sha256_file(pretrain_data["tokens"] / "manifest.json")
    assert lineage["tokenizer_hash"] == tokenizer.hash()
    assert lineage["step"] == 150 and lineage["tokens_trained"] == 150 * 1024
    assert lineage["run_dir"] == str(trained_run.resolve())
    val = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]
    assert f"{val['val_loss']:.4f}" in card and "val_bpb" in card
    assert "global_batch_tokens: 1024" in card  # the training config, verbatim
    assert hashes.sha256_file(exported / "model.safetensors") in card


def test_bf16_export_stays_bf16_in_lmforge_and_transformers(trained_run, tmp_path):
    out = tmp_path / "bf16"
    export.run(ExportConfig(model=str(trained_run), out=str(out), dtype="bfloat16"))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    reloaded, _, _ = load_model(out)
    assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(out, **auto_dtype()).dtype == torch.bfloat16
    # Exporting the bf16 dir again (model dir -> model dir) keeps it bit-identical.
    again = tmp_path / "again"
    export.run(ExportConfig(model=str(out), out=str(again), dtype="bfloat16"))
    assert hashes.sha256_file(again / "model.safetensors") == hashes.sha256_file(out / "model.safetensors")


def test_sharded_export_writes_an_index_that_transformers_and_lmforge_read(trained_run, tmp_path, corpus_texts):
    out = tmp_path / "sharded"
    result = export.run(ExportConfig(model=str(trained_run), out=str(out), max_shard_size="100KB"))
    shards = [f for f in result.files if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in result.files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:  # within the limit, unless one tensor alone exceeds it (as in HF)
        tensors = [k for k, v in index["weight_map"].items() if v == shard]
        assert os.path.getsize(out / shard) <= 100_000 + 4096 or len(tensors) == 1
    ours, tokenizer, _ = load_model(trained_run)
    tokens = real_token_batch(tokenizer.encode_prompt, corpus_texts, rows=1, length=64)
    with torch.no_grad():
        expected = ours(tokens)
        assert (load_model(out)[0](tokens) - expected).abs().max() < 1e-6
        assert (AutoModelForCausalLM.from_pretrained(out)(tokens).logits - expected).abs().max() < 1e-4


LAYOUTS = {
    "tied-mha": dict(tie_embeddings=True, n_kv_heads=4),
    "qwen2-qkv-bias": dict(qkv_bias=True),
    "llama-all-biases": dict(qkv_bias=True, attn_out_bias=True, mlp_bias=True),
    "wide-heads": dict(head_size=32),
    "llama3-rope": dict(rope_theta=500000.0, rope_scaling=RopeScaling(type="llama3", factor=8.0, original_max_seq_len=32)),
    "linear-rope": dict(rope_scaling=RopeScaling(type="linear", factor=2.0)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_variant_exports_to_matching_transformers_logits(layout, trained_tokenizer, tmp_path, corpus_texts):
    config = ModelConfig(preset="tiny", vocab_size=1024, max_seq_len=128, **LAYOUTS[layout])
    model = Transformer(config)
    model.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():  # biases start at zero; make them count
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.5, generator=torch.Generator().manual_seed(1))
    save_model_dir(tmp_path / "m", model, trained_tokenizer)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    expected_class = "Qwen2ForCausalLM" if layout == "qwen2-qkv-bias" else "LlamaForCausalLM"
    assert type(theirs).__name__ == expected_class
    tokens = real_token_batch(trained_tokenizer.encode_prompt, corpus_texts, rows=2, length=120)
    with torch.no_grad():
        assert (theirs(tokens).logits - model.eval()(tokens)).abs().max().item() < 1e-4


def test_a_failed_export_leaves_no_directory_behind(trained_run, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise CheckpointError("export failed its round-trip check: logits differ by 1")

    monkeypatch.setattr(export, "verify_round_trip", broken)
    with pytest.raises(CheckpointError, match="round-trip"):
        export.run(ExportConfig(model=str(trained_run), out=str(tmp_path / "model")))
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_a_non_empty_out_dir_unless_told_to_overwrite(trained_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="lmforge did not write.*pass --overwrite"):
        export.run(ExportConfig(model=str(trained_run), out=str(out)))
    assert (out / "notes.txt").read_text() == "keep me"
    export.run(ExportConfig(model=str(trained_run), out=str(out), overwrite=True))
    assert (out / "config.json").is_file() and not (out / "notes.txt").exists()


def test_cli_exports_and_generates_the_same_text_from_the_run_and_the_model_dir(trained_run, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]

    def lmforge(*args):
        return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, cwd=root, timeout=120)

    done = lmforge("export", str(trained_run), "--out", str(tmp_path / "m"), "--dtype", "float32")
    assert done.returncode == 0, done.stderr
    assert "from_pretrained" in done.stdout and (tmp_path / "m" / "model.safetensors").is_file()
    greedy = ["--prompt", "The module", "--temperature", "0", "--max-tokens", "12"]
    from_run, from_dir = lmforge("generate", str(trained_run), *greedy), lmforge("generate", str(tmp_path / "m"), *greedy)
    assert from_run.returncode == 0 and from_run.stdout.startswith("The module")
    assert from_dir.stdout == from_run.stdout
    bad = lmforge("export", str(trained_run), "--out", str(tmp_path / "x"), "--dtype", "int8")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "'dtype'" in last and "int8" in last, bad.stderr
    assert not (tmp_path / "x").exists()
