"""`lmforge report RUN`: one self-contained HTML page (plus the PNGs) describing a run.

Curves of loss, validation loss and bits per byte, learning rate, gradient norm,
tokens/s and MFU (and for RL runs: rewards, held-out reward, KL, clip fraction, entropy,
completion length, rollout tokens/s); evaluation results; the lineage from raw data to model; the data's
curation funnel when the dataset came from `lmforge curate`; the model card when the run
has one. Images are embedded as data URIs, so the file can be mailed or archived alone.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from lmforge import atomic
from lmforge.errors import ConfigError
from lmforge.monitor.catalog import fmt, read_metrics, summarize
from lmforge.store import token_dataset
from lmforge.store.model_dir import MODEL_CARD_FILE
from lmforge.store.run_dir import RunDir

# The look every lmforge HTML page shares (run reports, sweep reports).
STYLE = """<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: 4px 10px; text-align: left; font-size: 14px; }
th { background: #f5f5f5; } .charts { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; } figcaption { font-size: 12px; color: #666; text-align: center; }
pre { background: #f8f8f8; padding: 1em; overflow-x: auto; font-size: 12px; }
</style>"""

CURVES = [
    ("loss", "train loss", ["loss"]),
    ("val", "validation", ["val_loss", "val_bpb"]),
    ("lr", "learning rate", ["lr"]),
    ("grad_norm", "gradient norm", ["grad_norm"]),
    ("throughput", "tokens / second", ["tokens_per_second"]),
    ("mfu", "model FLOPs utilisation", ["mfu"]),
]
# What RL runs (`lmforge rl`) log besides; `*` stands for each reward's label.
RL_CURVES = [
    ("reward", "reward (rollouts: mean per reward)", ["reward/*/mean"]),
    ("val_reward", "held-out reward (greedy)", ["val_reward", "val_reward/*"]),
    ("policy", "KL to reference, clip fraction, entropy", ["kl", "clip_fraction", "entropy"]),
    ("groups", "advantage std, groups without reward variance", ["advantage_std", "zero_variance_groups"]),
    ("completions", "completion length (tokens)", ["completion_length"]),
    ("rollout", "rollout tokens / second", ["rollout_tokens_per_second"]),
]

# What mixture-of-experts runs log besides (expert load: share of a layer's tokens x experts).
MOE_CURVES = [
    ("expert_load_range", "MoE expert load: most and least loaded expert (1 = even share)", ["expert_load_max", "expert_load_min"]),
    ("aux_losses", "auxiliary losses (weighted)", ["moe_aux_loss", "router_z_loss", "z_loss"]),
]


def _expand(records: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """`a/*/b` as every logged key of that shape (not stderr companions), in first-seen order."""
    out: list[str] = []
    for key in keys:
        if "*" not in key:
            out.append(key)
            continue
        head, _, tail = key.partition("*")
        seen = dict.fromkeys(k for r in records for k in r if k.startswith(head) and k.endswith(tail)
                             and "/" not in k[len(head): len(k) - len(tail)] and not k.endswith("/stderr"))
        out += [k for k in seen if k not in out]
    return out


def _last_val_rewards(records: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The latest held-out reward of an RL run, each with its standard error where logged."""
    last = next((r for r in reversed(records) if "val_reward" in r), None)
    if last is None:
        return []
    return [(f"last {k}", f"{v:.4f}" + (f" ± {last[k + '/stderr']:.4f}" if k + "/stderr" in last else ""))
            for k, v in last.items() if k.startswith("val_reward") and not k.endswith("/stderr")]


def png_bytes(fig) -> bytes:
    """A matplotlib figure as PNG bytes (laid out tight), closing it."""
    from matplotlib import pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def figure(png: bytes, title: str) -> str:
    """A PNG embedded as a data URI with its caption (the page stays one self-contained file)."""
    return (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
            f"<figcaption>{html.escape(title)}</figcaption></figure>")


def _plot(records: list[dict[str, Any]], keys: list[str], title: str) -> bytes | None:
    series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float)) and "step" in r] for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2), dpi=100)
    for key, points in series.items():
        steps, values = zip(*points, strict=True)
        ax.plot(steps, values, marker="." if len(points) < 30 else None, label=key)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    return png_bytes(fig)


def _expert_heatmap(records: list[dict[str, Any]]) -> bytes | None:
    """The latest per-layer, per-expert load of an MoE run as a heatmap (1 = an even share)."""
    last = next((r for r in reversed(records) if isinstance(r.get("expert_load"), list) and r["expert_load"]), None)
    if last is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    load = last["expert_load"]
    fig, ax = plt.subplots(figsize=(6.4, max(2.0, 0.35 * len(load) + 1.2)), dpi=100)
    image = ax.imshow(load, aspect="auto", cmap="coolwarm", vmin=0.0, vmax=2.0)
    ax.set_title(f"expert load at step {last['step']} (1 = even share)")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    layers = last.get("expert_load_layers") or list(range(len(load)))
    ax.set_yticks(range(len(load)), [str(i) for i in layers])
    fig.colorbar(image, ax=ax)
    return png_bytes(fig)


