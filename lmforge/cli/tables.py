"""Tables for people and for pipes: every table verb takes `--format table|json|csv`.

`table` is a rich table: on a terminal it fits the terminal; piped or redirected it is as
wide as its content, so a name is never folded or cut (`lmforge runs list | grep quickstart`
finds it). `json` and `csv` carry the raw values under stable snake_case keys: json is one
list of objects (or, for a verb that prints several tables, an object of such lists keyed
by table); csv is one header line and one line per row (several tables: a first `table`
column says which).
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Annotated, Any

import typer


class OutputFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


FormatOption = Annotated[OutputFormat, typer.Option(
    "--format", case_sensitive=False,
    help="table (for people; never folds names when piped), json or csv (for scripts: raw values, stable keys)")]


@dataclass
class Listing:
    """One table: `columns` are its stable keys (json/csv), `headings` what people read."""

    key: str
    title: str
    columns: list[str]
    rows: list[list[Any]]
    headings: list[str] = field(default_factory=list)

    def records(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


def stdout_console():
    """A rich console for stdout: the terminal's width on a terminal; otherwise wide enough
    that no cell is folded or cut (rich would assume 80 columns)."""
    from rich.console import Console

    if sys.stdout.isatty():
        return Console()
    return Console(width=1_000_000, soft_wrap=True)


def cell(value: Any) -> str:
    """A value as people read it in a table cell."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(cell, value)) or "-"
    return str(value)


def emit(fmt: OutputFormat | str, *listings: Listing) -> None:
    """Print `listings` to stdout in `fmt`."""
    fmt = OutputFormat(fmt)
    if fmt is OutputFormat.json:
        body: Any = listings[0].records() if len(listings) == 1 else {t.key: t.records() for t in listings}
        sys.stdout.write(json.dumps(body, indent=2, default=str) + "\n")
    elif fmt is OutputFormat.csv:
        _write_csv(listings)
    else:
        console = stdout_console()
        for listing in listings:
            console.print(_rich_table(listing, fold=sys.stdout.isatty()))


def _rich_table(listing: Listing, fold: bool):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=escape(listing.title))
    for heading in listing.headings or listing.columns:
        # On a terminal long cells fold to fit; piped, the console is wide and nothing wraps.
        table.add_column(escape(heading), overflow="fold" if fold else "ignore", no_wrap=not fold)
    for row in listing.rows:
        table.add_row(*(escape(cell(value)) for value in row))
    return table


def _write_csv(listings: tuple[Listing, ...]) -> None:
    several = len(listings) > 1
    columns = list(dict.fromkeys((["table"] if several else []) + [c for t in listings for c in t.columns]))
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for listing in listings:
        for record in listing.records():
            row = {k: _csv_value(v) for k, v in record.items()}
            writer.writerow({"table": listing.key, **row} if several else row)


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return value
