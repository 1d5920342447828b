"""Build the verifiable arithmetic task for RL (`lmforge/data/rl/arithmetic_{train,test,sft}.jsonl.gz`).

Multi-step integer arithmetic ("What is 14 + 9 - 6?") with the exact answer in `answer`,
which `numeric_match` (lmforge.align.rewards) checks against the last number of a reply.
Deterministic (seeded), written for lmforge, no downloads. The train and test splits share
no expression, and neither holds a question of the shipped `arithmetic` eval task.

`arithmetic_sft.jsonl.gz` holds chat conversations whose assistant turn works the sum out step
by step ("13 * 5 = 65. 18 - 65 = -47. The answer is -47."): the SFT warm-up that gives a small
model a format and a nonzero success rate before RL. Its expressions come from the same
generator, drawn after the two splits, so they are disjoint from both and from the eval task.

    python scripts/build_arithmetic_task.py            # rewrites the three files
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
TRAIN, TEST, SFT, SEED = 2000, 200, 3000, 20261130


def expression(rng: random.Random) -> str:
    """Two or three operations on small integers; products stay small enough to be learnable."""
    steps = rng.choice([2, 2, 3])
    text = str(rng.randint(1, 20))
    for _ in range(steps):
        op = rng.choice(["+", "+", "-", "*"])
        text += f" {op} {rng.randint(1, 9) if op == '*' else rng.randint(1, 20)}"
    return text


def worked_solution(expr: str) -> str:
    """Products first, then sums and differences left to right, one short sentence per operation."""
    tokens = expr.split()
    steps = []
    while "*" in tokens:  # precedence: every product is worked out before any sum
        i = tokens.index("*")
        product = int(tokens[i - 1]) * int(tokens[i + 1])
        steps.append(f"{tokens[i - 1]} * {tokens[i + 1]} = {product}.")
        tokens[i - 1:i + 2] = [str(product)]
    while len(tokens) > 1:
        left, op, right = int(tokens[0]), tokens[1], int(tokens[2])
        value = left + right if op == "+" else left - right
        steps.append(f"{left} {op} {right} = {value}.")
        tokens[:3] = [str(value)]
    steps.append(f"The answer is {tokens[0]}.")
    return " ".join(steps)


def build() -> tuple[list[dict], list[dict], list[dict]]:
    rng = random.Random(SEED)
    taken = {json.loads(line)["question"] for line in EVAL_TASK.read_text().splitlines() if line.strip()}
    seen: set[str] = set()
    records = []
    while len(records) < TRAIN + TEST + SFT:  # the first TRAIN + TEST draws are unchanged by SFT
        expr = expression(rng)
        question = f"What is {expr}?"
        if expr in seen or question in taken:
            continue
        seen.add(expr)
        records.append({"prompt": question, "answer": str(eval(expr, {"__builtins__": {}}))})  # noqa: S307 (our own digits and operators)
    test, train, sft = records[:TEST], records[TEST:TEST + TRAIN], records[TEST + TRAIN:]
    for split, rows in (("train", train), ("test", test)):
        for i, row in enumerate(rows):
            row["id"] = f"arith-{split}-{i:04d}"
    return train, test, sft


def conversations(rows: list[dict]) -> list[dict]:
    """OpenAI `messages` records, the format `lmforge sft` reads."""
    return [{"messages": [{"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": worked_solution(r["prompt"].removeprefix("What is ")
                                                                           .removesuffix("?"))}]} for r in rows]


def write(path: Path, rows: list[dict]) -> None:
    """JSONL, gzip without a timestamp so a rebuild gives the same bytes."""
    data = "".join(json.dumps(r) + "\n" for r in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(data.encode("utf-8"))


def main() -> int:
    train, test, sft = build()
    for split, rows in (("train", train), ("test", test)):
        write(OUT / f"arithmetic_{split}.jsonl.gz", [{"id": r["id"], "prompt": r["prompt"], "answer": r["answer"]}
                                                     for r in rows])
    write(OUT / "arithmetic_sft.jsonl.gz", conversations(sft))
    print(f"{len(train)} train, {len(test)} test prompts, {len(sft)} SFT conversations -> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
