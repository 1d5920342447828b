"""Optional dependencies: which pip extra brings each package lmforge imports only for one capability.

`pip install lmforge` installs the core: curate, tokenizer, tokenize, train, eval, SFT/DPO/RL,
generate, chat, export and the quickstart. The rest come per capability, as pyproject's
`[project.optional-dependencies]` declares them (tests/test_install.py checks the two agree):

    serve  `lmforge serve` (fastapi, starlette, uvicorn, prometheus_client, llguidance)
    eval   `lmforge eval --harness` (lm-evaluation-harness)
    align  LoRA in `lmforge sft` / `dpo` / `rl` and `lmforge lora merge` (peft)
    track  `run.trackers: [wandb, mlflow]`
    ray    `lmforge curate executor.kind=ray`, `lmforge sweep executor.kind=ray`
    sweep  `lmforge sweep sampler=optuna` (optuna), `executor.kind=submitit` (submitit)
    vllm   `lmforge serve engine.backend=vllm` (brings its own CUDA build of torch)
    datasets  `datasets` saved dirs and Hub datasets as inputs

A missing one is a user error: `require` (or the CLI, for a module-level import) names the
extra to install in one line, and the verb exits 2.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from lmforge.errors import ConfigError

# top-level import name -> (the distribution pip installs, the lmforge extra that declares it)
EXTRAS: dict[str, tuple[str, str]] = {
    "fastapi": ("fastapi", "serve"),
    "starlette": ("starlette", "serve"),
    "uvicorn": ("uvicorn", "serve"),
    "prometheus_client": ("prometheus_client", "serve"),
    "llguidance": ("llguidance", "serve"),
    "lm_eval": ("lm_eval", "eval"),
    "peft": ("peft", "align"),
    "wandb": ("wandb", "track"),
    "mlflow": ("mlflow", "track"),
    "ray": ("ray", "ray"),
    "optuna": ("optuna", "sweep"),
    "submitit": ("submitit", "sweep"),
    "vllm": ("vllm", "vllm"),
    "datasets": ("datasets", "datasets"),
}


class MissingExtraError(ConfigError):
    """A capability asked for (by a verb or a config key) whose optional dependency is not installed."""


def install_hint(module: str) -> str | None:
    """`pip install 'lmforge[EXTRA]'` for a module of an extra (`fastapi.responses` counts), else None."""
    entry = EXTRAS.get(module.split(".")[0])
    return None if entry is None else f"pip install 'lmforge[{entry[1]}]'"


def missing(module: str, purpose: str) -> MissingExtraError:
    """The one-line error for `purpose` (e.g. "lmforge serve") lacking `module`."""
    entry = EXTRAS.get(module.split(".")[0])
    distribution = entry[0] if entry else module.split(".")[0]
    hint = install_hint(module) or f"pip install {distribution}"
    return MissingExtraError(f"{purpose} needs {distribution}, which is not installed: {hint}")


def require(module: str, purpose: str) -> ModuleType:
    """Import `module`, or raise the one-line `MissingExtraError` naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != module.split(".")[0]:
            raise  # the package is there but one of its own dependencies is not: a broken install
        raise missing(module, purpose) from None
