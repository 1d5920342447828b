"""What every verb shares: one way to build its config, and small output helpers.

Every config-taking verb takes `[CONFIG.yaml] [flags] [section.key=value ...]` and resolves
it with `build_config`: built-in defaults < CONFIG.yaml < flags < key=value (see
`lmforge.config.PRECEDENCE`), each layer merged key by key into its section.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel

from lmforge.cli import configdoc
from lmforge.errors import ConfigError

T = TypeVar("T", bound=BaseModel)

ConfigArgs = Annotated[
    list[str] | None,
    typer.Argument(
        help="optional CONFIG.yaml (or a shipped config's name: `lmforge configs`), then section.key=value "
        "overrides. Precedence: built-in defaults "
        "< CONFIG.yaml < flags < section.key=value; each merges into its section key by key",
        show_default=False,
    ),
]


def build_config(model: type[T], args: list[str] | None, flags: dict[str, Any] | None = None,
                 base: dict[str, Any] | None = None) -> T:
    """Split positional args into one optional YAML file and key=value overrides, then resolve
    defaults (+ the verb's `base`) < YAML < `flags` < overrides."""
    from lmforge.config import load_config
    from lmforge.shipped import config_path

    path, overrides = None, []
    for arg in args or []:
        if "=" in arg:
            overrides.append(arg)
        elif path is None:  # a YAML file, or a shipped config by name (`lmforge configs`)
            path = str(config_path(arg))
        else:
            raise ConfigError(f"unexpected argument {arg!r}: expected one CONFIG.yaml or section.key=value")
    if configdoc.printing():  # --print-config: print what this run would use, then exit 0
        configdoc.print_config(model, path, overrides, base, flags)
    return load_config(model, path, overrides, base=base, flags=flags)


def flags(**values: Any) -> dict[str, Any]:
    """The options the user gave (None and False mean 'not given': the config decides)."""
    return {k: v for k, v in values.items() if v is not None and v is not False}


def negatable(**values: bool | None) -> dict[str, bool]:
    """`--x/--no-x` options that default to None: either form, when given, wins over CONFIG.yaml."""
    return {k: v for k, v in values.items() if v is not None}


def split_list(values: list[str] | None) -> list[str] | None:
    """Repeated and comma-separated values as one list; None when none were given."""
    if not values:
        return None
    return [item.strip() for value in values for item in value.split(",") if item.strip()]


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    """A rich table on stdout that never folds names when piped (see lmforge.cli.tables)."""
    from lmforge.cli.tables import Listing, emit

    emit("table", Listing("rows", title, header, rows))


def torchrun(nproc: int | None, max_restarts: int, strategy: str, command: list[str]) -> None:
    """`--nproc N` outside torchrun: relaunch this command under torchrun on N local processes."""
    if nproc is None or "WORLD_SIZE" in os.environ:
        return
    if nproc > 1 and strategy == "single":
        raise ConfigError(f"--nproc {nproc} needs parallel.strategy=ddp or fsdp (it is single)")
    # --standalone: a c10d rendezvous on a free local port, which also serves relaunches.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                f"--max-restarts={max_restarts}", "-m", "lmforge"]
    raise typer.Exit(subprocess.run([*launcher, *command]).returncode)


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"
