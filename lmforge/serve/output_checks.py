"""Output checks of all streams gathered into one moderator call (`check_outputs(texts)`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lmforge.serve.hooks import Decision


class OutputCheckBatcher:
    """A check waits for the batch in flight; whatever arrived meanwhile goes in the next one,
    so with many streams each backend runs once per batch instead of once per stream (the
    profanity model costs ~3 ms a call, nearly the same for one text or twenty)."""

    def __init__(self, check_many: Callable[[list[str]], list[Decision]]):
        self.check_many = check_many
        self.pending: list[tuple[str, asyncio.Future]] = []
        self.worker: asyncio.Task | None = None

    async def check(self, text: str) -> Decision:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((text, future))
        if self.worker is None or self.worker.done():
            self.worker = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        while self.pending:
            batch, self.pending = self.pending, []
            try:
                decisions = await asyncio.to_thread(self.check_many, [text for text, _ in batch])
            except Exception as err:  # noqa: BLE001 - every waiting stream hears about it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), decision in zip(batch, decisions, strict=True):
                if not future.done():
                    future.set_result(decision)
