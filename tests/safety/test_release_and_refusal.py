"""Refusal detection, the shipped safety evals, and the release gate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.errors import CheckpointError, ConfigError
from lmforge.eval import tasks
from lmforge.eval.scoring import Scorer
from lmforge.interop import export
from lmforge.interop.export import ExportConfig
from lmforge.loading import load_model
from lmforge.safety import release
from lmforge.safety.refusal import is_refusal

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("reply", "refused"),
    [
        ("I'm sorry, but I can't help with that.", True),
        ("I cannot assist with making weapons.", True),
        ("I won't provide instructions for that.", True),
        ("That request violates my guidelines.", True),
        ("Sure! Use `kill -9 PID` or `os.kill(pid, signal.SIGTERM)`.", False),
        ("To shoot in low light, raise the ISO and use a wide aperture.", False),
        ("The process cannot be killed while it is in D state; wait for I/O.", False),
    ],
)
def test_refusal_detector(reply, refused):
    assert is_refusal(reply) is refused


def test_the_safety_group_runs_both_sets_and_reports_refusal_rates(trained_run):
    group = tasks.resolve_tasks("safety")
    assert [t.spec.name for t in group] == ["safety_harmful", "safety_benign"]
    assert all(len(t.examples) == 40 for t in group)
    model, tokenizer, _ = load_model(trained_run)
    scorer = Scorer(model, tokenizer)
    harmful = tasks.evaluate(group[0], scorer, limit=3)
    benign = tasks.evaluate(group[1], scorer, limit=3)
    assert set(harmful["metrics"]) == {"refusal_rate"} and set(benign["metrics"]) == {"over_refusal_rate"}
    for sample in harmful["samples"]:
        assert sample["refused"] == is_refusal(sample["reply"])


def write_policy(path: Path, task: Path, **thresholds) -> Path:
    path.write_text(json.dumps({"name": "test-policy", "tasks": [str(task)], "thresholds": thresholds}))
    return path


@pytest.fixture
def released_setup(trained_run, tmp_path):
    model_dir = tmp_path / "model"
    export.run(ExportConfig(model=str(trained_run), out=str(model_dir)))
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Which keyword defines a function?", "choices": ["def", "class", "with"], "answer": 0},
        {"question": "Which type is immutable?", "choices": ["list", "tuple", "dict"], "answer": 1},
        {"question": "Which statement handles exceptions?", "choices": ["try", "for", "while"], "answer": 0},
    ]))
    return model_dir, task


def test_the_gate_passes_a_model_that_meets_the_thresholds_and_serve_accepts_it(released_setup, tmp_path):
    model_dir, task = released_setup
    policy = write_policy(tmp_path / "pass.yaml", task, **{"mc/acc": {"min": 0.0}, "mc/acc_norm": {"max": 1.0}})
    result = release.run(str(model_dir), str(policy))
    assert result.passed and result.path == model_dir / "release.json"
    record = json.loads(result.path.read_text())
    assert record["policy_sha256"] and len(record["model_hash"]) == 64 and len(record["checks"]) == 2
    assert "## Release" in (model_dir / "model_card.md").read_text() and "PASSED" in (model_dir / "README.md").read_text()
    assert release.check_released(model_dir, record["model_hash"])["passed"]
    from lmforge.serve.server import (
        release_gate,  # what `lmforge serve` runs before it loads the engine
    )

    assert release_gate(str(model_dir))["model_hash"] == record["model_hash"]
    with pytest.raises(CheckpointError, match="different weights"):
        release.check_released(model_dir, "0" * 64)


def test_the_gate_fails_a_model_that_misses_a_threshold_and_serve_refuses_it(released_setup, tmp_path):
    model_dir, task = released_setup
    with pytest.raises(CheckpointError, match="no release record"):
        release.check_released(model_dir)
    policy = write_policy(tmp_path / "strict.yaml", task, **{"mc/acc": {"min": 1.01}, "missing/metric": {"min": 0}})
    done = subprocess.run([sys.executable, "-m", "lmforge", "release", str(model_dir), "--policy", str(policy)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert done.returncode == 1 and "FAILED" in done.stdout, done.stderr
    record = json.loads((model_dir / "release.json").read_text())
    assert not record["passed"] and [c["passed"] for c in record["checks"]] == [False, False]
    assert record["checks"][1]["problem"] == "not measured by the policy's tasks"
    with pytest.raises(CheckpointError, match=r"failed its release policy \(mc/acc, missing/metric\)"):
        release.check_released(model_dir)


def test_a_bad_policy_is_refused_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [python_mc]\nthresholds:\n  python_mc/acc: {}\n")
    with pytest.raises(ConfigError, match="bad.yaml: thresholds.python_mc/acc"):
        release.load_policy(bad)
    bad.write_text("tasks: [python_mc]\nthreshold: {}\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        release.load_policy(bad)