def table(rows: list[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _lineage(path: Path, manifest: dict[str, Any]) -> list[tuple[str, Any]]:
    """Raw data -> curation -> token dataset -> tokenizer -> this run (-> parent model)."""
    rows: list[tuple[str, Any]] = []
    dataset = manifest.get("dataset")
    if dataset:
        data_manifest = atomic.read_json(token_dataset.manifest_path(dataset))
        source = data_manifest.get("source", {})
        if isinstance(source, dict):
            files = source.get("files") or []
            rows.append(("raw data", ", ".join(str(f.get("path", f)) if isinstance(f, dict) else str(f) for f in files[:5]) or source.get("hash")))
        rows.append(("token dataset", dataset))
        rows.append(("dataset manifest sha256", manifest.get("dataset_manifest_sha256")))
    rows.append(("tokenizer hash", manifest.get("tokenizer_hash")))
    rows.append(("parent", manifest.get("parent")))
    rows.append(("run", str(path.resolve())))
    rows.append(("lmforge / torch", f"{manifest.get('lmforge_version')} / {manifest.get('torch_version')}"))
    rows.append(("git commit", manifest.get("git_commit")))
    return [(k, v) for k, v in rows if v]


def _curation(manifest: dict[str, Any]) -> str:
    """The curation funnel, if the token dataset was built from `lmforge curate` output."""
    dataset = manifest.get("dataset")
    if not dataset:
        return ""
    for candidate in _curation_reports(Path(dataset)):
        report = atomic.read_json(candidate)
        steps = report.get("steps")
        if not isinstance(steps, list) or not steps:
            continue
        rows = []
        for s in steps:
            if not isinstance(s, dict):
                continue
            removed = s.get("removed") if isinstance(s.get("removed"), dict) else {}
            reasons = ", ".join(f"{r} {fmt(v.get('docs') if isinstance(v, dict) else v)}" for r, v in removed.items())
            cells = [s.get("step", s.get("name")), s.get("docs_in"), s.get("docs_out"), s.get("bytes_in"), s.get("bytes_out")]
            rows.append("<tr>" + "".join(f"<td>{html.escape(fmt(c))}</td>" for c in cells)
                        + f"<td>{html.escape(reasons or '-')}</td></tr>")
        head = "".join(f"<th>{h}</th>" for h in ("step", "docs in", "docs out", "bytes in", "bytes out", "removed by reason"))
        chart = ""
        funnel = candidate.parent / "funnel.png"
        if funnel.is_file():
            chart = (f'<figure><img alt="curation funnel" src="data:image/png;base64,{base64.b64encode(funnel.read_bytes()).decode()}">'
                     "<figcaption>curation funnel</figcaption></figure>")
        return (f"<h2>Curation funnel</h2><p>{html.escape(str(candidate))}: {fmt(report.get('removed_share'))} of the "
                f"input removed</p><table><tr>{head}</tr>{''.join(rows)}</table>{chart}")
    return ""


def _curation_reports(dataset: Path) -> list[Path]:
    manifest = atomic.read_json(token_dataset.manifest_path(dataset))
    source = manifest.get("source", {})
    files = source.get("files", []) if isinstance(source, dict) else []
    dirs = {Path(f.get("path", "") if isinstance(f, dict) else f).parent for f in files}
    return [d / name for d in dirs for name in ("report.json", "curation_report.json") if (d / name).is_file()]


def render(run: str | os.PathLike, out: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write `<out>/index.html` and the PNGs (default out: RUN/report); return the HTML path.

    An existing `out` is replaced only when it holds an earlier report, or with `overwrite`.
    """
    path = Path(run)
    if not path.is_dir():
        raise ConfigError(f"run dir not found: {path}")
    out = Path(out) if out else path / "report"
    atomic.check_output_dir(out, "report", overwrite=overwrite, inputs=[path])
    summary = summarize(path)
    records = read_metrics(path)
    if not records:
        raise ConfigError(f"{path} has no metrics.jsonl records to report")
    manifest = atomic.read_json(RunDir(path).manifest_path)
    images = []
    with atomic.atomic_dir(out, "report") as tmp:
        charts = [(name, title, _plot(records, _expand(records, keys), title)) for name, title, keys in CURVES + RL_CURVES + MOE_CURVES]
        charts.append(("expert_load", "MoE expert load per layer", _expert_heatmap(records)))
        for name, title, png in charts:
            if png is None:
                continue
            atomic.write_bytes(tmp / f"{name}.png", png)
            images.append(figure(png, title))
        overview = table([
            ("kind", summary.kind), ("status", summary.status), ("step", f"{fmt(summary.step)} / {fmt(summary.max_steps)}"),
            ("tokens", summary.tokens), ("last train loss", summary.last_loss), ("best val loss", summary.best_val_loss),
            ("best val bits/byte", summary.best_val_bpb), *_last_val_rewards(records),
            ("latest checkpoint", summary.checkpoint), ("created", summary.created_at),
        ])
        evals = table(sorted(summary.evals.items())) if summary.evals else "<p>No evaluation results in eval/.</p>"
        card = path / MODEL_CARD_FILE
        card_html = f"<h2>Model card</h2><pre>{html.escape(card.read_text(encoding='utf-8'))}</pre>" if card.is_file() else ""
        config = json.dumps(summary.config, indent=2)
        page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lmforge report: {html.escape(summary.name)}</title>
{STYLE}</head><body>
<h1>{html.escape(summary.name)}</h1><p>{html.escape(str(path.resolve()))}</p>
<h2>Overview</h2>{overview}
<h2>Curves</h2><div class="charts" id="charts">{''.join(images)}</div>
<h2>Evaluation</h2>{evals}
<h2>Lineage</h2>{table(_lineage(path, manifest))}
{_curation(manifest)}
{card_html}
<h2>Config</h2><pre>{html.escape(config)}</pre>
</body></html>
"""
        atomic.write_text(tmp / "index.html", page)
    return out / "index.html"
