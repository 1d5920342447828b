"""Progress on every long stage: bars on a terminal, none (and no control characters) in a pipe,
and every stage's updates reach a `progress.listen` callback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmforge.cli import main
from lmforge.monitor.progress import Progress, listen, silence_tqdm_in


def record(stages: dict):
    """A listen callback keeping each stage's last (done, total)."""
    return lambda stage, done, total: stages.__setitem__(stage, (done, total))


def test_a_bar_only_on_a_terminal_and_a_log_line_when_piped(monkeypatch, capsys, caplog):
    caplog.set_level("INFO", logger="lmforge.progress")
    monkeypatch.delenv("LMFORGE_PROGRESS", raising=False)
    with Progress("tokenize", unit="doc") as progress:  # capsys: stderr is not a terminal
        progress.update(40, tokens="1,000")
    assert capsys.readouterr().err == ""
    assert "tokenize: 40 doc in" in caplog.text
    monkeypatch.setenv("LMFORGE_PROGRESS", "1")
    with Progress("tokenize", total=40, unit="doc") as progress:
        progress.update(40)
    assert "\r" in capsys.readouterr().err  # a forced bar draws as tqdm does


def test_datatrove_bars_are_hidden_in_process_and_restored_after():
    from tqdm import tqdm

    minhash = pytest.importorskip("datatrove.pipeline.dedup.minhash")
    with silence_tqdm_in("datatrove"):
        assert minhash.tqdm(range(3)).disable
    assert minhash.tqdm is tqdm


def test_tokenizer_training_and_tokenize_report_progress_through_the_cli(corpus_subset, tmp_path):
    stages: dict = {}
    with listen(record(stages)):
        assert main(["tokenizer", "train", "-i", str(corpus_subset), "--out", str(tmp_path / "tok"),
                     "--vocab-size", "512"]) == 0
        assert main(["tokenize", "-i", str(corpus_subset), "--tokenizer", str(tmp_path / "tok"),
                     "--out", str(tmp_path / "tokens"), "--workers", "1"]) == 0
    documents = json.loads((tmp_path / "tokens" / "manifest.json").read_text())["splits"]
    assert stages["tokenizer train"][0] == stages["tokenize"][0] == sum(s["documents"] for s in documents.values())


def test_eval_and_export_report_progress_through_the_cli(trained_run, tmp_path):
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Which keyword defines a function?", "choices": ["def", "class", "lambda"], "answer": 0},
        {"question": "Which type is immutable?", "choices": ["list", "tuple"], "answer": 1},
    ]))
    stages: dict = {}
    with listen(record(stages)):
        assert main(["eval", str(trained_run), "--tasks", str(task), "--device", "cpu", "--out", str(tmp_path / "ev")]) == 0
        assert main(["export", str(trained_run), "--out", str(tmp_path / "model")]) == 0
    assert stages["eval mc"] == (5, 5)  # one request per choice
    assert stages["export model"] == (4, 4)


def test_piped_tokenize_writes_no_bar_control_characters(corpus_subset, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LMFORGE_PROGRESS", "TQDM_DISABLE")}
    tok = subprocess.run([sys.executable, "-m", "lmforge", "tokenizer", "train", "-i", str(corpus_subset),
                          "--out", str(tmp_path / "tok"), "--vocab-size", "512"], capture_output=True, text=True, env=env)
    out = subprocess.run([sys.executable, "-m", "lmforge", "tokenize", "-i", str(corpus_subset), "--tokenizer",
                          str(tmp_path / "tok"), "--out", str(tmp_path / "tokens"), "--workers", "1"],
                         capture_output=True, text=True, env=env)
    assert tok.returncode == 0 and out.returncode == 0, tok.stderr + out.stderr
    for stream in (tok.stdout, tok.stderr, out.stdout, out.stderr):
        assert "\r" not in stream and "\x1b[" not in stream
    assert "tokenize: " in out.stderr and " doc in " in out.stderr  # one line at the end instead of a bar
