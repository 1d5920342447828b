"""The curation report: `report.json`, `report.md` (a table a person reads) and `funnel.png`.

One row per step: documents and bytes in and out, and each reason a document was removed,
with a few (PII-scrubbed) examples. Bytes are the UTF-8 bytes of document text, except the
read step's input, which is the size of the raw records. Counts add up: every step's
input is the previous step's output, and in = out + removed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lmforge import __version__, atomic
from lmforge.data.curate.audit import read_ledgers
from lmforge.data.curate.config import CurateConfig

log = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, FUNNEL_PNG = "report.json", "report.md", "funnel.png"


def build(config: CurateConfig, files: list[str], work: Path, order: list[str], seconds: dict[str, float]) -> dict:
    steps = []
    for name in order:
        entry = read_ledgers(work / "ledger", name)
        entry = {"step": name, **entry}
        steps.append(entry)
    first, last = steps[0], steps[-1]
    removed_share = 1 - last["docs_out"] / first["docs_in"] if first["docs_in"] else 0.0
    report: dict[str, Any] = {
        "created_by": f"lmforge {__version__}",
        "inputs": files,
        "input": {"records": first["docs_in"], "bytes": first["bytes_in"]},
        "output": {"docs": last["docs_out"], "bytes": last["bytes_out"], "format": config.output.format},
        "removed_share": round(removed_share, 4),
        "steps": steps,
        "stage_seconds": seconds,
        "seconds": round(sum(seconds.values()), 3),
        "warnings": [],
    }
    pii = next((s["counters"] for s in steps if s["step"] == "pii"), {})
    if pii:
        report["pii_replacements"] = {k: v for k, v in pii.items() if k != "documents_changed"}
    if removed_share > config.report.warn_removed_share:
        report["warnings"].append(
            f"{removed_share:.0%} of the input was removed (more than report.warn_removed_share="
            f"{config.report.warn_removed_share:.0%}); top reasons: {top_reasons(report)}. "
            "Check input.text_field, the language list and the filter thresholds."
        )
    for warning in report["warnings"]:
        log.warning("curate: %s", warning)
    return report


def top_reasons(report: dict, k: int = 3) -> str:
    reasons = [(f"{s['step']}/{r}", v["docs"]) for s in report["steps"] for r, v in s["removed"].items()]
    reasons.sort(key=lambda item: -item[1])
    return ", ".join(f"{name} {count}" for name, count in reasons[:k]) or "none"


def _mb(nbytes: int) -> str:
    return f"{nbytes / 1e6:,.2f}"


def table(report: dict) -> str:
    """Markdown: the funnel, the reasons with examples, and any warnings."""
    lines = [f"# Curation report ({report['created_by']})", ""]
    for warning in report["warnings"]:
        lines += [f"> **WARNING**: {warning}", ""]
    lines += [
        f"Input: {report['input']['records']:,} records, {_mb(report['input']['bytes'])} MB; "
        f"output: {report['output']['docs']:,} documents, {_mb(report['output']['bytes'])} MB "
        f"({report['removed_share']:.1%} of documents removed) in {report['seconds']:.1f} s.",
        "",
        "| step | docs in | docs out | removed | MB in | MB out | reasons |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in report["steps"]:
        reasons = ", ".join(f"{r} {v['docs']:,}" for r, v in sorted(s["removed"].items(), key=lambda kv: -kv[1]["docs"]))
        counters = ", ".join(f"{k} {v:,}" for k, v in s["counters"].items())
        lines.append(
            f"| {s['step']} | {s['docs_in']:,} | {s['docs_out']:,} | {s['docs_in'] - s['docs_out']:,} | "
            f"{_mb(s['bytes_in'])} | {_mb(s['bytes_out'])} | {reasons or counters or '-'} |"
        )
    examples = [(s["step"], r, ex) for s in report["steps"] for r, ex in s["examples"].items() if ex]
    if examples:
        lines += ["", "## Removed examples", ""]
        for step, reason, texts in examples:
            lines.append(f"### {step} / {reason}")
            lines += [f"- `{_one_line(t)}`" for t in texts]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _one_line(text: str, limit: int = 200) -> str:
    text = " ".join(text.split()).replace("`", "'")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def funnel_png(report: dict, path: Path) -> None:
    """Documents (left) and megabytes (right) remaining after each step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = report["steps"]
    labels = ["input", *(s["step"] for s in steps)]
    docs = [steps[0]["docs_in"], *(s["docs_out"] for s in steps)]
    mbs = [steps[0]["bytes_in"] / 1e6, *(s["bytes_out"] / 1e6 for s in steps)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(labels) + 1.5), sharey=True)
    for ax, values, title in ((axes[0], docs, "documents"), (axes[1], mbs, "MB of text")):
        bars = ax.barh(range(len(labels)), values, color="#4C72B0")
        ax.set_title(f"{title} remaining after each step")
        top = max(values) or 1
        for bar, value, previous in zip(bars, values, [values[0], *values[:-1]], strict=True):
            lost = (previous - value) / previous if previous else 0
            note = f"{value:,.0f}" if title == "documents" else f"{value:,.2f}"
            if lost > 0.0005:
                note += f"  (-{lost:.1%})"
            ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, note, va="center", fontsize=8)
        ax.set_xlim(0, top * 1.35)
    axes[0].set_yticks(range(len(labels)), labels)
    axes[0].invert_yaxis()  # the axes share y: inverting one inverts both (twice would undo it)
    fig.suptitle(f"lmforge curate: {report['removed_share']:.1%} of documents removed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(directory: Path, report: dict) -> None:
    atomic.write_json(directory / REPORT_JSON, report)
    atomic.write_text(directory / REPORT_MD, table(report))
    funnel_png(report, directory / FUNNEL_PNG)
