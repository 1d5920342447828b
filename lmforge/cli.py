"""The `lmforge` command: one thin verb per stage. Each parses, then calls `<stage>.run(config)`.

Config-taking verbs accept `[CONFIG.yaml] [section.key=value ...]`; user errors print one
line and exit 2.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from pydantic import BaseModel

from lmforge.errors import ConfigError, LmforgeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="lmforge: curate -> tokenizer -> pretrain -> evaluate -> align -> serve -> monitor, one tool.",
    epilog="Config-taking verbs resolve one rule: built-in defaults < CONFIG.yaml < flags < "
    "section.key=value overrides, merged key by key into each section. Outputs replace only "
    "what lmforge wrote (or with --overwrite). LMFORGE_DEBUG=1 or --debug shows tracebacks.",
)
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train and use byte-level BPE tokenizers.")
app.add_typer(tokenizer_app, name="tokenizer")
runs_app = typer.Typer(no_args_is_help=True, help="List, inspect and compare run dirs.")
app.add_typer(runs_app, name="runs")
lora_app = typer.Typer(no_args_is_help=True, help="LoRA adapters.")
app.add_typer(lora_app, name="lora")

ConfigArgs = Annotated[
    list[str] | None,
    typer.Argument(
        help="optional CONFIG.yaml (or a shipped config's name: `lmforge configs`), then section.key=value "
        "overrides. Precedence: built-in defaults "
        "< CONFIG.yaml < flags < section.key=value; each merges into its section key by key",
        show_default=False,
    ),
]


def _config(model: type[BaseModel], args: list[str] | None, flags: dict[str, Any] | None = None,
            base: dict[str, Any] | None = None):
    """Split positional args into one optional YAML file and key=value overrides, then resolve
    defaults (+ the verb's `base`) < YAML < `flags` < overrides."""
    from lmforge.config import load_config
    from lmforge.shipped import config_path

    path, overrides = None, []
    for arg in args or []:
        if "=" in arg:
            overrides.append(arg)
        elif path is None:  # a YAML file, or a shipped config by name (`lmforge configs`)
            path = str(config_path(arg))
        else:
            raise ConfigError(f"unexpected argument {arg!r}: expected one CONFIG.yaml or section.key=value")
    return load_config(model, path, overrides, base=base, flags=flags)


def _flags(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


@app.command()
def quickstart(
    args: ConfigArgs = None,
    out: Annotated[str | None, typer.Option(help="work dir")] = None,
    overwrite: Annotated[bool, typer.Option(help="use an --out dir that lmforge's quickstart did not write")] = False,
):
    """Run the whole spine on the bundled corpus: tokenizer, tokens, pretraining, eval, sample."""
    from rich.console import Console
    from rich.table import Table

    from lmforge import quickstart as qs

    config = _config(qs.QuickstartConfig, args, _flags(out=out, overwrite=overwrite or None))
    results = qs.run(config)
    table = Table(title=f"lmforge quickstart -> {config.out}")
    for column in ("stage", "status", "seconds", "outputs"):
        table.add_column(column)
    for r in results:
        table.add_row(r.name, r.status, f"{r.seconds:.1f}", "\n".join(r.outputs))
    console = Console()
    console.print(table)
    curated = next((r for r in results if r.name == "curate"), None)
    if curated is not None:
        removed = ", ".join(f"{k} {v}" for k, v in curated.details["removed"].items()) or "nothing"
        console.print(f"[bold]curate[/] {curated.details['records']:,} records -> {curated.details['docs']:,} "
                      f"documents; removed: {removed} (report: {Path(config.out) / 'curated' / 'report.md'})")
    train = next(r for r in results if r.name == "train").details
    sample = next(r for r in results if r.name == "sample").details
    console.print(
        f"[bold]model[/] {train['params']:,} params, {train['steps']} steps; "
        f"train loss {train['first_loss']:.3f} -> {train['final_loss']:.3f}; "
        f"val loss {train['val_loss']:.3f}, {train['val_bpb']:.3f} bits/byte"
    )
    console.print(f"[bold]sample[/] {sample['prompt']}[italic]{sample['completion']}[/]", markup=True)
    sft = next((r for r in results if r.name == "sft"), None)
    if sft is not None:
        console.print(f"[bold]sft[/] {sft.details['conversations']} conversations, {sft.details['steps']} steps; "
                      f"loss {sft.details['first_loss']:.3f} -> {sft.details['final_loss']:.3f}")
    safety = next((r for r in results if r.name == "safety"), None)
    if safety is not None:
        for name, values in safety.details.items():
            console.print(f"[bold]safety[/] {name}: refusal rate on harmful requests "
                          f"{values.get('safety_harmful/refusal_rate', 0):.0%}, on benign ones "
                          f"{values.get('safety_benign/over_refusal_rate', 0):.0%}")
    model_dir = next((r for r in results if r.name == "export"), None)
    if model_dir is not None:
        path = model_dir.details["model_dir"]
        console.print(f"[bold]model dir[/] {path} (Hugging Face format); load it with", soft_wrap=True)
        for line in (
            f"  AutoModelForCausalLM.from_pretrained({path!r})",
            f"  AutoTokenizer.from_pretrained({path!r})",
            f"  or: lmforge generate {path} --prompt '...'",
        ):
            console.print(line, soft_wrap=True, markup=False)
    console.print(f"summary: {Path(config.out) / 'summary.json'}")


@tokenizer_app.command("train")
def tokenizer_train(
    inputs: Annotated[list[str], typer.Option("--input", "-i", help="file or dir (repeatable)")],
    out: Annotated[str, typer.Option(help="output dir for tokenizer.json")],
    vocab_size: Annotated[int, typer.Option(help="vocabulary size, special tokens included")] = 8192,
    min_frequency: int = 2,
    text_field: str = "text",
    text_split: Annotated[str, typer.Option(help="txt files: file | paragraph | line")] = "file",
    overwrite: Annotated[bool, typer.Option(help="replace a tokenizer.json in --out that lmforge did not train")] = False,
):
    """Train a byte-level BPE tokenizer with lmforge's special tokens."""
    from lmforge import tokenizer as tk
    from lmforge.config import build

    config = build(tk.TokenizerTrainConfig, dict(
        inputs=inputs, out=out, vocab_size=vocab_size, min_frequency=min_frequency,
        text_field=text_field, text_split=text_split, overwrite=overwrite,
    ))
    trained = tk.run_train(config)
    typer.echo(f"tokenizer with {trained.vocab_size} tokens -> {Path(out) / tk.TOKENIZER_FILE}")


@tokenizer_app.command("encode")
def tokenizer_encode(tokenizer: str, text: Annotated[str, typer.Argument(help="text; - reads stdin")]):
    """Print the token ids of TEXT, space-separated."""
    from lmforge.tokenizer import load_tokenizer

    text = sys.stdin.read() if text == "-" else text
    typer.echo(" ".join(map(str, load_tokenizer(tokenizer).encode(text))))


@tokenizer_app.command("decode")
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


@app.command()
def tokenize(
    args: ConfigArgs = None,
    inputs: Annotated[list[str] | None, typer.Option("--input", "-i", help="file or dir (repeatable)")] = None,
    tokenizer: Annotated[str | None, typer.Option(help="tokenizer dir or tokenizer.json")] = None,
    out: Annotated[str | None, typer.Option(help="token dataset dir")] = None,
    workers: Annotated[int | None, typer.Option(help="encoding processes")] = None,
    val_fraction: Annotated[float | None, typer.Option(help="share of documents held out")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an --out dir that lmforge's tokenize did not write")] = False,
):
    """Encode documents into a token dataset dir (shards + manifest.json) with a validation split."""
    from lmforge.data import tokenize as tok

    config = _config(tok.TokenizeConfig, args, _flags(
        inputs=inputs, tokenizer=tokenizer, out=out, num_workers=workers, val_fraction=val_fraction,
        overwrite=overwrite or None,
    ))
    manifest = tok.run(config)
    splits = ", ".join(f"{s}: {v['tokens']:,} tokens / {v['documents']:,} docs" for s, v in manifest["splits"].items())
    typer.echo(f"{config.out}: {splits}")


@app.command()
def curate(
    args: ConfigArgs = None,
    inputs: Annotated[list[str] | None, typer.Option("--input", "-i", help="file, dir or fsspec URL (repeatable)")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="output dir (shards + report)")] = None,
    workers: Annotated[int | None, typer.Option(help="worker processes (executor.workers)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace output dirs that lmforge's curate did not write")] = False,
):
    """Curate raw text with datatrove: filters, PII scrubbing, dedup, decontamination, and a report."""
    from lmforge.data import curate as cur

    flags: dict[str, Any] = {}
    if inputs:
        flags["input"] = {"paths": inputs}
    if output:
        flags["output"] = {"dir": output}
    if workers:
        flags["executor"] = {"workers": workers}
    if overwrite:
        flags.setdefault("output", {})["overwrite"] = True
    result = cur.run(_config(cur.CurateConfig, args, flags))
    report = result.report
    for warning in report["warnings"]:
        typer.secho(f"WARNING: {warning}", fg="red", bold=True, err=True)
    typer.echo(f"{report['input']['records']:,} records -> {report['output']['docs']:,} documents "
               f"({report['removed_share']:.1%} removed) in {report['seconds']:.1f}s -> {result.out}")
    typer.echo(f"report: {result.out / 'report.md'}, {result.out / 'funnel.png'}")


@app.command()
def train(
    args: ConfigArgs = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's latest complete checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace what an earlier run left in the run dir (a different config, tokenizer or data)")] = False,
    profile: Annotated[str | None, typer.Option(help="steps=A:B: torch profiler trace into RUN/profile/")] = None,
    nproc: Annotated[int | None, typer.Option(help="launch this many processes with torchrun (one node)")] = None,
    max_restarts: Annotated[int, typer.Option(help="--nproc: relaunches after a process dies")] = 0,
):
    """Pretrain a model: `lmforge train configs/pretrain-small.yaml data.dataset=DIR`.

    Several processes: `lmforge train CONFIG parallel.strategy=fsdp --nproc 8`, or
    `torchrun --nproc_per_node 8 -m lmforge train CONFIG parallel.strategy=fsdp`.
    """
    from lmforge.train import trainer
    from lmforge.train.config import TrainConfig

    config = _config(TrainConfig, [*(args or []), *([f"train.profile={profile}"] if profile else [])])
    _torchrun(nproc, max_restarts, config.parallel.strategy,
              ["train", *(args or []), *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else []),
               *([f"--profile={profile}"] if profile else [])])
    result = trainer.run(config, resume=resume, overwrite=overwrite)
    summary = f"{result.status} at step {result.step}; run dir {result.run_dir}"
    if result.val_loss is not None:
        summary += f"; val loss {result.val_loss:.4f}, {result.val_bpb:.4f} bits/byte"
    if os.environ.get("RANK", "0") == "0":  # one summary per run
        typer.echo(summary)
    if result.signal is not None:
        raise typer.Exit(128 + result.signal)


def _engine_and_params(model: str, device: str, compile: bool, **sampling):
    """The inference engine (one sequence) on MODEL and validated sampling parameters."""
    from lmforge.serve.config import EngineConfig
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams

    try:
        params = SamplingParams(**sampling)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    engine = Engine.from_path(model, EngineConfig(max_num_seqs=1, device=device, compile=compile))
    return engine, params


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="model dir, run dir or checkpoint dir")],
    prompt: Annotated[str, typer.Option(help="text to continue")] = "",
    max_tokens: int = 128,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeatable)")] = None,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "cpu",
    compile: Annotated[bool, typer.Option(help="torch.compile the decode step")] = False,
):
    """Sample a continuation of PROMPT with the inference engine (KV cache, streaming)."""
    engine, params = _engine_and_params(model, device, compile, max_tokens=max_tokens, temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=seed, stop=stop or [],
                                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty)
    with engine:
        handle = engine.submit(prompt, params)
        typer.echo(prompt, nl=False)
        for output in handle:
            typer.echo(output.text, nl=False)
        typer.echo()


