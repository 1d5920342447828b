"""LoRA adapter dirs in peft's layout for the exported model: transformers + peft load them, lmforge reads them back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.align.config import AlignConfig
from lmforge.align.run import run_sft
from lmforge.errors import CheckpointError
from lmforge.interop import export
from lmforge.interop.export import ExportConfig
from lmforge.store.loading import load_adapter, load_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_run(trained_run, corpus_texts, tmp_path_factory):
    """An exported base model dir and a LoRA SFT run from it (a few steps on real text)."""
    root = tmp_path_factory.mktemp("lora-hf")
    base = root / "base"
    export.run(ExportConfig(model=str(trained_run), out=str(base)))
    words = [w for text in corpus_texts for w in text.split()]
    chats = [{"messages": [{"role": "user", "content": "Continue: " + " ".join(words[i : i + 12])},
                           {"role": "assistant", "content": " ".join(words[i + 12 : i + 30])}]}
             for i in range(0, 40 * 30, 30)]
    data = root / "sft.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    config = AlignConfig.model_validate({
        "model": str(base), "run": {"name": "lora", "out_dir": str(root / "runs"), "seed": 0},
        "data": {"seq_len": 96, "train": str(data)}, "optim": {"lr": 5e-3},
        "lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["wqkv", "wo", "w13", "w2", "output"]},
        "train": {"max_steps": 4, "global_batch_tokens": 96 * 4, "micro_batch_size": 4, "device": "cpu",
                  "eval_every": 0, "checkpoint_every": 0, "log_every": 1, "progress": False},
    })
    return base, run_sft(config).run_dir / "adapter"


def tokens() -> torch.Tensor:
    return torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(0))


def test_an_sft_adapter_names_the_exported_models_modules_as_peft_does(lora_run):
    base, adapter = lora_run
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj",
                                                "up_proj", "v_proj"]
    assert config["base_model_name_or_path"] == str(base.resolve())
    names = load_file(str(adapter / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight" in names
    assert "base_model.model.lm_head.lora_B.weight" in names
    assert (adapter / "lmforge_adapter.json").is_file()


def test_peft_over_transformers_gives_the_logits_of_lmforges_adapted_model(lora_run):
    base, adapter = lora_run
    ours, _, _ = load_adapter(adapter)
    hf_base = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(hf_base, str(adapter)).eval()
    with torch.no_grad():
        expected = ours.eval()(tokens())
        got = theirs(tokens()).logits
        base_logits = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32)(tokens()).logits
    assert (got - base_logits).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_lora_merge_from_the_hf_layout_gives_the_adapted_model(lora_run, tmp_path):
    from lmforge.cli import main

    base, adapter = lora_run
    assert main(["lora", "merge", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    merged, _, _ = load_model(tmp_path / "merged")
    ours, _, _ = load_adapter(adapter)
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens()), ours.eval()(tokens()), atol=1e-4, rtol=0)


def test_an_adapter_whose_q_k_v_updates_do_not_share_lora_a_is_refused_by_name(lora_run, tmp_path):
    import shutil

    _, adapter = lora_run
    copy = shutil.copytree(adapter, tmp_path / "adapter")
    tensors = load_file(str(copy / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"
    tensors[key] = tensors[key] + 0.5
    save_file(tensors, str(copy / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="lora_A of self_attn.q_proj, self_attn.k_proj, self_attn.v_proj in layer 0 differ"):
        load_adapter(copy)


def test_an_adapter_in_lmforges_own_module_names_as_older_lmforge_wrote_still_loads(lora_run, tmp_path):
    import shutil

    _, adapter = lora_run
    ours, _, _ = load_adapter(adapter)
    ours.save_pretrained(str(tmp_path / "old"))  # peft's own save: lmforge's module names (wqkv, w13, ...)
    shutil.copy(adapter / "lmforge_adapter.json", tmp_path / "old")
    assert "wqkv" in json.loads((tmp_path / "old" / "adapter_config.json").read_text())["target_modules"]
    old, _, _ = load_adapter(tmp_path / "old")
    with torch.no_grad():
        torch.testing.assert_close(old.eval()(tokens()), ours.eval()(tokens()), atol=1e-6, rtol=0)
