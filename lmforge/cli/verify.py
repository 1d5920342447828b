"""`lmforge verify PATH`: is this artifact still what its records say, all the way to the raw files?"""

from __future__ import annotations

from typing import Annotated, Literal

import typer


def verify(
    path: Annotated[str, typer.Argument(help="model dir, run dir, checkpoint, token dataset, curated dataset, "
                                             "tokenizer, eval result (or eval/ dir) or release.json")],
    output_format: Annotated[Literal["text", "json"], typer.Option(
        "--format", help="text: one line per link; json: the links and the first break, for machines")] = "text",
):
    """Walk PATH's lineage back to the raw input files, recomputing every recorded hash.

    One line per link (OK, BROKEN and why, or UNRECORDED); exit 0 when the chain is intact,
    1 naming the first break."""
    from lmforge.store import verify as lineage_verify

    links = lineage_verify.verify(path)
    broken = lineage_verify.first_break(links)
    if output_format == "json":
        typer.echo(lineage_verify.to_json(path, links))
    else:
        for link in links:
            typer.echo(link.line())
        checked = sum(link.status == lineage_verify.OK for link in links)
        unrecorded = sum(link.status == lineage_verify.UNRECORDED for link in links)
        if broken is None:
            typer.echo(f"lineage intact: {checked} links verified" + (f", {unrecorded} unrecorded" if unrecorded else ""))
        else:
            typer.echo(f"lineage BROKEN at {broken.kind} {broken.path}: {broken.note}", err=True)
    if broken is not None:
        raise typer.Exit(1)