def _split_list(values: list[str] | None) -> list[str]:
    return [item.strip() for value in values or [] for item in value.split(",") if item.strip()]


@app.command("eval")
def eval_model(
    model: Annotated[str, typer.Argument(help="model dir, run dir or checkpoint dir; or `compare`")],
    others: Annotated[list[str] | None, typer.Argument(help="compare: the models to tabulate", show_default=False)] = None,
    tasks: Annotated[list[str] | None, typer.Option("--tasks", "-t", help="shipped task names, task YAMLs or JSONL files (comma-separated or repeated)")] = None,
    data: Annotated[list[str] | None, typer.Option("--data", "-d", help="text/jsonl/parquet file or token dataset dir: bits per byte")] = None,
    harness: Annotated[list[str] | None, typer.Option(help="lm-evaluation-harness task names")] = None,
    include_path: Annotated[str | None, typer.Option(help="extra harness task YAMLs")] = None,
    limit: Annotated[int | None, typer.Option(help="first N examples per task")] = None,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    seed: int = 1234,
    out: Annotated[str | None, typer.Option(help="results dir (default: the model's eval/)")] = None,
):
    """Evaluate a model (`lmforge eval MODEL --tasks python_mc`) or compare results (`lmforge eval compare A B`)."""
    from rich.console import Console
    from rich.table import Table

    from lmforge.config import build
    from lmforge.eval import runner

    console = Console()
    if model == "compare":
        header, rows = runner.compare(others or [])
        table = Table(title="lmforge eval compare")
        for column in header:
            table.add_column(column)
        for row in rows:
            table.add_row(*row)
        console.print(table)
        return
    if others:
        raise ConfigError(f"unexpected arguments {' '.join(others)!r} (one model per eval; `lmforge eval compare A B` compares)")
    config = build(runner.EvalConfig, _flags(
        model=model, tasks=_split_list(tasks), data=_split_list(data), harness=_split_list(harness),
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
    console.print(table)
    if config.save:
        console.print(f"results: {Path(config.out) if config.out else runner.eval_dir(Path(model))}/")


@app.command()
def chat(
    model: Annotated[str, typer.Argument(help="model dir, run dir or checkpoint dir")],
    system: Annotated[str | None, typer.Option(help="system message")] = None,
    max_tokens: int = 256,
    temperature: float = 0.7,
    top_k: int | None = None,
    top_p: float = 0.95,
    seed: int | None = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda")] = "cpu",
    compile: Annotated[bool, typer.Option(help="torch.compile the decode step")] = False,
):
    """Chat in the terminal (or over a pipe: one user turn per line). /reset clears, /exit quits."""
    from lmforge.chat import ChatSession

    engine, params = _engine_and_params(model, device, compile, max_tokens=max_tokens, temperature=temperature,
                                        top_k=top_k, top_p=top_p, seed=seed)
    session = ChatSession(engine, params, system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            typer.echo("you> ", nl=False)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            session.reset()
            continue
        if not text.strip():
            continue
        typer.echo("assistant> ", nl=False)
        for piece in session.send(text):
            typer.echo(piece, nl=False)
        typer.echo()
    engine.shutdown(drain=False)


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="model dir, run dir or checkpoint dir")],
    args: ConfigArgs = None,
    host: Annotated[str | None, typer.Option(help="address to bind (server.host)")] = None,
    port: Annotated[int | None, typer.Option(help="port (server.port)")] = None,
    api_keys_file: Annotated[str | None, typer.Option(help="lines of name:key or name:sha256:HEX")] = None,
    device: Annotated[str | None, typer.Option(help="engine.device: auto, cpu, cuda")] = None,
    allow_unreleased: Annotated[bool, typer.Option(
        "--allow-unreleased", help="serve without a passing `lmforge release` record (allow_unreleased)")] = False,
):
    """OpenAI-compatible server: /v1/completions, /v1/chat/completions, /metrics, ... (Ctrl-C drains).

    The model needs a passing release record for its weights (`lmforge release MODEL --policy ...`)
    unless --allow-unreleased is given."""
    from lmforge.serve import server
    from lmforge.serve.config import ServeConfig

    flags: dict[str, Any] = {"model": model}
    server_flags = _flags(host=host, port=port)
    if server_flags:
        flags["server"] = server_flags
    if api_keys_file is not None:
        flags["auth"] = {"api_keys_file": api_keys_file}
    if device is not None:
        flags["engine"] = {"device": device}
    if allow_unreleased:
        flags["allow_unreleased"] = True
    server.run(_config(ServeConfig, args, flags))


