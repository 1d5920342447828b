"""Build the verifiable arithmetic task for RL (`lmforge/data/rl/arithmetic_{train,test}.jsonl.gz`).

Multi-step integer arithmetic ("What is 14 + 9 - 6?") with the exact answer in `answer`,
which `numeric_match` (lmforge.align.rewards) checks against the last number of a reply.
Deterministic (seeded), written for lmforge, no downloads. The train and test splits share
no expression, and neither holds a question of the shipped `arithmetic` eval task.

    python scripts/build_arithmetic_task.py            # rewrites the two files
"""

from __future__ import annotations

import gzip
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "lmforge" / "data" / "rl"
EVAL_TASK = ROOT / "lmforge" / "eval" / "tasks" / "arithmetic.jsonl"
TRAIN, TEST, SEED = 2000, 200, 20261130


def expression(rng: random.Random) -> str:
    """Two or three operations on small integers; products stay small enough to be learnable."""
    steps = rng.choice([2, 2, 3])
    text = str(rng.randint(1, 20))
    for _ in range(steps):
        op = rng.choice(["+", "+", "-", "*"])
        text += f" {op} {rng.randint(1, 9) if op == '*' else rng.randint(1, 20)}"
    return text


def build() -> tuple[list[dict], list[dict]]:
    rng = random.Random(SEED)
    taken = {json.loads(line)["question"] for line in EVAL_TASK.read_text().splitlines() if line.strip()}
    seen: set[str] = set()
    records = []
    while len(records) < TRAIN + TEST:
        expr = expression(rng)
        question = f"What is {expr}?"
        if expr in seen or question in taken:
            continue
        seen.add(expr)
        records.append({"prompt": question, "answer": str(eval(expr, {"__builtins__": {}}))})  # noqa: S307 (our own digits and operators)
    test, train = records[:TEST], records[TEST:]
    for split, rows in (("train", train), ("test", test)):
        for i, row in enumerate(rows):
            row["id"] = f"arith-{split}-{i:04d}"
    return train, test


def write(path: Path, rows: list[dict]) -> None:
    data = "".join(json.dumps({"id": r["id"], "prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(data.encode("utf-8"))


def main() -> int:
    train, test = build()
    write(OUT / "arithmetic_train.jsonl.gz", train)
    write(OUT / "arithmetic_test.jsonl.gz", test)
    print(f"{len(train)} train, {len(test)} test prompts -> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
