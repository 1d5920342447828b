"""Stream documents out of txt / jsonl(.gz) / parquet files and directories.

Everything is a generator over documents, so inputs larger than memory never load whole.
JSONL files go through `lmforge.jsonl`, lmforge's one JSONL reader.
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from lmforge.errors import DataError
from lmforge.jsonl import read_jsonl
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
