"""/metrics' selection: lmforge's vLLM-named series, or, behind vLLM, vLLM's own with no name twice."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.parser import text_string_to_metric_families

from lmforge.serve.backend import EngineStats
from lmforge.serve.metrics import ServeMetrics, one_two_five_buckets
from lmforge.serve.vllm_engine import kv_usage


class FakeEngine:
    """An engine as the metrics see it: stats, and (like vLLM) maybe a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry
        if registry is not None:
            self.metrics_registry = lambda: self.registry

    def stats(self) -> EngineStats:
        return EngineStats(running=2, waiting=1, kv_cache_usage=0.25)


def families(metrics: ServeMetrics) -> dict[str, list]:
    found: dict[str, list] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        assert family.name not in found, f"{family.name} is exported twice"
        found[family.name] = family.samples
    return found


def vllms_own_series() -> CollectorRegistry:
    """A few of the series vLLM's PrometheusStatLogger registers, with its labels."""
    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    Gauge("vllm:num_requests_running", "", labels, registry=registry).labels("m", "0").set(7)
    Gauge("vllm:kv_cache_usage_perc", "", labels, registry=registry).labels("m", "0").set(0.5)
    Counter("vllm:prompt_tokens", "", labels, registry=registry).labels("m", "0").inc(11)
    return registry


def test_the_builtin_engine_shows_every_series_measured_by_lmforge():
    metrics = ServeMetrics(FakeEngine(), "m", max_model_len=100)
    found = families(metrics)
    assert found["vllm:num_requests_running"][0].value == 2
    assert found["vllm:num_requests_waiting"][0].value == 1
    assert found["vllm:kv_cache_usage_perc"][0].value == 0.25
    assert found["vllm:kv_cache_usage_perc"][0].labels == {"model_name": "m"}
    assert {"vllm:prompt_tokens", "vllm:time_to_first_token_seconds", "lmforge_requests"} <= set(found)


def test_behind_vllm_its_own_series_stand_and_lmforge_fills_in_only_what_it_lacks():
    metrics = ServeMetrics(FakeEngine(vllms_own_series()), "m", max_model_len=100)
    metrics.prompt_tokens.labels("m").inc(3)  # lmforge's count of the same, which must not show
    found = families(metrics)
    assert found["vllm:num_requests_running"][0].value == 7  # vLLM's, not the fake engine's stats
    assert found["vllm:kv_cache_usage_perc"][0].labels == {"model_name": "m", "engine": "0"}
    assert [s.value for s in found["vllm:prompt_tokens"] if s.name.endswith("_total")] == [11]
    # Series vLLM does not have here still come from lmforge, and lmforge's own always do.
    assert "vllm:time_to_first_token_seconds" in found and "vllm:num_requests_waiting" in found
    assert "lmforge_requests" in found and "lmforge_rate_limited" in found


def test_kv_cache_use_behind_vllm_is_read_from_vllms_gauge():
    assert kv_usage(vllms_own_series()) == 0.5
    older = CollectorRegistry()
    Gauge("vllm:gpu_cache_usage_perc", "", ["model_name"], registry=older).labels("m").set(0.75)
    assert kv_usage(older) == 0.75
    assert kv_usage(CollectorRegistry()) == 0.0  # before vLLM's first step


def test_token_count_buckets_are_vllms_one_two_five_steps_up_to_the_context():
    assert one_two_five_buckets(100) == [1, 2, 5, 10, 20, 50, 100]
    assert one_two_five_buckets(4096)[-3:] == [500, 1000, 2000]
