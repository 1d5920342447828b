"""`lmforge sweep report DIR`: the trials of a sweep as a terminal table and one HTML page.

The page (in the style of `lmforge report`, whose helpers it uses) has a summary, the best
trial with its full override list, every trial, the metric against each swept key (a log
x-axis for log ranges) and the train-loss curves of the five best trials. It is written
atomically, with its PNGs embedded, so it can be mailed or archived alone.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

from lmforge import atomic
from lmforge.errors import ConfigError, OutputError
from lmforge.experiments.spec import SweepSpec
from lmforge.experiments.sweep import best_trial
from lmforge.experiments.sweep_dir import SweepDir, TrialRecord
from lmforge.monitor.catalog import fmt, read_metrics
from lmforge.monitor.report import STYLE, figure, png_bytes
from lmforge.monitor.report import table as key_value_table

TOP_CURVES = 5  # loss curves of this many best trials


def _load(directory: str | os.PathLike) -> tuple[SweepDir, SweepSpec, list[TrialRecord]]:
    sweep = SweepDir(directory)
    if not sweep.is_sweep():
        raise ConfigError(f"{directory} is not a sweep dir (no sweep.json written by `lmforge sweep`)")
    spec = SweepSpec.model_validate(sweep.read_spec())
    return sweep, spec, sweep.read_trials()


def _swept(spec: SweepSpec, record: TrialRecord) -> list[str]:
    return [fmt(record.params.get(key)) for key in spec.space]


def table_rows(spec: SweepSpec, trials: list[TrialRecord]) -> tuple[list[str], list[list[str]]]:
    """Trial id (the best marked *), status, the swept values, the metric and seconds."""
    best = best_trial(trials, spec.mode)
    header = ["trial", "status", *spec.space, spec.metric, "seconds"]
    rows = [[f"{t.id}{' *' if best is not None and t.id == best.id else ''}", t.status, *_swept(spec, t),
             fmt(t.metric), "-" if t.seconds is None else f"{t.seconds:.0f}"] for t in trials]
    return header, rows


def table(directory: str | os.PathLike) -> tuple[str, list[str], list[list[str]]]:
    """The terminal table of `lmforge sweep report`: its title, header and rows."""
    sweep, spec, trials = _load(directory)
    header, rows = table_rows(spec, trials)
    return f"sweep {spec.name}: {spec.metric} ({spec.mode}), * = best", header, rows


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _metric_plot(spec: SweepSpec, trials: list[TrialRecord], key: str) -> bytes | None:
    """The metric against one swept key; a bundle (or a choice of strings) by its position."""
    points = [(t.params.get(key), t.metric) for t in trials if t.status == "done" and _numeric(t.metric)]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    if all(_numeric(x) for x, _ in points):
        ax.scatter([x for x, _ in points], [y for _, y in points])
        if spec.space[key].log:
            ax.set_xscale("log")
    else:
        labels = sorted({fmt(x) for x, _ in points})
        ax.scatter([labels.index(fmt(x)) for x, _ in points], [y for _, y in points])
        ax.set_xticks(range(len(labels)), labels)
    ax.set_xlabel(key)
    ax.set_ylabel(spec.metric)
    ax.set_title(f"{spec.metric} vs {key}")
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def _loss_curves(sweep: SweepDir, ranked: list[TrialRecord]) -> bytes | None:
    series = []
    for trial in ranked[:TOP_CURVES]:
        records = read_metrics(sweep.trial_dir(trial.id))
        points = [(r["step"], r["loss"]) for r in records if _numeric(r.get("loss")) and "step" in r]
        if points:
            series.append((trial.id, points))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    for name, points in series:
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="." if len(points) < 30 else None, label=name)
    ax.set_title(f"train loss of the {len(series)} best trials")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    return png_bytes(fig)


def _trials_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# In the page's head: an existing --out file is replaced only when it carries this (or with overwrite).
GENERATOR = '<meta name="generator" content="lmforge sweep report">'


def render(directory: str | os.PathLike, out: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write the sweep's HTML report (default DIR/report.html); return its path. An existing file
    is replaced only when it is an earlier sweep report, or with `overwrite`."""
    sweep, spec, trials = _load(directory)
    out = Path(out) if out else sweep.path / "report.html"
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory: name the HTML file to write")
    if out.exists() and not overwrite and GENERATOR.encode() not in out.read_bytes()[:2048]:
        raise OutputError(f"--out {out} exists and is not a sweep report lmforge wrote: pass --overwrite to "
                          "replace it, or name another file")
    best = best_trial(trials, spec.mode)
    ranked = sorted((t for t in trials if t.status == "done" and _numeric(t.metric)),
                    key=lambda t: t.metric if spec.mode == "min" else -t.metric)  # type: ignore[operator]
    status = sweep.read_status()
    counts = ", ".join(f"{n} {s}" for s, n in (status.get("counts") or {}).items() if n)
    summary = key_value_table([("sweep", spec.name), ("dir", str(sweep.path.resolve())), ("status", status.get("status")),
                     ("base", spec.base), ("sampler", f"{spec.sampler} (seed {spec.seed})"), ("trials", f"{len(trials)}: {counts}"),
                     ("metric", f"{spec.metric} ({spec.mode})"), ("executor", spec.executor.kind)])
    if best is None:
        best_html = "<p>No trial has finished with a metric yet.</p>"
    else:
        best_html = key_value_table([("trial", best.id), (spec.metric, best.metric), *[(k, best.params.get(k)) for k in spec.space],
                           ("seconds", best.seconds), ("params (non-embedding)", best.metrics.get("params")),
                           ("tokens", best.metrics.get("tokens"))])
        best_html += f"<pre>lmforge train {html.escape(spec.base)} {html.escape(' '.join(best.overrides))}</pre>"
    charts = [(f"{spec.metric} vs {key}", _metric_plot(spec, trials, key)) for key in spec.space]
    charts.append(("train loss of the best trials", _loss_curves(sweep, ranked)))
    images = "".join(figure(png, title) for title, png in charts if png is not None)
    header, rows = table_rows(spec, trials)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{GENERATOR}<title>lmforge sweep report: {html.escape(spec.name)}</title>
{STYLE}</head><body>
<h1>sweep {html.escape(spec.name)}</h1><p>{html.escape(str(sweep.path.resolve()))}</p>
<h2>Summary</h2>{summary}
<h2>Best trial</h2>{best_html}
<h2>Trials</h2>{_trials_html(header, rows)}
<h2>Plots</h2><div class="charts" id="charts">{images or '<p>Nothing to plot yet.</p>'}</div>
</body></html>
"""
    atomic.write_text(out, page)
    return out
