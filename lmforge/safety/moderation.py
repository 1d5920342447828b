"""Moderation: one small interface for scoring text as toxic or adult, shared by curation and serving.

A `Moderator` scores texts with one probability per category (the same shape as
`lmforge.safety.classifier.TextClassifier.scores`, which therefore is one). Curation drops
documents whose flagged share is too high; the serving gateway can use the same object
through `check_input` / `check_output` (the `moderation.hook` contract), e.g.
`moderation.hook: "lmforge.safety.moderation:profanity_moderator"`.

`ProfanityModerator` wraps alt-profanity-check: a linear SVM on TF-IDF features whose
weights ship inside the wheel (no download at run time), ~0.02 ms per short text on a CPU.
It detects profanity, insults and sexual language; it is a cheap first line, not a
judge of subtler harms (a trained `TextClassifier` is the place for those).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from lmforge.errors import ConfigError


@runtime_checkable
class Moderator(Protocol):
    categories: Sequence[str]

    def scores(self, texts: list[str]) -> list[dict[str, float]]:
        """Per text, the probability of each category."""
        ...


@dataclass(frozen=True)
class Decision:
    """Field-compatible with the serving gateway's decision: allowed, reason, categories."""

    allowed: bool = True
    reason: str = ""
    categories: list[str] = field(default_factory=list)


def flagged(moderator: Moderator, texts: list[str], threshold: float) -> list[list[str]]:
    """Per text, the categories whose probability reaches `threshold`."""
    return [[c for c, p in s.items() if p >= threshold] for s in moderator.scores(texts)]


_CHUNK_BREAK = re.compile(r"\n\s*\n")


def chunks(text: str, max_chars: int = 1000) -> list[str]:
    """Paragraphs merged up to ~max_chars: the classifier scores short spans better than whole pages."""
    out: list[str] = []
    current = ""
    for paragraph in _CHUNK_BREAK.split(text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        while len(paragraph) > max_chars:  # one huge paragraph: cut at a space near the limit
            cut = paragraph.rfind(" ", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max_chars
            out.append(paragraph[:cut])
            paragraph = paragraph[cut:].strip()
        if current and len(current) + len(paragraph) + 2 > max_chars:
            out.append(current)
            current = paragraph
        else:
            current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        out.append(current)
    return out


class ProfanityModerator:
    """alt-profanity-check behind the `Moderator` interface (category: "profanity")."""

    categories = ("profanity",)

    def __init__(self, threshold: float = 0.8):
        try:
            from profanity_check import predict_prob
        except ImportError:
            raise ConfigError(
                "the profanity moderator needs alt-profanity-check: pip install 'lmforge[curate]'"
            ) from None
        self._predict_prob = predict_prob
        self.threshold = threshold

    def scores(self, texts: list[str]) -> list[dict[str, float]]:
        if not texts:
            return []
        return [{"profanity": float(p)} for p in self._predict_prob(list(texts))]

    # The serving gateway's hook contract.
    def check_input(self, texts: Sequence[str]) -> Decision:
        return self._decide(list(texts), "input")

    def check_output(self, text: str) -> Decision:
        return self._decide([text], "output")

    def _decide(self, texts: list[str], where: str) -> Decision:
        spans = [c for t in texts for c in chunks(t)]
        hits = sorted({c for cats in flagged(self, spans, self.threshold) for c in cats})
        if hits:
            return Decision(False, f"{where} flagged: {', '.join(hits)}", hits)
        return Decision()


MODERATORS = {"profanity": ProfanityModerator}


def load_moderator(name: str, **options) -> Moderator:
    """A moderator by name (`profanity`), or `module:factory` for your own."""
    if name in MODERATORS:
        return MODERATORS[name](**options)
    module_name, sep, attr = name.partition(":")
    if not sep:
        raise ConfigError(f"unknown moderator {name!r} (built in: {', '.join(MODERATORS)}; or module:factory)")
    import importlib

    try:
        moderator = getattr(importlib.import_module(module_name), attr)(**options)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"moderator {name!r} cannot be loaded: {err}") from None
    if not isinstance(moderator, Moderator):
        raise ConfigError(f"moderator {name!r} has no `categories` and `scores(texts)`")
    return moderator


def profanity_moderator(threshold: float = 0.8) -> ProfanityModerator:
    """Factory for the serving gateway's `moderation.hook`."""
    return ProfanityModerator(threshold)
