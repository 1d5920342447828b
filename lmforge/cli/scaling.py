"""Scaling-law verbs: `scaling fit SWEEP [--budget 1e18] [--out DIR] [--bootstrap 200]`."""

from __future__ import annotations

from typing import Annotated

import typer

scaling_app = typer.Typer(no_args_is_help=True, help="Fit scaling laws over a sweep's finished trials.")


@scaling_app.command("fit")
def scaling_fit(
    sweep: Annotated[str, typer.Argument(help="sweep dir (written by `lmforge sweep`)")],
    budget: Annotated[str | None, typer.Option(help="compute budget in FLOPs, e.g. 1e18: the compute-optimal N, D "
                                               "and predicted loss for it")] = None,
    out: Annotated[str | None, typer.Option(help="output dir (default SWEEP/scaling)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an --out dir that lmforge's scaling fit did not write")] = False,
    bootstrap: Annotated[int, typer.Option(min=0, help="bootstrap refits behind the 95% intervals (0: none)")] = 200,
    seed: Annotated[int, typer.Option(help="seed of the bootstrap resampling")] = 0,
):
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla), iso-FLOP minima and lr transfer; write JSON and HTML."""
    from lmforge.experiments.scaling_report import fit, summary_lines

    result = fit(sweep, budget=budget, out=out, overwrite=overwrite, n_bootstrap=bootstrap, seed=seed)
    for line in summary_lines(result):
        typer.echo(line)
