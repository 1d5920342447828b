"""Reward-model dirs: the causal-LM model dir (store/model_dir.py) with a scalar head instead.

transformers' `<Family>ForSequenceClassification` layout: the decoder's tensors under
`model.` exactly as `hf.state_to_hf` names them, no `lm_head`, and `score.weight` [1, dim];
config.json names that architecture with `num_labels: 1` and the `pad_token_id` the
pooling needs (the reward is read at each row's last non-pad token).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lmforge import atomic
from lmforge.errors import CheckpointError
from lmforge.model.reward import RewardModel
from lmforge.store import hf
from lmforge.store.model_dir import MODEL_DIR_KIND, generation_config, token_ids, tokenizer_files
from lmforge.tokenizer import LmTokenizer, load_tokenizer

SCORE_WEIGHT = "score.weight"


def reward_config_to_hf(model: RewardModel, dtype: torch.dtype, ids: dict[str, int | None]) -> dict:
    """The causal-LM config.json with the sequence-classification architecture of its family."""
    config = hf.config_to_hf(model.config, dtype, {**ids, "pad_token_id": model.pad_id})
    causal = config["architectures"][0]
    config["architectures"] = [causal.replace("ForCausalLM", "ForSequenceClassification")]
    config["num_labels"] = 1
    # No lm_head to tie in this layout; the embedding is stored once either way.
    config["tie_word_embeddings"] = False
    return config


def reward_state_to_hf(model: RewardModel, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {k: v.detach().to("cpu", dtype) for k, v in model.state_dict().items()}
    tensors = hf.state_to_hf(state, model.config)
    tensors.pop("lm_head.weight", None)
    tensors[SCORE_WEIGHT] = state[SCORE_WEIGHT]
    return tensors


def save_reward_model_dir(out: str | os.PathLike, model: RewardModel, tokenizer: LmTokenizer,
                          dtype: torch.dtype = torch.float32) -> list[str]:
    """Write a reward model dir atomically (replacing `out`); return its weight files."""
    with atomic.atomic_dir(out, MODEL_DIR_KIND) as tmp:
        weights = hf.write_safetensors(tmp, reward_state_to_hf(model, dtype), 5 * 10**9)
        atomic.write_json(tmp / hf.CONFIG_FILE, reward_config_to_hf(model, dtype, token_ids(tokenizer)))
        atomic.write_json(tmp / hf.GENERATION_CONFIG_FILE, generation_config(tokenizer))
        for name, text in tokenizer_files(tokenizer, model.config.max_seq_len).items():
            atomic.write_text(tmp / name, text)
    return weights


def load_reward_model_dir(path: str | os.PathLike, device: torch.device | str = "cpu",
                          dtype: torch.dtype | None = None) -> tuple[RewardModel, LmTokenizer]:
    """Reward model (eval mode) and tokenizer from a dir `save_reward_model_dir` wrote (or transformers
    saved in that layout); dtype as stored unless given."""
    path = Path(path)
    hf_config = hf.read_hf_config(path)
    architecture = (hf_config.get("architectures") or ["none"])[0]
    labels = hf_config.get("num_labels", len(hf_config.get("id2label") or {}) or 2)
    if not architecture.endswith("ForSequenceClassification") or labels != 1:
        raise CheckpointError(f"{path}: not a reward model dir (architecture {architecture}, {labels} labels; "
                              "wanted *ForSequenceClassification with num_labels 1)")
    if hf_config.get("pad_token_id") is None:
        raise CheckpointError(f"{path}/{hf.CONFIG_FILE}: pad_token_id is missing (the reward is read at the last non-pad token)")
    # Read as the causal LM it was built on, its output head tied to the embedding (the reward never uses it).
    causal = {**hf_config, "architectures": [architecture.replace("ForSequenceClassification", "ForCausalLM")],
              "tie_word_embeddings": True}
    config = hf.config_from_hf(causal, path)
    tensors = hf.read_safetensors(path)
    if SCORE_WEIGHT not in tensors:
        raise CheckpointError(f"{path}: weights lack the tensor {SCORE_WEIGHT!r}")
    score = tensors.pop(SCORE_WEIGHT)
    with torch.device("meta"):
        model = RewardModel(config, int(hf_config["pad_token_id"]))
    expected = {k: v.shape for k, v in hf.state_to_hf(model.state_dict(), config).items()}
    state = {**hf.state_from_hf(tensors, config, expected, path), SCORE_WEIGHT: score}
    model.to_empty(device=device)
    model.to(dtype or score.dtype)
    model.init_rope()
    model.load_state_dict(state)
    return model.eval(), load_tokenizer(path)
