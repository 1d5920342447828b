"""lmforge's own datatrove steps, for what datatrove has no offline step for.

- `UnicodeNormalizer`: NFC/NFKC, CRLF -> LF, control characters dropped.
- `LanguageFilter`: py3langid (its model ships in the wheel; datatrove's own filter
  downloads a fastText model at run time).
- `PIIScrubber`: e-mail addresses, public IP addresses and phone numbers -> placeholders,
  counted (datatrove's `PIIFormatter` has no phone numbers and no counts; its e-mail
  pattern and IP validator are reused).
- `ToxicityFilter`: any `lmforge.safety.moderation.Moderator` over the document's chunks.
- `Decontaminator`: drops documents sharing a long n-gram with an evaluation passage
  (datatrove's n-gram decontamination reads lighteval tasks from the Hub).
Everything heavy (models, indexes) loads lazily, in the worker that uses it.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from functools import partial
from pathlib import Path

from datatrove.data import Document
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters.base import BaseFormatter

from lmforge.errors import ConfigError, DataError
from lmforge.safety import rules
from lmforge.safety.moderation import chunks, flagged, load_moderator
from lmforge.shipped import resolve_path

_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class UnicodeNormalizer(BaseFormatter):
    name = "normalize"

    def __init__(self, form: str = "NFC"):
        super().__init__()
        self.form = form

    def format(self, text: str) -> str:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        return _CONTROL_CHARS.sub("", unicodedata.normalize(self.form, text))


class LanguageFilter(BaseFilter):
    """Keeps documents whose top py3langid language is in `languages` with probability >= min_score."""

    name = "language"

    def __init__(self, languages: list[str], min_score: float = 0.65, max_chars: int = 2000):
        super().__init__()
        self.languages, self.min_score, self.max_chars = set(languages), min_score, max_chars
        self._identifier = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._identifier is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        language, score = self._identifier.classify(doc.text[: self.max_chars])
        doc.metadata["language"], doc.metadata["language_score"] = language, round(float(score), 4)
        if language not in self.languages:
            return False, "wrong_language"
        if score < self.min_score:
            return False, "low_language_score"
        return True


class PIIScrubber(BaseFormatter):
    """Replaces PII with placeholders; `counters` counts replacements per kind (read by the ledger)."""

    name = "pii"

    def __init__(self, emails: bool = True, ips: bool = True, phones: bool = True, only_public_ips: bool = True,
                 email_placeholder: str = "<EMAIL>", ip_placeholder: str = "<IP_ADDRESS>",
                 phone_placeholder: str = "<PHONE_NUMBER>"):
        super().__init__()
        self.rules = []
        if emails:
            self.rules.append(("email", rules.EMAIL, None, email_placeholder))
        if ips:
            self.rules.append(("ip", rules.IPV4, partial(rules.is_personal_ip, only_public=only_public_ips), ip_placeholder))
        if phones:
            self.rules.append(("phone", rules.PHONE, rules.is_phone, phone_placeholder))
        self.counters: dict[str, int] = defaultdict(int)

    def scrub(self, text: str, counts: dict[str, int] | None = None) -> str:
        for kind, pattern, valid, placeholder in self.rules:

            def replace(match, kind=kind, valid=valid, placeholder=placeholder):
                if valid is not None and not valid(match.group(0)):
                    return match.group(0)
                if counts is not None:
                    counts[kind] += 1
                return placeholder

            text = pattern.sub(replace, text)
        return text

    def format(self, text: str) -> str:
        before = sum(self.counters.values())
        text = self.scrub(text, self.counters)
        if sum(self.counters.values()) > before:
            self.counters["documents_changed"] += 1
        return text


class ToxicityFilter(BaseFilter):
    """Drops a document when more than `max_flagged_share` of its text (by chunk length) is flagged."""

    name = "toxicity"

    def __init__(self, moderator: str = "profanity", threshold: float = 0.8, max_flagged_share: float = 0.1):
        super().__init__()
        self.moderator_name, self.threshold, self.max_flagged_share = moderator, threshold, max_flagged_share
        self._moderator = None

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if self._moderator is None:
            self._moderator = load_moderator(self.moderator_name)
        pieces = chunks(doc.text)
        if not pieces:
            return True
        flags = [bool(f) for f in flagged(self._moderator, pieces, self.threshold)]
        share = sum(len(p) for p, f in zip(pieces, flags, strict=True) if f) / sum(len(p) for p in pieces)
        doc.metadata["toxic_share"] = round(share, 4)
        if share > self.max_flagged_share:
            return False, "toxic"
        return True


_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def eval_passages(sources: list[str]) -> dict[str, list[str]]:
    """Evaluation text per source: each example's prompt plus its answer (what a model is scored on).

    A source is a shipped task name, a task YAML/JSONL (read as `lmforge eval` reads it), or a
    .txt file whose paragraphs are passages.
    """
    from lmforge.eval.tasks import resolve_tasks

    passages: dict[str, list[str]] = {}
    for source in sources:
        path = Path(resolve_path(source))
        if path.suffix == ".txt" and path.is_file():
            passages[path.stem] = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
            continue
        try:
            tasks = resolve_tasks(source)
        except (ConfigError, DataError) as err:
            raise ConfigError(f"decontaminate.tasks: {err}") from None
        for task in tasks:
            texts = passages.setdefault(task.spec.name, [])
            for example in task.examples:
                if example.choices:
                    texts.append(f"{example.prompt}{task.spec.target_delimiter}{example.choices[example.answer]}")
                elif isinstance(example.answer, str) and task.spec.type == "generation":
                    texts.append(f"{example.prompt}{example.answer}")
                else:
                    texts.append(example.prompt)
    return passages


class Decontaminator(BaseFilter):
    """Drops documents that share an n-gram of `ngram` words with any evaluation passage.

    The 13-gram overlap test of GPT-3 (Brown et al. 2020, appendix C): passages shorter than
    `ngram` words (but at least `min_words`) must appear whole; shorter ones are ignored, as
    a 5-word question matches too much ordinary text to mean contamination.
    """

    name = "decontaminate"

    def __init__(self, passages: dict[str, list[str]], ngram: int = 13, min_words: int = 8):
        super().__init__()
        self.passages, self.ngram, self.min_words = passages, ngram, min_words
        self._index: dict[int, dict[tuple[str, ...], str]] | None = None

    def index(self) -> dict[int, dict[tuple[str, ...], str]]:
        """n-gram length -> {n-gram: source}; passages shorter than `ngram` index their own length."""
        if self._index is None:
            self._index = defaultdict(dict)
            for source, texts in self.passages.items():
                for text in texts:
                    tokens = words(text)
                    if len(tokens) < self.min_words:
                        continue
                    n = min(self.ngram, len(tokens))
                    for i in range(len(tokens) - n + 1):
                        self._index[n].setdefault(tuple(tokens[i : i + n]), source)
        return self._index

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        tokens = words(doc.text)
        for n, grams in self.index().items():
            for i in range(len(tokens) - n + 1):
                source = grams.get(tuple(tokens[i : i + n]))
                if source is not None:
                    doc.metadata["contaminated_with"] = source
                    return False, "eval_overlap"
        return True
