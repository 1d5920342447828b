"""`lmforge serve`: check the release gate, load the model once, and serve it until SIGINT/SIGTERM.

The gate (`safety.release.check_released`) compares the hashes of the weight files with the
model's release record before anything loads; the engine then loads the model, and the app
(`serve.app`) answers in front of it.
"""

from __future__ import annotations

import logging

import uvicorn

from lmforge.device import dtype_name
from lmforge.device import resolve as resolve_device
from lmforge.safety.release import check_released
from lmforge.serve.app import create_app
from lmforge.serve.config import ServeConfig
from lmforge.serve.engine import Engine
from lmforge.serve.hooks import load_hook

log = logging.getLogger(__name__)


def run(config: ServeConfig) -> None:
    """Check, load the model, start the engine and serve until SIGINT/SIGTERM (which drain first)."""
    m = config.moderation
    moderator = load_hook(m.hook, m.options, m.policy)  # a bad policy fails before the model loads
    if config.engine.backend == "lmforge":
        resolve_device(config.engine.device, "engine.device")  # so does a device this machine lacks
    if config.allow_unreleased:
        log.warning("serving %s without checking its release record (--allow-unreleased)", config.model)
    else:
        record = check_released(config.model)  # hashes the weight files; the model is not loaded yet
        log.info("release record: policy %r passed on %s", record.get("policy"), record.get("created_at"))
    if config.engine.backend == "vllm":  # vLLM's own series then carry the model_name that lmforge's do
        config.engine.vllm_args.setdefault("served_model_name", config.served_model_name)
    engine = Engine.from_path(config.model, config.engine, config.lora)
    app = create_app(engine, config, moderator=moderator)
    log.info("serving %s as %r on http://%s:%d (device %s, %s)", config.model, app.state.gateway.model_name,
             config.server.host, config.server.port, engine.device, dtype_name(engine.dtype))
    uvicorn.run(app, host=config.server.host, port=config.server.port, log_level=config.server.log_level,
                timeout_graceful_shutdown=int(config.server.graceful_shutdown_s) or None)
