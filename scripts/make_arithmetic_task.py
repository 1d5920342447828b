"""Rebuild lmforge/eval/tasks/arithmetic.jsonl: 80 addition, subtraction and multiplication
questions with 1-3 digit operands, from a fixed seed (byte-identical on every run).

    python scripts/make_arithmetic_task.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "lmforge" / "eval" / "tasks" / "arithmetic.jsonl"


def main() -> None:
    rng = random.Random(2026)
    records = []
    for i in range(80):
        op = "+-*"[i % 3]
        digits = 1 + (i // 3) % 3
        a, b = (rng.randrange(10 ** (digits - 1), 10**digits) for _ in range(2))
        if op == "*":
            b = rng.randrange(2, 20)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        records.append({"id": f"arithmetic-{i + 1:03d}", "question": f"What is {a} {op} {b}?", "answer": str(answer)})
    OUT.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"{len(records)} questions -> {OUT}")


if __name__ == "__main__":
    main()
