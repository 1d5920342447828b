"""SFT and DPO read parquet files and `datasets` dirs with JSONL's record shapes, and train alike."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.align.run import run_dpo, run_sft
from lmforge.store import hashes
from tests.align.test_sft_dpo import chat_files, config  # noqa: F401  (chat_files is a fixture)

STEPS = {"max_steps": 6, "eval_every": 0, "checkpoint_every": 0}


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sft_on_a_parquet_file_trains_as_on_the_same_jsonl(trained_run, chat_files, tmp_path):  # noqa: F811
    pq.write_table(pa.Table.from_pylist(records(chat_files / "sft.jsonl")), tmp_path / "sft.parquet")
    from_jsonl = run_sft(config(trained_run, tmp_path / "jsonl", {"train": str(chat_files / "sft.jsonl")}, train=STEPS))
    from_parquet = run_sft(config(trained_run, tmp_path / "parquet", {"train": str(tmp_path / "sft.parquet")}, train=STEPS))
    assert from_parquet.status == "completed" and from_parquet.step == 6
    assert from_parquet.losses == pytest.approx(from_jsonl.losses, abs=1e-6)


def test_dpo_on_a_datasets_saved_dir_trains_as_on_the_same_jsonl(trained_run, chat_files, tmp_path):  # noqa: F811
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(records(chat_files / "prefs.jsonl")).save_to_disk(str(tmp_path / "prefs"))
    from_jsonl = run_dpo(config(trained_run, tmp_path / "jsonl", {"train": str(chat_files / "prefs.jsonl")}, train=STEPS))
    from_saved = run_dpo(config(trained_run, tmp_path / "saved", {"train": str(tmp_path / "prefs")}, train=STEPS))
    assert from_saved.status == "completed"
    assert from_saved.losses == pytest.approx(from_jsonl.losses, abs=1e-6)
    # The run records the saved dir by the tree hash `lmforge verify` recomputes.
    manifest = json.loads((from_saved.run_dir / "manifest.json").read_text())
    assert manifest["dataset"] == str((tmp_path / "prefs").resolve())
    assert manifest["dataset_sha256"] == hashes.sha256_file(tmp_path / "prefs")
