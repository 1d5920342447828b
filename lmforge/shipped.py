"""What ships inside the lmforge package: bundled data and the YAML recipes of `lmforge configs`.

Two ways to name a shipped file, so that a shipped config works from any directory and from
a wheel install, never from a path that only exists in a git checkout:

    lmforge://data/chat/python_docs_chat.jsonl.gz   a file (or dir) inside the installed
                                                    package; `resolve_path` turns it into a
                                                    real path, every reader of user paths
                                                    calls it, other paths pass unchanged
    sft, sft.yaml                                   a shipped config by name (`config_path`):
                                                    an existing file of that name wins
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import ConfigError, DataError

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PACKAGE_DIR / "configs"
SCHEME = "lmforge://"


def resolve_path(path: str | os.PathLike) -> str:
    """`lmforge://REL` -> the absolute path of REL inside the package; any other path or URL as is."""
    text = os.fspath(path)
    if not text.startswith(SCHEME):
        return text
    relative = text[len(SCHEME):].lstrip("/")
    target = (PACKAGE_DIR / relative).resolve()
    if not target.is_relative_to(PACKAGE_DIR) or not target.exists():
        raise DataError(f"{text}: no such file ships with lmforge (package dir {PACKAGE_DIR})")
    return str(target)


@dataclass(frozen=True)
class ShippedConfig:
    name: str  # what a verb accepts in place of a path: `lmforge sft MODEL sft`
    path: Path
    description: str  # the file's first comment line


def shipped_configs() -> list[ShippedConfig]:
    """Every YAML recipe in the package's configs/, sorted by name."""
    found = []
    for path in sorted(CONFIGS_DIR.glob("*.yaml"), key=lambda p: p.stem):  # `sft` before `sft-arithmetic`
        comments = (line.lstrip("# ").rstrip() for line in path.read_text(encoding="utf-8").splitlines()
                    if line.startswith("#"))
        found.append(ShippedConfig(path.stem, path, next(comments, "")))
    return found


def shipped_config(name: str) -> ShippedConfig:
    """A shipped config by name, with or without `.yaml` (`sft`, `sft.yaml`)."""
    stem = name.removesuffix(".yaml").removesuffix(".yml")
    found = {c.name: c for c in shipped_configs()}
    if stem not in found:
        raise ConfigError(f"no shipped config {name!r} (shipped: {', '.join(found) or 'none'})")
    return found[stem]


def config_path(arg: str | os.PathLike) -> Path:
    """A config argument as a file: an existing file wins, then a shipped config by name."""
    path = Path(resolve_path(arg))
    if path.is_file():
        return path
    name = os.fspath(arg)
    try:
        return shipped_config(name).path
    except ConfigError:
        names = ", ".join(c.name for c in shipped_configs()) or "none"
        raise ConfigError(f"config file not found: {name} (nor a shipped config: {names})") from None
