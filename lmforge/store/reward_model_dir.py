"""Reward-model dirs: the causal-LM model dir (store/model_dir.py) with a scalar head instead.

transformers' `<Family>ForSequenceClassification` layout: the decoder's tensors under
`model.` exactly as `hf.state_to_hf` names them, no `lm_head`, and `score.weight` [1, dim];
config.json names that architecture with `num_labels: 1` and the `pad_token_id` the
pooling needs (the reward is read at each row's last non-pad token).
"""

from __future__ import annotations

import os

import torch

from lmforge import atomic
from lmforge.model.reward import RewardModel
from lmforge.store import hf
from lmforge.store.model_dir import MODEL_DIR_KIND, generation_config, token_ids, tokenizer_files
from lmforge.tokenizer import LmTokenizer

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
