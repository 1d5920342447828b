"""The `lmforge` command end to end: quickstart, the stage verbs, and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main

ROOT = Path(__file__).resolve().parents[1]


def lmforge(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={"PATH": "/usr/bin:/bin", "LMFORGE_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.slow
def test_quickstart_runs_every_stage_then_skips_unchanged_ones(tmp_path):
    fast = [
        "model.preset=tiny", "model.max_seq_len=128", "seq_len=64", "vocab_size=1024",
        "max_steps=40", "global_batch_tokens=2048", "micro_batch_size=16", "eval_every=20",
        "warmup_steps=5", "progress=false", "sampling.max_tokens=12", "sft_steps=20", "safety_eval_limit=4",
    ]
    first = lmforge("quickstart", "--out", "qs", *fast, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    summary = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert {"tokenizer", "tokenize", "train", "sample", "sft", "safety", "export"} <= set(summary)
    assert summary["sft"]["details"]["final_loss"] < summary["sft"]["details"]["first_loss"]
    assert set(summary["safety"]["details"]) == {"pretrained", "sft"} and "of harmful requests" in first.stdout
    harmful = summary["safety"]["details"]["sft"]["safety_harmful/refusal_rate"]
    assert harmful["n"] == 4 and 0 <= harmful["value"] <= 1 and harmful["stderr"] >= 0  # reported with its stderr
    assert f"{harmful['value']:.0%} ± {harmful['stderr']:.0%} (n=4)" in first.stdout
    assert all(s["status"] == "ran" for s in summary.values())
    train = summary["train"]["details"]
    assert train["final_loss"] < train["first_loss"] - 1.0
    assert train["val_bpb"] > 0 and "bits/byte" in first.stdout
    assert (tmp_path / "qs" / "sample.txt").read_text().startswith("The Python interpreter")
    assert (tmp_path / "qs" / "runs" / "quickstart" / "metrics.jsonl").is_file()
    assert (tmp_path / "qs" / "model" / "model.safetensors").is_file()
    assert "AutoModelForCausalLM.from_pretrained" in first.stdout
    # The run's report shows where its data came from: the curation funnel of the quickstart's first stage.
    assert lmforge("report", "qs/runs/quickstart", cwd=tmp_path).returncode == 0
    page = (tmp_path / "qs" / "runs" / "quickstart" / "report" / "index.html").read_text()
    assert "Curation funnel" in page and "exact_dedup" in page and "curation funnel" in page

    again = lmforge("quickstart", "--out", "qs", *fast, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert all(s["status"] == "skipped" for s in json.loads((tmp_path / "qs" / "summary.json").read_text()).values())

    # A changed sampling prompt reruns only the last stage.
    changed = lmforge("quickstart", "--out", "qs", *fast, "prompt=Lists are", cwd=tmp_path)
    statuses = {k: v["status"] for k, v in json.loads((tmp_path / "qs" / "summary.json").read_text()).items()}
    assert changed.returncode == 0 and statuses.pop("sample") == "ran"
    assert set(statuses.values()) == {"skipped"}


def test_stage_verbs_chain_on_real_text_through_the_cli(tmp_path, pretrain_data):
    docs = str(pretrain_data["docs"])
    assert lmforge("tokenizer", "train", "-i", docs, "--out", "tok", "--vocab-size", "800", cwd=tmp_path).returncode == 0
    encoded = lmforge("tokenizer", "encode", "tok", "héllo wörld <|endoftext|>", cwd=tmp_path)
    decoded = lmforge("tokenizer", "decode", "tok", encoded.stdout.strip(), cwd=tmp_path)
    assert decoded.stdout.rstrip("\n") == "héllo wörld <|endoftext|>"
    tokenized = lmforge("tokenize", "-i", docs, "--tokenizer", "tok", "--out", "tokens", "--workers", "2", cwd=tmp_path)
    assert tokenized.returncode == 0 and "val:" in tokenized.stdout
    config = tmp_path / "train.yaml"
    config.write_text(
        "model: {preset: tiny, max_seq_len: 128}\ndata: {dataset: tokens, seq_len: 64}\n"
        "train: {max_steps: 4, global_batch_tokens: 512, micro_batch_size: 8, progress: false}\n"
    )
    trained = lmforge("train", "train.yaml", "run.name=cli", "train.eval_every=2", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "completed at step 4" in trained.stdout
    sample = lmforge("generate", "runs/cli", "--prompt", "import", "--max-tokens", "5", "--seed", "0", cwd=tmp_path)
    assert sample.returncode == 0 and sample.stdout.startswith("import")
    again = lmforge("generate", "runs/cli/checkpoints/step-0000004", "--prompt", "import", "--max-tokens", "5",
                    "--seed", "0", cwd=tmp_path)
    assert again.stdout == sample.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "data.dataset=missing"], "not a token dataset (no manifest.json): missing"),
        (["train", "nope.yaml"], "config file not found: nope.yaml"),
        (["train", "data.dataset=x", "train.bogus=1"], "unknown key 'train.bogus' (allowed: max_steps"),
        (["train", "data.dataset=x", "optim.name=sgd"], "bad value for 'optim.name'"),
        (["train", "data.dataset=x", "model.preset=huge"], "unknown preset 'huge'"),
        (["train", "data.dataset=x", "data.seq_len=100000"], "exceeds model.max_seq_len"),
        (["tokenize", "--input", "missing.jsonl", "--tokenizer", "t", "--out", "o"], "input not found: missing.jsonl"),
        (["tokenizer", "train", "-i", "missing.txt", "--out", "t"], "input not found: missing.txt"),
        (["tokenizer", "encode", "no-tokenizer", "hi"], "tokenizer not found"),
        (["generate", "no-run"], "model not found: no-run"),
    ],
)
def test_user_errors_print_one_line_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_malformed_yaml_and_bad_corpus_are_reported_with_their_location(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text("train: {max_steps: [1,\n")
    assert main(["train", "bad.yaml"]) == 2
    assert "bad.yaml: not valid YAML" in capsys.readouterr().err
    Path("binary.yaml").write_bytes(b"\x00\xff\xfe")  # not text at all: one line too, not a crash
    assert main(["train", "binary.yaml", "--print-config"]) == 2
    assert capsys.readouterr().err.strip() == "error: binary.yaml: not a YAML text file (not UTF-8)"
    Path("docs.jsonl").write_text('{"text": "fine"}\n{"text": broken}\n')
    assert main(["tokenizer", "train", "-i", "docs.jsonl", "--out", "tok"]) == 2
    assert "docs.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert not Path("tok").exists()
    Path("empty.txt").write_text("")
    assert main(["tokenizer", "train", "-i", "empty.txt", "--out", "tok"]) == 2
    assert "no non-empty documents" in capsys.readouterr().err


def test_generate_and_chat_run_on_the_inference_engine(trained_run, tmp_path):
    stopped = lmforge("generate", str(trained_run), "--prompt", "The list", "--max-tokens", "40", "--seed", "3",
                      "--stop", " ", cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert " " not in stopped.stdout.removeprefix("The list").strip("\n")  # cut at the first space, which is not shown
    piped = subprocess.run([sys.executable, "-m", "lmforge", "chat", str(trained_run), "--max-tokens", "6", "--seed", "1"],
                           input="What is a list?\n/reset\nAnd a tuple?\n/exit\n", cwd=tmp_path, capture_output=True,
                           text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert piped.returncode == 0 and piped.stdout.count("assistant> ") == 2, piped.stderr
    bad = lmforge("generate", str(trained_run), "--top-p", "2", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: top_p must be in (0, 1], got 2.0"


def test_quickstart_sft_stage_reruns_when_its_data_changes_under_the_same_path(tmp_path):
    from lmforge import quickstart as qs

    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    config = qs.QuickstartConfig(out=str(tmp_path / "qs"), sft_data=[str(data)])
    results = {"train": qs.StageResult("train", "ran", 0.0, [], {"steps": 1})}
    before = qs.sft_stage(config, results).fingerprint
    assert qs.sft_stage(config, results).fingerprint == before
    data.write_text('{"messages": [{"role": "user", "content": "hello"}]}\n')
    assert qs.sft_stage(config, results).fingerprint != before
