"""Write constraints.txt: the version of every distribution pyproject.toml declares, as installed here.

    .venv/bin/python scripts/constraints.py           # rewrite constraints.txt from .venv
    .venv/bin/python scripts/constraints.py --check   # exit 1 when it is out of date

`make test` (and so CI) installs with `pip install -c constraints.txt`, so a CI run gets the
versions the suite last passed with; pyproject.toml keeps the ranges users install from.
Declared distributions that are not installed here (vllm: CUDA only) are left unpinned.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# Versions `make test` and CI install (pip install -c constraints.txt): every distribution
# pyproject.toml declares, at the version the test suite passed with. Regenerate after a
# change to pyproject.toml's dependencies: .venv/bin/python scripts/constraints.py
"""


def declared_names(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Every distribution named in dependencies and optional-dependencies (self-references dropped)."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    specs = list(project["dependencies"])
    for group in project.get("optional-dependencies", {}).values():
        specs.extend(group)
    names = {canonical(re.match(r"[A-Za-z0-9._-]+", spec).group(0)) for spec in specs}
    names.discard(canonical(project["name"]))
    return sorted(names)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def render() -> str:
    lines = []
    for name in declared_names():
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        lines.append(f"{name}=={version.split('+')[0]}")  # torch 2.13.0+cpu -> 2.13.0 (CPU or CUDA)
    return HEADER + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when constraints.txt differs")
    args = parser.parse_args()
    path, text = ROOT / "constraints.txt", render()
    if args.check:
        if path.read_text(encoding="utf-8") != text:
            print(f"{path} is out of date: run scripts/constraints.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} ({text.count('==')} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
