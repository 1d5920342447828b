"""The shipped rewards by name: the function, its typed options and the record fields it reads."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import Field

from lmforge.align.rewards import sandbox, verifiable
from lmforge.config import Section


@dataclass(frozen=True)
class ShippedReward:
    score: Callable[[dict, str, Section], float]
    options: type[Section]
    parallel: bool = False  # runs subprocesses: several completions at once, each thread waiting on one


class RewardModelOptions(Section):
    prompt_field: str = Field("prompt", description="record field the reward model reads as the prompt")
    path: str | None = Field(None, description="`lmforge rl`: the reward model dir (RUN/reward_model of `lmforge rm`) or its run dir")


SHIPPED: dict[str, ShippedReward] = {
    "numeric_match": ShippedReward(verifiable.numeric_match, verifiable.NumericMatchOptions),
    "exact_match": ShippedReward(verifiable.exact_match, verifiable.ExactMatchOptions),
    "regex_match": ShippedReward(verifiable.regex_match, verifiable.RegexMatchOptions),
    "format": ShippedReward(verifiable.format_reward, verifiable.FormatOptions),
    "unit_tests": ShippedReward(sandbox.unit_tests, sandbox.UnitTestsOptions, parallel=True),
}
# A trained reward model scores whole batches; it is passed in as a callable when the rewards
# are built (`build_rewards(..., reward_model=...)`), so its options are checked here but it
# has no per-completion function.
REWARD_MODEL = "reward_model"
OPTIONS: dict[str, type[Section]] = {**{n: s.options for n, s in SHIPPED.items()}, REWARD_MODEL: RewardModelOptions}


def fields_read(name: str, options: Section) -> list[str]:
    """The record fields a shipped reward (or the reward model) reads with these options."""
    if name == REWARD_MODEL:
        return [options.prompt_field]
    field = getattr(options, "field", None)
    return [field] if field else []
