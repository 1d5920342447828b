"""Each benchmark owns one marked section of BENCHMARKS.md and rewrites only that section."""

from __future__ import annotations

from pathlib import Path

from lmforge import atomic

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def write_section(name: str, section: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` (or append it), atomically."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{section.rstrip()}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else "# lmforge benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]  # what follows the section stays as it is
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic.write_text(path, text)
