"""Configs you can see: `--print-config` on every config-taking verb, its sections in `--help`, `--version`.

A config-taking verb is registered through `configured("module:ConfigClass")`, which adds
`--print-config` to it and names the class its `--help` describes. With `--print-config`,
`build_config` prints the resolved config (defaults < CONFIG.yaml < flags < overrides, the
one precedence rule) as commented YAML and exits 0; fed back as CONFIG, that YAML resolves
to the same config.
"""

from __future__ import annotations

import contextvars
import functools
import importlib
import inspect
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError

from lmforge.config import (
    commented_yaml,
    format_validation_error,
    merge_layers,
    section_class,
    section_summary,
)
from lmforge.errors import ConfigError

PIPELINE = "curate -> tokenizer -> tokenize -> pretrain (train) -> eval -> align (sft, dpo, rm, rl) -> export -> release -> serve"

_PRINTING: contextvars.ContextVar[bool] = contextvars.ContextVar("lmforge_print_config", default=False)

PrintConfig = Annotated[bool, typer.Option(
    "--print-config", help="print the resolved config (every key: its value and description) as YAML and exit "
    "without running; save it and pass it back as CONFIG to run exactly that")]


def configured(config: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a config-taking verb whose config is `config` ("module:Class"): it gains
    `--print-config`, and its `--help` lists the class's sections."""

    def wrap(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def verb(*args: Any, print_config: bool = False, **kwargs: Any) -> Any:
            token = _PRINTING.set(print_config)
            try:
                return function(*args, **kwargs)
            finally:
                _PRINTING.reset(token)

        signature = inspect.signature(function, eval_str=True)
        extra = inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=PrintConfig)
        verb.__signature__ = signature.replace(parameters=[*signature.parameters.values(), extra])  # type: ignore[attr-defined]
        verb.lmforge_config = config  # type: ignore[attr-defined]
        return verb

    return wrap


def printing() -> bool:
    """Whether this verb was asked for `--print-config` (then `build_config` prints, not runs)."""
    return _PRINTING.get()


def print_config(model: type[BaseModel], path: str | None, overrides: list[str],
                 base: dict[str, Any] | None, flags: dict[str, Any] | None) -> None:
    """Print the resolved config as commented YAML and exit 0. A bad key or value is the usual
    one-line error; required keys nobody set are printed as `null  # REQUIRED` (noted on stderr)."""
    data, source = merge_layers(model, path, overrides, base, flags)
    try:
        values = model.model_validate(data).model_dump(mode="json")
        missing: list[str] = []
        unmet: list[str] = []
    except ValidationError as err:
        missing = [key for e in err.errors() if e["type"] == "missing" for key in _required_keys(model, e["loc"])]
        # A whole-config check (loc ()) such as curate's "no input" is a note too, as a missing key is.
        unmet = [e["msg"].removeprefix("Value error, ") for e in err.errors() if not e["loc"] and e["type"] != "missing"]
        if any(e["type"] != "missing" and e["loc"] for e in err.errors()):
            raise ConfigError(format_validation_error(err, model, source)) from None
        values = data
    print_resolved(model, values, " < ".join(["built-in defaults", *([source] if source else []), "flags",
                                              "key=value overrides"]), missing, unmet)


def print_resolved(model: type[BaseModel], values: dict[str, Any], layers: str, missing: list[str] | None = None,
                   unmet: list[str] | None = None) -> None:
    """Print a resolved config (`layers`: where it came from) as commented YAML; exit 0."""
    typer.echo(f"# {model.__name__}, resolved: {layers}\n{commented_yaml(model, values)}")
    if missing:
        typer.echo(f"note: set {', '.join(repr(m) for m in missing)} before running "
                   "(in CONFIG.yaml, by its flag or as key=value)", err=True)
    for message in unmet or []:
        typer.echo(f"note: before running: {message}", err=True)
    raise typer.Exit(0)


def _required_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The required keys under a missing `loc`: itself, or a whole missing section's required keys."""
    cls: type[BaseModel] | None = model
    for part in loc:
        field = cls.model_fields.get(str(part)) if cls is not None else None
        cls = section_class(field.annotation) if field is not None else None
    if cls is None:
        return [".".join(map(str, loc))]
    return [key for name, field in cls.model_fields.items() if field.is_required()
            for key in _required_keys(model, (*loc, name))]


def config_class(dotted: str) -> type[BaseModel]:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


def sections_help(model: type[BaseModel], usage: str) -> str:
    """The epilog of a verb's --help: one line per config section, and where every key is."""
    from rich.markup import escape  # typer renders help as rich markup

    lines = [f"Config sections; every key, its value and description: {usage} ... --print-config"]
    keys = []
    for name, field in model.model_fields.items():
        if section_class(field.annotation) is None:
            keys.append(name)
        else:
            lines.append(f"  {name}: {escape(section_summary(model, name) or '-')}")
    if keys:
        lines.append(f"  top-level keys: {', '.join(keys)}")
    return "\n".join(lines)


def describe_sections(command: Any, argv: list[str]) -> None:
    """On `lmforge VERB --help`: give the verb's help its config sections (imported only then)."""
    if not {"--help", "-h"} & set(argv):
        return
    path = []
    for word in argv:
        commands = getattr(command, "commands", None)  # a group's (typer carries its own click)
        if commands is None or word.startswith("-") or word not in commands:
            break
        command, path = commands[word], [*path, word]
    dotted = getattr(getattr(command, "callback", None), "lmforge_config", None)
    if dotted is not None:
        command.epilog = sections_help(config_class(dotted), "lmforge " + " ".join(path))


def version_text() -> str:
    """`lmforge --version`: the installed package's version and torch's."""
    from importlib import metadata

    import lmforge

    try:
        version = metadata.version("lmforge")
    except metadata.PackageNotFoundError:  # a checkout on PYTHONPATH
        version = lmforge.__version__
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return f"lmforge {version} (torch {torch_version}, Python {sys.version.split()[0]})"
