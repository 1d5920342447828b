"""Interop verbs: `export` (a Hugging Face model dir), `import` (one into lmforge), `lora merge`."""

from __future__ import annotations

from typing import Annotated

import typer

from lmforge.cli.common import ConfigArgs, build_config, flags, negatable
from lmforge.cli.configdoc import configured

lora_app = typer.Typer(no_args_is_help=True, help="LoRA adapters.")



def export_model(
    model: Annotated[str, typer.Argument(help="run dir, checkpoint dir or model dir")],
    args: ConfigArgs = None,
    out: Annotated[str | None, typer.Option(help="Hugging Face model dir to write")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16")] = None,
    max_shard_size: Annotated[str | None, typer.Option(help="split weights past this size (5GB, 500MB)")] = None,
    name: Annotated[str | None, typer.Option(help="model name in the card")] = None,
    overwrite: Annotated[bool | None, typer.Option(help="replace an existing out dir")] = None,
    push_to_hub: Annotated[str | None, typer.Option(help="then upload the dir to this Hub model repo (org/name)")] = None,
    private: Annotated[bool, typer.Option("--private", help="--push-to-hub: create the repo private")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="--push-to-hub: list what would be uploaded, send nothing")] = False,
):
    """Write a Hugging Face model dir (safetensors, config, tokenizer, chat template, card); --push-to-hub uploads it."""
    from lmforge.errors import ConfigError
    from lmforge.interop import export

    if (private or dry_run) and not push_to_hub:
        raise ConfigError("--private and --dry-run go with --push-to-hub REPO")
    if push_to_hub:
        from lmforge.interop.push import check_push

        check_push(push_to_hub, dry_run)  # a bad id or offline mode fails before the export

    config = build_config(export.ExportConfig, args, flags(
        model=model, out=out, dtype=dtype, max_shard_size=max_shard_size, name=name,
    ) | negatable(overwrite=overwrite))
    result = export.run(config)
    typer.echo(f"{result.params:,} params ({result.dtype}) -> {result.out}: {', '.join(result.files)}")
    typer.echo(f"load it: AutoModelForCausalLM.from_pretrained({str(result.out)!r})")
    if push_to_hub:
        from lmforge.interop.push import push_to_hub as push

        typer.echo("\n".join(push(result.out, push_to_hub, private=private, dry_run=dry_run).lines))


def import_model(
    source: Annotated[str, typer.Argument(help="Hugging Face Llama/Mistral/Qwen2 model dir or Hub id org/name[@revision]")],
    args: ConfigArgs = None,
    out: Annotated[str | None, typer.Option(help="model dir (or run dir with --to checkpoint) to write")] = None,
    to: Annotated[str | None, typer.Option(help="model | checkpoint")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | float32 | bfloat16 | float16")] = None,
    max_seq_len: Annotated[int | None, typer.Option(help="cap the context length")] = None,
    overwrite: Annotated[bool | None, typer.Option(help="replace an existing out dir")] = None,
):
    """Bring a Hugging Face Llama-family model (a dir or a Hub id) into lmforge (eval, fine-tune, serve)."""
    from lmforge.interop import importer

    config = build_config(importer.ImportConfig, args, flags(
        source=source, out=out, to=to, dtype=dtype, max_seq_len=max_seq_len,
    ) | negatable(overwrite=overwrite))
    result = importer.run(config)
    typer.echo(f"{result.architecture}, {result.params:,} params ({result.dtype}) -> {result.out}")


@lora_app.command("merge")
@configured("lmforge.interop.export:ExportConfig")
def lora_merge(
    source: Annotated[str, typer.Argument(help="LoRA run dir, its checkpoint, or an adapter dir")],
    args: ConfigArgs = None,
    out: Annotated[str | None, typer.Option(help="model dir to write")] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 | bfloat16 | float16")] = None,
    base: Annotated[str | None, typer.Option(help="the base model's path, if it moved (its weights' hash is checked)")] = None,
    overwrite: Annotated[bool | None, typer.Option(help="replace an --out dir that is not an lmforge model dir")] = None,
):
    """Fold LoRA adapters into their base model and write a Hugging Face model dir."""
    from lmforge.interop import export

    config = build_config(export.ExportConfig, args, flags(model=source, out=out, dtype=dtype, base=base)
                          | negatable(overwrite=overwrite))
    result = export.run(config)
    typer.echo(f"merged {result.params:,} params ({result.dtype}) -> {result.out}")
