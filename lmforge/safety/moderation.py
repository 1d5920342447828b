"""Moderation: one interface for scoring text by category, shared by curation and serving.

A `Moderator` has `categories` and `scores(texts) -> [{category: probability}]`; some also
locate what they found (`spans(text)`, which the serving policy needs to redact). Backends:

- `rules`: personal data and secrets by pattern (`lmforge.safety.rules`: pii/email, pii/phone,
  pii/ip_address, pii/credit_card, pii/ssn, secrets/api_key, secrets/private_key,
  secrets/credential), with spans;
- `profanity`: alt-profanity-check, a linear SVM on TF-IDF features whose weights ship inside
  the wheel (no download; ~0.02 ms per short text); profanity, insults and sexual language;
- `classifier`: an lmforge-trained classifier (`lmforge train-classifier`), whose categories
  are the labels of its data (name them as the OpenAI moderation API does: harassment, hate,
  self-harm, sexual, violence, illicit, ...);
- `module:factory`: your own.

`Moderation` composes backends (a category's score is the highest any backend gives it) and
applies a threshold per category; `moderate(texts)` returns a `ModerationResult` per text
(scores, flagged categories, spans). Long texts are scored by chunks of paragraphs (the
classifiers judge short spans better than whole pages) and take their worst chunk.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from lmforge.errors import ConfigError
from lmforge.safety import rules


@runtime_checkable
class Moderator(Protocol):
    categories: Sequence[str]

    def scores(self, texts: list[str]) -> list[dict[str, float]]:
        """Per text, the probability of each category."""
        ...


ACTIONS = ("allow", "flag", "redact", "block")  # in increasing severity


@dataclass(frozen=True)
class Decision:
    """What a moderator decided for one input (all its texts) or one output.

    `allowed` is False only for a block. `actions` maps each category that was acted on to its
    action; `redacted` holds the texts with placeholders when something was redacted.
    """

    allowed: bool = True
    reason: str = ""
    categories: list[str] = field(default_factory=list)
    actions: dict[str, str] = field(default_factory=dict)
    redacted: list[str] | None = None

    @property
    def action(self) -> str:
        if not self.allowed:
            return "block"
        return max(self.actions.values(), key=ACTIONS.index, default="allow")


ALLOW = Decision()


@dataclass(frozen=True)
class ModerationResult:
    scores: dict[str, float]
    flagged: list[str]
    spans: list[rules.Span] = field(default_factory=list)


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
                "the profanity moderator needs alt-profanity-check, a core dependency: pip install alt-profanity-check"
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


def _classifier(path: str, **options):
    from lmforge.safety.classifier import load_classifier

    return load_classifier(path, **options)


MODERATORS = {"profanity": ProfanityModerator, "rules": rules.RulesModerator, "classifier": _classifier}


def load_moderator(name: str, **options) -> Moderator:
    """A moderator by name (`rules`, `profanity`, `classifier` with `path=`), or `module:factory`."""
    if name in MODERATORS:
        try:
            return MODERATORS[name](**options)
        except TypeError as err:
            raise ConfigError(f"moderator {name!r}: {err}") from None
    if ":" not in name:
        raise ConfigError(f"unknown moderator {name!r} (built in: {', '.join(MODERATORS)}; or module:factory)")
    return load_factory(name, options, Moderator, "moderator")


def load_factory(spec: str, options: dict[str, Any], protocol: type, what: str) -> Any:
    """`package.module:factory` called with `options`; what it returns must meet `protocol`.

    The one loader of user-supplied moderators: curation's and the policy's backends
    (`Moderator`) and the gateway's `moderation.hook` (`lmforge.serve.hooks.ModerationHook`).
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"bad value for {what!r}: expected module:factory (got {spec!r})")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"{what} {spec!r} cannot be loaded: {err}") from None
    loaded = factory(**options)
    if not isinstance(loaded, protocol):
        members = ", ".join([*getattr(protocol, "__annotations__", {}),
                             *(m for m, v in vars(protocol).items() if callable(v) and not m.startswith("_"))])
        raise ConfigError(f"{what} {spec!r} did not return an object with {members}")
    return loaded


