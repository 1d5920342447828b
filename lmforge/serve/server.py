"""`lmforge serve`: check the release gate, load the model once, and serve it until SIGINT/SIGTERM.

The gate (`safety.release.check_released`) compares the hashes of the weight files with the
model's release record before anything loads; the engine then loads the model, and the app
(`serve.app`) answers in front of it.
"""

from __future__ import annotations

import logging
import os

import torch
import uvicorn

from lmforge.device import dtype_name
from lmforge.device import resolve as resolve_device
from lmforge.errors import LmforgeError
from lmforge.safety.release import RELEASE_FILE, check_released, record_dir
from lmforge.serve.app import create_app
from lmforge.serve.config import ServeConfig
from lmforge.serve.engine import Engine
from lmforge.serve.hooks import load_hook
from lmforge.store.hashes import sha256_file
from lmforge.store.loading import local_path
from lmforge.store.weights import digest_of, weights_digest_or_none

log = logging.getLogger(__name__)


def run(config: ServeConfig) -> None:
    """Check, load the model, start the engine and serve until SIGINT/SIGTERM (which drain first)."""
    m = config.moderation
    moderator = load_hook(m.hook, m.options, m.policy)  # a bad policy fails before the model loads
    if config.engine.backend == "lmforge":
        resolve_device(config.engine.device, "engine.device")  # so does a device this machine lacks
    if config.allow_unreleased:
        if not local_path(config.model).exists():  # its one-line error, not after this warning
            raise LmforgeError(f"model not found: {config.model}")
        log.warning("serving %s without checking its release record (--allow-unreleased)", config.model)
        record = released_or_none(config.model)
    else:
        record = check_released(config.model)  # hashes the weight files; the model is not loaded yet
        log.info("release record: policy %r passed on %s", record.get("policy"), record.get("created_at"))
    digests = lineage_digests(config.model, record)
    if config.engine.backend == "vllm":  # vLLM's own series then carry the model_name that lmforge's do
        config.engine.vllm_args.setdefault("served_model_name", config.served_model_name)
    engine = Engine.from_path(config.model, config.engine, config.lora)
    app = create_app(engine, config, moderator=moderator, digests=digests)
    log.info("serving %s as %r on http://%s:%d (device %s, %s)", config.model, app.state.gateway.model_name,
             config.server.host, config.server.port, engine.device, dtype_name(engine.dtype))
    log.info("audit log: %s", config.audit.path or "off (audit.path=FILE keeps one row per request)")
    threads = torch.get_num_threads()
    if torch.device(engine.device).type == "cpu":  # the vLLM backend names its device as a string
        set_cpu_threads(config.engine.cpu_threads)
    try:
        uvicorn.run(app, host=config.server.host, port=config.server.port, log_level=config.server.log_level,
                    timeout_graceful_shutdown=int(config.server.graceful_shutdown_s) or None)
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process


def set_cpu_threads(threads: int | None) -> int:
    """torch's intra-op threads for a CPU engine behind the HTTP server. By default one core is left
    to the front end: the event loop, SSE and detokenizing run beside every decode step, and an
    OpenMP team that must share all its cores with them stalls at each barrier (on 2 cores at 16
    streams: 1,565 output tokens/s with both, 1,883 with one; BENCHMARKS.md, serving notes)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads or max(1, cores - 1)
    torch.set_num_threads(threads)
    log.info("engine on CPU: %d torch thread(s) of %d core(s) (engine.cpu_threads)", threads, cores)
    return threads


def released_or_none(model: str) -> dict | None:
    """The model's passing release record when it has one for these weights (reported, not required)."""
    try:
        return check_released(model)
    except LmforgeError:
        return None


def lineage_digests(model: str, record: dict | None) -> dict[str, str]:
    """{model_digest, release_digest}: the served weights' digest (`store.weights`) and the sha256
    of the release record that passed them; either is left out when it cannot be known."""
    files = (record or {}).get("weight_files")
    model_digest = digest_of(files) if files else weights_digest_or_none(model)
    digests = {"model_digest": f"sha256:{model_digest}"} if model_digest else {}
    if record is not None:
        digests["release_digest"] = f"sha256:{sha256_file(record_dir(model) / RELEASE_FILE)}"
    return digests
