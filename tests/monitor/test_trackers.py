"""Trackers as their users expect: env vars respected, one tracker run across --resume, the
config and eval results sent, metric names kept. W&B runs offline; MLflow uses a file store in tmp."""

from __future__ import annotations

import json

import pytest
import yaml

from lmforge.cli import main
from lmforge.monitor.trackers import (
    TRACKERS_FILE,
    TrackerConfig,
    build_trackers,
    mlflow_name,
    read_ids,
    wandb_mode,
)

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """No W&B env and no netrc login: what a first run on a fresh machine sees."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_PROJECT", "WANDB_ENTITY", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def mlflow_client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def wandb_records(run_dir, run_id) -> bytes:
    """The raw records of every offline W&B run dir of `run_id` (protobuf keeps names as bytes)."""
    return b"".join(f.read_bytes() for f in (run_dir / "wandb").glob(f"offline-run-*-{run_id}*/*.wandb"))


def test_wandb_is_offline_only_when_no_mode_is_set_and_nobody_is_logged_in(no_wandb_login, tmp_path, monkeypatch):
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode() == "online"
    monkeypatch.delenv("WANDB_MODE")
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() is None  # logged in: online, as `wandb login` users expect


def test_wandb_mode_project_and_entity_come_from_the_environment(no_wandb_login, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    monkeypatch.setenv("WANDB_ENTITY", "my-team")
    tracker = build_trackers(TrackerConfig(backends=["wandb"]), tmp_path, "run-1", {"optim": {"lr": 0.003}})[0]
    tracker.log(1, {"train/loss": 4.0})
    tracker.close()
    ids = read_ids(tmp_path)["wandb"]
    assert ids["project"] == "my-project" and ids["entity"] == "my-team"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    build_trackers(TrackerConfig(backends=["wandb"]), tmp_path / "off", "run-2", {})[0].close()
    assert not list((tmp_path / "off").glob("wandb/offline-run-*"))  # the user's mode, not offline


def test_mlflow_logs_to_mlflow_tracking_uri_with_names_and_config_unmangled(no_wandb_login, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'tracking.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    tracker = build_trackers(TrackerConfig(backends=["mlflow"]), tmp_path / "run", "run-1",
                             {"optim": {"lr": 0.003}, "run": {"name": "run-1"}})[0]
    tracker.log(1, {"train/loss": 4.0, "eval/python_mc/acc": 0.5})
    tracker.close()
    assert not (tmp_path / "run" / "mlflow.db").exists()
    assert list((tmp_path / "mlflow-artifacts").rglob("config.json")) and not any((tmp_path / "cwd").iterdir())
    run = mlflow_client(uri).get_run(read_ids(tmp_path / "run")["mlflow"]["run_id"])
    assert run.data.metrics == {"train/loss": 4.0, "eval/python_mc/acc": 0.5}
    assert run.data.params["optim.lr"] == "0.003"
    assert mlflow_name("eval/mc (5-shot)/acc,none") == "eval/mc _5-shot_/acc_none"
    assert mlflow_name("a/../b") == "a/_/b"


@pytest.fixture
def pretrain_yaml(pretrain_data, tmp_path):
    config = {
        "run": {"name": "tracked", "out_dir": str(tmp_path / "runs"), "seed": 7},
        "model": {"preset": "tiny", "max_seq_len": 128},
        "data": {"dataset": str(pretrain_data["tokens"]), "seq_len": 64},
        "schedule": {"warmup_steps": 2},
        "train": {"max_steps": 4, "global_batch_tokens": 1024, "micro_batch_size": 8, "eval_every": 0,
                  "checkpoint_every": 4, "log_every": 1, "progress": False, "device": "cpu"},
        "trackers": {"backends": ["wandb", "mlflow"]},
    }
    path = tmp_path / "pretrain.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_resume_continues_the_same_tracker_runs_and_eval_results_land_in_them(
        no_wandb_login, pretrain_yaml, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'tracking.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    run_dir = tmp_path / "runs" / "tracked"
    assert main(["train", str(pretrain_yaml)]) == 0
    first = read_ids(run_dir)
    assert set(first) == {"wandb", "mlflow"}

    assert main(["train", str(pretrain_yaml), "--resume", "train.max_steps=8"]) == 0
    assert read_ids(run_dir) == first  # the same W&B run id and MLflow run: curves continue
    client = mlflow_client(uri)
    run_id = first["mlflow"]["run_id"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 9))
    assert client.get_run(run_id).data.params["run.name"] == "tracked"
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{first['wandb']['id']}*"))) == 2

    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Which keyword defines a function?", "choices": ["def", "class"], "answer": 0},
        {"question": "Which type is immutable?", "choices": ["list", "tuple"], "answer": 1},
    ]))
    assert main(["eval", str(run_dir), "--tasks", str(task)]) == 0
    eval_metrics = {k: v for k, v in client.get_run(run_id).data.metrics.items() if k.startswith("eval/mc/")}
    assert eval_metrics and all(0.0 <= v <= 1.0 for v in eval_metrics.values())
    assert client.get_metric_history(run_id, next(iter(eval_metrics)))[0].step == 8
    assert b"eval/mc/" in wandb_records(run_dir, first["wandb"]["id"])
    assert (run_dir / TRACKERS_FILE).is_file()
