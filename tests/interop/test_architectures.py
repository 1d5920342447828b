"""Every Hugging Face layout lmforge writes and reads (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE,
Dots1, Mixtral): exported model dirs load in transformers with the same logits, and models built and
saved by transformers import with the same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from lmforge.errors import CheckpointError
from lmforge.interop import importer
from lmforge.interop.importer import ImportConfig
from lmforge.model import ModelConfig, Transformer
from lmforge.store.loading import load_model
from lmforge.store.model_dir import load_model_dir, save_model_dir

MOE = dict(num_experts=4, top_k=2, expert_ffn_dim=32)
# DeepSeek-V3's routing: sigmoid gates, a choice-only bias (set non-zero below), shared experts, a scale.
DOTS1_MOE = dict(MOE, gate="sigmoid", num_shared_experts=2, route_scale=2.5, bias_update_rate=0.001, dense_layers=[0])
EXPORTS = {
    "llama": ("LlamaForCausalLM", dict()),
    "mistral-all-sliding": ("MistralForCausalLM", dict(sliding_window=8)),
    "qwen2-sliding-pattern": ("Qwen2ForCausalLM", dict(sliding_window=8, attention_pattern=["full", "sliding"])),
    "qwen3-qk-norm": ("Qwen3ForCausalLM", dict(qk_norm=True)),
    "qwen3-sliding-pattern": ("Qwen3ForCausalLM", dict(qk_norm=True, sliding_window=8, attention_pattern=["sliding", "full"])),
    "qwen3-moe": ("Qwen3MoeForCausalLM", dict(qk_norm=True, moe=dict(MOE, norm_topk=False, dense_layers=[0]))),
    "dots1": ("Dots1ForCausalLM", dict(qk_norm=True, sliding_window=8, attention_pattern=["sliding", "full"], moe=DOTS1_MOE)),
    "mixtral": ("MixtralForCausalLM", dict(sliding_window=8, moe=MOE)),
}
HF_SMALL = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1)
SLIDING_PATTERN = dict(use_sliding_window=True, sliding_window=8, max_window_layers=0,
                       layer_types=["sliding_attention", "full_attention"] * 2)
IMPORTS = {
    "llama": ("llama", dict()),
    "mistral-all-sliding": ("mistral", dict(sliding_window=8)),
    "qwen2-sliding-pattern": ("qwen2", SLIDING_PATTERN),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=16)),
    "qwen3-sliding-pattern": ("qwen3", dict(head_dim=16, **SLIDING_PATTERN)),
    "qwen3-moe": ("qwen3_moe", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                    norm_topk_prob=False, mlp_only_layers=[0, 2])),
    "dots1": ("dots1", dict(head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1,
                            sliding_window=8, max_window_layers=0, layer_types=SLIDING_PATTERN["layer_types"])),
    "mixtral": ("mixtral", dict(sliding_window=8, num_local_experts=4, num_experts_per_tok=2)),
}


def hf_logits(directory: Path, tokens: torch.Tensor) -> tuple[str, torch.Tensor]:
    theirs = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return type(theirs).__name__, theirs(tokens).logits


@pytest.mark.parametrize("case", EXPORTS)
def test_exported_models_load_in_transformers_with_the_same_logits(case, trained_tokenizer, tmp_path):
    architecture, fields = EXPORTS[case]
    config = ModelConfig(vocab_size=trained_tokenizer.vocab_size, dim=64, n_layers=4, n_heads=4, n_kv_heads=2,
                         ffn_dim=96, max_seq_len=64, init_std=0.1, **fields)
    torch.manual_seed(0)
    ours = Transformer(config).eval()
    if config.moe is not None and config.moe.gate == "sigmoid":  # Dots1 writes the bias: a non-zero one tests it
        with torch.no_grad():
            for name, buffer in ours.named_buffers():
                if name.endswith("expert_bias"):
                    buffer.normal_(std=0.5)
    save_model_dir(tmp_path / "out", ours, trained_tokenizer)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["architectures"] == [architecture]
    tokens = torch.randint(0, config.vocab_size, (2, 40))  # longer than the window
    with torch.no_grad():
        expected = ours(tokens)
    name, got = hf_logits(tmp_path / "out", tokens)
    assert name == architecture
    assert (got - expected).abs().max().item() < 1e-4
    # And lmforge reads its own export back to the same model.
    again, _ = load_model_dir(tmp_path / "out")
    assert [again.config.layer_window(i) for i in range(4)] == [config.layer_window(i) for i in range(4)]
    with torch.no_grad():
        assert (again(tokens) - expected).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def small_tokenizer():
    """A byte-level BPE with its own specials, as an HF tokenizer would have."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog"] * 20,
                           trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def save_hf_model(directory: Path, model_type: str, fields: dict, tokenizer) -> None:
    config = AutoConfig.for_model(model_type, **HF_SMALL, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # HF initialises biases to zero; random ones test the mapping
                param.normal_(std=0.5)
            elif "norm" in name:  # and norms to one
                param.normal_(1.0, 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # Dots1's choice-only routing bias, zero at init
                buffer.normal_(std=0.5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.mark.parametrize("case", IMPORTS)
def test_models_saved_by_transformers_import_with_the_same_logits(case, small_tokenizer, tmp_path):
    model_type, fields = IMPORTS[case]
    save_hf_model(tmp_path / "hf", model_type, fields, small_tokenizer)
    tokens = torch.randint(0, 320, (2, 40))
    architecture, expected = hf_logits(tmp_path / "hf", tokens)
    assert architecture == EXPORTS[case][0]
    result = importer.run(ImportConfig(source=str(tmp_path / "hf"), out=str(tmp_path / "lm")))
    assert result.architecture == architecture
    ours, _, _ = load_model(tmp_path / "lm")
    with torch.no_grad():
        got = ours(tokens)
    assert (got - expected).abs().max().item() < 1e-4
    config = ours.config
    if "sliding_window" in fields:
        windows = [config.layer_window(i) for i in range(4)]
        types = fields.get("layer_types", ["sliding_attention"] * 4)
        assert windows == [8 if t == "sliding_attention" else None for t in types]
    if model_type == "qwen3_moe":
        assert config.moe.dense_layers == [0, 2] and config.moe.norm_topk is False
    if model_type == "dots1":
        moe = config.moe
        assert (moe.gate, moe.num_shared_experts, moe.route_scale, moe.norm_topk, moe.dense_layers) == ("sigmoid", 1, 2.5, True, [0])
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        for i in (1, 2, 3):
            bias = theirs.model.layers[i].mlp.gate.e_score_correction_bias
            assert bias.abs().min() > 0 and torch.equal(ours.layers[i].ffn.expert_bias, bias)


# ---------------------------------------------------------------------------- bad input


def test_importing_an_unsupported_architecture_names_it_and_the_supported_ones(small_tokenizer, tmp_path):
    save_hf_model(tmp_path / "hf", "llama", {}, small_tokenizer)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        importer.run(ImportConfig(source=str(tmp_path / "hf"), out=str(tmp_path / "out")))
    message = str(err.value)
    assert "architecture DeepseekV3ForCausalLM is not supported" in message and "\n" not in message
    for supported in (architecture for architecture, _ in EXPORTS.values()):
        assert supported in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "fields,option",
    [
        (dict(moe=dict(MOE, gate="sigmoid")), "moe.gate sigmoid"),  # without qk_norm: Mixtral, softmax only
        (dict(qk_norm=True, moe=dict(MOE, num_shared_experts=1)), "moe.num_shared_experts"),  # softmax: not Dots1
        (dict(qk_norm=True, moe=dict(MOE, bias_update_rate=0.001)), "moe.bias_update_rate"),
        (dict(qk_norm=True, moe=dict(MOE, gate="sigmoid", dense_layers=[1])), "moe.dense_layers"),  # not the first k
    ],
)
def test_exporting_an_moe_no_transformers_layout_expresses_fails_on_one_line_naming_the_option(
    fields, option, trained_tokenizer, tmp_path
):
    config = ModelConfig(vocab_size=trained_tokenizer.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                         ffn_dim=96, max_seq_len=64, **fields)
    with pytest.raises(CheckpointError) as err:
        save_model_dir(tmp_path / "out", Transformer(config), trained_tokenizer)
    message = str(err.value)
    assert message.startswith("cannot export to a Hugging Face layout: ") and option in message and "\n" not in message
    assert not (tmp_path / "out").exists()
