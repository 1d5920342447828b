"""The files a model's weights are read from, and their hashes, without loading the model.

A release record vouches for these files (`safety.release`): `lmforge serve` hashes them
before the engine loads the model, so the model is loaded once, not twice.

    model dir        its safetensors (one file, or the shards its index names)
    adapter dir      its safetensors (the base is checked by its own hash when the adapter loads)
    checkpoint dir   DCP's `.metadata` and `*.distcp` shards (not `trainer_state.json`, which
                     describes the run, not the weights); a run dir means its latest checkpoint
"""

from __future__ import annotations

import os
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.store import hashes, hf
from lmforge.store.adapter import is_adapter_dir
from lmforge.store.loading import resolve_model
from lmforge.store.model_dir import is_model_dir

DCP_METADATA = ".metadata"


def weight_files(model: str | os.PathLike) -> list[Path]:
    """The weight files of a model dir, adapter dir, run dir or checkpoint dir, in a fixed order."""
    path = resolve_model(model)
    if is_model_dir(path):
        return hf.weight_files(path)
    if is_adapter_dir(path):
        return sorted(path.glob("*.safetensors"))
    return sorted([path / DCP_METADATA, *path.glob("*.distcp")])


def weight_file_hashes(model: str | os.PathLike) -> dict[str, str]:
    """{file name: sha256} of `weight_files(model)`: equal maps, the same weights on disk."""
    return {file.name: hashes.sha256_file(file) for file in weight_files(model)}


def digest_of(file_hashes: dict[str, str]) -> str:
    """One hash for a set of weight files: sha256 of the canonical JSON of {name: sha256}."""
    return hashes.sha256_json(file_hashes)


def weights_digest(model: str | os.PathLike) -> str:
    """The digest of a model's weights as stored (`lmforge serve` reports it, lineage records it)."""
    return digest_of(weight_file_hashes(model))


def weights_digest_or_none(model: str | os.PathLike) -> str | None:
    """`weights_digest`, or None for a model whose weight files lmforge cannot list (a record is
    then written without it, and `lmforge verify` reports that link as unrecorded)."""
    try:
        return weights_digest(model)
    except (OSError, LmforgeError):
        return None
