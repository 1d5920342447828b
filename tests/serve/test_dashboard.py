"""The Grafana dashboard in deploy/ queries only series that a running server exports, under vLLM's
names where vLLM has the series (so it charts a vLLM server too)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.conftest import KEY

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "lmforge-serve.json"
SUFFIXES = ("_bucket", "_count", "_sum", "_total")
# vLLM's deprecated names, exported for dashboards that still query them; this one uses the new names.
ALIASES = {"vllm:time_per_output_token_seconds", "vllm:gpu_cache_usage_perc"}


def family_of(series: str) -> str:
    for suffix in SUFFIXES:
        if series.endswith(suffix):
            return series[: -len(suffix)]
    return series


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def test_every_dashboard_query_names_a_metric_the_server_exports(served):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    httpx.post(served.base_url + "/completions", headers={"Authorization": f"Bearer {KEY}"},
               json={"model": "tiny-docs", "prompt": "Sets", "max_tokens": 3}).raise_for_status()
    families = text_string_to_metric_families(httpx.get(served.url + "/metrics").text)
    exported = {f.name: f.type for f in families if not f.name.endswith("_created")}
    queried: set[str] = set()
    for panel in panels(dashboard):
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            expr = target["expr"]
            assert expr.count("(") == expr.count(")"), expr
            assert 'model_name=~"$model_name"' in expr, expr
            names = re.findall(r"\b(?:lmforge_|vllm:)[a-z0-9_:]+", expr)
            assert names, expr
            for name in names:
                family = family_of(name)
                assert family in exported, f"{panel['title']}: {name} is not exported"
                if name.endswith("_bucket"):
                    assert exported[family] == "histogram", name
                if name.endswith("_total"):
                    assert exported[family] == "counter", name
                queried.add(family)
    # Every metric the server exports has a panel.
    assert queried == {name for name in exported if name.startswith(("lmforge_", "vllm:"))} - ALIASES
    variables = {v["name"]: v["definition"] for v in dashboard["templating"]["list"] if "definition" in v}
    assert "vllm:num_requests_running" in variables["job"] and "model_name" in variables["model_name"]


def test_the_layout_is_a_valid_grid():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
