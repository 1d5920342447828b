"""The shipped `sft` and `dpo` recipes train on the chat data that ships with lmforge, from any
working directory; the shipped preference pairs teach a model to prefer the documented answer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.shipped import resolve_path
from lmforge.store import hashes

ROOT = Path(__file__).resolve().parents[2]
# The test model is tiny (context 128): the recipes' own keys stay, only its size shrinks.
SMALL = ["data.seq_len=128", "train.global_batch_tokens=1024", "train.micro_batch_size=8", "train.device=cpu",
         "train.progress=false", "train.log_every=1"]


def lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={"PATH": "/usr/bin:/bin", "LMFORGE_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)})


def metric(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.mark.slow
def test_sft_then_dpo_by_shipped_config_name_find_their_data_from_another_directory(trained_run, tmp_path):
    sft = lmforge("sft", str(trained_run), "sft", *SMALL, "train.max_steps=2", "train.eval_every=2", cwd=tmp_path)
    assert sft.returncode == 0, sft.stderr
    manifest = json.loads((tmp_path / "runs" / "sft" / "manifest.json").read_text())
    chat = resolve_path("lmforge://data/chat/python_docs_chat.jsonl.gz")
    assert manifest["dataset"] == chat and manifest["dataset_sha256"] == hashes.sha256_file(chat)
    # The saved config keeps the portable name of the data, not this machine's path.
    assert "train: lmforge://data/chat/python_docs_chat.jsonl.gz" in (tmp_path / "runs" / "sft" / "config.yaml").read_text()

    # DPO from the SFT run on the shipped pairs: the held-out reward margin opens up.
    dpo = lmforge("dpo", "runs/sft", "dpo", *SMALL, "train.max_steps=12", "train.eval_every=6", "optim.lr=5e-4",
                  "schedule.warmup_steps=2", cwd=tmp_path)
    assert dpo.returncode == 0, dpo.stderr
    run_dir = tmp_path / "runs" / "dpo"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["dataset"] == resolve_path("lmforge://data/chat/python_docs_preferences.jsonl.gz")
    assert len(metric(run_dir, "reward_margin")) == 12 and len(metric(run_dir, "preference_accuracy")) == 12
    margins = metric(run_dir, "val_reward_margin")
    assert len(margins) == 2 and 0 < margins[0] < margins[1]
    assert len(metric(run_dir, "val_preference_accuracy")) == 2
