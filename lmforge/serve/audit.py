"""The audit log: one SQLite row per request (never a raw API key), written off the event loop."""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

COLUMNS = (
    "time", "request_id", "key_id", "route", "model", "prompt_tokens", "completion_tokens",
    "latency_ms", "status", "finish_reason", "moderation", "error",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,            -- unix seconds when the request arrived
    request_id TEXT,
    key_id TEXT,                   -- the API key's name, never the key
    route TEXT,
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    latency_ms REAL,
    status INTEGER,                -- HTTP status
    finish_reason TEXT,
    moderation TEXT,               -- allowed | input_blocked: ... | output_blocked: ...
    error TEXT
)
"""


def _storable(value):
    """Text that SQLite can store: a lone surrogate (from a client's JSON) becomes '?'."""
    if isinstance(value, str) and not value.isascii():
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


class AuditLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with sqlite3.connect(self.path) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._writer, name="lmforge-audit", daemon=True)
        self._thread.start()

    def record(self, **fields) -> None:
        fields.setdefault("time", time.time())
        self._queue.put(tuple(_storable(fields.get(c)) for c in COLUMNS))

    def _writer(self) -> None:
        db = sqlite3.connect(self.path)
        insert = f"INSERT INTO requests ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
        while True:
            row = self._queue.get()
            if row is None:
                break
            rows = [row]
            while not self._queue.empty():  # write what has piled up in one transaction
                more = self._queue.get()
                if more is None:
                    self._queue.put(None)
                    break
                rows.append(more)
            try:
                db.executemany(insert, rows)
                db.commit()
            except (sqlite3.Error, ValueError):
                # One bad row must not take the batch, or the writer, with it: the rest of the
                # server's life would go unaudited.
                db.rollback()
                for one in rows:
                    try:
                        db.execute(insert, one)
                        db.commit()
                    except (sqlite3.Error, ValueError):
                        log.exception("audit log: could not write request %s", one[1])
            finally:
                for _ in rows:
                    self._queue.task_done()
        db.close()

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every recorded row is written."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)
