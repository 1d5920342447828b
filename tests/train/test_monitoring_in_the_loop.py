"""What the loop reports while it trains: eval tasks, alerts, profiler traces, trackers."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.eval import tasks
from lmforge.eval.scoring import Scorer
from lmforge.monitor.alerts import ALERTS_FILE
from lmforge.store.loading import load_model
from lmforge.store.run_dir import RunDir
from lmforge.train import pretrain, trainer


def write_task(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Which keyword defines a function?", "choices": ["def", "class"], "answer": 0},
        {"question": "Which type is immutable?", "choices": ["list", "tuple"], "answer": 1},
    ]))
    return path


def test_eval_tasks_run_every_eval_every_steps_and_are_logged(make_config, tmp_path):
    task = write_task(tmp_path)
    config = make_config(train={"eval_every": 6, "eval_tasks": [str(task)], "max_steps": 12})
    result = trainer.run(config)
    records = [r for r in RunDir(result.run_dir).read_metrics() if "eval/mc/acc" in r]
    assert [r["step"] for r in records] == [6, 12]
    assert all("eval/mc/acc_norm" in r and "val_loss" in r for r in records)
    # The logged scores are the task's scores of the model at that step: at step 12, the final checkpoint.
    model, tokenizer, _ = load_model(result.run_dir)
    final = tasks.evaluate(tasks.resolve_task(str(task)), Scorer(model, tokenizer))["metrics"]
    assert (records[-1]["eval/mc/acc"], records[-1]["eval/mc/acc_norm"]) == (final["acc"]["value"], final["acc_norm"]["value"])
    assert result.val_metrics["eval/mc/acc"] == records[-1]["eval/mc/acc"]


def test_a_bad_eval_task_fails_before_training(make_config):
    with pytest.raises(ConfigError, match="neither a file nor a shipped task"):
        trainer.run(make_config(train={"eval_tasks": ["no-such-task"]}))


def test_profiling_writes_a_chrome_trace_of_the_chosen_steps(make_config):
    result = trainer.run(make_config(train={"profile": "steps=3:4", "max_steps": 6}))
    traces = list((result.run_dir / "profile").glob("trace-steps-3-4.json"))
    assert len(traces) == 1
    names = {e.get("name") for e in json.loads(traces[0].read_text())["traceEvents"]}
    assert {"lmforge/train_step_3", "lmforge/train_step_4"} <= names
    assert not {"lmforge/train_step_2", "lmforge/train_step_5"} & names


def test_a_clean_run_raises_no_alert_and_a_planted_nan_does(make_config, monkeypatch):
    # Throughput alerts depend on machine load (tested on planted readings in tests/monitor).
    clean = trainer.run(make_config("clean", alerts={"throughput_fraction": 0.01}))
    assert not (clean.run_dir / ALERTS_FILE).exists()
    original = pretrain.PretrainObjective.loss

    def poisoned(self, model, batch):
        loss, extras = original(self, model, batch)
        return (loss * torch.nan if self.loader.samples(0, 0) and _step[0] == 7 else loss), extras

    _step = [0]
    original_batch = pretrain.PretrainObjective.batch

    def batch(self, step, micro_step):
        _step[0] = step + 1
        return original_batch(self, step, micro_step)

    monkeypatch.setattr(pretrain.PretrainObjective, "loss", poisoned)
    monkeypatch.setattr(pretrain.PretrainObjective, "batch", batch)
    result = trainer.run(make_config("nan", train={"max_steps": 8}))
    alerts = [json.loads(line) for line in (result.run_dir / ALERTS_FILE).read_text().splitlines()]
    assert ("non_finite_loss", 7) in {(a["alert"], a["step"]) for a in alerts}