def _print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in header:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


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
    _print_table(f"runs in {root}", ["run", "kind", "status", "step", "tokens", "loss", "best val", "evals", "parent"], rows)


@runs_app.command("show")
def runs_show(run: Annotated[str, typer.Argument(help="run dir")]):
    """Everything about one run: summary, evals, lineage and config."""
    from lmforge.monitor import catalog

    r = catalog.summarize(run)
    rows = [[k, catalog.fmt(v)] for k, v in catalog.metric_rows([r])]
    rows += [["checkpoint", r.checkpoint or "-"], ["parent", r.parent or "-"], ["created", r.created_at or "-"]]
    rows += [[f"config {k}", str(v)] for k, v in catalog.flatten(r.config).items()]
    _print_table(f"run {r.path}", ["", "value"], rows)


@runs_app.command("compare")
def runs_compare(runs: Annotated[list[str], typer.Argument(help="run dirs")]):
    """Metrics side by side and only the config keys that differ."""
    from lmforge.monitor import catalog

    summaries = [catalog.summarize(r) for r in runs]
    names = [s.name for s in summaries]
    _print_table("metrics", ["", *names], [[k, *map(catalog.fmt, v)] for k, v in catalog.metric_rows(summaries)])
    differences = catalog.config_differences(summaries)
    if differences:
        _print_table("config differences", ["key", *names], [[k, *map(str, v)] for k, v in differences])
    else:
        typer.echo("configs are identical (apart from run.name)")


