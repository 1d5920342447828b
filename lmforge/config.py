"""Typed configs: YAML files plus `section.key=value` overrides, validated before any work.

Every stage takes one pydantic model, resolved by one precedence rule for every verb:

    built-in defaults < CONFIG.yaml < command-line flags < section.key=value overrides

Each layer merges into the sections below it key by key: `train.max_steps=50` changes one
key and keeps the rest of `train` (including a verb's own section defaults, such as SFT's
smaller batch). Unknown keys and bad values raise `ConfigError` naming the key, what is
allowed and the closest valid spelling; the resolved config is what a run saves.
"""

from __future__ import annotations

import copy
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from lmforge.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a YAML text file (not UTF-8)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 3e-4); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"bad override {text!r}: expected section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"bad override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


PRECEDENCE = "built-in defaults < CONFIG.yaml < flags < section.key=value overrides"


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at `loc` (for unknown-key errors)."""
    cls: Any = model
    for part in loc[:-1]:
        field = cls.model_fields.get(part) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return []
        cls = field.annotation
        for arg in typing.get_args(cls) or ():
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                cls = arg
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return []


def format_validation_error(err: ValidationError, model: type[BaseModel], source: str) -> str:
    # An unknown key first: a misspelt required key also reports the real one as missing.
    first = next((e for e in err.errors() if e["type"] == "extra_forbidden"), err.errors()[0])
    loc = tuple(first["loc"])
    key = ".".join(str(p) for p in loc)
    if not key:  # a whole-model check (e.g. seq_len vs max_seq_len): its message names the keys
        message = first["msg"].removeprefix("Value error, ")
    elif first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc)
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        prefix = ".".join(str(p) for p in loc[:-1])
        hint = f"; did you mean {'.'.join(filter(None, [prefix, close[0]]))!r}?" if close else ""
        hint += f" (allowed: {', '.join(allowed)})" if allowed else ""
        message = f"unknown key {key!r}{hint}"
    elif first["type"] == "missing":
        missing = [".".join(str(p) for p in e["loc"]) for e in err.errors() if e["type"] == "missing"]
        message = f"missing required {', '.join(repr(m) for m in missing)} (set it in CONFIG.yaml, by its flag or as key=value)"
        more_count = len(err.errors()) - len(missing)
        if more_count:
            message += f" (and {more_count} more problem{'s' if more_count > 1 else ''})"
        return f"{source}: {message}" if source else message
    else:
        message = f"bad value for {key!r}: {first['msg'].removeprefix('Value error, ')}"
        if "input" in first and not isinstance(first["input"], dict):
            message += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    if more:
        message += f" (and {more} more problem{'s' if more > 1 else ''})"
    return f"{source}: {message}" if source else message


def build(model: type[T], data: dict[str, Any], source: str = "") -> T:
    """Validate `data` into `model`, turning pydantic's report into a one-line ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, model, source)) from None


def section_defaults(model: type[BaseModel]) -> dict[str, Any]:
    """The values a model's section defaults set beyond their class defaults, as nested dicts.

    `AlignConfig.train` defaults to `LoopConfig(max_steps=200, ...)`; pydantic would build a
    `train:` mapping from a YAML or an override from `LoopConfig`'s class defaults and drop
    those. Merging the user's keys into this dict first keeps them.
    """
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            explicit = default.model_dump(exclude_unset=True)
            nested = section_defaults(type(default))
            out[name] = _deep_merge(nested, explicit)
    return out


def load_config(
    model: type[T],
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
) -> T:
    """Resolve `model` by the one precedence rule (see PRECEDENCE), merged per key.

    `base`: a verb's own defaults (below the YAML); `flags`: values of command-line
    options, nested by section (above the YAML, below `section.key=value` overrides).
    """
    return build(model, *merge_layers(model, path, overrides, base, flags))


def merge_layers(
    model: type[BaseModel],
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
    """The layers of `load_config` merged into one mapping, not yet validated; and its source."""
    defaults: dict[str, Any] = _deep_merge(section_defaults(model), copy.deepcopy(base or {}))
    given: dict[str, Any] = {}
    source = ""
    if path is not None:
        given = read_yaml(path)
        source = str(path)
    given = _deep_merge(given, copy.deepcopy(flags or {}))
    given = apply_overrides(given, list(overrides or []))
    for name, section in defaults.items():
        # A preset names a whole section (a model's shape): the user's preset replaces the
        # default section rather than keeping its other values (dim, layers, ...).
        chosen = given.get(name)
        if isinstance(chosen, dict) and isinstance(section, dict) and chosen.get("preset", section.get("preset")) != section.get("preset"):
            defaults[name] = {}
    return _deep_merge(defaults, given), source


def _deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def to_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ------------------------------------------------------------------ configs that explain themselves

_REQUIRED = object()  # a required key nobody set: printed as null, marked REQUIRED


def section_class(annotation: Any) -> type[BaseModel] | None:
    """The Section a field holds (`RunConfig`, or `RunConfig | None`), else None."""
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    for candidate in (annotation, *(typing.get_args(annotation) if union else ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def key_description(field: Any) -> str:
    """A field's description plus, for a closed set of values, what is allowed."""
    choices = [c for arg in (field.annotation, *typing.get_args(field.annotation))
               if typing.get_origin(arg) is typing.Literal for c in typing.get_args(arg)]
    parts = [" ".join((field.description or "").split())]
    if choices:
        parts.append("one of: " + ", ".join(str(c) for c in choices))
    return "; ".join(p for p in parts if p)


def section_summary(model: type[BaseModel], name: str) -> str:
    """One line about a section of `model`: its field's description, else its class docstring."""
    field = model.model_fields[name]
    cls = section_class(field.annotation)
    doc = (cls.__doc__ or "").strip().split("\n\n")[0] if cls is not None else ""
    return " ".join((field.description or doc).split())


def commented_yaml(model: type[BaseModel], values: dict[str, Any], indent: int = 0) -> str:
    """`values` (a config's `model_dump(mode="json")`, or a partial mapping) as YAML that loads
    back to the same config, each key followed by its description as a `#` comment; keys
    missing from `values` show their defaults, required ones `null  # REQUIRED`."""
    from pydantic_core import to_jsonable_python

    pad, lines = "  " * indent, []
    for name, field in model.model_fields.items():
        if name in values:
            value = values[name]
        elif field.is_required():
            value = _REQUIRED
        else:
            value = to_jsonable_python(field.get_default(call_default_factory=True))
        note = key_description(field)
        section = section_class(field.annotation)
        if section is not None and (isinstance(value, dict) or value is _REQUIRED):
            summary = section_summary(model, name)
            lines += [f"{pad}# {summary}"] if summary else []
            body = commented_yaml(section, value if isinstance(value, dict) else {}, indent + 1)
            lines.append(f"{pad}{name}:" + ("" if body else " {}"))
            lines += [body] if body else []
            continue
        if value is _REQUIRED:
            value, note = None, f"REQUIRED{': ' + note if note else ''}"
        flat = isinstance(value, list) and not any(isinstance(v, (list, dict)) for v in value)
        text = yaml.safe_dump(value if flat else {name: value}, sort_keys=False, default_flow_style=flat,
                              width=1 << 20, allow_unicode=True).rstrip("\n").splitlines()
        text = [f"{name}: {text[0]}"] if flat else text  # a list of scalars on one line: [a, b]
        if note and len(text) == 1:
            lines.append(f"{pad}{text[0]}  # {note}")
        else:
            lines += [f"{pad}# {note}"] if note else []
            lines += [pad + line for line in text]
    return "\n".join(lines)
