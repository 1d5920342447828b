"""`lmforge tokenize`: encode documents into shards of token ids plus a manifest.

Layout of a token dataset dir:
    manifest.json               tokenizer hash, dtype, per-split counts and shard hashes
    train/shard-00000.bin       raw little-endian uint16/uint32 ids, read with np.memmap
    val/shard-00000.bin         held-out documents (chosen by a seeded hash of the index)
Every document is stored as [<|endoftext|>, *ids]: one separator serves as BOS and EOS.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydantic import Field

from lmforge import __version__, atomic
from lmforge.config import Section
from lmforge.data.readers import Source, TextSplit, expand_inputs, fingerprint, read_documents
from lmforge.errors import DataError
from lmforge.monitor.progress import Progress
from lmforge.store import hashes
from lmforge.store.token_dataset import FORMAT, KIND, MANIFEST, SPLITS
from lmforge.tokenizer import LmTokenizer, load_tokenizer

log = logging.getLogger(__name__)



class TokenizeConfig(Section):
    inputs: list[str] = Field(min_length=1, description="files or dirs of txt/jsonl/parquet (.gz, .zst), fsspec URLs, "
                              "`datasets` dirs or Hub datasets org/name[@revision][:split]")
    tokenizer: str = Field(description="tokenizer dir, tokenizer.json or Hub model id org/name[@revision]")
    out: str = Field(description="token dataset dir to write")
    text_field: str = "text"
    text_split: TextSplit = "file"
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0)
    seed: int = 0
    num_workers: int = Field(default_factory=lambda: max(1, min(8, os.cpu_count() or 1)), ge=1)
    docs_per_chunk: int = Field(256, ge=1)
    shard_tokens: int = Field(100_000_000, ge=1024)
    overwrite: bool = Field(False, description="replace an out dir that lmforge's tokenize did not write")


class ShardWriter:
    """Appends token arrays into fixed-size shard files, each renamed into place when full."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        (directory / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self.tokens = self.documents = self.text_bytes = 0
        self._file = None

    def _open(self) -> None:
        name = f"{self.split}/shard-{len(self.shards):05d}.bin"
        self._name, self._count, self._hash = name, 0, hashlib.sha256()
        self._file = open(self.directory / name, "wb")

    def _close(self) -> None:
        assert self._file is not None
        self._file.close()
        self.shards.append({"file": self._name, "tokens": self._count, "sha256": self._hash.hexdigest()})
        self._file = None

    def add(self, ids: np.ndarray, text_bytes: int) -> None:
        self.documents += 1
        self.text_bytes += text_bytes
        while len(ids):
            if self._file is None:
                self._open()
            room = self.shard_tokens - self._count
            chunk, ids = ids[:room], ids[room:]
            data = chunk.astype(self.dtype, copy=False).tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._count += len(chunk)
            self.tokens += len(chunk)
            if self._count == self.shard_tokens:
                self._close()

    def finish(self) -> dict:
        if self._file is not None:
            self._close()
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "text_bytes": self.text_bytes,
            "shards": self.shards,
        }


def is_validation(index: int, seed: int, fraction: float) -> bool:
    """A seeded hash of the document index decides its split: stable when streaming."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


_worker_tokenizer: LmTokenizer | None = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode_chunk(texts: list[str]) -> list[list[int]]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode_batch(texts)


def _chunks(docs: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(itertools.islice(docs, size)):
        yield chunk


def source_fingerprint(files: list[Source]) -> dict:
    entries = [fingerprint(source) for source in files]  # local paths resolved; Hub datasets by revision
    return {"files": entries, "hash": hashes.sha256_json([(e["bytes"], e["sha256"]) for e in entries])}


def run(config: TokenizeConfig) -> dict:
    """Tokenize `config.inputs` into `config.out`; returns the manifest."""
    atomic.check_output_dir(config.out, KIND, overwrite=config.overwrite, inputs=[*config.inputs, config.tokenizer],
                            read_inputs_recursively=True)
    files = expand_inputs(config.inputs)
    tokenizer = load_tokenizer(config.tokenizer)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    source = source_fingerprint(files)
    start = time.perf_counter()
    docs = (d for d in read_documents(files, config.text_field, config.text_split) if d)
    chunks = _chunks(docs, config.docs_per_chunk)

    with atomic.atomic_dir(config.out, KIND) as tmp, Progress("tokenize", unit="doc") as progress:
        writers = {s: ShardWriter(tmp, s, dtype, config.shard_tokens) for s in SPLITS}
        index = 0
        for texts, ids_batch in _encode_stream(chunks, tokenizer, config.num_workers):
            for text, ids in zip(texts, ids_batch, strict=True):
                split = "val" if is_validation(index, config.seed, config.val_fraction) else "train"
                row = np.empty(len(ids) + 1, dtype=np.int64)
                row[0] = tokenizer.eos_id
                row[1:] = ids
                writers[split].add(row, len(text.encode("utf-8")))
                index += 1
            progress.update(len(texts), tokens=f"{sum(w.tokens for w in writers.values()):,}")
        splits = {s: w.finish() for s, w in writers.items()}
        if splits["train"]["documents"] == 0:
            raise DataError(f"no non-empty documents in {', '.join(map(str, config.inputs))}")
        if config.val_fraction > 0 and splits["val"]["documents"] == 0:
            raise DataError(
                f"validation split is empty: {index} documents with val_fraction="
                f"{config.val_fraction}; raise val_fraction or add documents"
            )
        manifest = {
            "format": FORMAT,
            "created_by": f"lmforge {__version__}",
            "tokenizer": {
                "hash": tokenizer.hash(),
                "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id,
                "path": str(Path(tokenizer.path).resolve()),
            },
            "dtype": dtype.name,
            "seed": config.seed,
            "val_fraction": config.val_fraction,
            "splits": splits,
            "source": source,
        }
        atomic.write_json(tmp / MANIFEST, manifest)
    elapsed = time.perf_counter() - start
    total = sum(s["tokens"] for s in splits.values())
    log.info("tokenized %d documents into %d tokens in %.1fs", index, total, elapsed)
    return manifest


def _encode_stream(
    chunks: Iterator[list[str]], tokenizer: LmTokenizer, num_workers: int
) -> Iterator[tuple[list[str], list[list[int]]]]:
    """Encode chunks in order with a bounded number in flight, so memory stays flat."""
    if num_workers == 1:
        for chunk in chunks:
            yield chunk, tokenizer.encode_batch(chunk)
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(num_workers, initializer=_init_worker, initargs=(str(tokenizer.path),)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in chunks:
            pending.append((chunk, pool.apply_async(_encode_chunk, (chunk,))))
            if len(pending) >= 2 * num_workers:
                texts, result = pending.popleft()
                yield texts, result.get()
        while pending:
            texts, result = pending.popleft()
            yield texts, result.get()
