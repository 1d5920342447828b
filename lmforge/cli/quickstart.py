"""`lmforge quickstart`: the whole spine on the bundled corpus, then a summary of each stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmforge.cli.common import ConfigArgs, build_config, flags, negatable


def quickstart(
    args: ConfigArgs = None,
    out: Annotated[str | None, typer.Option(help="work dir")] = None,
    overwrite: Annotated[bool | None, typer.Option(help="use an --out dir that lmforge's quickstart did not write")] = None,
):
    """Run the whole spine on the bundled corpus: tokenizer, tokens, pretraining, eval, sample."""
    from rich.table import Table

    from lmforge import quickstart as qs
    from lmforge.cli.tables import stdout_console

    config = build_config(qs.QuickstartConfig, args, flags(out=out) | negatable(overwrite=overwrite))
    results = {r.name: r for r in qs.run(config)}
    table = Table(title=f"lmforge quickstart -> {config.out}")
    for column in ("stage", "status", "seconds", "outputs"):
        table.add_column(column)
    for r in results.values():
        table.add_row(r.name, r.status, f"{r.seconds:.1f}", "\n".join(r.outputs))
    console = stdout_console()  # piped: wide, so no stage name or path is folded
    console.print(table)
    _print_summary(console, {name: r.details for name, r in results.items()}, Path(config.out))
    console.print(f"summary: {Path(config.out) / 'summary.json'}")


def _print_summary(console, details: dict[str, dict], out: Path) -> None:
    """One line per stage that ran: what curation removed, the model, its sample, SFT, safety, export."""
    if "curate" in details:
        curated = details["curate"]
        removed = ", ".join(f"{k} {v}" for k, v in curated["removed"].items()) or "nothing"
        console.print(f"[bold]curate[/] {curated['records']:,} records -> {curated['docs']:,} "
                      f"documents; removed: {removed} (report: {out / 'curated' / 'report.md'})")
    train, sample = details["train"], details["sample"]
    console.print(
        f"[bold]model[/] {train['params']:,} params, {train['steps']} steps; "
        f"train loss {train['first_loss']:.3f} -> {train['final_loss']:.3f}; "
        f"val loss {train['val_loss']:.3f}, {train['val_bpb']:.3f} bits/byte"
    )
    console.print(f"[bold]sample[/] {sample['prompt']}[italic]{sample['completion']}[/]", markup=True)
    if "sft" in details:
        sft = details["sft"]
        console.print(f"[bold]sft[/] {sft['conversations']} conversations, {sft['steps']} steps; "
                      f"loss {sft['first_loss']:.3f} -> {sft['final_loss']:.3f}")
    for name, values in details.get("safety", {}).items():
        console.print(f"[bold]safety[/] {name}: refuses {_rate(values.get('safety_harmful/refusal_rate'))} of harmful "
                      f"requests, {_rate(values.get('safety_benign/over_refusal_rate'))} of benign ones "
                      "(held-out eval sets; refusal judge: classifier)")
    if "export" in details:
        path = details["export"]["model_dir"]
        console.print(f"[bold]model dir[/] {path} (Hugging Face format); load it with", soft_wrap=True)
        for line in (
            f"  AutoModelForCausalLM.from_pretrained({path!r})",
            f"  AutoTokenizer.from_pretrained({path!r})",
            f"  or: lmforge generate {path} --prompt '...'",
        ):
            console.print(line, soft_wrap=True, markup=False)


def _rate(metric) -> str:
    """`85% ± 6% (n=40)`: a rate with its standard error."""
    if not isinstance(metric, dict):  # a summary written before stderr was recorded
        return "-" if metric is None else f"{metric:.0%}"
    return f"{metric['value']:.0%} ± {metric['stderr']:.0%} (n={metric['n']})"
