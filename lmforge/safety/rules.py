"""Pattern rules for personal data and secrets: where they are in a text, and their placeholders.

Shared by curation (`PIIScrubber` replaces e-mail addresses, IP addresses and phone numbers in
documents) and moderation (`RulesModerator` scores and locates every category below, and the
serving policy redacts or blocks them). Categories use OpenAI-style `parent/child` names:

    pii/email  pii/phone  pii/ip_address  pii/credit_card  pii/ssn
    secrets/private_key  secrets/api_key  secrets/credential

Each rule is a regular expression plus, where a match alone is not proof enough, a validator
(Luhn checksum for card numbers, public address for IPs, digit count for phone numbers).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# E-mail (RFC 5322-ish local part, dotted domain or bracketed IP literal).
EMAIL = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@(?:(?:[A-Za-z0-9](?:["
    r"A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?|\[(?:(?:25[0-5]|2[0-4][0-9]|["
    r"01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?|[A-Za-z0-9-]*[A-Za-z0-9]:)])"
)
IPV4 = re.compile(r"(?<![\w.=-])(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)(?!\.?\d)")
# North-American (555) 123-4567 / 555-123-4567 / 555.123.4567 / +1 555 123 4567, and
# international numbers written with a leading +. Plain space-separated digit groups are
# not phones (they are number sequences far more often), and neither are dates or versions.
PHONE = re.compile(
    r"(?<![\w+.-])(?:\(\d{3}\)[ ]?\d{3}[-.]\d{4}|\d{3}([-.])\d{3}\1\d{4}"
    r"|\+1[ .-]?\d{3}[ .-]\d{3}[ .-]\d{4}|\+\d{1,3}(?:[ .-]\(?\d{1,4}\)?){2,5})(?![\w-])"
)
CREDIT_CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
SSN = re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}(?![\d-])")

PRIVATE_KEY = re.compile(r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----[\s\S]*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----|\Z)")
API_KEY = re.compile(
    r"\b(?:"
    r"(?:AKIA|ASIA)[0-9A-Z]{16}"                    # AWS access key id
    r"|gh[pousr]_[A-Za-z0-9]{36,}"                  # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{40,}"
    r"|sk-(?:proj-|ant-(?:api\d\d-)?)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic style
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"                # Slack
    r"|AIza[0-9A-Za-z_-]{35}"                       # Google API key
    r"|[rs]k_live_[0-9A-Za-z]{16,}"                 # Stripe live keys
    r"|hf_[A-Za-z0-9]{30,}"                         # Hugging Face
    r"|eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JSON web tokens
    r")(?![A-Za-z0-9_-])"
)
# `password = "hunter2!"`, `api_key: 'abc...'`, `AWS_SECRET_ACCESS_KEY=...`: the value only.
CREDENTIAL = re.compile(
    r"(?i)\b(?:\w*_)?(?:password|passwd|pwd|secret(?:_key)?|api[_-]?key|access[_-]?token|auth[_-]?token|aws_secret_access_key)"
    r"\s*[:=]\s*(?P<q>['\"]?)(?P<value>[^\s'\"]{8,})(?P=q)"
)


def is_phone(text: str) -> bool:
    return 9 <= sum(c.isdigit() for c in text) <= 15


def is_personal_ip(text: str, only_public: bool = True) -> bool:
    # Dotted quads of single digits (1.5.0.9) are version numbers far more often than hosts.
    if all(len(octet) == 1 for octet in text.split(".")):
        return False
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return address.is_global if only_public else not (address.is_loopback or address.is_unspecified)


def luhn(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


@dataclass(frozen=True)
class Rule:
    category: str
    pattern: re.Pattern
    placeholder: str
    valid: Callable[[str], bool] | None = None
    group: str | int = 0  # the part of the match that is the sensitive value


RULES: tuple[Rule, ...] = (
    Rule("secrets/private_key", PRIVATE_KEY, "<PRIVATE_KEY>"),
    Rule("secrets/api_key", API_KEY, "<API_KEY>"),
    Rule("secrets/credential", CREDENTIAL, "<SECRET>", group="value"),
    Rule("pii/email", EMAIL, "<EMAIL>"),
    Rule("pii/credit_card", CREDIT_CARD, "<CREDIT_CARD>", luhn),
    Rule("pii/ssn", SSN, "<SSN>"),
    Rule("pii/phone", PHONE, "<PHONE_NUMBER>", is_phone),
    Rule("pii/ip_address", IPV4, "<IP_ADDRESS>", is_personal_ip),
)
CATEGORIES = tuple(r.category for r in RULES)


@dataclass(frozen=True)
class Span:
    """Where a rule matched: text[start:end] is the value, `replacement` its placeholder."""

    start: int
    end: int
    category: str
    replacement: str


def find(text: str, rules: Iterable[Rule] = RULES) -> list[Span]:
    """Non-overlapping matches, earlier rules winning (a key inside a private key block is one span)."""
    spans: list[Span] = []
    for rule in rules:
        for match in rule.pattern.finditer(text):
            start, end = match.span(rule.group)
            if start == end or (rule.valid is not None and not rule.valid(match.group(rule.group))):
                continue
            if any(s.start < end and start < s.end for s in spans):
                continue
            spans.append(Span(start, end, rule.category, rule.placeholder))
    return sorted(spans, key=lambda s: s.start)


def redact(text: str, spans: Iterable[Span]) -> str:
    out, last = [], 0
    for span in sorted(spans, key=lambda s: s.start):
        out += [text[last:span.start], span.replacement]
        last = span.end
    return "".join(out) + text[last:]


class RulesModerator:
    """The rules behind the `Moderator` interface: score 1.0 for a category with a match, else 0."""

    threshold = 0.5

    def __init__(self, categories: Iterable[str] | None = None):
        wanted = set(categories) if categories is not None else None
        self.rules = tuple(r for r in RULES if wanted is None or r.category in wanted
                           or r.category.split("/")[0] in wanted)
        self.categories = tuple(r.category for r in self.rules)

    def scores(self, texts: list[str]) -> list[dict[str, float]]:
        out = []
        for spans in map(self.spans, texts):
            hit = {s.category for s in spans}
            out.append({c: float(c in hit) for c in self.categories})
        return out

    def spans(self, text: str) -> list[Span]:
        return find(text, self.rules)
