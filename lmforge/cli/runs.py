"""Monitoring verbs: `runs list | show | compare`, `report`, and `configs` (the shipped recipes)."""

from __future__ import annotations

from typing import Annotated

import typer

from lmforge.cli.common import print_table

runs_app = typer.Typer(no_args_is_help=True, help="List, inspect and compare run dirs.")
configs_app = typer.Typer(help="The YAML recipes that ship with lmforge; every config-taking verb accepts one by name.")


@runs_app.command("list")
def runs_list(root: Annotated[str, typer.Argument(help="dir of run dirs")] = "runs"):
    """One line per run: status, steps, tokens, losses, evals, parent."""
    from lmforge.monitor import catalog

    rows = []
    for path in catalog.find_runs(root):
        r = catalog.summarize(path)
        evals = ", ".join(f"{k} {v:.3f}" for k, v in list(r.evals.items())[:3])
        rows.append([r.name, r.kind or "-", r.status, f"{catalog.fmt(r.step)}/{catalog.fmt(r.max_steps)}",
                     catalog.fmt(r.tokens), catalog.fmt(r.last_loss), catalog.fmt(r.best_val_loss), evals or "-",
                     r.parent or "-"])
    print_table(f"runs in {root}", ["run", "kind", "status", "step", "tokens", "loss", "best val", "evals", "parent"], rows)


@runs_app.command("show")
def runs_show(run: Annotated[str, typer.Argument(help="run dir")]):
    """Everything about one run: summary, evals, lineage and config."""
    from lmforge.monitor import catalog

    r = catalog.summarize(run)
    rows = [[k, catalog.fmt(v)] for k, v in catalog.metric_rows([r])]
    rows += [["checkpoint", r.checkpoint or "-"], ["parent", r.parent or "-"], ["created", r.created_at or "-"]]
    rows += [[f"config {k}", str(v)] for k, v in catalog.flatten(r.config).items()]
    print_table(f"run {r.path}", ["", "value"], rows)


@runs_app.command("compare")
def runs_compare(runs: Annotated[list[str], typer.Argument(help="run dirs")]):
    """Metrics side by side and only the config keys that differ."""
    from lmforge.monitor import catalog

    summaries = [catalog.summarize(r) for r in runs]
    names = [s.name for s in summaries]
    print_table("metrics", ["", *names], [[k, *map(catalog.fmt, v)] for k, v in catalog.metric_rows(summaries)])
    differences = catalog.config_differences(summaries)
    if differences:
        print_table("config differences", ["key", *names], [[k, *map(str, v)] for k, v in differences])
    else:
        typer.echo("configs are identical (apart from run.name)")


def report(
    run: Annotated[str, typer.Argument(help="run dir")],
    out: Annotated[str | None, typer.Option(help="output dir (default RUN/report)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an --out dir that is not an lmforge report")] = False,
):
    """Write a self-contained HTML report of a run (curves, evals, lineage, card)."""
    from lmforge.monitor.report import render

    typer.echo(f"report: {render(run, out, overwrite)}")


@configs_app.callback(invoke_without_command=True)
def configs_list(ctx: typer.Context):
    """List the shipped configs: `lmforge sft MODEL sft` uses one by name; `configs show NAME` prints it."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.markup import escape

    from lmforge.shipped import shipped_configs

    rows = [[c.name, escape(c.description)] for c in shipped_configs()]
    print_table("shipped configs (lmforge configs show NAME)", ["name", "description"], rows)


@configs_app.command("show")
def configs_show(
    name: Annotated[str, typer.Argument(help="a shipped config's name, e.g. sft")],
    path: Annotated[bool, typer.Option("--path", help="print where the file is instead of its text")] = False,
):
    """Print a shipped config, e.g. to copy and edit it: `lmforge configs show sft > my-sft.yaml`."""
    from lmforge.shipped import shipped_config

    config = shipped_config(name)
    typer.echo(str(config.path) if path else config.path.read_text(encoding="utf-8"), nl=path)
