"""`lmforge tokenize`: shards plus manifest that hold every document exactly, written atomically."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lmforge.data.tokenize import TokenizeConfig, is_validation, run
from lmforge.errors import DataError
from lmforge.store import hashes
from lmforge.store.token_dataset import MANIFEST, read_manifest


def split_stream(directory: Path, split: str) -> np.ndarray:
    """The concatenated token ids of one split, read straight from its shard files."""
    manifest = json.loads((directory / MANIFEST).read_text())
    dtype = np.dtype(manifest["dtype"])
    shards = [
        np.fromfile(directory / s["file"], dtype=dtype) for s in manifest["splits"][split]["shards"]
    ]
    return np.concatenate(shards) if shards else np.empty(0, dtype=dtype)


def decode_documents(stream: np.ndarray, tokenizer) -> list[str]:
    """Cut a stream at each eos (every document starts with one) and decode the pieces."""
    starts = np.flatnonzero(stream == tokenizer.eos_id).tolist()
    bounds = [*starts, len(stream)]
    return [
        tokenizer.decode(stream[a + 1 : b].tolist())
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def dir_bytes(directory: Path) -> dict[str, bytes]:
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def small_corpus(corpus_texts, tmp_path_factory) -> Path:
    """The first 40 real documents: enough for several shards, quick to tokenize many times."""
    path = tmp_path_factory.mktemp("small") / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:40]), encoding="utf-8"
    )
    return path


def tokenize(inputs, tokenizer, out, **overrides) -> dict:
    settings = {"val_fraction": 0.1, "num_workers": 1, **overrides}
    return run(
        TokenizeConfig(
            inputs=[str(i) for i in inputs], tokenizer=str(tokenizer.path), out=str(out), **settings
        )
    )


def test_manifest_counts_equal_the_sum_over_shards_and_the_shard_files(
    token_dataset, trained_tokenizer, corpus_texts
):
    manifest = read_manifest(token_dataset)
    assert manifest["dtype"] == "uint16"  # 1024 ids fit in two bytes
    assert manifest["tokenizer"]["hash"] == trained_tokenizer.hash()
    assert manifest["tokenizer"]["eos_id"] == trained_tokenizer.eos_id
    total_documents = total_bytes = 0
    for split in ("train", "val"):
        info = manifest["splits"][split]
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"]) > 0
        for shard in info["shards"]:
            path = token_dataset / shard["file"]
            assert path.stat().st_size == shard["tokens"] * 2
            assert hashes.sha256_file(path) == shard["sha256"]
        assert len(split_stream(token_dataset, split)) == info["tokens"]
        total_documents += info["documents"]
        total_bytes += info["text_bytes"]
    assert total_documents == len(corpus_texts)
    assert total_bytes == sum(len(t.encode("utf-8")) for t in corpus_texts)


def test_every_document_starts_with_the_eos_id(token_dataset, trained_tokenizer):
    manifest = read_manifest(token_dataset)
    for split in ("train", "val"):
        stream = split_stream(token_dataset, split)
        assert stream[0] == trained_tokenizer.eos_id
        # Text never encodes to the special id, so each eos is exactly one document start.
        assert (
            int((stream == trained_tokenizer.eos_id).sum())
            == manifest["splits"][split]["documents"]
        )


def test_decoding_train_and_val_reproduces_every_input_document(
    token_dataset, trained_tokenizer, corpus_texts
):
    train = decode_documents(split_stream(token_dataset, "train"), trained_tokenizer)
    val = decode_documents(split_stream(token_dataset, "val"), trained_tokenizer)
    assert Counter(train + val) == Counter(corpus_texts)
    # Each split keeps input order, and the split of document i is its seeded hash.
    assert train == [t for i, t in enumerate(corpus_texts) if not is_validation(i, 0, 0.1)]
    assert val == [t for i, t in enumerate(corpus_texts) if is_validation(i, 0, 0.1)]


def test_two_workers_write_byte_identical_shards_to_one_worker(
    small_corpus, trained_tokenizer, tmp_path
):
    one = tokenize(
        [small_corpus], trained_tokenizer, tmp_path / "one", num_workers=1, docs_per_chunk=3
    )
    two = tokenize(
        [small_corpus], trained_tokenizer, tmp_path / "two", num_workers=2, docs_per_chunk=3
    )
    assert one["splits"] == two["splits"]
    one_files, two_files = dir_bytes(tmp_path / "one"), dir_bytes(tmp_path / "two")
    shard_names = [name for name in one_files if name.endswith(".bin")]
    assert shard_names and shard_names == [name for name in two_files if name.endswith(".bin")]
    assert all(one_files[name] == two_files[name] for name in shard_names)


def test_small_shard_tokens_split_the_stream_into_several_shards_with_the_same_content(
    small_corpus, trained_tokenizer, tmp_path
):
    whole = tokenize([small_corpus], trained_tokenizer, tmp_path / "whole")
    sharded = tokenize([small_corpus], trained_tokenizer, tmp_path / "sharded", shard_tokens=2048)
    shards = sharded["splits"]["train"]["shards"]
    assert len(whole["splits"]["train"]["shards"]) == 1 and len(shards) >= 3
    assert all(s["tokens"] == 2048 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 2048
    assert [s["file"] for s in shards] == [f"train/shard-{i:05d}.bin" for i in range(len(shards))]
    for split in ("train", "val"):
        assert sharded["splits"][split]["tokens"] == whole["splits"][split]["tokens"]
        assert np.array_equal(
            split_stream(tmp_path / "sharded", split), split_stream(tmp_path / "whole", split)
        )


def test_val_split_is_whole_documents_fixed_by_the_seed(
    small_corpus, trained_tokenizer, corpus_texts, tmp_path
):
    documents = corpus_texts[:40]
    first = tokenize([small_corpus], trained_tokenizer, tmp_path / "a", val_fraction=0.25, seed=0)
    again = tokenize([small_corpus], trained_tokenizer, tmp_path / "b", val_fraction=0.25, seed=0)
    other = tokenize([small_corpus], trained_tokenizer, tmp_path / "c", val_fraction=0.25, seed=1)
    assert first["splits"] == again["splits"]
    val_a = decode_documents(split_stream(tmp_path / "a", "val"), trained_tokenizer)
    val_c = decode_documents(split_stream(tmp_path / "c", "val"), trained_tokenizer)
    assert val_a and val_c and set(val_a) <= set(documents) and set(val_c) <= set(documents)
    assert val_a != val_c
    assert (
        other["splits"]["val"]["shards"][0]["sha256"]
        != first["splits"]["val"]["shards"][0]["sha256"]
    )


def test_val_fraction_zero_puts_every_document_in_train(small_corpus, trained_tokenizer, tmp_path):
    manifest = tokenize([small_corpus], trained_tokenizer, tmp_path / "out", val_fraction=0.0)
    assert manifest["splits"]["train"]["documents"] == 40
    assert manifest["splits"]["val"] == {"tokens": 0, "documents": 0, "text_bytes": 0, "shards": []}


def test_too_few_documents_for_a_validation_split_is_a_data_error(trained_tokenizer, tmp_path):
    one_doc = tmp_path / "one.jsonl"
    one_doc.write_text(json.dumps({"text": "only one document here"}) + "\n")
    seed = next(s for s in range(100) if not is_validation(0, s, 0.01))
    with pytest.raises(DataError, match="validation split is empty"):
        tokenize([one_doc], trained_tokenizer, tmp_path / "out", val_fraction=0.01, seed=seed)
    assert not (tmp_path / "out").exists()


def test_an_empty_input_file_is_a_data_error_and_writes_nothing(trained_tokenizer, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"no non-empty documents in .*empty\.jsonl"):
        tokenize([empty], trained_tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_tokenization_leaves_no_output_and_an_existing_dataset_untouched(
    small_corpus, corpus_texts, trained_tokenizer, tmp_path
):
    broken = tmp_path / "broken.jsonl"
    valid = "".join(json.dumps({"text": t}) + "\n" for t in corpus_texts[:10])
    broken.write_text(valid + '{"text": "unterminated\n', encoding="utf-8")

    for num_workers in (1, 2):
        with pytest.raises(DataError, match=r"broken\.jsonl:11: malformed JSON"):
            tokenize(
                [broken],
                trained_tokenizer,
                tmp_path / "fresh",
                docs_per_chunk=2,
                num_workers=num_workers,
            )
        assert not (tmp_path / "fresh").exists()

    existing = tmp_path / "existing"
    tokenize([small_corpus], trained_tokenizer, existing)
    before = dir_bytes(existing)
    with pytest.raises(DataError, match=r"broken\.jsonl:11"):
        tokenize([broken], trained_tokenizer, existing, docs_per_chunk=2)
    assert dir_bytes(existing) == before
    # No temp dirs are left beside the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl", "existing"]


def test_a_document_that_is_not_valid_unicode_is_a_data_error_naming_its_file(
    trained_tokenizer, tmp_path
):
    path = tmp_path / "scraped.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "half an emoji \\ud83d"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"scraped\.jsonl"):
        tokenize([path], trained_tokenizer, tmp_path / "out", val_fraction=0.0)
    assert not (tmp_path / "out").exists()


def test_read_manifest_refuses_a_dir_that_is_not_a_token_dataset(tmp_path):
    with pytest.raises(DataError, match=f"no {MANIFEST}"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format": "something.else"}))
    with pytest.raises(DataError, match="unknown token dataset format"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST).write_text("{broken")
    with pytest.raises(DataError, match="malformed JSON"):
        read_manifest(tmp_path)
