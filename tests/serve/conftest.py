"""A real server on a loopback port: uvicorn in a thread in front of the engine, the tiny trained model."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

import uvicorn  # noqa: E402

from lmforge.serve.app import create_app  # noqa: E402
from lmforge.serve.auth import hash_key  # noqa: E402
from lmforge.serve.config import ServeConfig  # noqa: E402
from lmforge.serve.engine import Engine  # noqa: E402
from lmforge.serve.lora import read_adapters  # noqa: E402
from lmforge.store.loading import load_model  # noqa: E402

KEY = "sk-test-alice-0123456789"
OTHER_KEY = "sk-test-bob-9876543210"
MODEL_NAME = "tiny-docs"


@dataclass
class Served:
    url: str
    engine: Engine
    app: object
    audit_path: Path
    server: uvicorn.Server

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def gateway(self):
        return self.app.state.gateway


def start(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="session")
def serve_model(trained_run):
    model, tokenizer, _ = load_model(trained_run)
    return model, tokenizer


@contextlib.contextmanager
def make_server(serve_model, tmp_path: Path, moderator=None, **sections):
    """Start a gateway over the shared tiny model; yields a `Served` and stops it afterwards."""
    model, tokenizer = serve_model
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# test keys\nalice:{KEY}\nbob:sha256:{hash_key(OTHER_KEY)}\n")
    data = {
        "model": "unused", "server": {"model_name": MODEL_NAME, "graceful_shutdown_s": 5},
        "auth": {"api_keys_file": str(keys), "api_keys_env": "LMFORGE_TEST_NO_SUCH_VAR"},
        "audit": {"path": str(tmp_path / "audit.sqlite")},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    config = ServeConfig.model_validate(data)
    # lora.adapters wrap the model's modules in place: pass a model of your own (not the session's) with them.
    adapters = read_adapters(config.lora.adapters, model, config.lora.max_rank) if config.lora.adapters else None
    engine = Engine(model, tokenizer, config.engine, adapters)
    app = create_app(engine, config, moderator=moderator)
    server, thread, url = start(app)
    served = Served(url, engine, app, Path(config.audit.path), server)
    try:
        yield served
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="session")
def served(serve_model, tmp_path_factory):
    with make_server(serve_model, tmp_path_factory.mktemp("serve"), engine={"max_num_seqs": 16}) as server:
        yield server


@pytest.fixture
def serve_config_of(monkeypatch):
    """`lmforge serve ARGS` up to the config it would serve with (the server is not started)."""
    from lmforge.cli import main
    from lmforge.serve import server

    class Stop(Exception):
        pass

    seen = {}

    def run(config):
        seen["config"] = config
        raise Stop

    monkeypatch.setattr(server, "run", run)

    def config_of(*args: str) -> ServeConfig:
        monkeypatch.setenv("LMFORGE_DEBUG", "1")  # let Stop through main's error handling
        try:
            with pytest.raises(Stop):
                main(["serve", *args])
        finally:
            monkeypatch.delenv("LMFORGE_DEBUG")
        return seen["config"]

    return config_of