@app.command()
def report(
    run: Annotated[str, typer.Argument(help="run dir")],
    out: Annotated[str | None, typer.Option(help="output dir (default RUN/report)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an --out dir that is not an lmforge report")] = False,
):
    """Write a self-contained HTML report of a run (curves, evals, lineage, card)."""
    from lmforge.monitor.report import render

    typer.echo(f"report: {render(run, out, overwrite)}")


@app.command()
def release(
    model: Annotated[str, typer.Argument(help="model dir, run dir or checkpoint dir")],
    policy: Annotated[str, typer.Option(help="release policy YAML (evals and thresholds)")],
    device: str = "cpu",
):
    """Run a release policy's evals and thresholds; write release.json (exit 1 if it fails)."""
    from lmforge.safety import release as gate

    result = gate.run(model, policy, device)
    rows = [[c["metric"], "-" if c["value"] is None else f"{c['value']:.4f}",
             "" if c["min"] is None else str(c["min"]), "" if c["max"] is None else str(c["max"]),
             "pass" if c["passed"] else "FAIL"] for c in result.record["checks"]]
    _print_table(f"release policy {result.record['policy']}", ["metric", "value", "min", "max", "result"], rows)
    typer.echo(f"{'PASSED' if result.passed else 'FAILED'}: {result.path}")
    if not result.passed:
        raise typer.Exit(1)


