"""Stream documents and records out of txt / jsonl / parquet files, directories and datasets.

Everything is a generator over documents, so inputs larger than memory never load whole.
Files are opened through fsspec: local paths, `lmforge://...` and any fsspec URL
(`hf://datasets/org/name/data/x.jsonl.zst`, `s3://...`), `.gz` and `.zst` (Dolma,
RedPajama) decompressed on the fly. JSONL goes through `lmforge.jsonl`, lmforge's one
JSONL reader. `datasets` dirs (`save_to_disk`) and Hub datasets (`org/name[@revision]`,
streamed) are `hf_datasets.DatasetSource`s, read row by row.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import fsspec
from zstandard import ZstdError

from lmforge.data.hf_datasets import DatasetSource, dataset_source, iter_rows
from lmforge.data.hf_datasets import fingerprint as dataset_fingerprint
from lmforge.errors import DataError
from lmforge.jsonl import read_jsonl
from lmforge.shipped import resolve_path

TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

TextSplit = Literal["file", "paragraph", "line"]
Source = Path | str | DatasetSource  # a local file, an fsspec URL of a file, a `datasets` dataset


def _kind(path: Path | str) -> str | None:
    name = str(path).lower()
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def expand_inputs(inputs: list[str | os.PathLike]) -> list[Source]:
    """Files and directories (searched recursively for supported files), in sorted order;
    fsspec URLs alike; `datasets` dirs and Hub datasets as one source each.

    `lmforge://data/...` names a file or dir that ships inside the package.
    """
    if not inputs:
        raise DataError("no input files given")
    files: list[Source] = []
    for item in inputs:
        resolved = str(resolve_path(item))
        if (dataset := dataset_source(resolved)) is not None:
            files.append(dataset)
            continue
        if "://" in resolved:
            files.extend(_expand_url(resolved))
            continue
        path = Path(resolved)
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


def _expand_url(url: str) -> list[str]:
    """The supported files an fsspec URL names (a dir: searched recursively), as URLs."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
        is_dir, exists = fs.isdir(root), fs.exists(root)
    except Exception as err:  # an unknown protocol, an unreachable bucket, bad credentials, ...
        raise DataError(f"cannot read input {url}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not exists:
        raise DataError(f"input not found: {url}")
    if not is_dir:
        if _kind(root) is None:
            raise DataError(f"unsupported file type: {url} (supported: {', '.join(SUPPORTED)})")
        return [fs.unstrip_protocol(root)]
    found = sorted(p for p in fs.find(root) if _kind(p))
    if not found:
        raise DataError(f"no supported files ({', '.join(SUPPORTED)}) under {url}")
    return [fs.unstrip_protocol(p) for p in found]


def _open(path: Path | str, mode: str = "rt"):
    """A file through fsspec, `.gz`/`.zst`/`.bz2` decompressed by suffix."""
    return fsspec.open(str(path), mode, encoding="utf-8" if "t" in mode else None, compression="infer")


def _read_text(path: Path | str, split: TextSplit) -> Iterator[str]:
    with _open(path) as f:
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


def _read_record_texts(path: Source, text_field: str) -> Iterator[str]:
    rows = iter_rows(path) if isinstance(path, DatasetSource) else read_jsonl(path)
    for lineno, record in rows:
        if text_field not in record:
            raise DataError(f"{path}:{lineno}: record has no {text_field!r} field")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is not a string")
        _check_unicode(text, f"{path}:{lineno}")
        yield text


def _parquet_file(path: Path | str, f):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(f)
    except Exception as err:
        raise DataError(f"cannot read parquet file {path}: {err}") from None


def _read_parquet(path: Path | str, text_field: str) -> Iterator[str]:
    import pyarrow as pa

    with _open(path, "rb") as f:
        file = _parquet_file(path, f)
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
    files: list[Source], text_field: str = "text", text_split: TextSplit = "file"
) -> Iterator[str]:
    """Yield every document of every file, in order. Unreadable files raise DataError."""
    for path in files:
        kind = "records" if isinstance(path, DatasetSource) else _kind(path)
        try:
            if kind == "text":
                yield from _read_text(path, text_split)
            elif kind in ("jsonl", "records"):
                yield from _read_record_texts(path, text_field)
            else:
                yield from _read_parquet(path, text_field)
        except UnicodeDecodeError:
            raise DataError(f"{path}: not valid UTF-8 text") from None
        except (OSError, EOFError, ZstdError) as err:  # a truncated or corrupt .gz/.zst too
            raise DataError(f"cannot read {path}: {err}") from None


def read_records(source: Source) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line or row number, record) of a JSONL or parquet file or a `datasets` source: every
    record shape a JSONL file holds (nested lists and objects too) reads alike from each."""
    if isinstance(source, DatasetSource):
        yield from iter_rows(source)
    elif _kind(source) == "parquet":
        with _open(source, "rb") as f:
            file = _parquet_file(source, f)
            number = 0
            for batch in file.iter_batches(batch_size=1024):
                for record in batch.to_pylist():
                    number += 1
                    yield number, record
    else:
        yield from read_jsonl(source)


def load_records(name: str | os.PathLike, what: str = "data file") -> list[tuple[int, dict[str, Any]]]:
    """Every (number, record) of one JSONL(.gz/.zst) or parquet file, `datasets` dir or Hub dataset,
    which must exist and hold one record or more."""
    resolved = str(resolve_path(name))
    if not (Path(resolved).is_file() or "://" in resolved or dataset_source(resolved)):
        raise DataError(f"{what} not found: {name}")
    sources = expand_inputs([resolved])
    if len(sources) != 1 or (not isinstance(sources[0], DatasetSource) and _kind(sources[0]) not in ("jsonl", "parquet")):
        raise DataError(f"{what} {name}: expected one JSONL or parquet file, `datasets` dir or Hub dataset")
    try:
        records = list(read_records(sources[0]))
    except (OSError, EOFError, ZstdError) as err:
        raise DataError(f"{name}: unreadable ({err})") from None
    if not records:
        raise DataError(f"{what} {name} holds no records")
    return records


def fingerprint(source: Source) -> dict[str, Any]:
    """{path, bytes, sha256} of what a source reads (a Hub dataset: its repo and revision)."""
    from lmforge.store import hashes

    if isinstance(source, DatasetSource):
        return dataset_fingerprint(source)
    if isinstance(source, Path):
        return {"path": str(source.resolve()), "bytes": source.stat().st_size, "sha256": hashes.sha256_file(source)}
    fs, root = fsspec.core.url_to_fs(source)
    digest = hashlib.sha256()
    with fs.open(root, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return {"path": source, "bytes": fs.size(root), "sha256": digest.hexdigest()}


def source_record(name: str | os.PathLike) -> dict[str, Any]:
    """`fingerprint` of the one source `name` gives (a file, a `datasets` dir, a Hub dataset)."""
    sources = expand_inputs([name])
    if len(sources) != 1:
        raise DataError(f"{name}: expected one file or dataset, found {len(sources)} files")
    return fingerprint(sources[0])
