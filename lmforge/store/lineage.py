"""Lineage records: the content hashes of what each artifact was made from.

Every artifact names its inputs by path *and* sha256, so `lmforge verify` (`store.verify`)
can walk from a served model back to the raw files and recompute every hash on the way:

    curated dataset   lineage.json: its shards (outputs) and the raw input files
    tokenizer         lineage.json beside tokenizer.json: its hash and its training files
    token dataset     manifest.json: shard hashes, source files, the tokenizer's hash (tokenize)
    run / checkpoint  manifest.json: token dataset manifest or data file, tokenizer, config.yaml,
                      parent weights (fine-tunes); a checkpoint is its run's record
    model dir         lineage.json: its files (outputs) and the weights digest of its source
    eval result       eval/<task>.json: the weights digest of the model it scored
    release record    release.json: weight files, policy, the eval results it relied on

A record is one small JSON object, written atomically; inputs are entries
{"kind", "path", "sha256" or "weights_digest"}. Hashes: `store.hashes`; a model's weights
digest: `store.weights.weights_digest`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmforge import atomic
from lmforge.store import hashes

LINEAGE_FILE = "lineage.json"
FORMAT = "lmforge.lineage.v1"
RELEASE_FILE = "release.json"  # a model's release record (`safety.release`), in its model or run dir

RAW_FILE = "raw file"
CURATED = "curated dataset"
TOKENIZER = "tokenizer"
TOKEN_DATASET = "token dataset"
CHECKPOINT = "checkpoint"
MODEL_DIR = "model dir"
ADAPTER = "adapter"
EVAL_RESULT = "eval result"
RELEASE = "release record"


def raw_file(path: str | os.PathLike) -> dict[str, Any]:
    """An input file by content; a remote one (hf://, s3://) by name only: it is not read twice."""
    local = Path(path)
    if not local.is_file():
        return {"kind": RAW_FILE, "path": str(path), "sha256": None}
    return {"kind": RAW_FILE, "path": str(local.resolve()), "bytes": local.stat().st_size,
            "sha256": hashes.sha256_file(local)}


def file_hashes(directory: str | os.PathLike, files: list[str | os.PathLike]) -> dict[str, str]:
    """{path relative to `directory`: sha256} of `files` (inside `directory`)."""
    directory = Path(directory)
    return {Path(os.path.relpath(Path(f), directory)).as_posix(): hashes.sha256_file(f) for f in files}


def write(directory: str | os.PathLike, kind: str, inputs: list[dict[str, Any]],
          outputs: dict[str, str] | None = None, **extra: Any) -> Path:
    """Write `directory/lineage.json` (atomically): what `directory` holds and what it was made from."""
    path = Path(directory) / LINEAGE_FILE
    atomic.write_json(path, {"format": FORMAT, "kind": kind, **extra, "outputs": outputs or {}, "inputs": inputs})
    return path


def read(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The lineage record of `directory`, or None when it has none (older or foreign artifacts)."""
    record = atomic.read_json(Path(directory) / LINEAGE_FILE)
    return record if record.get("format") == FORMAT else None