def _torchrun(nproc: int | None, max_restarts: int, strategy: str, command: list[str]) -> None:
    """`--nproc N` outside torchrun: relaunch this command under torchrun on N local processes."""
    if nproc is None or "WORLD_SIZE" in os.environ:
        return
    if nproc > 1 and strategy == "single":
        raise ConfigError(f"--nproc {nproc} needs parallel.strategy=ddp or fsdp (it is single)")
    import subprocess

    # --standalone: a c10d rendezvous on a free local port, which also serves relaunches.
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                f"--max-restarts={max_restarts}", "-m", "lmforge"]
    raise typer.Exit(subprocess.run([*launcher, *command]).returncode)


def _align(kind: str, model: str, args: list[str] | None, resume: bool, nproc: int | None, overwrite: bool = False) -> None:
    from lmforge.align import run as align_run
    from lmforge.align.config import AlignConfig

    config = _config(AlignConfig, args, flags={"model": model}, base={"run": {"name": kind}})
    _torchrun(nproc, 0, config.parallel.strategy,
              [kind, model, *(args or []), *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else [])])
    result = (align_run.run_sft if kind == "sft" else align_run.run_dpo)(config, resume=resume, overwrite=overwrite)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.val_metrics.items())
    if os.environ.get("RANK", "0") == "0":  # one summary per run
        typer.echo(f"{result.status} at step {result.step}; run dir {result.run_dir}" + (f"; {metrics}" if metrics else ""))
    if result.signal is not None:
        raise typer.Exit(128 + result.signal)


