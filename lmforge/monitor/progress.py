"""Progress of a long stage (tokenizer training, tokenize, eval, curate, export): one home.

On a terminal (stderr is a TTY) a tqdm bar; otherwise no bar and no control characters,
only a log line when the stage ends (count, rate, seconds), so CI logs and pipes stay
readable. `LMFORGE_PROGRESS=1` forces the bar, `LMFORGE_PROGRESS=0` hides it (tqdm's own
`TQDM_DISABLE` works too). Inside `with listen(callback):` every update of every stage is
also passed to `callback(stage, done, total)`, bar or not: the Python API's hook for its
own progress display.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

from tqdm import tqdm

log = logging.getLogger("lmforge.progress")

T = TypeVar("T")
ProgressCallback = Callable[[str, int, int | None], None]
_LISTENERS: ContextVar[tuple[ProgressCallback, ...]] = ContextVar("lmforge_progress_listeners", default=())


@contextmanager
def listen(callback: ProgressCallback) -> Iterator[None]:
    """Pass every progress update made inside the block to `callback(stage, done, total)`."""
    token = _LISTENERS.set((*_LISTENERS.get(), callback))
    try:
        yield
    finally:
        _LISTENERS.reset(token)


def bars_enabled() -> bool:
    """Whether stages draw progress bars: LMFORGE_PROGRESS when set, else whether stderr is a terminal."""
    forced = os.environ.get("LMFORGE_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


class Progress:
    """A stage's progress: `update(n)` as work is done, `close()` (or a with-block) at the end."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", unit_scale: bool = False,
                 bar: bool | None = None, log_end: bool = True):
        """`bar`: None draws one when `bars_enabled()`; False never (another bar shows this stage).
        `log_end`: log the count, rate and seconds when it closes (for stages that do not)."""
        self.desc, self.total, self.unit, self.log_end = desc, total, unit, log_end
        self.listeners = _LISTENERS.get()
        self.done = 0
        self.start = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, dynamic_ncols=True,
                        leave=False, file=sys.stderr) if (bars_enabled() if bar is None else bar) else None
        self.closed = False

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        for listener in self.listeners:
            listener(self.desc, self.done, self.total)

    def write(self, message: str) -> None:
        """A line above the bar (or a log line without one)."""
        self.bar.write(message, file=sys.stderr) if self.bar is not None else log.info("%s: %s", self.desc, message)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        seconds = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.close()
        if not self.log_end:
            return
        rate = f", {self.done / seconds:,.1f} {self.unit}/s" if seconds > 0 else ""
        log.info("%s: %s %s in %.1fs%s", self.desc, f"{self.done:,}", self.unit, seconds, rate)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Yield `items`, counting each one as done."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(desc, total, unit) as progress:
        for item in items:
            yield item
            progress.update()


@contextmanager
def silence_tqdm_in(package: str) -> Iterator[None]:
    """Hide the tqdm bars that `package`'s modules (already imported) draw inside the block.

    tqdm reads TQDM_DISABLE once, when it is imported, so setting it later reaches only
    processes started afterwards; modules that did `from tqdm import tqdm` get a disabled one.
    """
    import functools

    patched = [module for name, module in list(sys.modules.items())
               if (name == package or name.startswith(package + ".")) and getattr(module, "tqdm", None) is tqdm]
    for module in patched:
        module.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        for module in patched:
            module.tqdm = tqdm
