"""`lmforge sweep SPEC.yaml [key=value ...]` runs a sweep; `lmforge sweep report DIR` reports one."""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperGroup


class _SpecFirst(TyperGroup):
    """`lmforge sweep SPEC.yaml ...` means `lmforge sweep run SPEC.yaml ...`: a first argument
    that names no subcommand is the spec of a sweep to run."""

    def resolve_command(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().resolve_command(ctx, args)


sweep_app = typer.Typer(
    cls=_SpecFirst, no_args_is_help=True,
    help="Sweeps of training runs: `lmforge sweep SPEC.yaml key=value...` runs the trials of a search "
    "space over a base config (each an ordinary run dir in SWEEP_DIR/trials/); `lmforge sweep report DIR`.",
)


@sweep_app.command("run")
def sweep_run(
    spec: Annotated[str, typer.Argument(help="sweep spec YAML (name, base, overrides, space, sampler, ...)")],
    overrides: Annotated[list[str] | None, typer.Argument(
        help="spec key=value overrides, beating the YAML (e.g. executor.max_parallel=2 trials=4)",
        show_default=False)] = None,
    resume: Annotated[bool, typer.Option(help="continue the sweep in its dir: finished trials stay, "
                                         "interrupted ones continue from their checkpoints")] = False,
    overwrite: Annotated[bool, typer.Option(help="start over, replacing an earlier sweep of this name")] = False,
    retry_failed: Annotated[bool, typer.Option(help="with --resume: rerun the trials that failed")] = False,
):
    """Run a sweep: every trial is `lmforge train BASE ...` in its own process; one line per finished trial."""
    from lmforge.experiments import sweep

    config = sweep.load_spec(spec, overrides or [])

    def progress(record) -> None:
        metric = "-" if record.metric is None else f"{record.metric:.4f}"
        params = ", ".join(f"{k}={v}" for k, v in record.params.items() if k in config.space)
        seconds = f"{record.seconds:.0f}s" if record.seconds is not None else ""
        note = f"; {record.error.splitlines()[-1][:160]}" if record.status == "failed" and record.error else ""
        typer.echo(f"{record.id} {record.status:<7} {config.metric} {metric} {seconds} ({params}){note}")

    result = sweep.run(config, resume=resume, overwrite=overwrite, retry_failed=retry_failed, progress=progress)
    counts = {s: sum(t.status == s for t in result.trials) for s in ("done", "failed", "pruned", "pending")}
    typer.echo(f"sweep {result.status}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
               + f"; sweep dir {result.dir}")
    if result.best is not None:
        typer.echo(f"best {result.best.id}: {config.metric} {result.best.metric:.4f}; "
                   + " ".join(result.best.overrides[len(sweep.TRIAL_DEFAULTS):]))
    if result.signal is not None:
        typer.echo("continue with --resume")
        raise typer.Exit(128 + result.signal)


@sweep_app.command("report")
def sweep_report(
    directory: Annotated[str, typer.Argument(metavar="DIR", help="sweep dir (out_dir/name)")],
    out: Annotated[str | None, typer.Option(help="HTML file to write (default DIR/report.html)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an --out file that is not an earlier sweep report")] = False,
):
    """A table of the trials here and an HTML page: best trial, metric vs each swept key, loss curves."""
    from lmforge.cli.common import print_table
    from lmforge.experiments import sweep_report as report

    title, header, rows = report.table(directory)
    print_table(title, header, rows)
    typer.echo(f"report: {report.render(directory, out, overwrite)}")
