"""Rebuild lmforge/data/chat/python_docs_preferences.jsonl.gz: preference pairs for DPO derived
from the shipped Python-docs conversations (PSF licence), deterministically, with no download.

Every pair asks the same question as a shipped conversation. The chosen reply is the
conversation's own answer (text of the docs); the rejected reply is a plausible failure a
fine-tuned model makes, one of five kinds:

    hallucinated    another module's description and paragraph under this module's name
    truncated       the answer cut off mid-sentence after about a third of its words
    refusal         an over-refusal of a harmless question
    vague           a content-free reply that names the module and says nothing about it
    wrong_example   the follow-up "Can you show an example?" answered with another page's code

Each conversation's first question gets two pairs with two different kinds of the first four;
a conversation with a follow-up turn gets a `wrong_example` pair as well.

    python scripts/build_preference_set.py
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONVERSATIONS = ROOT / "lmforge" / "data" / "chat" / "python_docs_chat.jsonl.gz"
OUT = ROOT / "lmforge" / "data" / "chat" / "python_docs_preferences.jsonl.gz"
SEED = 4321
FIRST_TURN_KINDS = ["hallucinated", "truncated", "refusal", "vague"]

REFUSALS = [
    "I can't help with that request.",
    "Sorry, I can't answer questions about that.",
    "I'm not able to help with that.",
]
VAGUE = [
    "`{name}` is a module in Python's standard library. You can import it and use it in your programs.",
    "`{name}` is part of Python. It provides functionality that you can use when you need it.",
    "That is one of the standard library modules; the documentation has the details.",
]
HEADER = re.compile(r"^`([^`]+)`: ")


def load_conversations() -> list[dict]:
    with gzip.open(CONVERSATIONS, "rt", encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for record in records:
        first = next(m["content"] for m in record["messages"] if m["role"] == "assistant")
        record["name"] = HEADER.match(first).group(1)
    return records


def first_turn(messages: list[dict]) -> tuple[list[dict], str]:
    """The prompt up to the first question (system message included) and its reference answer."""
    reply = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:reply], messages[reply]["content"]


def other(records: list[dict], record: dict, rng: random.Random, has=lambda r: True) -> dict:
    """Another conversation about a module whose name is not a prefix-relative of this one's."""
    name = record["name"]
    while True:
        pick = rng.choice(records)
        if pick is not record and has(pick) and not pick["name"].startswith(name) and not name.startswith(pick["name"]):
            return pick


def rejected_reply(kind: str, record: dict, answer: str, records: list[dict], rng: random.Random) -> str:
    name = record["name"]
    if kind == "hallucinated":
        _, their_answer = first_turn(other(records, record, rng)["messages"])
        return f"`{name}`: " + HEADER.sub("", their_answer, count=1)
    if kind == "truncated":
        words = answer.split()
        return " ".join(words[: max(6, len(words) // 3)]).rstrip(".,;:")
    if kind == "refusal":
        return rng.choice(REFUSALS)
    if kind == "vague":
        return rng.choice(VAGUE).format(name=name)
    raise ValueError(kind)


def build() -> list[dict]:
    rng = random.Random(SEED)
    records = load_conversations()
    pairs = []

    def add(record: dict, kind: str, prompt: list[dict], chosen: str, rejected: str) -> None:
        assert rejected != chosen, (record["id"], kind)
        pairs.append({"id": f"python-docs-pref-{len(pairs) + 1:04d}", "source": record["source"], "kind": kind,
                      "prompt": prompt, "chosen": chosen, "rejected": rejected})

    for record in records:
        prompt, answer = first_turn(record["messages"])
        for kind in rng.sample(FIRST_TURN_KINDS, 2):
            add(record, kind, prompt, answer, rejected_reply(kind, record, answer, records, rng))
        messages = record["messages"]
        if len(messages) > len(prompt) + 1:  # a follow-up turn asking for the page's example
            example_of = other(records, record, rng, has=lambda r: len(r["messages"]) > len(first_turn(r["messages"])[0]) + 1)
            add(record, "wrong_example", messages[:-1], messages[-1]["content"], example_of["messages"][-1]["content"])
    return pairs


def main() -> None:
    pairs = build()
    data = gzip.compress("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs).encode("utf-8"), mtime=0)
    tmp = OUT.with_name(OUT.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, OUT)
    # The file must read as `lmforge dpo` reads it (every record a valid preference pair).
    from lmforge.align.data import read_preferences

    assert len(read_preferences(OUT)) == len(pairs)
    kinds = {k: sum(p["kind"] == k for p in pairs) for k in dict.fromkeys(p["kind"] for p in pairs)}
    print(f"{len(pairs)} pairs ({', '.join(f'{k}: {n}' for k, n in kinds.items())}) -> {OUT}")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")


if __name__ == "__main__":
    main()
