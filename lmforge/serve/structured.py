"""Structured outputs: a grammar that every sampled token must keep the reply inside.

A request's `StructuredSpec` (JSON schema, any JSON object, a regex, one of a list of choices,
or a Lark grammar) is compiled by llguidance (the grammar engine vLLM uses) against the
served tokenizer; while the request samples, the tokens the grammar cannot take next are
masked out of its logits, so the reply parses whatever the model prefers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

StructuredKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]


@dataclass(frozen=True)
class StructuredSpec:
    """What the reply must match. `value`: the schema (dict), the regex or Lark text, the choices."""

    kind: StructuredKind
    value: Any = None
