"""A sweep's spec: a base training config, overrides for every trial, and a search space.

    name: lr-size                      # the sweep dir is out_dir/name
    base: pretrain-small               # what `lmforge train CONFIG` accepts: a shipped name or a YAML path
    overrides: [data.dataset=work/tokens, train.max_steps=100]
    space:
      optim.lr: {values: [1.0e-3, 3.0e-3]}                     # a choice
      schedule.warmup_steps: {low: 0, high: 50, type: int}     # a range (random/optuna)
      optim.weight_decay: {low: 1.0e-3, high: 0.3, log: true, num: 3}  # num: that many (log-)spaced points
      size: {values: [{model.dim: 64}, {model.dim: 128}]}      # no dot: a bundle, one choice sets several keys

Everything is checked before any trial starts (`validate`): the spec's own keys, and the
TrainConfig of every combination the sampler may produce, built the way `lmforge train`
builds it and then as a model on the meta device, so a shape that cannot work fails up front
with one line naming the keys and values at fault.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from lmforge.config import Section, apply_overrides, build, parse_override, read_yaml
from lmforge.errors import ConfigError, DataError
from lmforge.shipped import config_path
from lmforge.store.token_dataset import read_manifest

# Keys the sweep sets for each trial: its run dir is DIR/trials/<trial id>.
OWNED_KEYS = ("run.name", "run.out_dir")
# Spec keys that change how trials run, not which trials run or what they compute: a resumed
# sweep may change them (more parallelism, more random/optuna trials).
NOT_THE_SWEEP = frozenset({"executor", "trials"})
# Combinations checked up front before validation is sampled rather than exhaustive.
MAX_CHECKED_COMBINATIONS = 512


class Param(Section):
    """One axis of the search space: a choice (`values`) or a range (`low`/`high`)."""

    values: list[Any] | None = Field(None, description="a choice among these (a bundle: mappings of key: value)")
    low: float | None = None
    high: float | None = None
    log: bool = Field(False, description="a range sampled (or gridded) on a log scale")
    type: Literal["float", "int"] = "float"
    num: int | None = Field(None, ge=2, description="a range as that many (log-)evenly spaced points")

    def points(self) -> list[Any] | None:
        """The values a grid visits (a choice's values, or the range's `num` points); None for a continuous range."""
        if self.values is not None:
            return list(self.values)
        if self.num is None:
            return None
        assert self.low is not None and self.high is not None
        if self.log:
            a, b = math.log(self.low), math.log(self.high)
            raw = [math.exp(a + (b - a) * i / (self.num - 1)) for i in range(self.num)]
        else:
            raw = [self.low + (self.high - self.low) * i / (self.num - 1) for i in range(self.num)]
        if self.type == "int":
            return list(dict.fromkeys(round(v) for v in raw))
        return [float(f"{v:.6g}") for v in raw]  # 0.0173205 rather than 0.017320508075688773

    def ends(self) -> list[Any]:
        """What the up-front check builds: every point, or both ends of a continuous range."""
        points = self.points()
        if points is not None:
            return points
        return [self.cast(self.low), self.cast(self.high)]

    def cast(self, value: Any) -> Any:
        return round(value) if self.type == "int" else float(value)


class PrunerSpec(Section):
    """Stop trials early on their intermediate metric values (optuna sampler only)."""

    kind: Literal["none", "median"] = "none"
    n_startup_trials: int = Field(5, ge=0, description="median: trials finished before any is pruned")
    n_warmup_steps: int = Field(0, ge=0, description="median: steps of a trial before it may be pruned")


class ExecutorSpec(Section):
    """Where trials run: local processes, Ray tasks or submitit jobs (SLURM)."""

    kind: Literal["local", "ray", "submitit"] = "local"
    max_parallel: int | None = Field(None, ge=1, description="local/ray: trials at once; None: cores // threads_per_trial")
    threads_per_trial: int = Field(1, ge=1, description="torch/OpenMP threads of each trial")
    ray_address: str | None = Field(None, description="None: a local Ray runtime started for the sweep")
    submitit: dict[str, Any] = Field(default_factory=dict, description="submitit AutoExecutor parameters; "
                                     "`cluster`: slurm | local | debug")
    poll_seconds: float = Field(1.0, gt=0, description="how often the driver looks at running trials")

    def parallel(self) -> int:
        if self.max_parallel is not None:
            return self.max_parallel
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // self.threads_per_trial)


class SweepSpec(Section):
    """A base training config, overrides for every trial, and the space searched over them."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$", description="the sweep dir is out_dir/name")
    out_dir: str = "sweeps"
    base: str = Field(description="shipped config name or YAML path, as `lmforge train CONFIG` takes")
    overrides: list[str] = Field(default_factory=list, description="section.key=value for every trial")
    space: dict[str, Param] = Field(min_length=1)
    sampler: Literal["grid", "random", "optuna"] = "grid"
    trials: int | None = Field(None, ge=1, description="random/optuna: how many; grid: the product")
    seed: int = 0
    metric: str = Field("val_loss", description="the trial's last logged value of this metrics.jsonl key")
    mode: Literal["min", "max"] = "min"
    pruner: PrunerSpec = PrunerSpec()
    executor: ExecutorSpec = ExecutorSpec()

    @field_validator("pruner", mode="before")
    @classmethod
    def _pruner_by_name(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> SweepSpec:
        for key, param in self.space.items():
            _check_param(key, param)
        if self.sampler == "grid":
            size = self.grid_size()
            if self.trials is not None and self.trials != size:
                raise ValueError(f"trials {self.trials} differs from the grid's {size} points (drop trials)")
        elif self.trials is None:
            raise ValueError(f"trials: the {self.sampler} sampler needs a number of trials")
        if self.pruner.kind != "none" and self.sampler != "optuna":
            raise ValueError(f"pruner {self.pruner.kind!r} needs sampler: optuna")
        for text in self.overrides:
            if "=" not in text:
                raise ValueError(f"overrides: {text!r} is not section.key=value")
        return self

    def grid_size(self) -> int:
        return math.prod(len(p.points() or []) for p in self.space.values())

    @property
    def dir(self) -> Path:
        return Path(self.out_dir) / self.name

    def identity(self) -> dict[str, Any]:
        """The spec fields that decide which trials run and what they compute (see NOT_THE_SWEEP)."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in NOT_THE_SWEEP}

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()


def _check_param(key: str, param: Param) -> None:
    where = f"space.{key}"
    if param.values is not None:
        if param.low is not None or param.high is not None or param.num is not None:
            raise ValueError(f"{where}: give either values or low/high, not both")
        if not param.values:
            raise ValueError(f"{where}: values is empty")
        if "." not in key and not all(isinstance(v, dict) and v for v in param.values):
            raise ValueError(f"{where}: a name without a dot is a bundle: each value is a mapping of config keys")
        return
    if param.low is None or param.high is None:
        raise ValueError(f"{where}: give values, or both low and high")
    if "." not in key:
        raise ValueError(f"{where}: a range needs a config key (section.key)")
    if param.low >= param.high:
        raise ValueError(f"{where}: low {param.low} is not below high {param.high}")
    if param.log and param.low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0 (got {param.low})")


def check_grid_ranges(spec: SweepSpec) -> None:
    if spec.sampler != "grid":
        return
    for key, param in spec.space.items():
        if param.points() is None:
            raise ConfigError(f"space.{key}: the grid sampler needs num (points) for a range, or values")


def load_spec(path: str | os.PathLike, overrides: list[str] | None = None) -> SweepSpec:
    """Read SPEC.yaml, apply `key=value` overrides (they beat the file), validate it all."""
    data = read_yaml(config_path(path))  # a shipped recipe by name (sweep-cpu) or a file
    for text in overrides or []:
        keys, value = parse_override(text)
        if keys[0] == "space" and len(keys) > 2:  # space.optim.lr.values=[...]: the param's key holds dots
            data.setdefault("space", {}).setdefault(".".join(keys[1:-1]), {})[keys[-1]] = value
        else:
            apply_overrides(data, [text])
    spec = build(SweepSpec, data, f"sweep spec {path}")
    validate(spec)
    return spec


def spec_from_dict(data: dict[str, Any]) -> SweepSpec:
    """A spec from plain data (the Python API), checked as `load_spec` checks a file."""
    spec = build(SweepSpec, data, "sweep spec")
    validate(spec)
    return spec


# ------------------------------------------------------------------ the training configs it produces


def param_overrides(spec: SweepSpec, params: dict[str, Any]) -> list[str]:
    """A trial's params as the `key=value` list `lmforge train` takes (bundles expanded)."""
    out = []
    for key, param in spec.space.items():
        if key not in params:
            continue
        if "." in key:
            out.append(f"{key}={yaml_value(params[key])}")
        else:
            assert param.values is not None
            out += [f"{k}={yaml_value(v)}" for k, v in param.values[params[key]].items()]
    return out


def expand_params(spec: SweepSpec, params: dict[str, Any]) -> dict[str, Any]:
    """Params as recorded: each bundle's name -> index, plus the keys it sets."""
    out = dict(params)
    for key, param in spec.space.items():
        if "." not in key and key in params:
            assert param.values is not None
            out.update(param.values[params[key]])
    return out


def yaml_value(value: Any) -> str:
    """A value as a `key=value` override writes it: YAML that parses back to the same value
    (PyYAML reads `1e-05` as a string; it writes floats as `1.0e-05`)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text.removesuffix("...").strip()


def trial_config(spec: SweepSpec, extra: list[str]):
    """The TrainConfig `lmforge train BASE OVERRIDES EXTRA` resolves (the same path as the CLI)."""
    from lmforge.config import load_config
    from lmforge.train.config import TrainConfig

    return load_config(TrainConfig, config_path(spec.base), [*spec.overrides, *extra])


def validate(spec: SweepSpec) -> None:
    """Fail with one line before any trial starts: owned keys, grid ranges, the base config,
    and every combination of choices and range ends as a TrainConfig and a meta-device model."""
    for key, param in spec.space.items():
        keys = [key] if "." in key else [k for v in param.values or [] for k in v]
        owned = [k for k in keys if k in OWNED_KEYS]
        if owned:
            raise ConfigError(f"space.{key}: the sweep sets {owned[0]} (each trial's run dir is DIR/trials/ID)")
    owned = [o for o in spec.overrides if o.partition("=")[0].strip() in OWNED_KEYS]
    if owned:
        raise ConfigError(f"overrides: {owned[0]!r}: the sweep sets run.name and run.out_dir")
    check_grid_ranges(spec)
    try:
        base = trial_config(spec, [])
    except ConfigError as err:
        raise ConfigError(f"sweep spec base {spec.base!r} with its overrides: {err}") from None
    for key, param in spec.space.items():  # each key alone first: the error names that key
        for value in param.ends() if "." in key else range(len(param.values or [])):
            _check_combination(spec, {key: value})
    names = list(spec.space)
    combos = itertools.product(*(p.ends() if "." in k else range(len(p.values or [])) for k, p in spec.space.items()))
    for values in itertools.islice(combos, MAX_CHECKED_COMBINATIONS):
        _check_combination(spec, dict(zip(names, values, strict=True)))
    _check_dataset(base.data.dataset)


def _check_dataset(dataset: str) -> None:
    """A missing token dataset would fail every trial the same way: say so once, up front."""

    if "://" in dataset:  # a remote dataset is read by the trials (on their machines), not here
        return
    try:
        read_manifest(dataset)
    except DataError as err:
        raise ConfigError(f"sweep spec: data.dataset: {err} (build one with `lmforge tokenize`)") from None


def _check_combination(spec: SweepSpec, params: dict[str, Any]) -> None:
    overrides = param_overrides(spec, params)
    shown = ", ".join(f"{k}={yaml_value(v)}" if "." in k else f"{k}[{v}] ({', '.join(param_overrides(spec, {k: v}))})"
                      for k, v in params.items())
    try:
        config = trial_config(spec, overrides)
    except ConfigError as err:
        raise ConfigError(f"sweep space: {shown}: {err}") from None
    try:
        _build_on_meta(config)
    except Exception as err:  # any shape the model cannot take is the spec's fault
        message = " ".join(str(err).split())[:300]
        raise ConfigError(f"sweep space: {shown}: the model cannot be built: {message}") from None


def _build_on_meta(config) -> None:
    import torch

    from lmforge.model.transformer import Transformer

    model_config = config.model.model_copy(update={"vocab_size": config.model.vocab_size or 256})
    with torch.device("meta"):
        Transformer(model_config)
