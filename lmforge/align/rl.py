"""`lmforge rl`: GRPO with verifiable rewards, rollouts on lmforge's engine in the trainer's process.

    from lmforge.align.rl import RLConfig, run_rl
    result = run_rl(RLConfig.model_validate({"model": "runs/sft", "data": {"train": "prompts.jsonl"},
                                             "rewards": [{"name": "numeric_match"}]}))

Starts from any model (usually an SFT run), reads a prompt set (JSONL, one record per prompt
with the fields its rewards read), and trains through the shared trainer (checkpoints, exact
resume, metrics, alerts, torchrun with parallel.strategy=ddp). The run dir exports like any
other (`lmforge export RUN`). The objective is align/grpo.py, its rollouts align/rollouts.py.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from lmforge.align.grpo import GRPOObjective
from lmforge.align.reward_model import reward_scorer
from lmforge.align.rewards import build_rewards
from lmforge.align.rl_config import RLConfig
from lmforge.align.rollouts import RolloutWorker, encode_prompts
from lmforge.align.run import REWARD_MODEL_DIR, fine_tune, on_this_rank
from lmforge.device import compute_dtype
from lmforge.errors import ConfigError
from lmforge.shipped import resolve_path
from lmforge.store.loading import load_model
from lmforge.store.reward_model_dir import load_reward_model_dir
from lmforge.train import distributed
from lmforge.train.trainer import TrainResult

__all__ = ["RLConfig", "run_rl"]

log = logging.getLogger(__name__)


def run_rl(config: RLConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """GRPO per `config`. Under `torchrun` (parallel.strategy=ddp) every process samples its share
    of each rollout batch's prompts and trains on its block of each step's completions.
    `resume` continues the run dir's latest checkpoint; `overwrite` replaces an earlier run there."""
    return on_this_rank(_rl, config, resume, overwrite)


def _rl(config: RLConfig, resume: bool, env: distributed.DistEnv, overwrite: bool = False) -> TrainResult:
    if config.parallel.strategy == "fsdp":
        raise ConfigError("lmforge rl does not support parallel.strategy=fsdp yet (use single or ddp)")
    base, tokenizer, source = load_model(config.model, "cpu", torch.float32)
    if tokenizer.vocab_size > base.config.vocab_size:
        raise ConfigError(f"{config.model}: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"vocabulary is {base.config.vocab_size}: they do not belong together")
    rewards = build_rewards(config.rewards, reward_model=_reward_model(config, env.device))
    records = rewards.load_prompts(resolve_path(config.data.train), config.data.prompt_field)
    context = base.config.max_seq_len
    prompt_ids = encode_prompts(tokenizer, records, config.data.prompt_field, config.data.system_prompt,
                                config.rollout.max_tokens, context, config.data.train)
    test = None
    if config.data.test:
        test_records = rewards.load_prompts(resolve_path(config.data.test), config.data.prompt_field)[: config.data.test_limit]
        test = (test_records, encode_prompts(tokenizer, test_records, config.data.prompt_field,
                                             config.data.system_prompt, config.rollout.max_tokens, context,
                                             config.data.test))
    dtype = compute_dtype(config.train.dtype, env.device)
    # The KL anchor is the starting model, whatever step a resumed run is at.
    reference = None
    if config.grpo.kl_coef > 0:
        reference = copy.deepcopy(base).to(env.device).eval().requires_grad_(False)
    worker = RolloutWorker(tokenizer, records, prompt_ids, rewards, config.rollout, config.grpo, config.run.seed, env,
                           dtype, config.train.micro_batch_size, reference,
                           need_old_logprobs=config.rollout.steps_per_rollout > 1)
    objective = GRPOObjective(worker, config, env, test)
    log.info("rl: %d prompts (%d held out), %d per rollout x %d completions, %d step(s) per rollout, rewards %s",
             len(records), len(test[0]) if test else 0, config.rollout.prompts_per_step, config.rollout.group_size,
             config.rollout.steps_per_rollout, ", ".join(f"{r.key} x{r.weight:g}" for r in config.rewards))
    return fine_tune(config, base, tokenizer, source, objective, "rl", resume, env, overwrite)


def _reward_model(config: RLConfig, device: torch.device):
    """The scorer behind a `reward_model` reward (None when none is configured)."""
    spec = next((r for r in config.rewards if r.name == "reward_model"), None)
    if spec is None:
        return None
    path = spec.parsed_options().path
    if path is None:
        raise ConfigError("reward 'reward_model' needs options.path: the reward model dir `lmforge rm` wrote")
    directory = Path(path) / REWARD_MODEL_DIR if (Path(path) / REWARD_MODEL_DIR).is_dir() else Path(path)
    if not directory.is_dir():
        raise ConfigError(f"reward 'reward_model': {path} is not a directory")
    model, tokenizer = load_reward_model_dir(directory, device)
    return reward_scorer(model, tokenizer)
