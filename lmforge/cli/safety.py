"""Safety verbs: `release` (the gate's record), `redteam` (garak against a server), `train-classifier`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli import configdoc
from lmforge.cli.common import ConfigArgs, build_config, flags, negatable, split_list
from lmforge.cli.tables import FormatOption, Listing, OutputFormat, emit


def release(
    model: Annotated[str, typer.Argument(help="model dir, run dir or checkpoint dir")],
    policy: Annotated[str, typer.Option(help="release policy YAML (evals and thresholds)")],
    device: Annotated[str, typer.Option(help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")] = "auto",
    baseline: Annotated[str | None, typer.Option(
        help="a previous release.json (or its dir): each check is tested against it on the same examples (McNemar)")] = None,
    fmt: FormatOption = OutputFormat.table,
):
    """Run a release policy's evals and thresholds; write release.json (exit 1 if it fails).

    A rate passes by its Wilson interval (not its point estimate); a threshold the sample cannot
    resolve is refused with the n it needs."""
    from lmforge.safety import release as gate

    if configdoc.printing():  # --print-config: the policy as the gate would read it
        from lmforge.shipped import config_path

        resolved, _ = gate.load_policy(policy)
        configdoc.print_resolved(gate.ReleasePolicy, resolved.model_dump(mode="json"), str(config_path(policy)))
    result = gate.run(model, policy, device, baseline)
    table = fmt is OutputFormat.table
    rows = [[c["metric"], c["value"], _interval(c, table), c.get("n"), c["min"], c["max"],
             c.get("min_detectable_difference"), (c.get("baseline") or {}).get("verdict"),
             (c.get("baseline") or {}).get("p_value"), c["passed"] if not table else "pass" if c["passed"] else "FAIL"]
            for c in result.record["checks"]]
    emit(fmt, Listing("checks", f"release policy {result.record['policy']}",
                      ["metric", "value", "interval", "n", "min", "max", "mdd", "baseline", "p_value", "passed"], rows,
                      headings=["metric", "value", "interval", "n", "min", "max", "mdd", "baseline", "p", "result"]))
    for c in result.record["checks"]:
        if c.get("problem"):
            typer.echo(f"{c['metric']}: {c['problem']}", err=not table)
    # json/csv: stdout holds the checks only; the verdict is the exit status (and this line on stderr).
    typer.echo(f"{'PASSED' if result.passed else 'FAILED'}: {result.path}", err=fmt is not OutputFormat.table)
    if not result.passed:
        raise typer.Exit(1)


def _interval(check: dict, table: bool) -> str | list[float] | None:
    interval = check.get("interval")
    if not interval or not table:
        return interval
    return f"[{interval[0]:.3f}, {interval[1]:.3f}]"


def redteam(
    url: Annotated[str, typer.Argument(help="the server's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")],
    out: Annotated[str, typer.Option(help="dir for redteam.json/.md and garak's files")],
    model_name: Annotated[str, typer.Option(help="the model id the server serves")] = "lmforge",
    probes: Annotated[str, typer.Option(help="default, smoke, or comma-separated garak probes")] = "default",
    garak: Annotated[str | None, typer.Option(help="python of garak's venv (default: $LMFORGE_GARAK_PYTHON or .venv-garak/bin/python)")] = None,
    api_key_env: Annotated[str, typer.Option(help="env var holding the server's API key")] = "LMFORGE_REDTEAM_KEY",
    generations: int = 1,
    prompt_cap: Annotated[int | None, typer.Option(help="at most this many prompts per probe")] = None,
    max_tokens: int = 150,
    report: Annotated[str | None, typer.Option(help="summarize this garak report.jsonl instead of running garak")] = None,
):
    """Red-team a running `lmforge serve` with garak's offline probes; summarize its report (docs/redteam.md)."""
    from lmforge.safety import redteam as rt

    if report is not None:
        summary = rt.summarize(Path(report))
        rt.write_summary(summary, Path(out))
    else:
        chosen = {"default": rt.DEFAULT_PROBES, "smoke": rt.SMOKE_PROBES}.get(probes) or split_list([probes])
        python = garak or os.environ.get("LMFORGE_GARAK_PYTHON") or ".venv-garak/bin/python"
        summary = rt.run_garak(url, model_name, Path(out), chosen, python, generations, os.environ.get(api_key_env),
                               prompt_cap=prompt_cap, max_tokens=max_tokens)
    typer.echo(rt.summary_markdown(summary))


def train_classifier(
    model: Annotated[str, typer.Argument(help="base lmforge model: model dir, run dir or checkpoint")],
    args: ConfigArgs = None,
    data: Annotated[str | None, typer.Option(help="labelled JSONL: text + labels / label")] = None,
    out: Annotated[str | None, typer.Option(help="classifier dir to write")] = None,
    val_data: Annotated[str | None, typer.Option(help="labelled JSONL to validate and calibrate on (default: hold out --val-fraction)")] = None,
    val_fraction: float | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    max_len: int | None = None,
    train_base: Annotated[bool | None, typer.Option(help="fine-tune the whole model, not only the head")] = None,
    target_fpr: Annotated[float | None, typer.Option(help="calibrate thresholds to this validation false-positive rate")] = None,
    threshold: Annotated[float | None, typer.Option(help="every category's threshold when not calibrated")] = None,
    overwrite: Annotated[bool | None, typer.Option(help="replace an --out dir that is not an lmforge classifier")] = None,
):
    """Train a moderation classifier (a head on an lmforge model), thresholds calibrated on validation."""
    from lmforge.safety import classifier

    config = build_config(classifier.ClassifierConfig, args, flags(
        model=model, data=data, out=out, val_data=val_data, val_fraction=val_fraction, epochs=epochs, lr=lr,
        max_len=max_len, target_fpr=target_fpr, threshold=threshold,
    ) | negatable(train_base=train_base, overwrite=overwrite))
    metrics = classifier.run(config)

    def fmt(value):
        return "-" if value is None else f"{value:.2f}"

    for name, m in metrics.get("categories", {}).items():
        typer.echo(f"{name}: threshold {m['threshold']:.3f}, precision {fmt(m['precision'])}, recall {fmt(m['recall'])}, "
                   f"F1 {fmt(m['f1'])}, false-positive rate {fmt(m['fpr'])} (support {m['support']})")
    if metrics:
        b = metrics["binary"]
        typer.echo(f"harmful at all: precision {fmt(b['precision'])}, recall {fmt(b['recall'])}, F1 {fmt(b['f1'])}, "
                   f"false-positive rate on safe texts {fmt(b['fpr'])} (validation, n={metrics['n']})")
    typer.echo(f"classifier -> {config.out}")
