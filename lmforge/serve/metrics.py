"""Prometheus metrics of the gateway and its engine, under vLLM's names.

The engine and per-request series carry vLLM's names, types, buckets and `model_name` label
(vllm/v1/metrics/loggers.py), so a dashboard or autoscaler written for vLLM reads lmforge as
it is; lmforge's own series (HTTP requests, rate limits, moderation) keep `lmforge_` names and
gain `model_name` too. Request series take the request's model name (an adapter may serve
under its own); the engine's gauges take the served model's.

Behind the vLLM backend, vLLM records its `vllm:*` series itself in prometheus_client's
default registry: /metrics then shows those, and lmforge's copy of a series vLLM has is left
out (a counter exported twice would double in every `sum`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

# vLLM's buckets (vllm/v1/metrics/loggers.py), so quantiles compare across the two servers.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)
MODEL = ["model_name"]


def one_two_five_buckets(limit: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's token-count buckets for a context of `limit`)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > limit:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


class ServeMetrics:
    """Every series /metrics shows. `engine.metrics_registry()`, where a backend has one, is
    the registry where the engine records its own `vllm:*` series (vLLM's default registry)."""

    def __init__(self, engine=None, model_name: str = "lmforge", max_model_len: int = 4096):
        self.model_name = model_name
        self.registry = CollectorRegistry()  # lmforge_* series
        self.engine_series = CollectorRegistry()  # vllm:* series as lmforge measures them
        self.engine = engine
        self._http_series(self.registry)
        self._request_series(self.engine_series, one_two_five_buckets(max_model_len))
        self._engine_series(self.engine_series, engine)

    def _http_series(self, r: CollectorRegistry) -> None:
        self.requests = Counter("lmforge_requests", "HTTP requests by route and status",
                                ["route", "status", *MODEL], registry=r)
        self.rate_limited = Counter("lmforge_rate_limited", "requests refused by a rate limit",
                                    ["limit", *MODEL], registry=r)
        self.moderation = Counter("lmforge_moderation_decisions",
                                  "moderation actions (flag, redact, block) by direction and category",
                                  ["direction", "category", "action", *MODEL], registry=r)

    def _request_series(self, r: CollectorRegistry, token_buckets: list[int]) -> None:
        def histogram(name, doc, buckets):
            return Histogram(name, doc, MODEL, buckets=buckets, registry=r)

        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", MODEL, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", MODEL,
                                         registry=r)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               [*MODEL, "finished_reason"], registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Cumulative number of preemption from the engine "
                                   "(always 0: a running sequence keeps its slot).", MODEL, registry=r)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                               token_buckets)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", token_buckets)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             TOKEN_LATENCY_BUCKETS)
        # vLLM's older name for the same observations, still what many dashboards query.
        self.tpot = histogram("vllm:time_per_output_token_seconds", "Histogram of time per output token in seconds.",
                              TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        self.preemptions.labels(self.model_name)  # exported as 0 from the start

    def _engine_series(self, r: CollectorRegistry, engine) -> None:
        def gauge(name: str, doc: str, read) -> None:
            child = Gauge(name, doc, MODEL, registry=r).labels(self.model_name)
            if engine is not None:
                child.set_function(lambda: read(engine.stats()))  # read at scrape time, never stale

        gauge("vllm:num_requests_running", "Number of requests in model execution batches.", lambda s: s.running)
        gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lambda s: s.waiting)
        gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", lambda s: s.kv_cache_usage)
        gauge("vllm:gpu_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage. "
              "DEPRECATED: Use vllm:kv_cache_usage_perc instead.", lambda s: s.kv_cache_usage)

    def engine_registry(self):
        """Where the engine records its own series, or None (then lmforge measures them all)."""
        read = getattr(self.engine, "metrics_registry", None)
        return read() if callable(read) else None

    def render(self) -> bytes:
        own = self.engine_registry()
        if own is None:
            return generate_latest(self.registry) + generate_latest(self.engine_series)
        return (generate_latest(self.registry) + generate_latest(own)
                + generate_latest(Without(self.engine_series, {f.name for f in own.collect()})))


class Without:
    """A registry's families except those named: what generate_latest reads (`collect`)."""

    def __init__(self, registry: CollectorRegistry, names: Iterable[str]):
        self.registry, self.names = registry, set(names)

    def collect(self) -> Iterator[Metric]:
        return (family for family in self.registry.collect() if family.name not in self.names)
