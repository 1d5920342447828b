"""Verifiable rewards: a completion checked against the prompt record, in-process and cheap.

Each reward is `fn(record, completion, options) -> float` with a typed options section;
`fields(options)` names the record fields it reads, so a prompt set is checked before training.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import Field, field_validator

from lmforge.config import Section

# A number as people write it: sign, thousands commas, decimals ("-1,234.50", "$72" -> 72).
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")
# GSM8K marks the final answer with "#### 72"; text after the last marker is the answer.
_GSM8K_MARK = "####"


def last_number(text: Any) -> Decimal | None:
    """The last number in `text` (after its last `####` if it has one), commas dropped; None if none."""
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        text = repr(text)
    text = str(text)
    if _GSM8K_MARK in text:
        text = text.rsplit(_GSM8K_MARK, 1)[1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return Decimal(found[-1].replace(",", "").lstrip("+"))
    except InvalidOperation:  # "1,,": commas but no digits after removal cannot happen; be safe
        return None


class NumericMatchOptions(Section):
    field: str = Field("answer", description="record field holding the reference answer")
    tolerance: float = Field(1e-6, ge=0, description="absolute difference still counted as equal")


def numeric_match(record: dict, completion: str, options: NumericMatchOptions) -> float:
    """1.0 when the completion's last number equals the reference's (GSM8K `####` convention)."""
    expected = last_number(record[options.field])
    if expected is None:
        raise ValueError(f"field {options.field!r} holds no number: {str(record[options.field])[:80]!r}")
    got = last_number(completion)
    return float(got is not None and abs(got - expected) <= Decimal(str(options.tolerance)))


class ExactMatchOptions(Section):
    field: str = Field("answer", description="record field holding the reference text")
    ignore_case: bool = False


def _normalize(text: Any, ignore_case: bool) -> str:
    text = " ".join(str(text).split())  # runs of whitespace and the ends do not count
    return text.lower() if ignore_case else text


def exact_match(record: dict, completion: str, options: ExactMatchOptions) -> float:
    """1.0 when the completion equals the reference text, whitespace normalised."""
    expected = record[options.field]
    candidates = expected if isinstance(expected, list) else [expected]  # several accepted answers
    got = _normalize(completion, options.ignore_case)
    return float(any(got == _normalize(c, options.ignore_case) for c in candidates))


class RegexMatchOptions(Section):
    field: str = Field("pattern", description="record field holding the regex the completion must match")
    fullmatch: bool = Field(False, description="the whole completion must match, not a part of it")
    ignore_case: bool = False


def regex_match(record: dict, completion: str, options: RegexMatchOptions) -> float:
    """1.0 when the completion matches the record's own regex (DOTALL: `.` crosses lines)."""
    flags = re.DOTALL | (re.IGNORECASE if options.ignore_case else 0)
    pattern = re.compile(str(record[options.field]), flags)
    found = pattern.fullmatch(completion) if options.fullmatch else pattern.search(completion)
    return float(found is not None)


class FormatOptions(Section):
    pattern: str = Field(description="regex the completion must match, e.g. '<think>.*</think>\\s*<answer>.*</answer>'")
    fullmatch: bool = Field(True, description="the whole completion must match, not a part of it")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"not a valid regex ({err})") from None
        return value


def format_reward(record: dict, completion: str, options: FormatOptions) -> float:
    """1.0 when the completion has the required shape; reads no record field."""
    pattern = re.compile(options.pattern, re.DOTALL)
    found = pattern.fullmatch(completion.strip()) if options.fullmatch else pattern.search(completion)
    return float(found is not None)
