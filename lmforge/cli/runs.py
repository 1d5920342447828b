"""Monitoring verbs: `runs list | show | compare`, `report`, and `configs` (the shipped recipes)."""

from __future__ import annotations

from typing import Annotated

import typer

from lmforge.cli.tables import FormatOption, Listing, OutputFormat, emit

runs_app = typer.Typer(no_args_is_help=True, help="List, inspect and compare run dirs.")
configs_app = typer.Typer(help="The YAML recipes that ship with lmforge; every config-taking verb accepts one by name.")


@runs_app.command("list")
def runs_list(root: Annotated[str, typer.Argument(help="dir of run dirs")] = "runs",
              fmt: FormatOption = OutputFormat.table):
    """One line per run: status, steps, tokens, losses, evals, parent."""
    from lmforge.monitor import catalog

    runs = [catalog.summarize(path) for path in catalog.find_runs(root)]
    if fmt is not OutputFormat.table:  # every field, raw
        columns = ["run", "path", "kind", "status", "step", "max_steps", "tokens", "last_loss", "best_val_loss",
                   "best_val_bpb", "evals", "parent", "created_at"]
        emit(fmt, Listing("runs", f"runs in {root}", columns, [[
            r.name, str(r.path), r.kind, r.status, r.step, r.max_steps, r.tokens, r.last_loss, r.best_val_loss,
            r.best_val_bpb, r.evals, r.parent, r.created_at] for r in runs]))
        return
    rows = [[r.name, r.kind, r.status, f"{catalog.fmt(r.step)}/{catalog.fmt(r.max_steps)}", r.tokens, r.last_loss,
             r.best_val_loss, dict(list(r.evals.items())[:3]), r.parent] for r in runs]
    emit(fmt, Listing("runs", f"runs in {root}", ["run", "kind", "status", "step", "tokens", "loss", "best val",
                                                  "evals", "parent"], rows))


@runs_app.command("show")
def runs_show(run: Annotated[str, typer.Argument(help="run dir")], fmt: FormatOption = OutputFormat.table):
    """Everything about one run: summary, evals, lineage and config."""
    from lmforge.monitor import catalog

    r = catalog.summarize(run)
    rows = [[k, values[0]] for k, values in catalog.metric_rows([r])]
    rows += [["checkpoint", r.checkpoint], ["parent", r.parent], ["created", r.created_at]]
    # Config values as written (a table would round 3e-5 to 0.0000); json/csv keep their types.
    rows += [[f"config.{k}", str(v) if fmt is OutputFormat.table else v] for k, v in catalog.flatten(r.config).items()]
    emit(fmt, Listing("run", f"run {r.path}", ["key", "value"], rows, headings=["", "value"]))


@runs_app.command("compare")
def runs_compare(runs: Annotated[list[str], typer.Argument(help="run dirs")], fmt: FormatOption = OutputFormat.table):
    """Metrics side by side and only the config keys that differ."""
    from lmforge.monitor import catalog

    summaries = [catalog.summarize(r) for r in runs]
    names = [s.name for s in summaries]
    if len(set(names)) < len(names):  # runs of one name in different dirs: columns by path
        names = [str(s.path) for s in summaries]
    metrics = Listing("metrics", "metrics", ["metric", *names], [[k, *v] for k, v in catalog.metric_rows(summaries)],
                      headings=["", *names])
    differences = Listing("config_differences", "config differences", ["key", *names],
                          [[k, *v] for k, v in catalog.config_differences(summaries)])
    if fmt is not OutputFormat.table:
        emit(fmt, metrics, differences)
        return
    emit(fmt, metrics)
    if differences.rows:
        differences.rows = [[k, *map(str, v)] for k, *v in differences.rows]
        emit(fmt, differences)
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
def configs_list(ctx: typer.Context, fmt: FormatOption = OutputFormat.table):
    """List the shipped configs: `lmforge sft MODEL sft` uses one by name; `configs show NAME` prints it."""
    if ctx.invoked_subcommand is not None:
        return
    from lmforge.shipped import shipped_configs

    rows = [[c.name, c.description] for c in shipped_configs()]
    emit(fmt, Listing("configs", "shipped configs (lmforge configs show NAME)", ["name", "description"], rows))


@configs_app.command("show")
def configs_show(
    name: Annotated[str, typer.Argument(help="a shipped config's name, e.g. sft")],
    path: Annotated[bool, typer.Option("--path", help="print where the file is instead of its text")] = False,
):
    """Print a shipped config, e.g. to copy and edit it: `lmforge configs show sft > my-sft.yaml`."""
    from lmforge.shipped import shipped_config

    config = shipped_config(name)
    typer.echo(str(config.path) if path else config.path.read_text(encoding="utf-8"), nl=path)