def profanity_moderator(threshold: float = 0.8) -> ProfanityModerator:
    """Factory for the serving gateway's `moderation.hook`."""
    return ProfanityModerator(threshold)


def _threshold_of(backend, category: str) -> float | None:
    own = getattr(backend, "thresholds", None)
    if isinstance(own, dict) and category in own:
        return float(own[category])
    value = getattr(backend, "threshold", None)
    return None if value is None else float(value)


def lookup(table: dict[str, Any], category: str, default: Any = None) -> Any:
    """`table[category]`, else its parent's (`pii` for `pii/email`), else `default`'s entry."""
    for key in (category, category.split("/")[0], "default"):
        if key in table:
            return table[key]
    return default


class Moderation:
    """Backends composed: per category the highest score, flagged at its threshold.

    Thresholds: `thresholds[category]`, else `thresholds[parent]`, else the backend's own
    (a trained classifier's calibrated ones, the profanity model's 0.8), else 0.5.
    """

    def __init__(self, backends: Sequence[Moderator], thresholds: dict[str, float] | None = None,
                 chunk_chars: int = 1000):
        if not backends:
            raise ConfigError("moderation needs at least one backend")
        self.backends = list(backends)
        self.categories = tuple(dict.fromkeys(c for b in self.backends for c in b.categories))
        self.chunk_chars = chunk_chars
        self.thresholds: dict[str, float] = {}
        for category in self.categories:
            given = lookup(thresholds or {}, category)
            own = next((t for b in self.backends if category in b.categories
                        for t in [_threshold_of(b, category)] if t is not None), None)
            self.thresholds[category] = float(given if given is not None else own if own is not None else 0.5)

    def scores(self, texts: list[str]) -> list[dict[str, float]]:
        return [r.scores for r in self.moderate(texts)]

    def moderate(self, texts: Sequence[str]) -> list[ModerationResult]:
        texts = list(texts)
        merged: list[dict[str, float]] = [dict.fromkeys(self.categories, 0.0) for _ in texts]
        spans: list[list[rules.Span]] = [[] for _ in texts]
        for backend in self.backends:
            if hasattr(backend, "spans"):  # pattern backends see the whole text and say where
                per_text = [backend.spans(t) for t in texts]
                for i, found in enumerate(per_text):
                    spans[i] += found
                    for s in found:
                        merged[i][s.category] = 1.0
                continue
            pieces = [(i, c) for i, t in enumerate(texts) for c in (chunks(t, self.chunk_chars) or [t])]
            for (i, _), row in zip(pieces, backend.scores([c for _, c in pieces]), strict=True):
                for category, p in row.items():
                    merged[i][category] = max(merged[i].get(category, 0.0), float(p))
        return [ModerationResult(scores, [c for c, p in scores.items() if p >= self.thresholds.get(c, 0.5)],
                                 sorted(found, key=lambda s: s.start))
                for scores, found in zip(merged, spans, strict=True)]


def build(backends: Sequence[str | dict[str, Any]] = ("rules", "profanity"),
          thresholds: dict[str, float] | None = None) -> Moderation:
    """`Moderation` from backend specs: a name, or `{name: ..., **options}` (e.g. a classifier's path)."""
    loaded = []
    for spec in backends:
        if isinstance(spec, str):
            loaded.append(load_moderator(spec))
        else:
            options = dict(spec)
            name = options.pop("name", None)
            if not isinstance(name, str):
                raise ConfigError(f"a moderation backend needs a 'name' (got {spec!r})")
            loaded.append(load_moderator(name, **options))
    return Moderation(loaded, thresholds)


_default: Moderation | None = None


def moderate(texts: Sequence[str], moderation: Moderation | None = None) -> list[ModerationResult]:
    """Per text: scores by category, the flagged categories and the located spans.

    Without `moderation`, the default backends (rules and profanity) at their own thresholds.
    """
    global _default
    if moderation is None:
        if _default is None:
            _default = build()
        moderation = _default
    return moderation.moderate(texts)