@app.command()
def sft(
    model: Annotated[str, typer.Argument(help="model to fine-tune: model dir, run dir or checkpoint")],
    args: ConfigArgs = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's latest checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace what an earlier run left in the run dir (a different config, tokenizer or data)")] = False,
    nproc: Annotated[int | None, typer.Option(help="launch this many processes with torchrun (parallel.strategy=ddp|fsdp)")] = None,
):
    """Supervised fine-tuning on chat conversations: `lmforge sft MODEL configs/sft.yaml data.train=...`."""
    _align("sft", model, args, resume, nproc, overwrite)


@app.command()
def dpo(
    model: Annotated[str, typer.Argument(help="model to align: model dir, run dir or checkpoint")],
    args: ConfigArgs = None,
    resume: Annotated[bool, typer.Option(help="continue from the run's latest checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace what an earlier run left in the run dir (a different config, tokenizer or data)")] = False,
    nproc: Annotated[int | None, typer.Option(help="launch this many processes with torchrun (parallel.strategy=ddp|fsdp)")] = None,
):
    """Direct preference optimisation on chosen/rejected pairs: `lmforge dpo MODEL configs/dpo.yaml`."""
    _align("dpo", model, args, resume, nproc, overwrite)


@lora_app.command("merge")
def lora_merge(
    source: Annotated[str, typer.Argument(help="LoRA run dir, its checkpoint, or an adapter dir")],
    out: Annotated[str, typer.Option(help="model dir to write")],
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    base: Annotated[str | None, typer.Option(help="the base model's path, if it moved (its weights' hash is checked)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an --out dir that is not an lmforge model dir")] = False,
):
    """Fold LoRA adapters into their base model and write a Hugging Face model dir."""
    from lmforge.config import build
    from lmforge.interop import export

    config = build(export.ExportConfig, _flags(model=source, out=out, dtype=dtype, overwrite=overwrite, base=base))
    result = export.run(config)
    typer.echo(f"merged {result.params:,} params ({result.dtype}) -> {result.out}")


