"""The `lmforge` command: one thin verb per stage. Each parses, then calls `<stage>.run(config)`.

Every verb is a plain function in the module of its group (data, train, eval, infer,
safety, interop, runs, quickstart), registered on `app` below. Config-taking verbs accept
`[CONFIG.yaml] [flags] [section.key=value ...]` and resolve them with
`lmforge.cli.common.build_config`; user errors print one line and exit 2.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import click
import typer

from lmforge import extras
from lmforge.cli import configdoc, data, infer, interop, quickstart, runs, safety, train, verify
from lmforge.cli.eval import eval_app
from lmforge.cli.scaling import scaling_app
from lmforge.cli.sweep import sweep_app
from lmforge.errors import LmforgeError

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=f"lmforge, one tool for a language model's whole life: {configdoc.PIPELINE}; "
    "`lmforge quickstart` runs the spine on bundled data.",
    epilog="Config-taking verbs resolve one rule: built-in defaults < CONFIG.yaml < flags < "
    "section.key=value overrides, merged key by key into each section; `lmforge VERB --help` lists "
    "its config sections and `lmforge VERB --print-config` prints every key. Outputs replace only "
    "what lmforge wrote (or with --overwrite). LMFORGE_DEBUG=1 or --debug shows tracebacks.",
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(configdoc.version_text())
        raise typer.Exit(0)


@app.callback()
def _root(version: Annotated[bool, typer.Option(
    "--version", "-V", is_eager=True, callback=_show_version, help="print lmforge's and torch's versions and exit")] = False) -> None:
    pass


configured = configdoc.configured  # a config-taking verb: --print-config, its sections in --help
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train and use byte-level BPE tokenizers.")
tokenizer_app.command("train")(configured("lmforge.data.tokenizer_train:TokenizerTrainConfig")(data.tokenizer_train))
tokenizer_app.command("encode")(data.tokenizer_encode)
tokenizer_app.command("decode")(data.tokenizer_decode)

# `lmforge --help` lists the verbs in this order (the spine first), then the groups.
app.command()(configured("lmforge.quickstart:QuickstartConfig")(quickstart.quickstart))
app.command()(configured("lmforge.data.tokenize:TokenizeConfig")(data.tokenize))
app.command()(configured("lmforge.data.curate.config:CurateConfig")(data.curate))
app.command()(configured("lmforge.train.config:TrainConfig")(train.train))
app.command()(infer.generate)
app.command()(infer.chat)
app.command()(configured("lmforge.serve.config:ServeConfig")(infer.serve))
app.command()(runs.report)
app.command()(configured("lmforge.safety.release:ReleasePolicy")(safety.release))
app.command()(configured("lmforge.align.config:AlignConfig")(train.sft))
app.command()(configured("lmforge.align.config:AlignConfig")(train.dpo))
app.command()(configured("lmforge.align.config:AlignConfig")(train.rm))
app.command()(configured("lmforge.align.rl_config:RLConfig")(train.rl))
app.command()(safety.redteam)
app.command("train-classifier")(configured("lmforge.safety.classifier:ClassifierConfig")(safety.train_classifier))
app.command("export")(configured("lmforge.interop.export:ExportConfig")(interop.export_model))
app.command("import")(configured("lmforge.interop.importer:ImportConfig")(interop.import_model))
app.command()(verify.verify)
app.add_typer(tokenizer_app, name="tokenizer")
app.add_typer(eval_app, name="eval")
app.add_typer(runs.runs_app, name="runs")
app.add_typer(interop.lora_app, name="lora")
app.add_typer(runs.configs_app, name="configs")
app.add_typer(sweep_app, name="sweep")
app.add_typer(scaling_app, name="scaling")


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
    configdoc.describe_sections(command, argv)  # `VERB --help`: its config sections
    verb = next((a for a in argv if not a.startswith("-")), "")
    try:
        # Without standalone mode, click returns a raised typer.Exit's code instead of exiting.
        code = command.main(args=argv, prog_name="lmforge", standalone_mode=False)
        if isinstance(code, int):
            return code
    except _EXIT as err:
        return err.exit_code
    except (*_ABORT, KeyboardInterrupt):
        print("aborted", file=sys.stderr)
        return 130
    except _USAGE as err:  # a bad option or a missing argument: click's own message, exit 2
        err.show()
        return 2
    except Exception as err:
        if debug:
            raise
        if isinstance(err, ModuleNotFoundError) and extras.install_hint(err.name or ""):
            err = extras.missing(err.name, f"lmforge {verb}")  # a capability's extra is not installed
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


# typer >= 0.25 raises its own Exit/Abort and carries its own copy of click, whose usage errors
# derive from typer.exceptions.TyperException; plain click's are caught too.
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_USAGE = (click.ClickException, typer.exceptions.TyperException)


def entry() -> None:
    sys.exit(main())
