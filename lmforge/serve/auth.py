"""API keys (kept only as sha256 hashes) and per-key rate limits over a sliding minute."""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import ConfigError


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _parse_entry(entry: str, where: str) -> tuple[str, str]:
    """`name:key`, `name:sha256:HEX` or a bare key -> (name, sha256 hex)."""
    entry = entry.strip()
    name, sep, rest = entry.partition(":")
    if not sep:  # a bare key: named by the start of its hash
        digest = hash_key(entry)
        return f"key-{digest[:8]}", digest
    if not name or not rest:
        raise ConfigError(f"{where}: expected name:key or name:sha256:HEX")
    if rest.startswith("sha256:"):
        digest = rest.removeprefix("sha256:").lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"{where}: key {name!r} has a malformed sha256 hash")
        return name, digest
    return name, hash_key(rest)


class KeyStore:
    """Hashes of the accepted keys -> key names. No raw key is kept after loading."""

    def __init__(self, entries: dict[str, str] | None = None):
        self._by_hash = dict(entries or {})

    @classmethod
    def load(cls, file: str | None, env_var: str | None, keys: list[str] | None = None,
             key_env: str | None = None) -> KeyStore:
        """Keys from a file, an env var of comma-separated entries, `keys` as given (--api-key) and
        `key_env`, an env var holding one key taken whole."""
        entries: dict[str, str] = {}
        for i, item in enumerate(keys or []):
            if not item.strip():
                raise ConfigError(f"--api-key {i + 1} is empty")
            name, digest = _parse_entry(item, f"--api-key {i + 1}")
            entries[digest] = name
        single = os.environ.get(key_env, "").strip() if key_env else ""
        if single:
            digest = hash_key(single)
            entries[digest] = f"key-{digest[:8]}"
        if file:
            path = Path(file)
            if not path.is_file():
                raise ConfigError(f"API key file not found: {path}")
            for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    name, digest = _parse_entry(line, f"{path}:{number}")
                    entries[digest] = name
        raw = os.environ.get(env_var, "") if env_var else ""
        for i, item in enumerate(raw.split(",")):
            if item.strip():
                name, digest = _parse_entry(item, f"${env_var} entry {i + 1}")
                entries[digest] = name
        return cls(entries)

    @property
    def enabled(self) -> bool:
        return bool(self._by_hash)

    def identify(self, key: str | None) -> str | None:
        """The key's name, or None if it is not accepted (constant-time comparison of hashes)."""
        if not key:
            return None
        digest = hash_key(key)
        found = None
        for known, name in self._by_hash.items():
            if hmac.compare_digest(known, digest):
                found = name
        return found


class RateLimiter:
    """Requests and tokens per key over the last 60 seconds."""

    WINDOW = 60.0

    def __init__(self, requests_per_minute: int | None, tokens_per_minute: int | None):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self._events: dict[str, deque[list]] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str, tokens: int, now: float | None = None) -> tuple[bool, float, list | None]:
        """(admitted, seconds to wait if not, a ticket to `settle` with the tokens actually used)."""
        if self.rpm is None and self.tpm is None:
            return True, 0.0, None
        now = time.monotonic() if now is None else now
        with self._lock:
            events = self._events.setdefault(key, deque())
            while events and events[0][0] <= now - self.WINDOW:
                events.popleft()
            if self.rpm is not None and len(events) >= self.rpm:
                return False, events[0][0] + self.WINDOW - now, None
            if self.tpm is not None:
                if tokens > self.tpm:
                    return False, self.WINDOW, None
                used = sum(e[1] for e in events)
                if used + tokens > self.tpm:
                    # Wait until enough of the oldest usage has left the window.
                    freed = 0
                    for time_, count in events:
                        freed += count
                        if used - freed + tokens <= self.tpm:
                            return False, time_ + self.WINDOW - now, None
                    return False, self.WINDOW, None
            ticket = [now, tokens]
            events.append(ticket)
            return True, 0.0, ticket

    def settle(self, ticket: list | None, tokens: int) -> None:
        """Replace a request's estimate (prompt + max_tokens) by what it used."""
        if ticket is not None:
            with self._lock:
                ticket[1] = tokens


    def state(self, key: str, now: float | None = None) -> dict[str, LimitState]:
        """The key's standing under each configured limit ("requests", "tokens"), without using any."""
        now = time.monotonic() if now is None else now
        with self._lock:
            live = [tuple(e) for e in self._events.get(key, ()) if e[0] > now - self.WINDOW]
        found: dict[str, LimitState] = {}
        for name, limit, used, spent in (("requests", self.rpm, len(live), live),
                                         ("tokens", self.tpm, sum(e[1] for e in live), [e for e in live if e[1]])):
            if limit is not None:
                # Back to the initial state (OpenAI's meaning of reset) when the last use leaves the window.
                reset = spent[-1][0] + self.WINDOW - now if spent else 0.0
                found[name] = LimitState(limit, max(0, limit - used), reset)
        return found


@dataclass(frozen=True)
class LimitState:
    limit: int
    remaining: int
    reset_s: float  # until the window holds none of the key's use


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


def duration(seconds: float) -> str:
    """OpenAI's format of `x-ratelimit-reset-*`: 0s, 20ms, 1s, 8.64s, 6m0s, 1h2m3s (rounded up)."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    hours, rest = divmod(math.ceil(seconds * 100) / 100, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.2f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{int(hours)}h{int(minutes)}m{text}"
    return f"{int(minutes)}m{text}" if minutes else text
