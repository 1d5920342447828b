"""Rewards built from config, scored over a batch, weighted into one total, failures counted.

A reward that raises, returns NaN (or anything but a finite number) or times out scores 0 for
that completion; the run goes on, each failing reward is logged once per batch with the
first failing prompt's index, and the counts are metrics (`reward/<label>/errors`).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lmforge.align.rewards.config import RewardSpec
from lmforge.align.rewards.registry import REWARD_MODEL, SHIPPED, fields_read
from lmforge.align.rewards.sandbox import RewardTimeout
from lmforge.errors import ConfigError, DataError
from lmforge.jsonl import load_jsonl

log = logging.getLogger(__name__)

# The hook a trained reward model plugs into: prompts and completions in, one score each out.
RewardModelFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclass(frozen=True)
class Reward:
    """One configured reward: per completion (`score_one`) or per batch (`score_batch`)."""

    label: str
    weight: float
    fields: tuple[str, ...]
    score_one: Callable[[dict, str], float] | None = None
    score_batch: Callable[[list[dict], list[str]], Sequence[float]] | None = None
    max_workers: int = 1


@dataclass
class RewardBatch:
    """Per-reward scores and their weighted total for one batch, with failure counts."""

    total: list[float]
    scores: dict[str, list[float]]
    errors: dict[str, int] = field(default_factory=dict)
    timeouts: dict[str, int] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """`reward/<label>/mean|std|errors|timeouts` for each reward, and `reward/total/mean|std`."""
        out: dict[str, float] = {}
        for label, values in [*self.scores.items(), ("total", self.total)]:
            out[f"reward/{label}/mean"], out[f"reward/{label}/std"] = _mean_std(values)
            if label in self.errors:
                out[f"reward/{label}/errors"] = float(self.errors[label])
                out[f"reward/{label}/timeouts"] = float(self.timeouts[label])
        return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def _checked(value: Any) -> float:
    """The value as a finite float, or ValueError: a NaN must not reach the advantages."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"returned {type(value).__name__}, not a number") from None
    if not math.isfinite(number):
        raise ValueError(f"returned {number}")
    return number


def _import_function(spec: RewardSpec) -> Callable[..., Any]:
    module_name, _, attr = spec.name.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"reward {spec.name!r} cannot be loaded: {err}") from None
    if not callable(function):
        raise ConfigError(f"reward {spec.name!r} is not a function")
    try:  # options a function does not take would fail every call; say so before training
        inspect.signature(function).bind({}, "", **spec.options)
    except TypeError as err:
        raise ConfigError(f"reward {spec.name!r} cannot take (record, completion, **options): {err}") from None
    except ValueError:  # a builtin without a signature: nothing to check
        pass
    return function


def _build_one(spec: RewardSpec, reward_model: RewardModelFn | None) -> Reward:
    if spec.name == REWARD_MODEL:
        if reward_model is None:
            raise ConfigError("reward 'reward_model' is configured but no reward model was given")
        prompt_field = spec.parsed_options().prompt_field
        return Reward(spec.key, spec.weight, (prompt_field, *spec.fields),
                      score_batch=lambda records, completions: reward_model(
                          [str(r[prompt_field]) for r in records], completions))
    if spec.name in SHIPPED:
        shipped, options = SHIPPED[spec.name], spec.parsed_options()
        workers = min(getattr(options, "max_workers", 1), os.cpu_count() or 1) if shipped.parallel else 1
        return Reward(spec.key, spec.weight, (*fields_read(spec.name, options), *spec.fields),
                      score_one=lambda record, completion: shipped.score(record, completion, options),
                      max_workers=workers)
    function, kwargs = _import_function(spec), dict(spec.options)
    return Reward(spec.key, spec.weight, tuple(spec.fields),
                  score_one=lambda record, completion: function(record, completion, **kwargs))


def build_rewards(specs: Iterable[RewardSpec], reward_model: RewardModelFn | None = None) -> RewardSet:
    """The configured rewards, loaded; `reward_model` is the callable behind `name: reward_model`."""
    return RewardSet([_build_one(spec, reward_model) for spec in specs])


