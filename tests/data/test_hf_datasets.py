"""`lmforge tokenize` reads .zst files, `datasets` saved dirs and (cached, offline) Hub datasets
into exactly the tokens of the same documents as plain JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.readers import expand_inputs, load_records, read_documents, source_record
from lmforge.errors import DataError
from lmforge.store import hashes
from tests.test_hub import cache_repo


def tokenize(inputs: list[str], tokenizer, out: Path) -> dict[str, bytes]:
    """{shard path: bytes} of `lmforge tokenize` run on `inputs`."""
    args = ["tokenize", *[a for i in inputs for a in ("--input", i)], "--tokenizer", str(tokenizer.path),
            "--out", str(out), "--workers", "1"]
    assert main(args) == 0
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.bin"))}


@pytest.fixture(scope="module")
def plain_tokens(corpus_subset, trained_tokenizer, tmp_path_factory) -> dict[str, bytes]:
    return tokenize([str(corpus_subset)], trained_tokenizer, tmp_path_factory.mktemp("plain") / "tokens")


def test_a_zst_jsonl_file_tokenizes_to_the_tokens_of_the_plain_file(corpus_subset, trained_tokenizer, plain_tokens, tmp_path):
    import zstandard

    packed = tmp_path / "docs.jsonl.zst"
    packed.write_bytes(zstandard.ZstdCompressor().compress(corpus_subset.read_bytes()))
    assert tokenize([str(packed)], trained_tokenizer, tmp_path / "tokens") == plain_tokens


def test_a_datasets_saved_dir_tokenizes_to_the_tokens_of_the_plain_file(corpus_subset, corpus_texts, trained_tokenizer,
                                                                       plain_tokens, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_json(str(corpus_subset)).save_to_disk(str(tmp_path / "saved"))
    assert tokenize([str(tmp_path / "saved")], trained_tokenizer, tmp_path / "tokens") == plain_tokens
    # A DatasetDict: its train split by default, any other by name.
    held_out = datasets.Dataset.from_list([{"text": "Exceptions propagate up the stack."}])
    datasets.DatasetDict(train=datasets.Dataset.from_json(str(corpus_subset)), test=held_out).save_to_disk(str(tmp_path / "dict"))
    assert list(read_documents(expand_inputs([str(tmp_path / "dict")]))) == corpus_texts
    assert list(read_documents(expand_inputs([f"{tmp_path / 'dict'}:test"]))) == ["Exceptions propagate up the stack."]
    with pytest.raises(DataError, match="no split 'val'"):
        list(read_documents(expand_inputs([f"{tmp_path / 'dict'}:val"])))


def test_a_cached_hub_dataset_tokenizes_offline_to_the_tokens_of_the_plain_file(corpus_subset, trained_tokenizer,
                                                                                plain_tokens, tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    (tmp_path / "repo" / "data").mkdir(parents=True)
    (tmp_path / "repo" / "data" / "train.jsonl").write_bytes(corpus_subset.read_bytes())
    cache_repo(tmp_path / "cache", "org/docs", tmp_path / "repo", repo_type="dataset")
    assert tokenize(["org/docs"], trained_tokenizer, tmp_path / "tokens") == plain_tokens
    manifest = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
    (source,) = manifest["source"]["files"]
    assert source["path"] == "hf://datasets/org/docs" and len(source["revision"]) == 40
    with pytest.raises(DataError, match="org/absent"):
        list(read_documents(expand_inputs(["hf://datasets/org/absent"])))


def test_records_read_alike_from_jsonl_parquet_and_saved_dirs(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
               {"messages": [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]}]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = datasets.Dataset.from_list(records)
    table.to_parquet(str(tmp_path / "chat.parquet"))
    table.save_to_disk(str(tmp_path / "chat"))
    for name in ("chat.jsonl", "chat.parquet", "chat"):
        assert load_records(tmp_path / name) == [(1, records[0]), (2, records[1])], name
    before = source_record(tmp_path / "chat")["sha256"]
    assert before == hashes.sha256_file(tmp_path / "chat")  # a saved dir: the tree hash verify recomputes
    (arrow,) = (tmp_path / "chat").glob("*.arrow")
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))
    assert source_record(tmp_path / "chat")["sha256"] != before
    with pytest.raises(DataError, match="not found"):
        load_records(tmp_path / "absent.jsonl")


def test_online_a_hub_dataset_is_streamed_at_its_revision_and_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        return iter([{"text": "first"}, {"text": "second"}])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert list(read_documents(expand_inputs(["org/web@v2:validation"]))) == ["first", "second"]
    assert list(read_documents(expand_inputs(["hf://datasets/org/web"]))) == ["first", "second"]
    assert calls == [("org/web", {"revision": "v2", "split": "validation", "streaming": True}),
                     ("org/web", {"revision": None, "split": "train", "streaming": True})]
