"""Per-step accounting: documents and bytes in and out, removals by reason, a few examples each.

Every curation step runs inside `Audited`, which sees each document go in and either come
out or not; a removed document's reason is the one its datatrove filter returned (BaseFilter
tags `doc.metadata["filter_reason"]` when it has an exclusion writer, so `Audited` gives it
one that only tags) or the step's default reason (dedup stages). Each task writes one
ledger file per step atomically when the step has seen all its input, next to datatrove's
completion markers, so a resumed run's report still counts the tasks it skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter


class TaskLedger:
    """What one step did in one task."""

    def __init__(self, examples_per_reason: int, example_chars: int, scrub: Callable[[str], str] | None):
        self.docs_in = self.bytes_in = self.docs_out = self.bytes_out = 0
        self.reasons: dict[str, dict[str, int]] = defaultdict(lambda: {"docs": 0, "bytes": 0})
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.counters: dict[str, int] = defaultdict(int)
        self._cap, self._chars, self._scrub = examples_per_reason, example_chars, scrub

    def seen(self, nbytes: int) -> None:
        self.docs_in += 1
        self.bytes_in += nbytes

    def kept(self, nbytes: int) -> None:
        self.docs_out += 1
        self.bytes_out += nbytes

    def removed(self, reason: str, nbytes: int, example: str) -> None:
        entry = self.reasons[reason]
        entry["docs"] += 1
        entry["bytes"] += nbytes
        if len(self.examples[reason]) < self._cap:
            example = example[: self._chars]
            # Removed documents have not reached the PII step yet: scrub what the report shows.
            self.examples[reason].append(self._scrub(example) if self._scrub else example)

    def to_dict(self) -> dict[str, Any]:
        return {
            "docs_in": self.docs_in, "bytes_in": self.bytes_in,
            "docs_out": self.docs_out, "bytes_out": self.bytes_out,
            "removed": dict(self.reasons), "examples": dict(self.examples), "counters": dict(self.counters),
        }


class Ledger:
    """Where a step's per-task ledgers go: `<root>/<step>/<rank>.json`. Picklable (it is sent to workers)."""

    def __init__(self, root: str | os.PathLike, step: str, examples_per_reason: int = 3,
                 example_chars: int = 300, scrub: Callable[[str], str] | None = None):
        self.root, self.step = str(root), step
        self.examples_per_reason, self.example_chars, self.scrub = examples_per_reason, example_chars, scrub

    @contextlib.contextmanager
    def task(self, rank: int) -> Iterator[TaskLedger]:
        ledger = TaskLedger(self.examples_per_reason, self.example_chars, self.scrub)
        yield ledger  # an exception or an abandoned generator writes nothing: the task reruns
        path = Path(self.root) / self.step / f"{rank:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(ledger.to_dict()))
        os.replace(tmp, path)


def read_ledgers(root: str | os.PathLike, step: str) -> dict[str, Any]:
    """All tasks' ledgers of one step, summed; examples kept in task order."""
    total: dict[str, Any] = {"docs_in": 0, "bytes_in": 0, "docs_out": 0, "bytes_out": 0,
                             "removed": {}, "examples": {}, "counters": {}, "tasks": 0}
    for path in sorted((Path(root) / step).glob("*.json")):
        part = json.loads(path.read_text())
        total["tasks"] += 1
        for key in ("docs_in", "bytes_in", "docs_out", "bytes_out"):
            total[key] += part[key]
        for reason, entry in part["removed"].items():
            into = total["removed"].setdefault(reason, {"docs": 0, "bytes": 0})
            into["docs"] += entry["docs"]
            into["bytes"] += entry["bytes"]
        for reason, examples in part["examples"].items():
            total["examples"].setdefault(reason, []).extend(examples)
        for key, value in part["counters"].items():
            total["counters"][key] = total["counters"].get(key, 0) + value
    return total


class _TagOnly:
    """Stands in for a DiskWriter as a BaseFilter's exclusion writer: the filter tags the reason, we keep it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def write(self, document, rank: int = 0, **kwargs) -> None:
        pass


class Audited(PipelineStep):
    """Runs an order-preserving datatrove step and records what went in, came out, and why not."""

    def __init__(self, step: PipelineStep, ledger: Ledger, default_reason: str):
        super().__init__()
        self.step, self.ledger, self.default_reason = step, ledger, default_reason
        self.name, self.type = ledger.step, step.type
        self.stats = step.stats  # datatrove's per-task stats keep the inner step's own numbers
        if isinstance(step, BaseFilter) and step.exclusion_writer is None:
            step.exclusion_writer = _TagOnly()

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        pending: deque = deque()
        with self.ledger.task(rank) as ledger:

            def feed():
                for doc in data:
                    nbytes = len(doc.text.encode("utf-8"))
                    ledger.seen(nbytes)
                    pending.append((doc, nbytes))
                    yield doc

            def drop(doc, nbytes):
                reason = doc.metadata.pop("filter_reason", None) or self.default_reason
                ledger.removed(reason, nbytes, f"{doc.id}: {doc.text}")

            for doc in self.step.run(feed(), rank, world_size):
                while pending and pending[0][0] is not doc:
                    drop(*pending.popleft())
                if pending:
                    pending.popleft()
                ledger.kept(len(doc.text.encode("utf-8")))
                yield doc
            while pending:
                drop(*pending.popleft())
            for key, value in getattr(self.step, "counters", {}).items():
                ledger.counters[key] += value
