"""The moderation hook point of the gateway: inputs are checked before generation, outputs as they stream.

A moderator is any object with `check_input(texts) -> Decision` and
`check_output(text) -> Decision` (`lmforge.safety.moderation.Decision`: allowed, reason,
categories, per-category actions, redacted texts). The default allows everything;
`moderation.policy` (a YAML file or inline keys, `lmforge.safety.policy`) gives the policy
moderator, and `moderation.hook: "package.module:factory"` names your own (called with
`moderation.options` as keyword arguments). Decisions are recorded in the audit log and in
Prometheus counters; a blocked input gets a refusal or a 400 (`moderation.on_block`), a
blocked output ends its choice with `finish_reason: "content_filter"`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from lmforge.errors import ConfigError
from lmforge.safety.moderation import ALLOW, Decision, load_factory
from lmforge.safety.policy import PolicyModerator

__all__ = ["ALLOW", "AllowAll", "Decision", "ModerationHook", "load_hook"]


@runtime_checkable
class ModerationHook(Protocol):
    def check_input(self, texts: Sequence[str]) -> Decision:
        """The prompt texts (or chat message contents) of one request."""
        ...

    def check_output(self, text: str) -> Decision:
        """The text generated so far for one choice (called as it streams and at the end)."""
        ...


class AllowAll:
    def check_input(self, texts: Sequence[str]) -> Decision:
        return ALLOW

    def check_output(self, text: str) -> Decision:
        return ALLOW


def load_hook(hook: str | None, options: dict[str, Any] | None = None,
              policy: str | dict[str, Any] | None = None) -> ModerationHook:
    """A policy (file or inline) -> PolicyModerator; `module:factory` -> factory(**options); neither -> AllowAll."""
    if policy is not None and hook:
        raise ConfigError("give moderation.policy or moderation.hook, not both")
    if policy is not None:
        return PolicyModerator.from_source(policy)
    if not hook:
        return AllowAll()
    return load_factory(hook, options or {}, ModerationHook, "moderation.hook")
