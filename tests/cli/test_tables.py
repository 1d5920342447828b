"""Tables for people and for pipes: piped tables keep names whole, json and csv parse."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from lmforge.cli import main


@pytest.fixture(scope="module")
def runs_root(trained_run, tmp_path_factory):
    """Two real runs, `quickstart` and `quickstart-long-named-baseline`, the first evaluated on a task."""
    root = tmp_path_factory.mktemp("tables") / "runs"
    shutil.copytree(trained_run, root / "quickstart")
    shutil.copytree(trained_run, root / "quickstart-long-named-baseline")
    task = root.parent / "mc.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Which keyword defines a function?", "choices": ["def", "class"], "answer": 0},
        {"question": "Which type is immutable?", "choices": ["list", "tuple"], "answer": 1},
    ]))
    assert main(["eval", str(root / "quickstart"), "--tasks", str(task), "--device", "cpu"]) == 0
    return root


def run_cli(*args: str) -> str:
    """stdout of `lmforge ARGS` piped (not a terminal), as `lmforge ... | grep` sees it."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    out = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_runs_list_piped_keeps_every_run_name_whole_for_grep(runs_root):
    lines = run_cli("runs", "list", str(runs_root)).splitlines()
    quickstart = [line for line in lines if " quickstart " in line.replace("│", " ")]
    assert len(quickstart) == 1 and "completed" in quickstart[0] and "150/150" in quickstart[0]
    assert any("quickstart-long-named-baseline" in line for line in lines)
    assert "\x1b" not in "".join(lines)  # no colour codes into a pipe


def test_runs_list_json_and_csv_carry_raw_values_under_stable_keys(runs_root, capsys):
    assert main(["runs", "list", str(runs_root), "--format", "json"]) == 0
    runs = {r["run"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(runs) == {"quickstart", "quickstart-long-named-baseline"}
    assert runs["quickstart"]["step"] == 150 and runs["quickstart"]["status"] == "completed"
    assert isinstance(runs["quickstart"]["best_val_loss"], float) and runs["quickstart"]["evals"]
    assert main(["runs", "list", str(runs_root), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["run"] for r in rows] == ["quickstart", "quickstart-long-named-baseline"]
    assert rows[0]["step"] == "150" and float(rows[0]["last_loss"]) > 0


def test_runs_show_and_compare_take_every_format(runs_root, capsys):
    assert main(["runs", "show", str(runs_root / "quickstart"), "--format", "json"]) == 0
    values = {r["key"]: r["value"] for r in json.loads(capsys.readouterr().out)}
    assert values["step"] == 150 and values["config.run.name"] == "export-me"
    runs = [str(runs_root / "quickstart"), str(runs_root / "quickstart-long-named-baseline")]
    assert main(["runs", "compare", *runs, "--format", "json"]) == 0
    compared = json.loads(capsys.readouterr().out)
    assert set(compared) == {"metrics", "config_differences"} and compared["config_differences"] == []
    assert {r["metric"] for r in compared["metrics"]} >= {"step", "last loss"}
    assert main(["runs", "compare", *runs, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[0]["table"] == "metrics" and "quickstart-long-named-baseline" in rows[0]


def test_eval_compare_piped_json_and_csv(runs_root, capsys):
    model = str(runs_root / "quickstart")
    table = run_cli("eval", "compare", model)
    assert any(model in line for line in table.splitlines())  # the whole path, on one line
    assert main(["eval", "compare", model, "--format", "json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {r["task"] for r in results} == {"mc"} and all(0 <= r[model] <= 1 for r in results)
    assert set(results[0]) == {"task", "metric", model, f"{model} stderr"}
    assert main(["eval", "compare", model, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows and all(0 <= float(r[model]) <= 1 for r in rows)


def test_eval_run_json_is_the_only_thing_on_stdout(runs_root, tmp_path, capsys):
    task = runs_root.parent / "mc.jsonl"
    assert main(["eval", str(runs_root / "quickstart"), "--tasks", str(task), "--device", "cpu",
                 "--out", str(tmp_path), "--format", "json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert results and {"task", "metric", "value", "stderr", "n", "examples_per_second"} == set(results[0])
