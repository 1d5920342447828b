"""The moderation hook point of the gateway: inputs are checked before generation, outputs after.

A moderator is any object with `check_input(texts) -> Decision` and
`check_output(text) -> Decision`. The default allows everything; `moderation.hook:
"package.module:factory"` in the serve config names a factory that returns another one
(called with `moderation.options` as keyword arguments). Decisions are recorded in the
audit log; a blocked input is refused with HTTP 400, a blocked output ends its choice with
`finish_reason: "content_filter"`.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from lmforge.errors import ConfigError


@dataclass(frozen=True)
class Decision:
    allowed: bool = True
    reason: str = ""
    categories: list[str] = field(default_factory=list)


ALLOW = Decision()


@runtime_checkable
class Moderator(Protocol):
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


def load_moderator(hook: str | None, options: dict[str, Any] | None = None) -> Moderator:
    """`module:factory` -> factory(**options); None -> AllowAll."""
    if not hook:
        return AllowAll()
    module_name, sep, attr = hook.partition(":")
    if not sep or not attr:
        raise ConfigError(f"bad value for 'moderation.hook': expected module:factory (got {hook!r})")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"moderation.hook {hook!r} cannot be loaded: {err}") from None
    moderator = factory(**(options or {}))
    if not isinstance(moderator, Moderator):
        raise ConfigError(f"moderation.hook {hook!r} did not return an object with check_input and check_output")
    return moderator
