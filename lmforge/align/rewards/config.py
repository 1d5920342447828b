"""Config of the rewards an RL run scores completions with: names, weights and options.

    rewards:
      - {name: numeric_match, weight: 1.0}
      - {name: format, weight: 0.2, options: {pattern: "<answer>.*</answer>"}}
      - {name: "mypkg.rewards:brevity", weight: 0.1, fields: [max_words]}
      - {name: unit_tests, options: {timeout_s: 5, memory_mb: 256}}

A run's config subclasses `RewardsConfig` (or declares `rewards: list[RewardSpec]`).
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from lmforge.align.rewards.registry import OPTIONS
from lmforge.config import Section


class RewardSpec(Section):
    name: str = Field(description=f"a shipped reward ({', '.join(OPTIONS)}) or a Python function as module:function")
    weight: float = Field(1.0, description="its share of the total reward (negative: a penalty)")
    label: str | None = Field(None, description="name in metrics (reward/<label>/mean); default: name, or the function's name")
    options: dict[str, Any] = Field(default_factory=dict, description="the shipped reward's options, or keyword arguments of the function")
    fields: list[str] = Field(default_factory=list, description="record fields a module:function reward reads (checked before training)")

    @model_validator(mode="after")
    def _check(self) -> RewardSpec:
        if self.name not in OPTIONS:
            module, sep, function = self.name.partition(":")
            if not (sep and module and function):
                raise ValueError(f"unknown reward {self.name!r}: expected one of {', '.join(OPTIONS)} or module:function")
            return self
        try:
            OPTIONS[self.name].model_validate(self.options)
        except ValidationError as err:
            first = err.errors()[0]
            key, allowed = ".".join(str(p) for p in first["loc"]), list(OPTIONS[self.name].model_fields)
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            problem = "unknown option" if first["type"] == "extra_forbidden" else first["msg"]
            hint = f"; did you mean {close[0]!r}?" if close and first["type"] == "extra_forbidden" else ""
            raise ValueError(f"reward {self.name!r}: option {key!r}: {problem}{hint} (options: {', '.join(allowed)})") from None
        return self

    @property
    def key(self) -> str:
        return self.label or self.name.rpartition(":")[2]

    def parsed_options(self) -> Section:
        """The options as the shipped reward's typed section (a shipped or reward-model name only)."""
        return OPTIONS[self.name].model_validate(self.options)


class RewardsConfig(Section):
    rewards: list[RewardSpec] = Field(min_length=1, description="reward functions; the total is their weighted sum")

    @field_validator("rewards")
    @classmethod
    def _unique(cls, rewards: list[RewardSpec]) -> list[RewardSpec]:
        keys = [r.key for r in rewards]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"two rewards named {repeated[0]!r}: give one a label")
        return rewards
