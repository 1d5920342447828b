"""The first step of curation: documents out of txt / jsonl(.gz) / parquet files, local or fsspec.

Unlike `lmforge.data.readers` (which stops at the first bad record, as tokenizing must), a
curation run meets raw data: a bad record is counted under a reason code (malformed_json,
missing_text_field, binary, ...) with an example, and reading goes on. What survives is
the run's problem only when nothing does.

Sharding: with at least as many files as tasks, task r reads files r, r+N, ...; with fewer
(one big file), every task reads every file and keeps records r, r+N, ... so a single file
still spreads over all workers.
"""

from __future__ import annotations

import os

import fsspec
import fsspec.implementations.local
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.readers.base import BaseReader

from lmforge.data.curate.audit import Ledger
from lmforge.data.readers import JSONL_SUFFIXES, PARQUET_SUFFIXES, SUPPORTED, TEXT_SUFFIXES
from lmforge.errors import DataError
from lmforge.jsonl import BadLine, iter_jsonl
from lmforge.shipped import resolve_path

# A text whose share of control characters (other than \n \r \t \f) passes this is binary junk.
_MAX_CONTROL_SHARE = 0.01
_CONTROL = {c for c in range(32) if chr(c) not in "\n\r\t\f"} | {127}


def _kind(path: str) -> str | None:
    name = path.lower()
    for suffixes, kind in ((TEXT_SUFFIXES, "text"), (JSONL_SUFFIXES, "jsonl"), (PARQUET_SUFFIXES, "parquet")):
        if name.endswith(suffixes):
            return kind
    return None


def expand_inputs(paths: list[str]) -> list[str]:
    """Every supported file under `paths` (dirs searched recursively), as sorted URLs or paths."""
    files: list[str] = []
    for item in paths:
        fs, root = fsspec.core.url_to_fs(resolve_path(item))  # lmforge://: a file that ships with lmforge
        local = isinstance(fs, fsspec.implementations.local.LocalFileSystem)
        unstrip = (lambda p: p) if local else fs.unstrip_protocol
        try:
            is_dir, exists = fs.isdir(root), fs.exists(root)
        except Exception as err:  # an unreachable bucket, bad credentials, ...
            raise DataError(f"cannot read input {item}: {err}") from None
        if not exists:
            raise DataError(f"input not found: {item}")
        if is_dir:
            found = sorted(p for p in fs.find(root) if _kind(p))
            if not found:
                raise DataError(f"no supported files ({', '.join(SUPPORTED)}) under {item}")
            files += [unstrip(p) for p in found]
        elif _kind(root) is None:
            raise DataError(f"unsupported file type: {item} (supported: {', '.join(SUPPORTED)})")
        else:
            files.append(unstrip(root))
    return files


def _text_problem(text: str) -> str | None:
    """A reason code when `text` is not a usable document, else None."""
    if not text.strip():
        return "empty"
    if "\x00" in text or sum(ord(c) in _CONTROL for c in text[:10_000]) > _MAX_CONTROL_SHARE * min(len(text), 10_000):
        return "binary"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a JSON escape: no tokenizer takes it
        return "invalid_unicode"
    return None


class CurationReader(BaseReader):
    """Reads `files` into Documents; every record that is not a usable document is counted by reason."""

    name = "read"

    def __init__(self, files: list[str], ledger: Ledger, text_field: str = "text", id_field: str = "id",
                 text_split: str = "file"):
        super().__init__(text_key=text_field, id_key=id_field)
        self.files, self.ledger, self.text_split = files, ledger, text_split

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        by_file = len(self.files) >= world_size
        shard = self.files[rank::world_size] if by_file else self.files
        record_index = 0
        with self.ledger.task(rank) as ledger:
            for path in shard:
                try:
                    for record_id, raw_bytes, text, problem in self._records(path):
                        mine = by_file or record_index % world_size == rank
                        record_index += 1
                        if not mine:
                            continue
                        ledger.seen(raw_bytes)
                        problem = problem or _text_problem(text)
                        if problem:
                            shown = repr(text[:400]) if problem in ("binary", "invalid_unicode") else text[:400]
                            ledger.removed(problem, raw_bytes, f"{record_id}: {shown}")
                            continue
                        ledger.kept(len(text.encode("utf-8")))
                        self.stat_update("documents")
                        yield Document(text=text, id=str(record_id), metadata={"source": path})
                except (OSError, EOFError, ValueError, UnicodeDecodeError) as err:
                    # pyarrow's errors are OSError/ValueError subclasses; gzip's are OSError/EOFError.
                    if by_file or rank == 0:
                        ledger.seen(0)
                        ledger.removed("unreadable_file", 0, f"{path}: {type(err).__name__}: {err}"[:400])

    def _records(self, path: str):
        """(id, raw bytes, text, problem-or-None) for each record of one file."""
        kind = _kind(path)
        if kind == "jsonl":
            yield from self._jsonl(path)
        elif kind == "parquet":
            yield from self._parquet(path)
        else:
            yield from self._text(path)

    def _jsonl(self, path: str):
        for lineno, size, record in iter_jsonl(path):
            where = f"{os.path.basename(path)}:{lineno}"
            if isinstance(record, BadLine):
                if record.reason == "not_an_object":  # counted as a record without its text field
                    yield where, size, f"keys: {record.detail}", "missing_text_field"
                else:
                    detail = f" ({record.detail})" if record.reason == "malformed_json" else ""
                    yield where + detail, size, record.shown, record.reason
                continue
            if self.text_key not in record:
                yield where, size, f"keys: {', '.join(map(str, record))}", "missing_text_field"
                continue
            text = record[self.text_key]
            if not isinstance(text, str):
                yield where, size, repr(text)[:200], "text_not_a_string"
                continue
            yield record.get(self.id_key, where), size, text, None

    def _parquet(self, path: str):
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb") as f:
            file = pq.ParquetFile(f)
            names = file.schema_arrow.names
            if self.text_key not in names:
                yield path, 0, f"columns: {', '.join(names)}", "missing_text_field"
                return
            columns = [self.text_key] + ([self.id_key] if self.id_key in names else [])
            row = 0
            for batch in file.iter_batches(columns=columns, batch_size=1024):
                texts = batch.column(0).to_pylist()
                ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
                for text, record_id in zip(texts, ids, strict=True):
                    row += 1
                    record_id = record_id if record_id is not None else f"{os.path.basename(path)}:{row}"
                    if not isinstance(text, str):
                        yield record_id, 0, repr(text)[:200], "empty" if text is None else "text_not_a_string"
                        continue
                    yield record_id, len(text.encode("utf-8")), text, None

    def _text(self, path: str):
        with fsspec.open(path, "rb", compression="infer") as f:
            raw = f.read()
        name = os.path.basename(path)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            yield name, len(raw), raw[:200].decode("utf-8", "replace"), "binary"
            return
        if self.text_split == "file":
            yield name, len(raw), text, None
            return
        separator = "\n" if self.text_split == "line" else "\n\n"
        pieces = text.split(separator) if self.text_split == "line" else _paragraphs(text)
        for i, piece in enumerate(p for p in pieces if p.strip()):
            yield f"{name}:{i + 1}", len(piece.encode("utf-8")) + len(separator), piece, None


def _paragraphs(text: str) -> list[str]:
    out, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            out.append("\n".join(current))
            current = []
    if current:
        out.append("\n".join(current))
    return out
