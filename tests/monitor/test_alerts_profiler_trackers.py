"""Alerts fire on planted conditions and stay quiet on a clean run; profiler traces; trackers."""

from __future__ import annotations

import http.server
import json
import math
import threading
import time

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.monitor.alerts import ALERTS_FILE, AlertConfig, AlertMonitor
from lmforge.monitor.profiler import StepProfiler, parse_steps
from lmforge.monitor.trackers import TrackerConfig, build_trackers


def clean_readings(n=30):
    """A healthy run: loss falling slowly with noise, steady grad norms and throughput."""
    for step in range(1, n + 1):
        yield step, 6.0 - 0.05 * step + 0.02 * math.sin(step), 1.0 + 0.1 * math.cos(step), 10_000 + 300 * math.sin(step)


def test_a_clean_run_fires_no_alert(tmp_path):
    monitor = AlertMonitor(tmp_path, AlertConfig())
    for step, loss, norm, speed in clean_readings():
        assert monitor.observe(step, loss, norm, speed) == []
    assert not (tmp_path / ALERTS_FILE).exists()


@pytest.mark.parametrize(
    ("kind", "plant"),
    [
        ("non_finite_loss", dict(loss=float("nan"))),
        ("loss_spike", dict(loss=40.0)),
        ("grad_norm_explosion", dict(grad_norm=500.0)),
        ("throughput_drop", dict(tokens_per_second=1_000.0)),
    ],
)
def test_each_alert_fires_on_its_planted_condition(tmp_path, kind, plant):
    monitor = AlertMonitor(tmp_path, AlertConfig(), run_name="r")
    for step, loss, norm, speed in clean_readings(10):
        monitor.observe(step, loss, norm, speed)
    readings = {"loss": 5.4, "grad_norm": 1.0, "tokens_per_second": 10_000.0, **plant}
    fired = monitor.observe(11, **readings)
    assert [a["alert"] for a in fired] == [kind]
    line = json.loads((tmp_path / ALERTS_FILE).read_text().splitlines()[-1])
    assert line["alert"] == kind and line["step"] == 11 and line["run"] == "r"


def test_stalled_progress_and_checkpoint_failure_alert_and_reach_the_webhook(tmp_path):
    received = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/alert"
    monitor = AlertMonitor(tmp_path, AlertConfig(stall_minutes=0.002, webhook=url))
    monitor.observe(1, 5.0)
    monitor.start_watchdog(poll_seconds=0.05)
    time.sleep(0.5)
    monitor.checkpoint_failed(1, OSError("disk full"))
    monitor.close()
    deadline = time.time() + 5
    while len(received) < 2 and time.time() < deadline:
        time.sleep(0.05)
    server.shutdown()
    kinds = [a["alert"] for a in monitor.fired]
    assert kinds.count("stalled") == 1 and "checkpoint_failed" in kinds
    assert sorted(a["alert"] for a in received) == sorted(kinds)


def test_profiler_trace_is_valid_json_with_one_annotation_per_profiled_step(tmp_path):
    assert parse_steps("steps=3:4") == (3, 4) and parse_steps("2:2") == (2, 2)
    with pytest.raises(ConfigError, match="bad profile spec"):
        parse_steps("steps=5")
    profiler = StepProfiler(tmp_path, 3, 4)
    layer = torch.nn.Linear(32, 32)
    for step in range(1, 7):
        with torch.profiler.record_function(f"lmforge/train_step_{step}"):
            layer(torch.randn(4, 32)).sum().backward()
        profiler.step()
    profiler.close()
    events = json.loads(profiler.trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"lmforge/train_step_3", "lmforge/train_step_4"} <= names
    assert not {"lmforge/train_step_2", "lmforge/train_step_5"} & names


@pytest.mark.parametrize("backend", ["wandb", "mlflow"])
def test_trackers_write_readable_runs_offline(tmp_path, backend, monkeypatch):
    pytest.importorskip(backend)
    monkeypatch.setenv("WANDB_MODE", "offline")
    trackers = build_trackers(TrackerConfig(backends=[backend]), tmp_path, "run-1", {"optim": {"lr": 0.003}})
    for step in range(1, 4):
        trackers[0].log(step, {"loss": 5.0 - step, "lr": 0.001})
    trackers[0].close()
    if backend == "mlflow":
        import mlflow

        client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        run = client.search_runs(client.get_experiment_by_name("lmforge").experiment_id)[0]
        assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [4.0, 3.0, 2.0]
        assert run.data.params["optim.lr"] == "0.003"
    else:
        runs = list((tmp_path / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
