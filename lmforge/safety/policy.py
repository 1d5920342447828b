"""The serving moderation policy: per direction and category, allow / flag / redact / block.

    # configs/moderation.yaml, shipped as `moderation` (lmforge serve MODEL moderation.policy=moderation)
    backends: [rules, profanity]              # or {name: classifier, path: clf/}, module:factory
    thresholds: {profanity: 0.8}              # per category or parent; else the backend's own
    input:  {pii: redact, secrets: block, profanity: flag, default: allow}
    output: {pii: redact, secrets: redact, profanity: block, default: allow}

A category's action is looked up as itself (`pii/email`), then its parent (`pii`), then
`default`. `redact` replaces what the rules located with placeholders (`<EMAIL>`); for a
category no backend can locate (a classifier's `violence`), redact means block. What a block
does to the client (an OpenAI-style refusal, or a 400 with a moderation error) and how often a
stream is checked are the gateway's settings (`moderation.on_block`, `moderation.stream_window_chars`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmforge.config import Section, read_yaml
from lmforge.config import build as build_config
from lmforge.safety import rules
from lmforge.safety.moderation import ACTIONS, Decision, Moderation, ModerationResult, build, lookup
from lmforge.shipped import config_path

Action = Literal["allow", "flag", "redact", "block"]


class PolicyConfig(Section):
    backends: list[str | dict[str, Any]] = Field(default_factory=lambda: ["rules", "profanity"])
    thresholds: dict[str, float] = Field(default_factory=dict, description="category or parent -> threshold")
    input: dict[str, Action] = Field(default_factory=lambda: {"secrets": "block", "pii": "redact", "default": "flag"})
    output: dict[str, Action] = Field(default_factory=lambda: {"secrets": "redact", "pii": "redact", "default": "block"})


def load_policy(source: str | os.PathLike | dict[str, Any]) -> PolicyConfig:
    """Inline keys, a YAML file, or a shipped policy by name (`moderation`)."""
    data = source if isinstance(source, dict) else read_yaml(config_path(source))
    return build_config(PolicyConfig, data, "moderation.policy" if isinstance(source, dict) else str(source))


class PolicyModerator:
    """The policy behind the gateway's hook contract: `check_input(texts)`, `check_output(text)`."""

    def __init__(self, policy: PolicyConfig, moderation: Moderation | None = None):
        self.policy = policy
        self.moderation = moderation or build(policy.backends, policy.thresholds)
        self.redacts_output = "redact" in policy.output.values()  # the gateway then holds a stream's tail back

    @classmethod
    def from_source(cls, source: str | os.PathLike | dict[str, Any]) -> PolicyModerator:
        return cls(load_policy(source))

    def check_input(self, texts: Sequence[str]) -> Decision:
        texts = list(texts)
        return self._decide(texts, self.moderation.moderate(texts), self.policy.input, "input")

    def check_output(self, text: str) -> Decision:
        return self.check_outputs([text])[0]

    def check_outputs(self, texts: Sequence[str]) -> list[Decision]:
        """Several choices' outputs at once: one pass of each backend over all of them."""
        texts = list(texts)
        results = self.moderation.moderate(texts)
        return [self._decide([t], [r], self.policy.output, "output") for t, r in zip(texts, results, strict=True)]

    def _decide(self, texts: list[str], results: list[ModerationResult], table: dict[str, str], where: str) -> Decision:
        actions: dict[str, str] = {}
        for result in results:
            for category in result.flagged:
                action = lookup(table, category, "allow")
                if action == "redact" and not any(s.category == category for s in result.spans):
                    action = "block"  # nothing to cut out: the whole text is the problem
                if action != "allow":
                    actions[category] = max(actions.get(category, "allow"), action, key=ACTIONS.index)
        blocked = sorted(c for c, a in actions.items() if a == "block")
        if blocked:
            return Decision(False, f"{where} blocked: {', '.join(blocked)}", sorted(actions), actions)
        redacted = None
        to_cut = {c for c, a in actions.items() if a == "redact"}
        if to_cut:
            redacted = [rules.redact(t, [s for s in r.spans if s.category in to_cut])
                        for t, r in zip(texts, results, strict=True)]
        reason = ", ".join(f"{c}: {a}" for c, a in sorted(actions.items()))
        return Decision(True, reason, sorted(actions), actions, redacted)


def policy_moderator(policy: str | None = None, **inline: Any) -> PolicyModerator:
    """Factory for `moderation.hook: lmforge.safety.policy:policy_moderator` with a path or inline keys."""
    if policy is not None:
        return PolicyModerator.from_source(Path(policy))
    return PolicyModerator.from_source(inline)
