"""`lmforge eval`: `eval run MODEL` (also plain `eval MODEL`) and `eval compare A B ...`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from lmforge.cli.common import ConfigArgs, build_config, flags, split_list
from lmforge.cli.configdoc import configured
from lmforge.cli.tables import FormatOption, Listing, OutputFormat, emit, stdout_console


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
@configured("lmforge.eval.runner:EvalConfig")
def eval_run(
    model: Annotated[str, typer.Argument(help="model dir, run dir, checkpoint dir or Hub id org/name[@revision]")],
    args: ConfigArgs = None,
    tasks: Annotated[list[str] | None, typer.Option("--tasks", "-t", help="shipped task names, task YAMLs, JSONL/parquet files or Hub datasets org/name[:split] (comma-separated or repeated)")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", "-d", help="text/jsonl/parquet file, token dataset dir or Hub dataset: bits per byte")] = None,
    harness: Annotated[list[str] | None, typer.Option(help="lm-evaluation-harness task names")] = None,
    include_path: Annotated[str | None, typer.Option(help="extra harness task YAMLs")] = None,
    limit: Annotated[int | None, typer.Option(help="first N examples per task")] = None,
    batch_size: Annotated[int | None, typer.Option(help="examples per forward pass")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | float32 | bfloat16 | float16")] = None,
    seed: Annotated[int | None, typer.Option(help="few-shot and sampling seed")] = None,
    out: Annotated[str | None, typer.Option(help="results dir (default: the model's eval/)")] = None,
    fmt: FormatOption = OutputFormat.table,
):
    """Evaluate MODEL on tasks, text (bits per byte) and lm-evaluation-harness tasks; save the results."""
    from lmforge.eval import runner
    from lmforge.store.loading import eval_dir

    config = build_config(runner.EvalConfig, args, flags(
        model=model, tasks=split_list(tasks), data=split_list(data), harness=split_list(harness),
        harness_include=include_path, limit=limit, batch_size=batch_size, device=device, dtype=dtype,
        seed=seed, out=out,
    ))
    results = runner.run(config)
    rows = [[name, metric, value["value"], value.get("stderr"), result.get("n"), result.get("examples_per_second")]
            for name, result in results.items() for metric, value in result["metrics"].items()]
    emit(fmt, Listing("results", f"lmforge eval {model}", ["task", "metric", "value", "stderr", "n",
                                                          "examples_per_second"], rows,
                      headings=["task", "metric", "value", "stderr", "n", "ex/s"]))
    if config.save and fmt is OutputFormat.table:  # json/csv: stdout holds the data only
        stdout_console().print(f"results: {Path(config.out) if config.out else eval_dir(model)}/")


@eval_app.command("compare")
def eval_compare(
    models: Annotated[list[str] | None, typer.Argument(help="models whose saved results to tabulate", show_default=False)] = None,
    fmt: FormatOption = OutputFormat.table,
):
    """Tabulate every saved eval result of MODELS side by side (json/csv: `MODEL` and `MODEL stderr` columns)."""
    from lmforge.eval import runner

    header, rows = runner.compare(models or [])  # none: a one-line error naming what it needs
    if fmt is OutputFormat.table:
        emit(fmt, Listing("results", "lmforge eval compare", header, rows))
        return
    loaded = [runner.load_results(m) for m in models or []]
    columns = ["task", "metric", *(c for m in models or [] for c in (m, f"{m} stderr"))]
    raw = []
    for task, metric in ((row[0], row[1]) for row in rows):
        values = [results.get(task, {}).get("metrics", {}).get(metric) or {} for results in loaded]
        raw.append([task, metric, *(v for value in values for v in (value.get("value"), value.get("stderr")))])
    emit(fmt, Listing("results", "lmforge eval compare", columns, raw))
