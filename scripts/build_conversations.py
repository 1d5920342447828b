"""Rebuild lmforge/data/chat/python_docs_chat.jsonl.gz: chat conversations derived from the
bundled Python documentation corpus (PSF licence), deterministically.

Each library page "name --- description" becomes a question about the module, answered with
its description and first explanatory paragraph (text of the docs, trimmed to whole
sentences); pages with a short code example get a follow-up turn asking for it.

    python scripts/build_conversations.py
"""

from __future__ import annotations

import gzip
import json
import random
import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "lmforge" / "data" / "corpus" / "python_docs.jsonl.gz"
OUT = ROOT / "lmforge" / "data" / "chat" / "python_docs_chat.jsonl.gz"

QUESTIONS = [
    "What is the `{name}` module for?",
    "What does Python's `{name}` module do?",
    "I keep seeing `import {name}`. What is it?",
    "Briefly, what is `{name}` in the standard library?",
]
SYSTEMS = [
    "You are a concise assistant for Python's standard library.",
    "Answer questions about Python briefly and accurately.",
]
FOLLOW_UP = "Can you show an example?"


def sentences(text: str, limit: int = 400) -> str:
    """Whole sentences of `text`, at most `limit` characters (at least one sentence)."""
    text = " ".join(text.split())
    parts = re.split(r"(?<=[.!?])\s+", text)
    out = parts[0]
    for part in parts[1:]:
        if len(out) + 1 + len(part) > limit:
            break
        out += " " + part
    return out


def first_paragraph(paragraphs: list[str]) -> str | None:
    for paragraph in paragraphs[1:6]:
        flat = " ".join(paragraph.split())
        if flat.startswith(("Source code:", "Deprecated", "Availability", "Note", "See also", "New in version")):
            continue
        if paragraph.startswith("   ") or flat.startswith(("*", "-")) or len(flat) < 60 or not flat.endswith("."):
            continue
        return sentences(flat)
    return None


def code_example(paragraphs: list[str]) -> str | None:
    for paragraph in paragraphs[1:]:
        if paragraph.startswith("   ") and (">>>" in paragraph or "import" in paragraph):
            code = textwrap.dedent(paragraph).strip("\n")
            if 1 <= len(code.splitlines()) < 12:
                return code
    return None


def main() -> None:
    rng = random.Random(1234)
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        docs = sorted((json.loads(line) for line in f), key=lambda d: d["id"])
    records = []
    for doc in docs:
        if not doc["id"].startswith("library/"):
            continue
        paragraphs = doc["text"].split("\n\n")
        title = " ".join(paragraphs[0].split())
        if " --- " not in title:
            continue
        name, description = title.split(" --- ", 1)
        body = first_paragraph(paragraphs)
        if body is None or "deprecated" in description.lower():
            continue
        answer = f"`{name}`: {description}. {body}"
        messages = [{"role": "user", "content": rng.choice(QUESTIONS).format(name=name)},
                    {"role": "assistant", "content": answer}]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
        example = code_example(paragraphs)
        if example is not None:
            messages += [{"role": "user", "content": FOLLOW_UP}, {"role": "assistant", "content": example}]
        records.append({"id": f"python-docs-chat-{len(records) + 1:04d}", "source": doc["id"], "messages": messages})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))
    print(f"{len(records)} conversations -> {OUT}")


if __name__ == "__main__":
    main()
