"""Data verbs: `tokenizer train | encode | decode`, `tokenize`, `curate`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from lmforge.cli.common import ConfigArgs, build_config, flags, negatable
from lmforge.errors import ConfigError


def tokenizer_train(
    args: ConfigArgs = None,
    inputs: Annotated[list[str] | None, typer.Option("--input", "-i", help="file or dir (repeatable)")] = None,
    out: Annotated[str | None, typer.Option(help="output dir for tokenizer.json")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="vocabulary size, special tokens included")] = None,
    min_frequency: Annotated[int | None, typer.Option(help="merges seen fewer times are not learnt")] = None,
    text_field: Annotated[str | None, typer.Option(help="jsonl/parquet: the field holding the text")] = None,
    text_split: Annotated[str | None, typer.Option(help="txt files: file | paragraph | line")] = None,
    overwrite: Annotated[bool | None, typer.Option(help="replace a tokenizer.json in --out that lmforge did not train")] = None,
):
    """Train a byte-level BPE tokenizer with lmforge's special tokens."""
    from lmforge import tokenizer as tk
    from lmforge.data import tokenizer_train

    config = build_config(tokenizer_train.TokenizerTrainConfig, args, flags(
        inputs=inputs, out=out, vocab_size=vocab_size, min_frequency=min_frequency,
        text_field=text_field, text_split=text_split,
    ) | negatable(overwrite=overwrite))
    trained = tokenizer_train.run_train(config)
    typer.echo(f"tokenizer with {trained.vocab_size} tokens -> {Path(config.out) / tk.TOKENIZER_FILE}")


def tokenizer_encode(tokenizer: str, text: Annotated[str, typer.Argument(help="text; - reads stdin")]):
    """Print the token ids of TEXT, space-separated."""
    from lmforge.tokenizer import load_tokenizer

    text = sys.stdin.read() if text == "-" else text
    typer.echo(" ".join(map(str, load_tokenizer(tokenizer).encode(text))))


def tokenizer_decode(tokenizer: str, ids: Annotated[list[str], typer.Argument(help="token ids")]):
    """Print the text of space- or comma-separated token IDS."""
    from lmforge.tokenizer import load_tokenizer

    loaded = load_tokenizer(tokenizer)
    try:
        values = [int(x) for item in ids for x in item.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"token ids must be integers, got {' '.join(ids)!r}") from None
    bad = [i for i in values if not 0 <= i < loaded.vocab_size]
    if bad:
        raise ConfigError(f"token id {bad[0]} is outside the vocabulary (0..{loaded.vocab_size - 1})")
    typer.echo(loaded.decode(values))


def tokenize(
    args: ConfigArgs = None,
    inputs: Annotated[list[str] | None, typer.Option(
        "--input", "-i", help="file, dir, fsspec URL, `datasets` dir or Hub dataset org/name[@rev][:split] (repeatable)")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer dir, tokenizer.json or Hub id org/name[@revision]")] = None,
    out: Annotated[str | None, typer.Option(help="token dataset dir")] = None,
    workers: Annotated[int | None, typer.Option(help="encoding processes")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="share of documents held out")] = None,
    overwrite: Annotated[bool | None, typer.Option(help="replace an --out dir that lmforge's tokenize did not write")] = None,
):
    """Encode documents into a token dataset dir (shards + manifest.json) with a validation split."""
    from lmforge.data import tokenize as tok

    config = build_config(tok.TokenizeConfig, args, flags(
        inputs=inputs, tokenizer=tokenizer, out=out, num_workers=workers, val_fraction=val_fraction,
    ) | negatable(overwrite=overwrite))
    manifest = tok.run(config)
    splits = ", ".join(f"{s}: {v['tokens']:,} tokens / {v['documents']:,} docs" for s, v in manifest["splits"].items())
    typer.echo(f"{config.out}: {splits}")


def curate(
    args: ConfigArgs = None,
    inputs: Annotated[list[str] | None, typer.Option("--input", "-i", help="file, dir or fsspec URL (repeatable)")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="output dir (shards + report)")] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes (executor.workers)")] = None,
    overwrite: Annotated[bool | None, typer.Option(help="replace output dirs that lmforge's curate did not write")] = None,
):
    """Curate raw text with datatrove: filters, PII scrubbing, dedup, decontamination, and a report."""
    from lmforge.data import curate as cur

    given: dict[str, Any] = {}  # CurateConfig nests these options in its sections
    if inputs:
        given["input"] = {"paths": inputs}
    if output:
        given["output"] = {"dir": output}
    if workers:
        given["executor"] = {"workers": workers}
    if overwrite is not None:  # --overwrite or --no-overwrite: either wins over CONFIG.yaml
        given.setdefault("output", {})["overwrite"] = overwrite
    result = cur.run(build_config(cur.CurateConfig, args, given))
    report = result.report
    for warning in report["warnings"]:
        typer.secho(f"WARNING: {warning}", fg="red", bold=True, err=True)
    typer.echo(f"{report['input']['records']:,} records -> {report['output']['docs']:,} documents "
               f"({report['removed_share']:.1%} removed) in {report['seconds']:.1f}s -> {result.out}")
    typer.echo(f"report: {result.out / 'report.md'}, {result.out / 'funnel.png'}")
