"""The token dataset dir that `lmforge tokenize` writes and the loader reads.

Layout:
    manifest.json               tokenizer hash, dtype, per-split counts and shard hashes
    train/shard-00000.bin       raw little-endian uint16/uint32 ids, read with np.memmap
    val/shard-00000.bin         held-out documents (chosen by a seeded hash of the index)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lmforge.errors import DataError
from lmforge.store import hashes

MANIFEST = "manifest.json"
FORMAT = "lmforge.tokens.v1"
SPLITS = ("train", "val")
KIND = "token dataset"  # the output marker's kind (atomic.check_output_dir)


def manifest_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / MANIFEST


def manifest_hash(directory: str | os.PathLike) -> str:
    """The sha256 of a token dataset's manifest: what a run's lineage records of its data."""
    return hashes.sha256_file(manifest_path(directory))


def read_manifest(directory: str | os.PathLike) -> dict:
    path = manifest_path(directory)
    if not path.is_file():
        raise DataError(f"not a token dataset (no {MANIFEST}): {directory}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON ({err.msg})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: unknown token dataset format {manifest.get('format')!r}")
    return manifest
