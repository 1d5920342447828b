"""garak red-teaming: lmforge's summary of a real garak report, and a real garak run against the server.

`data/garak_small.report.jsonl` is the report of a garak 0.17.1 run (SMOKE_PROBES plus
dan.AutoDANCached, at most 4 prompts a probe) against `lmforge serve` on the tiny test model,
trimmed only by dropping entries: the attempts before detection (status 1) and the plugin
cache, payload and digest entries. The slow test needs garak's own interpreter
(`LMFORGE_GARAK_PYTHON`, else `<repo>/.venv-garak/bin/python`; scripts/redteam/garak.sh
creates it) and skips without one.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from lmforge.errors import ConfigError, DataError
from lmforge.safety import redteam

REPO = Path(__file__).resolve().parents[2]
REPORT = Path(__file__).parent / "data" / "garak_small.report.jsonl"


def garak_python() -> str | None:
    candidate = os.environ.get("LMFORGE_GARAK_PYTHON") or str(REPO / ".venv-garak" / "bin" / "python")
    return candidate if os.path.isfile(candidate) and os.access(candidate, os.X_OK) else None


def report_entries(path: Path = REPORT) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def counts_from_attempts(entries: list[dict], threshold: float) -> dict[tuple[str, str], list[int]]:
    """(probe, detector) -> [scored, hits, no output], recounted from the scored attempts."""
    detectors = defaultdict(list)
    for e in entries:
        if e["entry_type"] == "eval":
            detectors[e["probe"]].append(e["detector"])
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for a in entries:
        if a["entry_type"] != "attempt" or a["status"] != 2:
            continue
        for i, output in enumerate(a["outputs"]):
            for detector in detectors[a["probe_classname"]]:
                row = counts[(a["probe_classname"], detector)]
                if output is None:
                    row[2] += 1
                    continue
                row[0] += 1
                row[1] += a["detector_results"][detector][i] >= threshold
    return counts


def test_summary_counts_are_the_eval_entries_and_agree_with_the_scored_attempts():
    entries = report_entries()
    summary = redteam.summarize(REPORT)
    evals = [e for e in entries if e["entry_type"] == "eval"]

    assert summary["tool"] == "garak" and summary["garak_version"] == "0.17.1"
    assert summary["model"] == "tiny" and summary["generator"] == "openai.OpenAICompatible"
    assert summary["finished"] is True
    assert [(p["probe"], p["detector"]) for p in summary["probes"]] == [(e["probe"], e["detector"]) for e in evals]
    recount = counts_from_attempts(entries, summary["eval_threshold"])
    for p, e in zip(summary["probes"], evals, strict=True):
        assert (p["passed"], p["failures"], p["total"], p["no_output"]) == (
            e["passed"], e["fails"], e["total_evaluated"], e["nones"])
        assert p["passed"] + p["failures"] == p["total"]
        assert recount[(p["probe"], p["detector"])] == [p["total"], p["failures"], p["no_output"]]
        if p["total"]:
            assert p["attack_success_rate"] == pytest.approx(p["failures"] / p["total"], abs=1e-4)
        else:
            assert p["attack_success_rate"] is None  # every prompt was longer than the tiny context

    overall = summary["overall"]
    assert overall["attempts"] == sum(e["total_evaluated"] for e in evals) > 0
    assert overall["failures"] == sum(e["fails"] for e in evals) > 0
    assert overall["no_output"] == sum(e["nones"] for e in evals)
    assert overall["attack_success_rate"] == pytest.approx(overall["failures"] / overall["attempts"], abs=1e-4)


def test_summary_examples_are_failing_outputs_one_per_probe_first_and_truncated():
    summary = redteam.summarize(REPORT, max_examples=3)
    examples = summary["examples"]
    failing = {p["probe"] for p in summary["probes"] if p["failures"]}
    assert 0 < len(examples) <= 3
    assert {x["probe"] for x in examples} == failing  # both failing probes before a second of either
    for x in examples:
        assert x["score"] >= summary["eval_threshold"]
        assert x["prompt"] and len(x["prompt"]) <= redteam.EXAMPLE_CHARS
        assert len(x["output"]) <= redteam.EXAMPLE_CHARS


def test_write_summary_writes_the_json_and_a_markdown_table(tmp_path):
    summary = redteam.summarize(REPORT)
    json_path, md_path = redteam.write_summary(summary, tmp_path / "out")
    assert json.loads(json_path.read_text()) == summary
    table = md_path.read_text()
    for p in summary["probes"]:
        assert f"| {p['probe']} | {p['detector']} | {p['failures']} / {p['total']} |" in table
    assert "| **overall** |" in table and "n/a" in table  # dan.AutoDANCached scored nothing
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_summarize_refuses_a_missing_file_and_files_that_are_not_garak_reports(tmp_path):
    with pytest.raises(DataError, match="no such garak report"):
        redteam.summarize(tmp_path / "missing.report.jsonl")
    not_json = tmp_path / "notes.jsonl"
    not_json.write_text("hello\n")
    with pytest.raises(DataError, match="not a garak report"):
        redteam.summarize(not_json)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "a document"}) + "\n")
    with pytest.raises(DataError, match="not a garak report"):
        redteam.summarize(other)
    unfinished = tmp_path / "unfinished.report.jsonl"
    unfinished.write_text("".join(json.dumps(e) + "\n" for e in report_entries()
                                  if e["entry_type"] in ("start_run setup", "init")))
    with pytest.raises(DataError, match="no eval entries"):
        redteam.summarize(unfinished)


def test_run_garak_names_a_missing_interpreter_and_an_unreachable_server(tmp_path):
    with pytest.raises(ConfigError, match="garak interpreter .* not found"):
        redteam.run_garak("http://127.0.0.1:9/v1", "tiny", tmp_path, redteam.SMOKE_PROBES,
                          str(tmp_path / "no-venv" / "bin" / "python"))
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match="not reachable"):
        redteam.run_garak(f"http://127.0.0.1:{port}/v1", "tiny", tmp_path, redteam.SMOKE_PROBES, sys.executable)


@pytest.mark.slow
@pytest.mark.skipif(garak_python() is None, reason="no garak interpreter: set LMFORGE_GARAK_PYTHON or run "
                    "scripts/redteam/garak.sh to create .venv-garak")  # a marker: no model is trained for nothing
def test_garak_scans_lmforge_serve_with_the_offline_probes_and_the_summary_adds_up(trained_run, tmp_path):
    python = garak_python()
    from lmforge.store.loading import load_model
    from tests.serve.conftest import KEY, MODEL_NAME, make_server

    out = tmp_path / "redteam"
    with make_server(load_model(trained_run)[:2], tmp_path) as served:
        summary = redteam.run_garak(served.base_url, MODEL_NAME, out, redteam.SMOKE_PROBES, python,
                                    api_key=KEY, prompt_cap=4, max_tokens=32, timeout_s=300)

    assert summary["model"] == MODEL_NAME and summary["finished"]
    assert {p["probe"] for p in summary["probes"]} == set(redteam.SMOKE_PROBES)
    for p in summary["probes"]:
        assert p["total"] > 0, p
        assert p["passed"] + p["failures"] == p["total"]
        assert p["attack_success_rate"] == pytest.approx(p["failures"] / p["total"], abs=1e-4)
    overall = summary["overall"]
    assert overall["attempts"] == sum(p["total"] for p in summary["probes"]) > 0
    assert overall["attack_success_rate"] == pytest.approx(overall["failures"] / overall["attempts"], abs=1e-4)
    assert json.loads((out / "redteam.json").read_text()) == summary
    assert (out / "redteam.md").read_text().startswith(f"# Red-team summary: {MODEL_NAME}")
    # garak kept to the output dir: its log and caches are under out/garak/home.
    assert (out / "garak" / "home" / "data" / "garak" / "garak.log").is_file()
    # The server took everything garak sends (n, stop, seed, penalties, ...); the only refusals
    # are prompts longer than the tiny model's 128-token context.
    with sqlite3.connect(served.audit_path) as db:
        rows = db.execute("SELECT key_id, status, error FROM requests WHERE route LIKE '%chat%'").fetchall()
    assert rows and {key for key, _, _ in rows} == {"alice"}
    refused = [(status, error) for _, status, error in rows if status != 200]
    assert all(status == 400 and "tokens" in error for status, error in refused), refused


def test_the_cli_summarizes_a_report_and_refuses_an_unreachable_server(tmp_path, capsys):
    from lmforge.cli import main

    assert main(["redteam", "http://127.0.0.1:9/v1", "--out", str(tmp_path / "s"), "--report", str(REPORT)]) == 0
    summary = json.loads((tmp_path / "s" / "redteam.json").read_text())
    assert summary == redteam.summarize(REPORT) and (tmp_path / "s" / "redteam.md").is_file()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    capsys.readouterr()
    assert main(["redteam", f"http://127.0.0.1:{port}/v1", "--out", str(tmp_path / "x"), "--probes", "smoke",
                 "--garak", sys.executable]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert f"127.0.0.1:{port}" in lines[0] and "not reachable" in lines[0]
    assert not (tmp_path / "x" / "redteam.json").exists()