@app.command()
def redteam(
    url: Annotated[str, typer.Argument(help="the server's OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")],
    out: Annotated[str, typer.Option(help="dir for redteam.json/.md and garak's files")],
    model_name: Annotated[str, typer.Option(help="the model id the server serves")] = "lmforge",
    probes: Annotated[str, typer.Option(help="default, smoke, or comma-separated garak probes")] = "default",
    garak: Annotated[str | None, typer.Option(help="python of garak's venv (default: $LMFORGE_GARAK_PYTHON or .venv-garak/bin/python)")] = None,
    api_key_env: Annotated[str, typer.Option(help="env var holding the server's API key")] = "LMFORGE_REDTEAM_KEY",
    generations: int = 1,
    prompt_cap: Annotated[int | None, typer.Option(help="at most this many prompts per probe")] = None,
    max_tokens: int = 150,
    report: Annotated[str | None, typer.Option(help="summarize this garak report.jsonl instead of running garak")] = None,
):
    """Red-team a running `lmforge serve` with garak's offline probes; summarize its report (docs/redteam.md)."""
    from pathlib import Path

    from lmforge.safety import redteam as rt

    if report is not None:
        summary = rt.summarize(Path(report))
        rt.write_summary(summary, Path(out))
    else:
        chosen = {"default": rt.DEFAULT_PROBES, "smoke": rt.SMOKE_PROBES}.get(probes) or _split_list([probes])
        python = garak or os.environ.get("LMFORGE_GARAK_PYTHON") or ".venv-garak/bin/python"
        summary = rt.run_garak(url, model_name, Path(out), chosen, python, generations, os.environ.get(api_key_env),
                               prompt_cap=prompt_cap, max_tokens=max_tokens)
    typer.echo(rt.summary_markdown(summary))


@app.command("train-classifier")
def train_classifier(
    model: Annotated[str, typer.Argument(help="base lmforge model: model dir, run dir or checkpoint")],
    data: Annotated[str, typer.Option(help="labelled JSONL: text + labels / label")],
    out: Annotated[str, typer.Option(help="classifier dir to write")],
    epochs: int = 20,
    lr: float = 3e-3,
    train_base: Annotated[bool, typer.Option(help="fine-tune the whole model, not only the head")] = False,
    threshold: float = 0.5,
    overwrite: Annotated[bool, typer.Option(help="replace an --out dir that is not an lmforge classifier")] = False,
):
    """Train a moderation classifier (a head on an lmforge model) from labelled JSONL."""
    from lmforge.config import build
    from lmforge.safety import classifier

    config = build(classifier.ClassifierConfig, dict(
        model=model, data=data, out=out, epochs=epochs, lr=lr, train_base=train_base, threshold=threshold,
        overwrite=overwrite,
    ))
    metrics = classifier.run(config)
    for name, values in metrics.get("categories", {}).items():
        typer.echo(f"{name}: precision {values['precision']}, recall {values['recall']} (support {values['support']})")
    typer.echo(f"classifier -> {out}")


