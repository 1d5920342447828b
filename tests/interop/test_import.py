"""`lmforge import`: Llama-family models built and saved by transformers give the same logits in lmforge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from lmforge.errors import CheckpointError
from lmforge.interop import importer
from lmforge.interop.importer import ImportConfig
from lmforge.store.loading import load_model
from tests.interop.conftest import chat_ids, real_token_batch

ROOT = Path(__file__).resolve().parents[2]
FOREIGN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '[' + m['role'] + ']\n' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '[assistant]\n' }}{% endif %}"
)

SMALL = dict(vocab_size=600, hidden_size=64, intermediate_size=160, num_hidden_layers=2, max_position_embeddings=128)
CASES = {
    "llama-gqa": ("llama", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama-tied-mha": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500000.0)),
    "llama3-rope-scaling": ("llama", dict(
        num_attention_heads=4, num_key_value_heads=1, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    )),
    "llama-biases": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)),
    "llama-head-dim": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32)),
    "mistral": ("mistral", dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None, rope_theta=1e6)),
    "qwen2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6)),
}


@pytest.fixture(scope="module")
def foreign_tokenizer(corpus_texts):
    """A BPE with its own specials (<s>, </s>) and chat template, as an HF tokenizer would have."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(corpus_texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    fast.chat_template = FOREIGN_TEMPLATE
    return fast


def save_hf_model(directory: Path, model_type: str, fields: dict, tokenizer, dtype=torch.float32) -> AutoModelForCausalLM:
    config = AutoConfig.for_model(model_type, **SMALL, bos_token_id=0, eos_token_id=1, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF initialises biases to zero; random ones test the mapping
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.5)
    model = model.to(dtype)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


@pytest.mark.parametrize("case", CASES)
def test_imported_models_give_transformers_logits_on_real_text(case, foreign_tokenizer, corpus_texts, tmp_path):
    model_type, fields = CASES[case]
    theirs = save_hf_model(tmp_path / "hf", model_type, fields, foreign_tokenizer)
    result = importer.run(ImportConfig(source=str(tmp_path / "hf"), out=str(tmp_path / "lm")))
    assert result.architecture == type(theirs).__name__
    ours, tokenizer, _ = load_model(tmp_path / "lm")
    assert not tokenizer.native and tokenizer.bos_id == 0 and tokenizer.eos_id == 1
    tokens = real_token_batch(tokenizer.encode_prompt, corpus_texts, rows=2, length=120)
    with torch.no_grad():
        expected, got = theirs(tokens).logits, ours(tokens)
    assert (got - expected).abs().max().item() < 1e-4
    assert ours.config.num_params() == sum(p.numel() for p in theirs.parameters())
    # The imported dir is itself a standard model dir: transformers reads it back.
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    with torch.no_grad():
        assert (again(tokens).logits - expected).abs().max().item() < 1e-4


def test_imported_tokenizer_keeps_its_specials_and_chat_template(foreign_tokenizer, tmp_path):
    save_hf_model(tmp_path / "hf", *CASES["llama-gqa"], foreign_tokenizer)
    importer.run(ImportConfig(source=str(tmp_path / "hf"), out=str(tmp_path / "lm")))
    _, tokenizer, _ = load_model(tmp_path / "lm")
    messages = [{"role": "user", "content": "What is a list?"}, {"role": "assistant", "content": "A sequence."}]
    for generation_prompt in (False, True):
        assert tokenizer.encode_chat(messages, generation_prompt) == chat_ids(foreign_tokenizer, messages, generation_prompt)
    assert tokenizer.encode_prompt("x = 1")[0] == tokenizer.bos_id
    # Text that spells a special token is still text in lmforge's plain encoding.
    assert tokenizer.eos_id not in tokenizer.encode("</s>")


