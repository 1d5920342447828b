"""Which params each trial gets: a grid, seeded random draws, or Optuna's TPE (ask/tell).

Grid and random trials are a deterministic function of the spec (the same seed gives the
same trials, and the first N random trials stay the same when `trials` grows), so a resumed
sweep finds its trial ids unchanged. Optuna asks in the sweep's process; a resumed sweep
rebuilds the study from the recorded trials (`create_trial` + `add_trial`, with their
intermediate values) so TPE continues where it was. Params are keyed by the space's keys: a
choice or a range with `num` records its value, a bundle its index.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

from lmforge.experiments.spec import Param, SweepSpec
from lmforge.experiments.sweep_dir import TrialRecord


def _choices(key: str, param: Param) -> list[Any] | None:
    """What a trial picks from: a bundle's indices, a choice's values or a range's points; None: continuous."""
    if "." not in key:
        return list(range(len(param.values or [])))
    return param.points()


def grid(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every point of the grid, the last key varying fastest."""
    axes = {key: _choices(key, param) or [] for key, param in spec.space.items()}
    return [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]


def random_draws(spec: SweepSpec) -> list[dict[str, Any]]:
    """`spec.trials` draws from one `random.Random(spec.seed)`, one key after another."""
    rng = random.Random(spec.seed)
    draws = []
    for _ in range(spec.trials or 0):
        params: dict[str, Any] = {}
        for key, param in spec.space.items():
            choices = _choices(key, param)
            if choices is not None:
                params[key] = choices[rng.randrange(len(choices))]
                continue
            low, high = float(param.low), float(param.high)  # type: ignore[arg-type]
            if param.log:
                value = math.exp(rng.uniform(math.log(low), math.log(high)))
            else:
                value = rng.uniform(low, high)
            params[key] = round(value) if param.type == "int" else float(f"{value:.6g}")
        draws.append(params)
    return draws


class ListSampler:
    """Grid or random: the whole trial list is known up front."""

    def __init__(self, spec: SweepSpec):
        self.planned = grid(spec) if spec.sampler == "grid" else random_draws(spec)

    def ask(self, number: int) -> dict[str, Any] | None:
        return self.planned[number] if number < len(self.planned) else None

    def start(self, record: TrialRecord) -> None:
        pass

    def tell(self, record: TrialRecord) -> None:
        pass

    def report(self, record: TrialRecord, step: int, value: float) -> bool:
        return False


class OptunaSampler:
    """TPE (seeded) through Optuna's ask/tell; the median pruner on intermediate metric values."""

    def __init__(self, spec: SweepSpec, recorded: list[TrialRecord], intermediate: dict[str, list[tuple[int, float]]]):
        from lmforge.extras import require

        self.optuna = optuna = require("optuna", "lmforge sweep sampler=optuna")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.spec = spec
        self.distributions = {key: self._distribution(key, param) for key, param in spec.space.items()}
        pruner = (optuna.pruners.MedianPruner(n_startup_trials=spec.pruner.n_startup_trials,
                                              n_warmup_steps=spec.pruner.n_warmup_steps)
                  if spec.pruner.kind == "median" else optuna.pruners.NopPruner())
        self.study = optuna.create_study(direction="minimize" if spec.mode == "min" else "maximize",
                                         sampler=optuna.samplers.TPESampler(seed=spec.seed), pruner=pruner)
        self.live: dict[str, Any] = {}  # trial id -> the optuna Trial it runs as
        self._asked: dict[int, Any] = {}
        for record in recorded:
            self._add_finished(record, intermediate.get(record.id, []))

    def _distribution(self, key: str, param: Param) -> Any:
        dist = self.optuna.distributions
        choices = _choices(key, param)
        if choices is not None:  # by index: TPE needs plain values, and bundles are mappings
            return dist.CategoricalDistribution(list(range(len(choices))))
        if param.type == "int":
            return dist.IntDistribution(round(param.low), round(param.high), log=param.log)  # type: ignore[arg-type]
        return dist.FloatDistribution(param.low, param.high, log=param.log)  # type: ignore[arg-type]

    def _to_optuna(self, params: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, param in self.spec.space.items():
            choices = _choices(key, param)
            out[key] = choices.index(params[key]) if choices is not None and "." in key else params[key]
        return out

    def _from_optuna(self, params: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, param in self.spec.space.items():
            choices = _choices(key, param)
            out[key] = choices[params[key]] if choices is not None and "." in key else params[key]
        return out

    def _add_finished(self, record: TrialRecord, values: list[tuple[int, float]]) -> None:
        states = self.optuna.trial.TrialState
        state = {"done": states.COMPLETE, "pruned": states.PRUNED, "failed": states.FAIL}.get(record.status)
        if state is None:
            return  # pending or interrupted: asked again when it runs
        if state == states.COMPLETE and record.metric is None:
            state = states.FAIL
        self.study.add_trial(self.optuna.trial.create_trial(
            params=self._to_optuna(record.params), distributions=self.distributions,
            value=record.metric if state == states.COMPLETE else None,
            intermediate_values=dict(values), state=state))

    def ask(self, number: int) -> dict[str, Any] | None:
        if number >= (self.spec.trials or 0):
            return None
        trial = self.study.ask(self.distributions)
        self._asked[number] = trial
        return self._from_optuna(trial.params)

    def start(self, record: TrialRecord) -> None:
        """The optuna trial `record` runs as: a fresh ask, or a recorded one asked again."""
        trial = self._asked.pop(record.number, None)
        if trial is None:
            self.study.enqueue_trial(self._to_optuna(record.params), skip_if_exists=False)
            trial = self.study.ask(self.distributions)
        self.live[record.id] = trial

    def tell(self, record: TrialRecord) -> None:
        trial = self.live.pop(record.id, None)
        if trial is None or record.status == "pending":
            return
        states = self.optuna.trial.TrialState
        if record.status == "done" and record.metric is not None and math.isfinite(record.metric):
            self.study.tell(trial, record.metric)
        else:
            self.study.tell(trial, state=states.PRUNED if record.status == "pruned" else states.FAIL)

    def report(self, record: TrialRecord, step: int, value: float) -> bool:
        """An intermediate value; True when the pruner says to stop the trial."""
        trial = self.live.get(record.id)
        if trial is None or not math.isfinite(value):
            return False
        trial.report(value, step)
        return self.spec.pruner.kind != "none" and trial.should_prune()


def make_sampler(spec: SweepSpec, recorded: list[TrialRecord],
                 intermediate: dict[str, list[tuple[int, float]]]) -> ListSampler | OptunaSampler:
    if spec.sampler == "optuna":
        return OptunaSampler(spec, recorded, intermediate)
    return ListSampler(spec)
