#!/usr/bin/env python3
"""Build lmforge/data/corpus/python_docs.jsonl.gz from Debian's python3.11-doc package.

    cd $(mktemp -d) && apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb x
    python scripts/build_corpus.py x  [--out lmforge/data/corpus/python_docs.jsonl.gz]

Each reStructuredText source (`html/_sources/**/*.rst.txt`) becomes one document of
readable prose: directives, roles and section underlines are stripped; code examples are
kept. Deterministic: sorted order, gzip header without a timestamp. Stdlib only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
from pathlib import Path

SOURCES = "usr/share/doc/python3.11/html/_sources"
# Prose first; the library reference fills the remaining budget in sorted order.
# whatsnew (changelogs), c-api and distutils (API listings) are left out.
PROSE_DIRS = ["tutorial", "reference", "howto", "faq", "using", "extending"]
FILL_DIR = "library"
BUDGET_BYTES = 5_000_000
MIN_CHARS = 200

DIRECTIVE = re.compile(r"^\s*\.\.\s+[\w:-]+::.*$")
COMMENT_OR_TARGET = re.compile(r"^\s*\.\.\s+(_[^:]+:.*|\[[^\]]+\].*|\|[^|]+\|.*|[^\w\s].*)?$")
OPTION = re.compile(r"^\s+:[\w-]+:.*$")
UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")
ROLE_WITH_TARGET = re.compile(r":[\w:.-]+:`([^`<]*?)\s*<[^`>]*>`")
ROLE = re.compile(r":[\w:.-]+:`~?!?([^`]*)`")
LITERAL = re.compile(r"``([^`]+)``")
LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")
EMPHASIS = re.compile(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*")


def clean(rst: str) -> str:
    lines = []
    for line in rst.splitlines():
        if DIRECTIVE.match(line) or OPTION.match(line) or UNDERLINE.match(line):
            continue
        if COMMENT_OR_TARGET.match(line):
            continue
        line = ROLE_WITH_TARGET.sub(r"\1", line)
        line = ROLE.sub(r"\1", line)
        line = LITERAL.sub(r"\1", line)
        line = LINK.sub(r"\1", line)
        line = EMPHASIS.sub(lambda m: m.group(1) or m.group(2), line)
        lines.append(line.rstrip())
    text = "\n".join(lines)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


def documents(root: Path):
    sources = root / SOURCES
    if not sources.is_dir():
        raise SystemExit(f"{sources} not found: pass the root of the extracted python3.11-doc package")
    for directory in PROSE_DIRS + [FILL_DIR]:
        for path in sorted((sources / directory).rglob("*.rst.txt")):
            doc_id = str(path.relative_to(sources)).removesuffix(".rst.txt")
            yield doc_id, clean(path.read_text(encoding="utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="root of the extracted python3.11-doc package")
    parser.add_argument("--out", type=Path, default=Path("lmforge/data/corpus/python_docs.jsonl.gz"))
    parser.add_argument("--budget", type=int, default=BUDGET_BYTES, help="max UTF-8 bytes of text")
    args = parser.parse_args()

    buffer, count, total = io.BytesIO(), 0, 0
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as gz:
        for doc_id, text in documents(args.root):
            size = len(text.encode("utf-8"))
            if len(text) < MIN_CHARS:
                continue
            if total + size > args.budget:
                break
            gz.write((json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n").encode("utf-8"))
            count, total = count + 1, total + size
    data = buffer.getvalue()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(args.out)
    print(f"{count} documents, {total:,} bytes of text, {len(data):,} bytes compressed")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}  {args.out}")


if __name__ == "__main__":
    main()
