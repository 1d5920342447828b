"""Sweeps: the spec is checked before anything runs, trials are ordinary run dirs with records,
a failing trial does not stop the sweep, and a sweep resumes where it stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lmforge.errors import ConfigError, OutputError
from lmforge.experiments import sweep
from lmforge.experiments.samplers import grid, random_draws
from lmforge.experiments.spec import load_spec, spec_from_dict
from lmforge.experiments.sweep_dir import SweepDir

# A tiny model, a few steps, validation at the end: one trial is a few seconds on one core.
SHORT = ["model.preset=tiny", "model.max_seq_len=64", "data.seq_len=32", "train.max_steps=8",
         "train.global_batch_tokens=256", "train.micro_batch_size=8", "train.device=cpu", "train.eval_every=4",
         "train.eval_batches=1", "train.log_every=2", "train.checkpoint_every=0", "schedule.warmup_steps=2",
         "train.compile=false"]


def spec_data(tmp_path: Path, tokens: Path, **changes) -> dict:
    data = {
        "name": "s", "out_dir": str(tmp_path / "sweeps"), "base": "pretrain-small",
        "overrides": [f"data.dataset={tokens}", *SHORT],
        "space": {"optim.lr": {"values": [3.0e-3, 1.0e-2]}},
        "executor": {"max_parallel": 2, "poll_seconds": 0.2},
    }
    data.update(changes)
    return data


# ------------------------------------------------------------------ the spec


@pytest.mark.parametrize(("change", "named"), [
    ({"space": {"optim.lrr": {"values": [1.0e-3]}}}, "optim.lrr"),
    ({"space": {"optim.lr": {"values": []}}}, "space.optim.lr"),
    ({"space": {"optim.lr": {"low": 0.1, "high": 0.01, "log": True}}}, "space.optim.lr"),
    ({"space": {"optim.lr": {"low": 0.0, "high": 0.01, "log": True}, }, "sampler": "random", "trials": 2}, "space.optim.lr"),
    ({"space": {"optim.lr": {"low": 1.0e-3, "high": 0.01}}}, "space.optim.lr"),  # grid without num
    ({"space": {"run.name": {"values": ["a", "b"]}}}, "run.name"),
    ({"space": {"size": {"values": [{"model.dim": 64}, {"model.dim": 66}]}}}, "model.dim=66"),
    ({"sampler": "grid", "trials": 5}, "trials"),
    ({"samplr": "grid"}, "samplr"),
])
def test_a_bad_spec_fails_before_anything_is_written_naming_the_key(tmp_path, pretrain_data, change, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")) as err:
        spec = spec_from_dict(spec_data(tmp_path, pretrain_data["tokens"], **change))
        sweep.run(spec)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "sweeps").exists()


def test_a_missing_token_dataset_fails_the_sweep_once_before_any_trial(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.dataset: not a token dataset .*no-tokens.*lmforge tokenize"):
        sweep.run(spec_from_dict(spec_data(tmp_path, tmp_path / "no-tokens")))
    assert not (tmp_path / "sweeps").exists()


def test_spec_overrides_on_the_command_line_beat_the_yaml(tmp_path, pretrain_data):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_data(tmp_path, pretrain_data["tokens"], sampler="random", trials=2)))
    spec = load_spec(path, ["trials=3", "executor.max_parallel=1", "space.optim.lr.values=[0.001]"])
    assert (spec.trials, spec.executor.max_parallel, spec.space["optim.lr"].values) == (3, 1, [0.001])


def test_grid_is_the_product_of_choices_and_num_points_with_bundles_by_index(tmp_path, pretrain_data):
    spec = spec_from_dict(spec_data(tmp_path, pretrain_data["tokens"], space={
        "optim.weight_decay": {"low": 1.0e-3, "high": 0.1, "log": True, "num": 3},
        "size": {"values": [{"model.dim": 64, "model.n_heads": 4}, {"model.dim": 128, "model.n_heads": 4}]},
    }))
    points = grid(spec)
    assert len(points) == 6 and spec.grid_size() == 6
    assert [p["optim.weight_decay"] for p in points[::2]] == [0.001, 0.01, 0.1]
    assert [p["size"] for p in points[:2]] == [0, 1]


def test_random_trials_are_the_same_for_the_same_seed_and_grow_by_appending(tmp_path, pretrain_data):
    space = {"optim.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
             "schedule.warmup_steps": {"low": 0, "high": 4, "type": "int"}}
    make = lambda trials, seed: spec_from_dict(  # noqa: E731
        spec_data(tmp_path, pretrain_data["tokens"], sampler="random", trials=trials, seed=seed, space=space))
    first = random_draws(make(4, 0))
    assert first == random_draws(make(4, 0)) and first != random_draws(make(4, 1))
    assert random_draws(make(6, 0))[:4] == first
    assert all(1.0e-4 <= p["optim.lr"] <= 1.0e-2 and isinstance(p["schedule.warmup_steps"], int) for p in first)


# ------------------------------------------------------------------ running trials


@pytest.fixture(scope="module")
def finished_sweep(pretrain_data, tmp_path_factory):
    """Three trials on two local processes: two learning rates, and one whose tokenizer is missing."""
    root = tmp_path_factory.mktemp("sweep")
    spec = spec_from_dict(spec_data(root, pretrain_data["tokens"], space={"setup": {"values": [
        {"optim.lr": 3.0e-3}, {"optim.lr": 1.0e-2}, {"data.tokenizer": str(root / "no-such-tokenizer")}]}}))
    seen = []
    result = sweep.run(spec, progress=seen.append)
    return spec, result, seen


def test_a_local_sweep_records_each_trials_metric_size_and_tokens_and_goes_on_past_a_failure(finished_sweep):
    spec, result, seen = finished_sweep
    assert result.status == "done" and [t.status for t in result.trials] == ["done", "done", "failed"]
    assert sorted(t.id for t in seen) == ["t0000", "t0001", "t0002"]
    directory = SweepDir(result.dir)
    for trial in result.trials[:2]:
        record = json.loads((directory.trial_dir(trial.id) / "trial.json").read_text())
        metrics = record["metrics"]
        assert record["metric"] == metrics["val_loss"] and metrics["step"] == 8
        assert metrics["params"] > 0 and metrics["params_total"] > metrics["params"]
        assert metrics["tokens"] == 8 * 256 and metrics["flops"] == 6 * metrics["params"] * metrics["tokens"]
        assert record["attempts"] == 1 and record["seconds"] > 0
        config = yaml.safe_load((directory.trial_dir(trial.id) / "config.yaml").read_text())
        assert config["optim"]["lr"] == record["params"]["optim.lr"] and config["run"]["name"] == trial.id
    failed = result.trials[2]
    assert "no-such-tokenizer" in failed.error and failed.metric is None
    status = json.loads((result.dir / "sweep.json").read_text())
    assert status["status"] == "done" and status["counts"]["done"] == 2 and status["counts"]["failed"] == 1
    best = min(result.trials[:2], key=lambda t: t.metric)
    assert status["best"]["id"] == best.id == result.best.id


def test_rerunning_a_sweep_dir_needs_resume_or_overwrite_and_resume_needs_the_same_spec(finished_sweep):
    spec, result, _ = finished_sweep
    with pytest.raises(OutputError, match="--resume"):
        sweep.run(spec)
    changed = spec.model_copy(update={"seed": 5})
    with pytest.raises(ConfigError, match="seed 0 -> 5"):
        sweep.run(changed, resume=True)


def test_resume_keeps_finished_trials_and_reruns_failed_ones_only_when_asked(finished_sweep):
    spec, result, _ = finished_sweep
    files = [SweepDir(result.dir).trial_dir(t.id) / "trial.json" for t in result.trials]
    before = [(f.stat().st_mtime_ns, f.read_text()) for f in files]
    again = sweep.run(spec, resume=True)
    assert [t.status for t in again.trials] == ["done", "done", "failed"]
    assert [(f.stat().st_mtime_ns, f.read_text()) for f in files] == before
    retried = sweep.run(spec.model_copy(update={"executor": spec.executor.model_copy(update={"max_parallel": 1})}),
                        resume=True, retry_failed=True)
    assert retried.trials[2].status == "failed" and retried.trials[2].attempts == 2
    assert [(f.stat().st_mtime_ns, f.read_text()) for f in files[:2]] == before[:2]


def test_sweep_report_writes_a_table_and_an_html_page_with_the_best_trial(finished_sweep):
    from lmforge.experiments import sweep_report

    spec, result, _ = finished_sweep
    title, header, rows = sweep_report.table(result.dir)
    assert header[:3] == ["trial", "status", "setup"] and len(rows) == 3
    assert sum(row[0].endswith("*") for row in rows) == 1
    page = sweep_report.render(result.dir).read_text()
    assert "Best trial" in page and "data:image/png;base64" in page and result.best.id in page
    assert sweep_report.render(result.dir).read_text() == page  # its own earlier report: replaced
    config = result.dir / "trials" / result.best.id / "config.yaml"
    before = config.read_text()
    with pytest.raises(OutputError, match="is not a sweep report lmforge wrote: pass --overwrite"):
        sweep_report.render(result.dir, config)  # --out naming an input: refused, left as it was
    assert config.read_text() == before


def test_an_interrupted_sweep_resumes_its_trial_from_the_checkpoint(pretrain_data, tmp_path):
    longer = [o for o in SHORT if not o.startswith(("train.max_steps", "train.checkpoint_every"))]
    data = spec_data(tmp_path, pretrain_data["tokens"], space={"optim.lr": {"values": [3.0e-3]}},
                     overrides=[f"data.dataset={pretrain_data['tokens']}", *longer, "train.max_steps=400",
                                "train.checkpoint_every=2", "train.eval_every=0"])
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lmforge", "sweep", str(path)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = tmp_path / "sweeps" / "s" / "trials" / "t0000" / "checkpoints" / "latest"
    deadline = time.monotonic() + 60
    while not latest.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "--resume" in output
    record = SweepDir(tmp_path / "sweeps" / "s").read_trial("t0000")
    assert record.status == "pending" and record.attempts == 1
    resumed = sweep.run(load_spec(path), resume=True)
    record = resumed.trials[0]
    assert record.status == "done" and record.attempts == 2 and record.metrics["step"] == 400
    log = (tmp_path / "sweeps" / "s" / "trials" / "t0000" / "trial.log").read_text()
    assert "resumed from" in log


def test_starting_a_sweep_over_removes_what_lmforge_wrote_there_and_nothing_else(tmp_path):
    from lmforge import atomic

    sweep_dir = SweepDir(tmp_path / "s")
    for name in ("trials/t0000", "scaling", "notes"):
        (sweep_dir.path / name).mkdir(parents=True)
    (sweep_dir.path / "sweep.json").write_text("{}")
    atomic.mark_output_dir(sweep_dir.path / "scaling", "scaling")  # a fit lmforge wrote
    (sweep_dir.path / "notes" / "mine.txt").write_text("keep")
    sweep_dir.clear()
    assert sorted(p.name for p in sweep_dir.path.iterdir()) == ["notes"]
    (sweep_dir.path / "scaling").mkdir()  # the same name, not lmforge's: stays
    sweep_dir.clear()
    assert (sweep_dir.path / "scaling").is_dir()
