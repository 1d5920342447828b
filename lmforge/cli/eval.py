"""`lmforge eval`: `eval run MODEL` (also plain `eval MODEL`) and `eval compare A B ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from lmforge.cli.common import ConfigArgs, build_config, flags, print_table, split_list


class DefaultCommandGroup(TyperGroup):
    """A group whose first argument, when it names none of its commands, goes to `default_command`.

    `lmforge eval MODEL --tasks ...` is `lmforge eval run MODEL --tasks ...`; `lmforge eval
    compare A B` is the `compare` command (a model dir named `compare` needs `eval run compare`).
    """

    default_command = "run"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    cls=DefaultCommandGroup, no_args_is_help=True,
    help="Evaluate a model (`lmforge eval MODEL --tasks python_mc`, short for `eval run`) or compare saved results.",
)


@eval_app.command("run")
def eval_run(
    model: Annotated[str, typer.Argument(help="model dir, run dir, checkpoint dir or Hub id org/name[@revision]")],
    args: ConfigArgs = None,
    tasks: Annotated[list[str] | None, typer.Option("--tasks", "-t", help="shipped task names, task YAMLs or JSONL files (comma-separated or repeated)")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", "-d", help="text/jsonl/parquet file or token dataset dir: bits per byte")] = None,
    harness: Annotated[list[str] | None, typer.Option(help="lm-evaluation-harness task names")] = None,
    include_path: Annotated[str | None, typer.Option(help="extra harness task YAMLs")] = None,
    limit: Annotated[int | None, typer.Option(help="first N examples per task")] = None,
    batch_size: Annotated[int | None, typer.Option(help="examples per forward pass")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | float32 | bfloat16 | float16")] = None,
    seed: Annotated[int | None, typer.Option(help="few-shot and sampling seed")] = None,
    out: Annotated[str | None, typer.Option(help="results dir (default: the model's eval/)")] = None,
):
    """Evaluate MODEL on tasks, text (bits per byte) and lm-evaluation-harness tasks; save the results."""
    from rich.console import Console
    from rich.table import Table

    from lmforge.eval import runner
    from lmforge.store.loading import eval_dir

    config = build_config(runner.EvalConfig, args, flags(
        model=model, tasks=split_list(tasks), data=split_list(data), harness=split_list(harness),
        harness_include=include_path, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
        seed=seed, out=out,
    ))
    results = runner.run(config)
    table = Table(title=f"lmforge eval {model}")
    for column in ("task", "metric", "value", "stderr", "n", "ex/s"):
        table.add_column(column)
    for name, result in results.items():
        for metric, value in result["metrics"].items():
            stderr = value.get("stderr")
            table.add_row(name, metric, f"{value['value']:.4f}",
                          f"{stderr:.4f}" if isinstance(stderr, float) else "-",
                          str(result.get("n")), f"{result.get('examples_per_second') or 0:.1f}")
    Console().print(table)
    if config.save:
        Console().print(f"results: {Path(config.out) if config.out else eval_dir(model)}/")


@eval_app.command("compare")
def eval_compare(
    models: Annotated[list[str] | None, typer.Argument(help="models whose saved results to tabulate", show_default=False)] = None,
):
    """Tabulate every saved eval result of MODELS side by side."""
    from lmforge.eval import runner

    header, rows = runner.compare(models or [])  # none: a one-line error naming what it needs
    print_table("lmforge eval compare", header, rows)