def test_import_to_a_checkpoint_run_dir_loads_with_the_same_logits(foreign_tokenizer, corpus_texts, tmp_path):
    theirs = save_hf_model(tmp_path / "hf", *CASES["qwen2"], foreign_tokenizer)
    importer.run(ImportConfig(source=str(tmp_path / "hf"), out=str(tmp_path / "run"), to="checkpoint"))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step-0000000"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["kind"] == "import" and manifest["parent"] == str((tmp_path / "hf").resolve())
    ours, tokenizer, ckpt = load_model(tmp_path / "run")
    assert ckpt.name == "step-0000000" and next(ours.parameters()).dtype == torch.float32
    tokens = real_token_batch(tokenizer.encode_prompt, corpus_texts, rows=1, length=100)
    with torch.no_grad():
        assert (ours(tokens) - theirs(tokens).logits).abs().max().item() < 1e-4


def test_a_bf16_model_imports_and_reloads_in_bf16(foreign_tokenizer, tmp_path):
    save_hf_model(tmp_path / "hf", *CASES["llama-gqa"], foreign_tokenizer, dtype=torch.bfloat16)
    result = importer.run(ImportConfig(source=str(tmp_path / "hf"), out=str(tmp_path / "lm")))
    assert result.dtype == "bfloat16"
    assert json.loads((tmp_path / "lm" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    ours, _, _ = load_model(tmp_path / "lm")
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    as_fp32 = importer.run(ImportConfig(source=str(tmp_path / "hf"), out=str(tmp_path / "fp32"), dtype="float32"))
    assert as_fp32.dtype == "float32"


# ---------------------------------------------------------------------------- bad input


@pytest.fixture
def llama_dir(foreign_tokenizer, tmp_path) -> Path:
    save_hf_model(tmp_path / "hf", *CASES["llama-gqa"], foreign_tokenizer)
    return tmp_path / "hf"


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


def test_a_dir_without_config_json_is_refused(llama_dir, tmp_path):
    (llama_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"not a Hugging Face model dir \(no config.json\)"):
        importer.run(ImportConfig(source=str(llama_dir), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_an_unsupported_architecture_is_refused_by_name(tmp_path, foreign_tokenizer):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=600)).save_pretrained(tmp_path / "gpt2")
    foreign_tokenizer.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(CheckpointError, match="architecture GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        importer.run(ImportConfig(source=str(tmp_path / "gpt2"), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_match_the_config_are_refused(llama_dir, tmp_path):
    _edit_config(llama_dir, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.gate_proj.weight has shape \(160, 64\), config.json implies \(128, 64\)"):
        importer.run(ImportConfig(source=str(llama_dir), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_a_truncated_safetensors_file_is_refused(llama_dir, tmp_path):
    weights = llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        importer.run(ImportConfig(source=str(llama_dir), out=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


def test_pickled_weights_and_unknown_rope_scaling_are_refused_with_the_reason(llama_dir, tmp_path):
    original = (llama_dir / "config.json").read_text()
    _edit_config(llama_dir, rope_scaling={"rope_type": "yarn", "factor": 4.0}, rope_parameters=None)
    with pytest.raises(CheckpointError, match="rope scaling 'yarn' is not supported"):
        importer.run(ImportConfig(source=str(llama_dir), out=str(tmp_path / "out")))
    (llama_dir / "config.json").write_text(original)
    (llama_dir / "model.safetensors").rename(llama_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickled weights"):
        load_model(llama_dir)


def test_the_cli_reports_bad_input_on_one_line_and_writes_nothing(llama_dir, tmp_path):
    _edit_config(llama_dir, architectures=["FalconForCausalLM"], model_type="falcon")
    done = subprocess.run(
        [sys.executable, "-m", "lmforge", "import", str(llama_dir), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert errors[-1].startswith("error: ") and "FalconForCausalLM is not supported" in errors[-1]
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_an_imported_model_dir_verifies_back_to_its_source_files_and_names_a_changed_one(foreign_tokenizer, tmp_path):
    from lmforge.cli import main

    save_hf_model(tmp_path / "hf", *CASES["llama-gqa"], foreign_tokenizer)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "lm")]) == 0
    assert main(["verify", str(tmp_path / "lm")]) == 0
    weights = tmp_path / "hf" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one byte of the source's weights
    weights.write_bytes(bytes(data))
    assert main(["verify", str(tmp_path / "lm")]) == 1
