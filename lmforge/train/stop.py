"""SIGINT/SIGTERM as a request to stop after the current step (the trainer then checkpoints)."""

from __future__ import annotations

import logging
import signal

log = logging.getLogger(__name__)


class StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop after the current step; a second one stops now."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing the step and saving a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
