"""Rewards for RL: verifiable checks that ship, Python functions, a reward model, unit tests.

    from lmforge.align.rewards import RewardsConfig, build_rewards
    rewards = build_rewards(config.rewards, reward_model=None)
    prompts = rewards.load_prompts("prompts.jsonl")    # file:line if a field a reward reads is missing
    batch = rewards.score(records, completions)        # per-reward scores, weighted total
    metrics = batch.metrics()                          # reward/<label>/mean|std|errors|timeouts

Shipped rewards (options in brackets, defaults first):
- `numeric_match` [field=answer, tolerance]: the completion's last number equals the field's
  (GSM8K: text after the last `####`; commas and whitespace ignored).
- `exact_match` [field=answer, ignore_case]: equal after whitespace normalisation (a list: any).
- `regex_match` [field=pattern, fullmatch, ignore_case]: the completion matches the record's regex.
- `format` [pattern, fullmatch]: the completion matches a fixed regex.
- `unit_tests` [field=tests, timeout_s, memory_mb, partial_credit, max_workers]: the completion's
  code (its first fenced python block, if any) run with the record's tests (a script, or a list of
  assert snippets) in a killed-on-timeout, memory-limited subprocess; reward = fraction passed.
- `module:function`: `function(record, completion, **options) -> float`; `fields` lists what it reads.
- `reward_model` [prompt_field=prompt]: a callable `(prompts, completions) -> scores`, such as a
  trained reward model's scorer, passed as `build_rewards(..., reward_model=...)`.
"""

from lmforge.align.rewards.combine import (
           Reward,
           RewardBatch,
           RewardModelFn,
           RewardSet,
           build_rewards,
)
from lmforge.align.rewards.config import RewardsConfig, RewardSpec
from lmforge.align.rewards.registry import SHIPPED
from lmforge.align.rewards.sandbox import RewardTimeout, extract_code, run_tests
from lmforge.align.rewards.verifiable import last_number

__all__ = ["SHIPPED", "Reward", "RewardBatch", "RewardModelFn", "RewardSet", "RewardSpec", "RewardTimeout",
           "RewardsConfig", "build_rewards", "extract_code", "last_number", "run_tests"]
