"""`datasets` sources: dirs written by `save_to_disk` and Hugging Face Hub datasets.

    ./saved            a Dataset (or a DatasetDict: its `train` split) saved with `save_to_disk`
    org/name           a Hub dataset (no local path of that name), its `train` split
    org/name@rev:test  ... at a branch, tag or commit, its `test` split
    hf://datasets/org/name[@rev][:split]   the same, spelled as an fsspec URL

Hub datasets are streamed (`load_dataset(..., streaming=True)`): nothing larger than a
shard is downloaded or held. With `HF_HUB_OFFLINE=1` the repo's snapshot in the Hub cache
(`lmforge.hub`) is read instead, through the same `datasets` builders. A file inside a Hub
dataset (`hf://datasets/org/name/data/x.jsonl.zst`) is a file like any other (`readers`).
`datasets` is an optional dependency (`pip install 'lmforge[datasets]'`), imported only here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge import hub
from lmforge.errors import DataError
from lmforge.extras import require
from lmforge.store import hashes

DEFAULT_SPLIT = "train"
_SAVED_MARKERS = (("state.json", "dataset_info.json"), ("dataset_dict.json",))
_HF_DATASET_URL = re.compile(r"hf://datasets/(?P<id>[^/@:]+/[^/@:]+(?:@[\w.-]+)?)(?::(?P<split>[\w.-]+))?/?")
# A missing `data/train.jsonl` is a missing file, not a Hub dataset of that name.
FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".ndjson", ".parquet", ".gz", ".zst", ".yaml", ".yml", ".csv")
_SPLIT = re.compile(r"(?P<name>.+?):(?P<split>[\w.-]+)")


@dataclass(frozen=True)
class DatasetSource:
    """A `datasets` dataset to read records from: a saved dir (`path`) or a Hub repo (`repo`)."""

    name: str  # as the user gave it
    path: Path | None = None
    repo: str | None = None
    revision: str | None = None
    split: str = DEFAULT_SPLIT

    def __str__(self) -> str:
        return self.name


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a dir that `Dataset.save_to_disk` or `DatasetDict.save_to_disk` wrote."""
    return path.is_dir() and any(all((path / f).is_file() for f in files) for files in _SAVED_MARKERS)


def dataset_source(item: str) -> DatasetSource | None:
    """The `datasets` source `item` names, or None when it names a file, a plain dir or nothing."""
    if match := _HF_DATASET_URL.fullmatch(item):
        repo, revision = hub.parse(match["id"])  # type: ignore[misc]
        return DatasetSource(item, repo=repo, revision=revision, split=match["split"] or DEFAULT_SPLIT)
    base, split = item, None
    if not Path(item).exists() and (match := _SPLIT.fullmatch(item)):
        base, split = match["name"], match["split"]
    if is_saved_dataset(Path(base)):
        return DatasetSource(item, path=Path(base), split=split or DEFAULT_SPLIT)
    if "://" not in base and hub.is_hub_id(base) and not base.lower().endswith(FILE_SUFFIXES):
        repo, revision = hub.parse(base)  # type: ignore[misc]
        return DatasetSource(item, repo=repo, revision=revision, split=split or DEFAULT_SPLIT)
    return None


def _datasets():
    return require("datasets", "reading `datasets` dirs and Hub datasets")  # names the extra when missing


def _open(source: DatasetSource):
    datasets = _datasets()
    if source.path is not None:
        try:
            loaded = datasets.load_from_disk(str(source.path))
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read the saved dataset {source.path}: {err}") from None
        if isinstance(loaded, datasets.DatasetDict):
            if source.split not in loaded:
                raise DataError(f"{source}: no split {source.split!r} (splits: {', '.join(loaded)}); "
                                f"name one as {source.path}:SPLIT")
            loaded = loaded[source.split]
        return loaded
    where: str = source.repo  # type: ignore[assignment]
    revision = source.revision
    if hub.offline():  # datasets' own offline mode ignores the Hub cache: read the cached snapshot
        where = str(hub.snapshot(source.repo, revision, "dataset", error=DataError))  # type: ignore[arg-type]
        revision = None
    try:
        return datasets.load_dataset(where, revision=revision, split=source.split, streaming=True)
    except ValueError as err:  # an unknown split
        raise DataError(f"{source}: {str(err).splitlines()[0]}") from None
    except (OSError, ConnectionError) as err:  # no such dataset, no network
        raise DataError(f"Hugging Face Hub dataset {source}: {str(err).splitlines()[0]}") from None


def iter_rows(source: DatasetSource) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number from 1, row as a dict) of the source's split, streamed."""
    for number, row in enumerate(_open(source), 1):
        yield number, dict(row)


def fingerprint(source: DatasetSource) -> dict[str, Any]:
    """What identifies the data read: a saved dir's file hashes, or a Hub repo at its revision."""
    if source.path is not None:  # its files' tree hash, as `lmforge verify` recomputes it
        files = [p for p in source.path.rglob("*") if p.is_file()]
        return {"path": str(source.path.resolve()), "split": source.split,
                "bytes": sum(os.path.getsize(f) for f in files), "sha256": hashes.sha256_file(source.path)}
    entry = {"path": f"hf://datasets/{source.repo}", "revision": source.revision or "main", "split": source.split,
             "bytes": None, "sha256": None}
    if hub.offline():  # the cached snapshot is a commit: name it
        entry["revision"] = hub.snapshot(source.repo, source.revision, "dataset", error=DataError).name  # type: ignore[arg-type]
    return entry
