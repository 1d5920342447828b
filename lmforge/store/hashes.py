"""Content hashes: of files, of JSON-able objects, of model weights.

A hash recorded in a manifest, checkpoint, card or release record is compared later by
someone else; each kind of hash is computed here, once, so the two sides always agree.
A tokenizer's hash is `LmTokenizer.hash()` (the tokenizer sits a layer below store).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """A file's sha256. A dir read as one input (a `datasets` saved dir) hashes as the tree of its
    files: each relative name, then its content, in sorted order."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        files = sorted(os.path.relpath(os.path.join(root, name), path)
                       for root, _, names in os.walk(path) for name in names)
        for name in files:
            digest.update(f"{name}\0".encode())
            digest.update(bytes.fromhex(sha256_file(os.path.join(path, name), chunk)))
        return digest.hexdigest()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def model_hash(model: torch.nn.Module) -> str:
    """sha256 of every weight's bytes, in state-dict order: equal hashes, equal models."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()

