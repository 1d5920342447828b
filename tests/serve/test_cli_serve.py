"""`lmforge serve` as users start it: a subprocess that serves, then stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys

import openai
import pytest
import torch

from tests.conftest import free_port, wait_until_serving


def test_lmforge_serve_answers_the_openai_client_and_stops_on_sigterm(trained_run, tmp_path):
    port = free_port()
    audit = tmp_path / "audit.sqlite"
    env = {**os.environ, "LMFORGE_API_KEY": "sk-from-env"}  # one key, as VLLM_API_KEY
    env.pop("LMFORGE_API_KEYS", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", str(trained_run), "--port", str(port), "--allow-unreleased",
         "--api-key", "ci:sk-ci-key", "--api-key", "sk-second", "--served-model-name", "tiny",
         f"audit.path={audit}", "server.log_level=warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until_serving(server, port)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-ci-key", max_retries=0)
        out = client.completions.create(model="tiny", prompt="The list type", max_tokens=8, temperature=0)
        assert out.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-other", max_retries=0).models.list()
        for key in ("sk-second", "sk-from-env"):  # every --api-key, and $LMFORGE_API_KEY
            listed = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0).models.list()
            assert [m.id for m in listed.data] == ["tiny"]
        server.send_signal(signal.SIGTERM)
        # uvicorn drains, shuts the app down (engine, audit log), then re-raises the signal.
        assert server.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    with sqlite3.connect(audit) as db:
        rows = db.execute("SELECT key_id, status FROM requests").fetchall()
    assert ("ci", 200) in rows


def test_lmforge_serve_refuses_a_bad_config_before_loading(trained_run):
    from lmforge.cli import main

    assert main(["serve", str(trained_run), "engine.max_num_seqs=0"]) == 2
    assert main(["serve", str(trained_run), "server.bogus=1"]) == 2
    assert main(["serve", str(trained_run), "--allow-unreleased", "moderation.policy=no-such-policy.yaml"]) == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_lmforge_serve_on_cuda_without_cuda_is_a_one_line_error(trained_run):
    done = subprocess.run([sys.executable, "-m", "lmforge", "serve", str(trained_run), "--device", "cuda",
                           "--allow-unreleased", "--port", "1"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "engine.device=cuda but CUDA is not available" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_lmforge_serve_refuses_an_unreleased_model_in_one_line(trained_run):
    done = subprocess.run([sys.executable, "-m", "lmforge", "serve", str(trained_run), "--port", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "no release record" in done.stderr and "--allow-unreleased" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_lmforge_serve_writes_nothing_into_the_current_dir_unless_asked(trained_run, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    import lmforge.serve.server as server
    from lmforge.cli import main

    monkeypatch.chdir(tmp_path)
    served, threads = {}, torch.get_num_threads()
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kwargs: served.setdefault("app", app))
    assert main(["serve", str(trained_run), "--allow-unreleased", "engine.device=cpu"]) == 0
    with TestClient(served["app"]) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        assert client.post("/v1/completions", json={"model": model, "prompt": "The", "max_tokens": 2}).status_code == 200
    assert list(tmp_path.iterdir()) == []  # no serve_audit.sqlite: the audit log is off unless audit.path is set
    assert torch.get_num_threads() == threads  # serve's CPU thread setting ends with the server


def test_lmforge_serve_of_a_missing_model_is_one_line_even_with_allow_unreleased(tmp_path):
    done = subprocess.run([sys.executable, "-m", "lmforge", "serve", str(tmp_path / "absent"), "--allow-unreleased",
                           "--port", "1"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == f"error: model not found: {tmp_path / 'absent'}"  # no warning line before it


def test_a_cpu_engine_leaves_one_core_to_the_http_front_end_unless_told(monkeypatch):
    import lmforge.serve.server as server

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(server.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
        assert server.set_cpu_threads(None) == 3 and torch.get_num_threads() == 3
        assert server.set_cpu_threads(2) == 2 and torch.get_num_threads() == 2  # engine.cpu_threads
        monkeypatch.setattr(server.os, "sched_getaffinity", lambda pid: {0}, raising=False)
        assert server.set_cpu_threads(None) == 1  # never zero
    finally:
        torch.set_num_threads(before)