class RewardSet:
    """Scores (record, completion) pairs with every reward and sums them by weight."""

    def __init__(self, rewards: list[Reward]):
        self.rewards = rewards

    @property
    def fields(self) -> list[str]:
        """Every record field some reward reads, in config order."""
        return list(dict.fromkeys(f for r in self.rewards for f in r.fields))

    def check_fields(self, records: Iterable[tuple[int, dict]], path: str | os.PathLike) -> None:
        """DataError `file:line` at the first record without a field a reward reads (before training)."""
        for line, record in records:
            for reward in self.rewards:
                missing = next((f for f in reward.fields if record.get(f) is None), None)
                if missing is not None:
                    raise DataError(f"{path}:{line}: no field {missing!r}, which reward {reward.label!r} reads")

    def load_prompts(self, path: str | os.PathLike, prompt_field: str | None = None) -> list[dict]:
        """The records of a prompt set (JSONL), every one checked for the fields the rewards read
        and, given `prompt_field`, for text in it: a DataError `file:line` at the first that fails."""
        numbered = load_jsonl(path, what="prompt set")
        if not numbered:
            raise DataError(f"{path}: no prompts")
        for line, record in numbered if prompt_field else ():
            if not isinstance(record.get(prompt_field), str) or not record[prompt_field].strip():
                raise DataError(f"{path}:{line}: no text in field {prompt_field!r} (data.prompt_field)")
        self.check_fields(numbered, path)
        return [record for _, record in numbered]

    def score(self, records: Sequence[dict], completions: Sequence[str],
              prompt_indices: Sequence[int] | None = None) -> RewardBatch:
        """Each reward's scores and the weighted total; `prompt_indices` name prompts in warnings."""
        if len(records) != len(completions):
            raise ValueError(f"{len(records)} records but {len(completions)} completions")
        indices = list(prompt_indices) if prompt_indices is not None else list(range(len(records)))
        batch = RewardBatch(total=[0.0] * len(records), scores={})
        for reward in self.rewards:
            outcomes = _run(reward, list(records), list(completions))
            values = [v if isinstance(v, float) else 0.0 for v in outcomes]
            failed = [(i, v) for i, v in enumerate(outcomes) if not isinstance(v, float)]
            batch.scores[reward.label] = values
            batch.errors[reward.label] = len(failed)
            batch.timeouts[reward.label] = sum(isinstance(v, RewardTimeout) for _, v in failed)
            if failed:
                first, err = failed[0]
                log.warning("reward %r failed on %d of %d completions, counted as 0 (first: prompt %d: %s: %s)",
                            reward.label, len(failed), len(values), indices[first], type(err).__name__, err)
            batch.total = [t + reward.weight * v for t, v in zip(batch.total, values, strict=True)]
        return batch


def _run(reward: Reward, records: list[dict], completions: list[str]) -> list[float | Exception]:
    """One outcome per completion: its finite score, or the exception that stands for a failure."""
    if reward.score_batch is not None:
        try:
            scores = list(reward.score_batch(records, completions))
        except Exception as err:  # the whole batch failed; every completion counts as 0
            return [err] * len(records)
        if len(scores) != len(records):
            return [ValueError(f"returned {len(scores)} scores for {len(records)} completions")] * len(records)
        return [_attempt(lambda s=s: s) for s in scores]
    pairs = list(zip(records, completions, strict=True))
    if reward.max_workers > 1 and len(pairs) > 1:
        with ThreadPoolExecutor(max_workers=reward.max_workers, thread_name_prefix=f"reward-{reward.label}") as pool:
            return list(pool.map(lambda pair: _attempt(lambda: reward.score_one(*pair)), pairs))
    return [_attempt(lambda pair=pair: reward.score_one(*pair)) for pair in pairs]


def _attempt(score: Callable[[], Any]) -> float | Exception:
    try:
        return _checked(score())
    except Exception as err:  # a reward's bug or a bad record must not stop the run
        return err
