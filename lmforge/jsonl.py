"""lmforge's one JSONL reader: local paths, `lmforge://...` or any fsspec URL, `.gz`/`.zst` inflated.

`iter_jsonl` yields every non-blank line as a record or a `BadLine` (curation counts those
by reason and goes on); `read_jsonl` and `load_jsonl` (documents, task data, chat data,
labelled data) stop at the first bad line with a one-line `file:line: problem` error.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from lmforge.errors import DataError
from lmforge.shipped import resolve_path


@dataclass(frozen=True)
class BadLine:
    """A JSONL line that is not a JSON object: a reason code, what went wrong, the line's start."""

    reason: str  # "binary" | "malformed_json" | "not_an_object"
    detail: str  # the JSON error, or the type the line held instead of an object
    shown: str

    @property
    def message(self) -> str:
        return {"binary": "not valid UTF-8 text", "malformed_json": f"malformed JSON ({self.detail})",
                "not_an_object": f"expected a JSON object (got {self.detail})"}[self.reason]


def _parse_line(line: bytes) -> dict[str, Any] | BadLine:
    shown = line[:200].decode("utf-8", "replace")
    try:
        record = json.loads(line)
    except UnicodeDecodeError as err:
        return BadLine("binary", str(err), shown)
    except json.JSONDecodeError as err:
        return BadLine("malformed_json", err.msg, shown)
    if not isinstance(record, dict):
        return BadLine("not_an_object", type(record).__name__, shown)
    return record


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, int, dict[str, Any] | BadLine]]:
    """(line number, size in bytes, record or BadLine) for each non-blank line of a JSONL file.

    A local path, `lmforge://...` or any fsspec URL; `.gz` (and fsspec's other suffixes) decompress.
    """
    with fsspec.open(str(resolve_path(path)), "rb", compression="infer") as f:
        # Buffered: zstandard's stream reader (.zst) reads but cannot iterate lines itself.
        for number, line in enumerate(io.BufferedReader(f, 1 << 20), 1):
            if line.strip():
                yield number, len(line), _parse_line(line)


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each record; the first bad line raises `file:line: problem`."""
    for number, _, record in iter_jsonl(path):
        if isinstance(record, BadLine):
            if record.reason == "binary":
                raise DataError(f"{path}: not valid UTF-8 text (line {number})")
            raise DataError(f"{path}:{number}: {record.message}")
        yield number, record


def load_jsonl(path: str | os.PathLike, what: str = "data file") -> list[tuple[int, dict[str, Any]]]:
    """Every (line number, record) of a JSONL(.gz) file that must exist and hold one record or more."""
    path = Path(resolve_path(path))  # lmforge://data/chat/...: a file that ships with lmforge
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    try:
        records = list(read_jsonl(path))
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    if not records:
        raise DataError(f"{path}: no records")
    return records
