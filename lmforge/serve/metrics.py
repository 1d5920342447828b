"""Prometheus metrics of the gateway and its engine, in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)


class ServeMetrics:
    def __init__(self, engine=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmforge_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "arrival to first token", buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lmforge_inter_token_latency_seconds", "time between streamed tokens", buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("lmforge_e2e_request_latency_seconds", "arrival to last token", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "generated tokens", registry=r)
        self.rate_limited = Counter("lmforge_rate_limited", "requests refused by a rate limit", ["limit"], registry=r)
        self.moderation = Counter("lmforge_moderation_decisions", "moderation actions (flag, redact, block) by direction and category",
                                  ["direction", "category", "action"], registry=r)
        self.finished = Counter("lmforge_finished_requests", "generations by finish reason", ["finish_reason"], registry=r)
        self.running = Gauge("lmforge_requests_running", "sequences in the running batch", registry=r)
        self.waiting = Gauge("lmforge_requests_waiting", "requests waiting for a slot", registry=r)
        self.kv_cache = Gauge("lmforge_kv_cache_usage_ratio", "fraction of KV-cache positions in use", registry=r)
        if engine is not None:
            # Read at scrape time from the engine, never stale.
            self.running.set_function(lambda: engine.stats().running)
            self.waiting.set_function(lambda: engine.stats().waiting)
            self.kv_cache.set_function(lambda: engine.stats().kv_cache_usage)

    def render(self) -> bytes:
        return generate_latest(self.registry)
