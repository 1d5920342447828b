"""Model dirs in the Hugging Face layout: what `export` writes and every model-taking verb reads.

    config.json                  LlamaForCausalLM (or Qwen2ForCausalLM) config
    model.safetensors            weights (or model-0000k-of-0000n.safetensors + index)
    tokenizer.json               the BPE, with a post-processor that prepends BOS
    tokenizer_config.json        special tokens, chat_template, tokenizer class
    special_tokens_map.json
    generation_config.json       bos/eos/pad ids; eos includes the chat end-of-turn token
    model_card.md, README.md     lineage, training config, evals, usage

The directory is built under a temp name and renamed when whole.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from tokenizers import Tokenizer, processors

from lmforge import atomic
from lmforge.errors import CheckpointError
from lmforge.model import ModelConfig, Transformer
from lmforge.store import hf
from lmforge.tokenizer import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    LmTokenizer,
    load_tokenizer,
)

MODEL_CARD_FILE = "model_card.md"
# Card lineage key: the hash of the model dir's tokenizer.json as written (it differs from the
# training tokenizer's `tokenizer_hash` by the BOS post-processor); loading checks the two agree.
TOKENIZER_JSON_HASH = "tokenizer_json_hash"
MODEL_DIR_KIND = "model dir"  # the output marker's kind (atomic.check_output_dir)
# Files of an imported tokenizer that are copied as they are when it is written again.
_TOKENIZER_SIDE_FILES = (TOKENIZER_CONFIG_FILE, "special_tokens_map.json", "chat_template.jinja")


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / hf.CONFIG_FILE).is_file()


def token_ids(tokenizer: LmTokenizer) -> dict[str, int | None]:
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}


def tokenizer_files(tokenizer: LmTokenizer, max_seq_len: int) -> dict[str, str]:
    """tokenizer.json and friends, so `AutoTokenizer` behaves like lmforge's tokenizer.

    lmforge tokenizers gain a post-processor that prepends `<|endoftext|>` (HF's
    `tokenizer(text)` then equals lmforge's prompt encoding) and a chat template that
    renders lmforge's chat format. Imported tokenizers are written back unchanged.
    """
    if not tokenizer.native:
        files = {TOKENIZER_FILE: tokenizer.tk.to_str()}
        source = tokenizer.path.parent if tokenizer.path else None
        for name in _TOKENIZER_SIDE_FILES:
            if source is not None and (source / name).is_file():
                files[name] = (source / name).read_text(encoding="utf-8")
        return files
    exported = Tokenizer.from_str(tokenizer.tk.to_str())
    bos = tokenizer.bos_token
    exported.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tokenizer.bos_id)]
    )
    specials = {"bos_token": bos, "eos_token": tokenizer.eos_token, "pad_token": "<|pad|>"}
    config = {
        # The generic fast class: a Llama tokenizer class would rewrite the post-processor.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "unk_token": None,
        "model_max_length": max_seq_len,
        "clean_up_tokenization_spaces": False,
        "chat_template": tokenizer.chat_template,
    }
    return {
        TOKENIZER_FILE: exported.to_str(),
        TOKENIZER_CONFIG_FILE: json.dumps(config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(specials, indent=2) + "\n",
    }


def generation_config(tokenizer: LmTokenizer) -> dict:
    eos = sorted(tokenizer.stop_ids)
    return {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": eos[0] if len(eos) == 1 else eos,
        "pad_token_id": tokenizer.pad_id,
    }


def save_model_dir(
    out: str | os.PathLike,
    model: Transformer,
    tokenizer: LmTokenizer,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 5 * 10**9,
    finish: Callable[[Path, list[str]], str | None] | None = None,
) -> list[str]:
    """Write a complete model dir atomically (replacing `out`); return the weight files.

    `finish(tmp_dir, weight_files)` runs before the rename: it may check the written dir
    (raising leaves nothing behind) and returns the model card's text.
    """
    config = model.config
    # The MoE expert bias stays fp32 (transformers keeps e_score_correction_bias so too).
    state = {k: v if k.endswith("expert_bias") else v.to(dtype) for k, v in model.state_dict().items()}
    tensors = hf.state_to_hf(state, config)
    hf_config = hf.config_to_hf(config, dtype, token_ids(tokenizer))
    with atomic.atomic_dir(out, MODEL_DIR_KIND) as tmp:
        weights = hf.write_safetensors(tmp, tensors, max_shard_bytes)
        atomic.write_json(tmp / hf.CONFIG_FILE, hf_config)
        atomic.write_json(tmp / hf.GENERATION_CONFIG_FILE, generation_config(tokenizer))
        for name, text in tokenizer_files(tokenizer, config.max_seq_len).items():
            atomic.write_text(tmp / name, text)
        card = finish(tmp, weights) if finish is not None else None
        if card is not None:
            atomic.write_text(tmp / MODEL_CARD_FILE, card)
            # The Hub and most viewers show README.md as the card.
            shutil.copyfile(tmp / MODEL_CARD_FILE, tmp / "README.md")
    return weights


def read_model_config(path: str | os.PathLike, max_seq_len: int | None = None) -> ModelConfig:
    path = Path(path)
    return hf.config_from_hf(hf.read_hf_config(path), path, max_seq_len)


def load_model_dir(
    path: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    max_seq_len: int | None = None,
) -> tuple[Transformer, LmTokenizer]:
    """Model (in eval mode) and tokenizer from an HF Llama-family dir; dtype as stored unless given."""
    path = Path(path)
    config = read_model_config(path, max_seq_len)
    if not (path / TOKENIZER_FILE).is_file():
        raise CheckpointError(f"{path} has no {TOKENIZER_FILE}")
    tokenizer = load_tokenizer(path)
    # Instruct models list their end-of-turn tokens as extra EOS ids in generation_config.json.
    eos = hf.token_ids_from_hf(path).get("eos_token_id")
    tokenizer.stop_ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    tensors = hf.read_safetensors(path)
    with torch.device("meta"):
        model = Transformer(config)
    expected = {k: v.shape for k, v in hf.state_to_hf(model.state_dict(), config).items()}
    state = hf.state_from_hf(tensors, config, expected, path)
    dtype = dtype or next(iter(state.values())).dtype
    model.to_empty(device=device)
    model.to(dtype)
    model.init_rope()
    model.load_state_dict(state)  # copies, casting to the model's dtype
    return model.eval(), tokenizer


def read_card_lineage(card: Path) -> dict[str, Any]:
    """The `lmforge:` block of a card's YAML front matter, if it has one."""
    text = card.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return {}
    try:
        meta = yaml.safe_load(text[4 : text.index("\n---", 4)])
    except (ValueError, yaml.YAMLError):
        return {}
    return meta.get("lmforge", {}) if isinstance(meta, dict) else {}