@app.command("export")
def export_model(
    model: Annotated[str, typer.Argument(help="run dir, checkpoint dir or model dir")],
    out: Annotated[str, typer.Option(help="Hugging Face model dir to write")],
    dtype: Annotated[str, typer.Option(help="float32 | bfloat16 | float16")] = "float32",
    max_shard_size: Annotated[str, typer.Option(help="split weights past this size (5GB, 500MB)")] = "5GB",
    name: Annotated[str | None, typer.Option(help="model name in the card")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing out dir")] = False,
):
    """Write a Hugging Face model dir (safetensors, config, tokenizer, chat template, card)."""
    from lmforge.config import build
    from lmforge.interop import export

    config = build(export.ExportConfig, _flags(
        model=model, out=out, dtype=dtype, max_shard_size=max_shard_size, name=name, overwrite=overwrite,
    ))
    result = export.run(config)
    typer.echo(f"{result.params:,} params ({result.dtype}) -> {result.out}: {', '.join(result.files)}")
    typer.echo(f"load it: AutoModelForCausalLM.from_pretrained({str(result.out)!r})")


@app.command("import")
def import_model(
    source: Annotated[str, typer.Argument(help="local Hugging Face Llama/Mistral/Qwen2 model dir")],
    out: Annotated[str, typer.Option(help="model dir (or run dir with --to checkpoint) to write")],
    to: Annotated[str, typer.Option(help="model | checkpoint")] = "model",
    dtype: Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")] = "auto",
    max_seq_len: Annotated[int | None, typer.Option(help="cap the context length")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing out dir")] = False,
):
    """Bring a local Hugging Face Llama-family model into lmforge (eval, fine-tune, serve)."""
    from lmforge.config import build
    from lmforge.interop import importer

    config = build(importer.ImportConfig, _flags(
        source=source, out=out, to=to, dtype=dtype, max_seq_len=max_seq_len, overwrite=overwrite,
    ))
    result = importer.run(config)
    typer.echo(f"{result.architecture}, {result.params:,} params ({result.dtype}) -> {result.out}")


def _os_error_message(err: OSError) -> str:
    """`[Errno 28] No space left on device` -> 'no space left on device: PATH' (one line)."""
    reason = (err.strerror or str(err)).rstrip(".")
    where = ", ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    return f"{reason[:1].lower()}{reason[1:]}: {where}" if where else reason


def _crash_report(argv: list[str], err: BaseException) -> str:
    """Write the traceback of an unexpected error to a log file; return the file's path."""
    import tempfile
    import traceback

    directory = Path(os.environ.get("LMFORGE_LOG_DIR") or Path(tempfile.gettempdir()) / "lmforge")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(f"lmforge {' '.join(argv)}\n\n" + "".join(traceback.format_exception(err)), encoding="utf-8")
        return str(path)
    except OSError:
        return "(could not write a log file; rerun with --debug)"


configs_app = typer.Typer(help="The YAML recipes that ship with lmforge; every config-taking verb accepts one by name.")
app.add_typer(configs_app, name="configs")


@configs_app.callback(invoke_without_command=True)
def configs_list(ctx: typer.Context):
    """List the shipped configs: `lmforge sft MODEL sft` uses one by name; `configs show NAME` prints it."""
    if ctx.invoked_subcommand is not None:
        return
    from rich.markup import escape

    from lmforge.shipped import shipped_configs

    rows = [[c.name, escape(c.description)] for c in shipped_configs()]
    _print_table("shipped configs (lmforge configs show NAME)", ["name", "description"], rows)


@configs_app.command("show")
def configs_show(
    name: Annotated[str, typer.Argument(help="a shipped config's name, e.g. sft")],
    path: Annotated[bool, typer.Option("--path", help="print where the file is instead of its text")] = False,
):
    """Print a shipped config, e.g. to copy and edit it: `lmforge configs show sft > my-sft.yaml`."""
    from lmforge.shipped import shipped_config

    config = shipped_config(name)
    typer.echo(str(config.path) if path else config.path.read_text(encoding="utf-8"), nl=path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere (or LMFORGE_DEBUG=1) lets every error raise with its traceback.
    if "--debug" in argv:
        argv.remove("--debug")
        os.environ["LMFORGE_DEBUG"] = "1"  # torchrun relaunches inherit it
    debug = os.environ.get("LMFORGE_DEBUG", "") not in ("", "0")
    logging.basicConfig(
        # Under torchrun only rank 0 logs progress; the others report warnings and errors.
        level=os.environ.get("LMFORGE_LOG_LEVEL", "INFO" if os.environ.get("RANK", "0") == "0" else "WARNING"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    command = typer.main.get_command(app)
    verb = next((a for a in argv if not a.startswith("-")), "")
    try:
        # Without standalone mode, click returns a raised typer.Exit's code instead of exiting.
        code = command.main(args=argv, prog_name="lmforge", standalone_mode=False)
        if isinstance(code, int):
            return code
    except click.exceptions.Exit as err:
        return err.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        return 130
    except click.ClickException as err:
        err.show()
        return 2
    except Exception as err:
        if debug:
            raise
        if isinstance(err, LmforgeError):  # the user's input: one line naming what is wrong
            print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        if isinstance(err, OSError):  # missing, unwritable or full paths are the user's to fix
            print(f"error: {_os_error_message(err)}", file=sys.stderr)
            return 2
        if isinstance(err, MemoryError):
            print(f"error: out of memory while running `lmforge {verb}` (try a smaller batch or model)", file=sys.stderr)
            return 2
        log_path = _crash_report(argv, err)
        message = " ".join(str(err).split())[:300]
        print(f"error: unexpected {type(err).__name__} while running `lmforge {verb}`: {message} "
              f"(traceback in {log_path}; rerun with --debug to see it)", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
