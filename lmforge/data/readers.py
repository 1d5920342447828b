"""Stream documents out of txt / jsonl(.gz) / parquet files and directories.

Everything is a generator over documents, so inputs larger than memory never load whole.
`iter_jsonl` is lmforge's one JSONL reader (local paths or fsspec URLs, compression from
the suffix): curation counts its bad lines; `read_jsonl` / `load_jsonl` (task data, chat
data, labelled data) stop at the first with a one-line `file:line: problem` error.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec

from lmforge.errors import DataError
from lmforge.shipped import resolve_path

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

TextSplit = Literal["file", "paragraph", "line"]


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def expand_inputs(inputs: list[str | os.PathLike]) -> list[Path]:
    """Files and directories (searched recursively for supported files), in sorted order.

    `lmforge://data/...` names a file or dir that ships inside the package.
    """
    if not inputs:
        raise DataError("no input files given")
    files: list[Path] = []
    for item in inputs:
        path = Path(resolve_path(item))
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p))
            if not found:
                raise DataError(f"no supported files ({', '.join(SUPPORTED)}) under {path}")
            files.extend(found)
        elif path.is_file():
            if _kind(path) is None:
                raise DataError(f"unsupported file type: {path} (supported: {', '.join(SUPPORTED)})")
            files.append(path)
        else:
            raise DataError(f"input not found: {path}")
    return files


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _read_text(path: Path, split: TextSplit) -> Iterator[str]:
    with _open_text(path) as f:
        if split == "file":
            yield f.read()
            return
        if split == "line":
            for line in f:
                if line.strip():
                    yield line.rstrip("\n")
            return
        paragraph: list[str] = []
        for line in f:
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph).rstrip("\n")
                paragraph = []
        if paragraph:
            yield "".join(paragraph).rstrip("\n")


def _check_unicode(text: str, where: str) -> None:
    """JSON escapes can encode lone surrogates (half an emoji), which no tokenizer accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: text is not valid Unicode (lone surrogate)") from None


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
        for number, line in enumerate(f, 1):
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


def _read_jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    for lineno, record in read_jsonl(path):
        if text_field not in record:
            raise DataError(f"{path}:{lineno}: record has no {text_field!r} field")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is not a string")
        _check_unicode(text, f"{path}:{lineno}")
        yield text


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as err:
        raise DataError(f"cannot read parquet file {path}: {err}") from None
    if text_field not in file.schema_arrow.names:
        raise DataError(f"{path}: parquet file has no column {text_field!r}")
    column = file.schema_arrow.field(text_field).type
    if not (pa.types.is_string(column) or pa.types.is_large_string(column)):
        raise DataError(f"{path}: parquet column {text_field!r} holds {column}, not strings")
    for batch in file.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield text


def read_documents(
    files: list[Path], text_field: str = "text", text_split: TextSplit = "file"
) -> Iterator[str]:
    """Yield every document of every file, in order. Unreadable files raise DataError."""
    for path in files:
        kind = _kind(path)
        try:
            if kind == "text":
                yield from _read_text(path, text_split)
            elif kind == "jsonl":
                yield from _read_jsonl_texts(path, text_field)
            else:
                yield from _read_parquet(path, text_field)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not valid UTF-8 text") from None
        except (OSError, EOFError) as err:
            raise DataError(f"cannot read {path}: {err}") from None
