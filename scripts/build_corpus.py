#!/usr/bin/env python3
"""Build lmforge/data/corpus/python_docs.jsonl.gz from Debian's python3.11-doc package.

    cd "$(mktemp -d)" && apt-get download python3.11-doc && dpkg-deb -x python3.11-doc_*.deb x
    python scripts/build_corpus.py x            # the extracted package root ...
    python scripts/build_corpus.py python3.11-doc_*.deb   # ... or the .deb itself

Each reStructuredText source (``usr/share/doc/python3.11/html/_sources/**/*.rst.txt``)
becomes one document of readable prose, roughly as Sphinx renders it as text:

* markup-only directives (index, toctree, module, sectionauthor, highlight, include,
  image, testsetup, ...) are dropped with their bodies; other directive lines and
  their ``:option:`` lines are dropped and their bodies are kept and dedented;
* API descriptions (``.. function:: open(file, mode='r')``, ``.. class::`` ...) keep
  their signature as a plain line, as in the rendered docs; version notes, admonitions
  and availability notes become their rendered labels ("Changed in version 3.3:",
  "Note:", "Availability: Unix.");
* roles become their text (``:func:`os.open``` -> ``os.open()``, ``:ref:`text <t>``` ->
  ``text``, ``:ref:`label``` -> the section title it points to, ``:pep:`8``` -> ``PEP
  8``); literals, emphasis, links and footnote references lose their markup;
* section underlines/overlines, table borders, comments and link targets are dropped;
* code (``::`` literal blocks, doctests, code-block/doctest/productionlist bodies) is
  kept verbatim and indented;
* runs of 3+ blank lines collapse to one blank line; documents under 200 characters
  are skipped.

Selection (about 5 MB of UTF-8 text): the prose sections tutorial/, reference/, howto/,
faq/, using/, extending/ and the glossary, then the library reference in sorted order
until the budget is reached (whole documents only). whatsnew/ (changelogs, mostly
bullet lists), c-api/ and distutils/ (API listings, legacy) and the installing/
distributing stubs are left out.

Deterministic (sorted order, gzip header without name or timestamp); stdlib only.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import posixpath
import re
import tarfile
from pathlib import Path

SOURCES = "usr/share/doc/python3.11/html/_sources"
PROSE = ["tutorial/", "reference/", "howto/", "faq/", "using/", "extending/", "glossary"]
FILL = "library/"
BUDGET_BYTES = 5_000_000
MIN_CHARS = 200
SUBSTITUTIONS = {"version": "3.11", "release": "3.11", "nbsp": "\u00a0", "thin": "\u2009"}

# Directives dropped together with their whole body (pure markup, or content we lack).
DROP = {
    "index", "toctree", "sectionauthor", "moduleauthor", "codeauthor", "tabularcolumns",
    "highlight", "highlightlang", "include", "literalinclude", "image", "figure", "raw",
    "contents", "audit-event-table", "currentmodule", "module", "program", "testsetup",
    "testcleanup", "default-domain", "default-role", "role", "opcode-table", "c:namespace",
}
# Directives whose body is code: kept verbatim, indented, without inline-markup removal.
CODE = {"code-block", "sourcecode", "code", "doctest", "testcode", "testoutput",
        "productionlist", "parsed-literal"}
# API descriptions: the signature (directive argument) is kept as a line of text.
SIGNATURE_PREFIX = {
    "class": "class ", "exception": "exception ", "decorator": "@", "decoratormethod": "@",
    "classmethod": "classmethod ", "staticmethod": "staticmethod ",
    "abstractmethod": "abstractmethod ", "coroutinefunction": "coroutine ",
    "coroutinemethod": "coroutine ", "awaitablefunction": "awaitable ",
    "awaitablemethod": "awaitable ",
    **{name: "" for name in ("function", "method", "attribute", "data", "opcode", "cmdoption",
                             "option", "envvar", "describe", "object", "pdbcommand",
                             "property")},
}
ADMONITIONS = {"note": "Note", "warning": "Warning", "seealso": "See also",
               "important": "Important", "caution": "Caution", "tip": "Tip", "hint": "Hint",
               "attention": "Attention", "danger": "Danger", "error": "Error",
               "impl-detail": "CPython implementation detail"}

DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::(?:\s+(.*?))?\s*$")
EXPLICIT = re.compile(r"^(\s*)\.\.(?:\s|$)")  # comments, targets, footnotes, substitutions
FOOTNOTE = re.compile(r"^\s*\.\.\s+\[([^\]]+)\]\s*(.*)$")
OPTION = re.compile(r"^\s+:[\w -]+:(?:\s.*)?$")
UNDERLINE = re.compile(r"^(?:([=\-~^\"'`#*+_<>])\1{2,}|\.{4,})\s*$")
TABLE_BORDER = re.compile(r"^\s*(?:(?:[=-]{2,}\s+)+[=-]{2,}|\+(?:[-=]+\+)+)\s*$")
LIST_ITEM = re.compile(r"^\s*(?:[-*+•]|#\.|\d+\.|[a-zA-Z]\.|\(?\d+\)|\(?[a-zA-Z]\))\s+(?=\S)")
SUBST_DEF = re.compile(r"^\s*\.\.\s+\|([^|]+)\|\s+replace::\s+(.*?)\s*$")
NAMED_TARGET = re.compile(r"^\s*\.\.\s+_([^:`]+):\s+\S")
TARGET_DEF = re.compile(r"^\s*\.\.\s+_([^:]+):\s*$")

INLINE = re.compile(
    r"``(?P<lit>\S(?:.*?\S)??)``(?![`\w])"
    r"|:(?P<role>[A-Za-z]+(?::[A-Za-z]+)?):`(?P<rbody>[^`]*)`"
    r"|`(?P<ltext>[^`]*?)\s*<(?P<lurl>[^`>]*)>`_{0,2}"
    r"|`(?P<plain>[^`]+)`_{0,2}"
    r"|(?<![\w*\\])\*\*(?P<strong>\S(?:[^*]*?\S)??)\*\*(?![\w*])"
    r"|(?<![\w*\\])\*(?P<em>\S(?:[^*]*?\S)??)\*(?![\w*])"
    r"|(?P<fnspace>[ \t]*)\[(?P<fn>#[\w-]*|\*|\d+|[A-Za-z][\w-]*)\]_"
    r"|(?<![\w.-])(?P<ref>[A-Za-z][\w-]*[A-Za-z0-9])_(?![\w-])"
    r"|(?<![\w|])\|(?P<subst>\w[\w -]*)\|(?:__?)?(?![\w|])",
    re.S,
)
TARGET_IN_ROLE = re.compile(r"^(?P<text>.*?)\s*<(?P<target>[^<>]*)>$", re.S)
PAREN_ROLES = {"func", "meth", "py:func", "py:meth", "c:func"}


# ---------------------------------------------------------------------------- sources
def read_sources(path: Path) -> dict[str, str]:
    """{relative path under _sources: text} from an extracted package root or a .deb."""
    files: dict[str, str] = {}
    if path.is_file():
        prefix = "./" + SOURCES + "/"
        with tarfile.open(fileobj=io.BytesIO(deb_data_tar(path.read_bytes())), mode="r:*") as tar:
            for member in tar:
                name = member.name if member.name.startswith("./") else "./" + member.name
                if member.isfile() and name.startswith(prefix) and name.endswith(".rst.txt"):
                    files[name[len(prefix):]] = tar.extractfile(member).read().decode("utf-8")
    else:
        root = path / SOURCES
        if not root.is_dir():
            raise SystemExit(f"{root} not found: pass the extracted python3.11-doc root or its .deb")
        for file in root.rglob("*.rst.txt"):
            files[file.relative_to(root).as_posix()] = file.read_text(encoding="utf-8")
    if not files:
        raise SystemExit(f"no .rst.txt sources found in {path}")
    return dict(sorted(files.items()))


def deb_data_tar(deb: bytes) -> bytes:
    """The data.tar.* member of a Debian package (an `ar` archive)."""
    if not deb.startswith(b"!<arch>\n"):
        raise SystemExit("not a .deb (ar archive) file")
    pos = 8
    while pos + 60 <= len(deb):
        header = deb[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        if name.startswith("data.tar"):
            return deb[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)
    raise SystemExit("no data.tar member in the .deb")


# ---------------------------------------------------------------------------- titles
def section_titles(files: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """Map `.. _label:` targets and document names to the section titles they name."""
    labels: dict[str, str] = {}
    docs: dict[str, str] = {}
    for rel, text in files.items():
        lines = text.splitlines()
        pending: list[str] = []
        for i, line in enumerate(lines):
            m = TARGET_DEF.match(line)
            if m:
                pending.append(m.group(1).strip().lower())
                continue
            if not line.strip():
                continue
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            prev = lines[i - 1] if i else ""
            is_title = (UNDERLINE.match(nxt) and len(nxt.rstrip()) >= len(line.strip())
                        and (not line.startswith(" ") or UNDERLINE.match(prev))
                        and not UNDERLINE.match(line))
            if is_title:
                title = inline(line.strip(), {}, {}, "")
                docs.setdefault(rel.removesuffix(".rst.txt"), title)
                for label in pending:
                    labels.setdefault(label, title)
            if not UNDERLINE.match(line) and not EXPLICIT.match(line):
                pending = []  # (directives between a target and its title keep it)
    return labels, docs


# ---------------------------------------------------------------------------- inline
def inline(text: str, labels: dict[str, str], docs: dict[str, str], doc_id: str,
           substitutions: dict[str, str] | None = None) -> str:
    """Replace reST inline markup in a prose paragraph by its rendered text."""
    out, pos = [], 0
    for m in INLINE.finditer(text):
        out.append(unescape(text[pos:m.start()]))
        out.append(render(m, labels, docs, doc_id, substitutions or {}))
        pos = m.end()
    out.append(unescape(text[pos:]))
    result = "".join(out)
    # Markup broken across table cells or otherwise unbalanced: drop what is left of it.
    return re.sub(r":[A-Za-z]+(?::[A-Za-z]+)?:`", "", result)


def unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: "" if m.group(1) in " \n" else m.group(1), text, flags=re.S)


def render(m: re.Match, labels: dict[str, str], docs: dict[str, str], doc_id: str,
           substitutions: dict[str, str]) -> str:
    if m.group("lit") is not None:
        return m.group("lit")
    if m.group("role") is not None:
        return render_role(m.group("role"), m.group("rbody"), labels, docs, doc_id)
    if m.group("lurl") is not None:
        return unescape(m.group("ltext")) or m.group("lurl")
    if m.group("plain") is not None:
        return unescape(m.group("plain"))
    if m.group("strong") is not None:
        return unescape(m.group("strong"))
    if m.group("em") is not None:
        return unescape(m.group("em"))
    if m.group("fn") is not None:
        fn = m.group("fn")
        return "" if fn.startswith("#") or fn == "*" else f"{m.group('fnspace')}[{fn}]"
    if m.group("ref") is not None:  # a named hyperlink reference, if one of ours
        known = m.group("ref").lower() + "_" in substitutions
        return m.group("ref") if known else m.group(0)
    name = m.group("subst")
    return substitutions.get(name, SUBSTITUTIONS.get(name, m.group(0)))


# Roles whose rendered text is the target with a fixed prefix (":pep:`8`" -> "PEP 8").
ROLE_PREFIX = {"pep": "PEP ", "rfc": "RFC ", "issue": "bpo-", "gh": "gh-", "sup": "^", "sub": "_"}


def render_role(role: str, body: str, labels: dict[str, str], docs: dict[str, str],
                doc_id: str) -> str:
    role = role.lower().removeprefix("py:")
    explicit = TARGET_IN_ROLE.match(body)
    if explicit and explicit.group("text"):
        return unescape(explicit.group("text"))
    if explicit:  # ``:role:`<target>``` -- no text given
        body = explicit.group("target")
    body = unescape(body)
    if role == "ref":
        return labels.get(body.lower(), body.replace("-", " "))
    if role == "doc":
        target = body.lstrip("/") if body.startswith("/") else posixpath.normpath(
            posixpath.join(posixpath.dirname(doc_id), body))
        return docs.get(target, posixpath.basename(body))
    if role in ROLE_PREFIX:
        return ROLE_PREFIX[role] + body
    if role in ("samp", "file"):
        body = re.sub(r"(?<!\\)\{([^{}]*)\}", r"\1", body)
    if body.startswith("!"):
        body = body[1:]
    elif body.startswith("~"):
        body = re.split(r"[.:]", body[1:])[-1] if "(" not in body else body[1:]
    if role in PAREN_ROLES and not body.endswith(")"):
        body += "()"
    return body


# ---------------------------------------------------------------------------- blocks
class Frame:
    """An open indented block: a directive body, a comment, or a literal block."""

    def __init__(self, indent: int, kind: str, out_indent: int):
        self.indent = indent          # indent of the line that opened the block
        self.kind = kind              # "drop" | "code" | "keep" | "signature"
        self.out_indent = out_indent  # where its kept (dedented) body goes in the output
        self.body_seen = False        # a body line has been seen
        self.head = True              # still right after the opening line (options zone)
        self.shift = 0                # columns removed from the lines of its body
        self.grammar = False          # a productionlist body


def indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def label_line(name: str, arg: str, has_body: bool) -> str | None:
    end = ":" if has_body else "."
    if name in ("versionadded", "versionchanged", "deprecated"):
        version, _, rest = arg.partition(" ")
        lead = {"versionadded": "New in version", "versionchanged": "Changed in version",
                "deprecated": "Deprecated since version"}[name]
        return f"{lead} {version}: {rest}" if rest else f"{lead} {version}{end}"
    if name == "deprecated-removed":
        parts = arg.split(" ", 2)
        line = f"Deprecated since version {parts[0]}, will be removed in version {parts[1]}" \
            if len(parts) > 1 else f"Deprecated since version {arg}"
        return f"{line}: {parts[2]}" if len(parts) > 2 else line + end
    if name in ADMONITIONS:
        return f"{ADMONITIONS[name]}: {arg}" if arg else ADMONITIONS[name] + ":"
    if name == "availability":
        return f"Availability: {arg.rstrip('.')}."
    if name == "audit-event":
        event, _, rest = arg.partition(" ")
        args = rest.split(" ")[0] if rest else ""
        return (f"Raises an auditing event {event} with arguments "
                f"{', '.join(a for a in args.split(',') if a)}."
                if args else f"Raises an auditing event {event} with no arguments.")
    if name in ("rubric", "topic", "sidebar", "table", "list-table", "csv-table") and arg:
        return arg
    return None


def clean(rst: str, labels: dict[str, str], docs: dict[str, str], doc_id: str) -> str:
    lines = rst.expandtabs(8).splitlines()
    substitutions = {}  # this document's `.. |name| replace:: text` definitions
    for n, line in enumerate(lines):
        if n + 1 < len(lines) and UNDERLINE.match(lines[n + 1]) and line.strip():
            substitutions[line.strip().lower() + "_"] = ""  # section titles are targets too
        m = SUBST_DEF.match(line)
        if m:
            substitutions[m.group(1)] = inline(m.group(2), labels, docs, doc_id)
        m = TARGET_DEF.match(line) or NAMED_TARGET.match(line)
        if m:  # `name_` references to this document's targets render as `name`
            substitutions[m.group(1).strip().lower() + "_"] = ""
    out: list[tuple[str, bool]] = []  # (line, is_code)
    stack: list[Frame] = []

    def has_body(i: int, indent: int) -> bool:
        for later in lines[i + 1:]:
            if later.strip() and not OPTION.match(later):
                return indent_of(later) > indent
        return False

    i = -1
    while i + 1 < len(lines):
        i += 1
        line = lines[i].rstrip()
        if not line:
            for frame in stack:
                frame.head = False
            if not (stack and stack[-1].kind == "drop"):
                out.append(("", bool(stack) and stack[-1].kind == "code"))
            continue
        ind = indent_of(line)
        while stack and ind <= stack[-1].indent:
            stack.pop()
        top = stack[-1] if stack else None
        if top and top.kind == "drop":
            continue
        if top and top.head and OPTION.match(line):  # directive options
            continue
        if top and top.kind == "signature" and top.head and not top.body_seen \
                and ind >= top.indent + 6:
            out.append((" " * top.out_indent + line.strip(), False))  # more signatures
            continue
        if top and not top.body_seen:
            top.body_seen = True
            top.head = False
            if top.kind in ("keep", "signature"):  # dedent the body to the directive
                top.shift = ind - top.out_indent
            # code keeps the parent's shift: it stays indented relative to the text
        shift = top.shift if top else 0
        out_ind = max(ind - shift, 0)
        if top and top.kind == "code":
            text = line[ind:]
            if top.grammar:  # token references in grammar rules: `name` -> name
                text = re.sub(r"`([^`\s]+)`", r"\1", text)
            out.append((" " * out_ind + text, True))
            continue

        directive = DIRECTIVE.match(line)
        if directive:
            name, arg = directive.group(2).lower(), (directive.group(3) or "").strip()
            if name in DROP:
                kind = "drop"
            elif name in CODE:
                kind = "code"
            elif name.removeprefix("py:") in SIGNATURE_PREFIX or name.startswith("c:"):
                kind = "signature"
                prefix = SIGNATURE_PREFIX.get(name.removeprefix("py:"), "")
                out.append((" " * out_ind + prefix + arg, False))
            else:
                kind = "keep"
                label = label_line(name, arg, has_body(i, ind))
                if label is not None:
                    out.append((" " * out_ind + label, False))
            frame = Frame(ind, kind, out_ind)
            frame.shift, frame.grammar = shift, name == "productionlist"
            stack.append(frame)
            continue
        if EXPLICIT.match(line):
            footnote = FOOTNOTE.match(line)
            if footnote and not footnote.group(1).startswith(("#", "*")):
                out.append((" " * out_ind + f"[{footnote.group(1)}] {footnote.group(2)}", False))
                frame = Frame(ind, "keep", out_ind)
            elif footnote:
                out.append((" " * out_ind + footnote.group(2), False))
                frame = Frame(ind, "keep", out_ind)
            else:  # comment, hyperlink target, substitution definition
                frame = Frame(ind, "drop", out_ind)
            frame.shift = shift
            stack.append(frame)
            continue
        if line.lstrip().startswith("__ "):  # anonymous hyperlink target
            continue
        if (ind == 0 and UNDERLINE.match(line)) or TABLE_BORDER.match(line):
            continue
        if line.lstrip().startswith(">>>") and (not out or not out[-1][0].strip()):
            # A doctest block: code up to the next blank line.
            while i < len(lines) and lines[i].strip():
                out.append((" " * out_ind + lines[i].rstrip()[ind:], True))
                i += 1
            i -= 1
            continue
        text = line[ind:]
        if text.endswith("::"):  # "Example::" introduces a literal block
            text = text[:-2].rstrip() if text == "::" or text.endswith(" ::") else text[:-1]
            item = LIST_ITEM.match(line)  # the paragraph of a list item is indented further
            frame = Frame(ind + (len(item.group(0)) - ind if item else 0), "code", out_ind)
            frame.shift = shift
            stack.append(frame)
            if not text:
                continue
        out.append((" " * out_ind + text, False))

    # Inline markup, one prose paragraph at a time (roles and literals may span lines).
    result: list[str] = []
    para: list[str] = []

    def flush() -> None:
        if para:
            result.extend(inline("\n".join(para), labels, docs, doc_id, substitutions).split("\n"))
            para.clear()

    for text, is_code in out:
        if is_code or not text.strip():
            flush()
            result.append(text)
        else:
            para.append(text)
    flush()
    joined = "\n".join(line.rstrip() for line in result)
    return re.sub(r"\n{3,}", "\n\n", joined).strip("\n") + "\n"


# ---------------------------------------------------------------------------- main
def select(files: dict[str, str]) -> list[str]:
    ids = [rel.removesuffix(".rst.txt") for rel in files]
    chosen = []
    for group in PROSE + [FILL]:
        chosen += [d for d in ids if (d.startswith(group) if group.endswith("/") else d == group)]
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path,
                        help="root of the extracted python3.11-doc package, or the .deb file")
    parser.add_argument("--out", type=Path, default=Path("lmforge/data/corpus/python_docs.jsonl.gz"))
    parser.add_argument("--budget", type=int, default=BUDGET_BYTES, help="max UTF-8 bytes of text")
    args = parser.parse_args()

    files = read_sources(args.source)
    labels, docs = section_titles(files)
    buffer, count, chars, total, groups, last = io.BytesIO(), 0, 0, 0, {}, None
    with gzip.GzipFile(filename="", fileobj=buffer, mode="wb", mtime=0, compresslevel=9) as gz:
        for doc_id in select(files):
            text = clean(files[doc_id + ".rst.txt"], labels, docs, doc_id)
            if len(text.strip()) < MIN_CHARS:
                continue
            size = len(text.encode("utf-8"))
            if total + size > args.budget:
                break
            gz.write((json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n").encode())
            count, chars, total = count + 1, chars + len(text), total + size
            group = doc_id.split("/")[0]
            groups[group] = groups.get(group, 0) + 1
            last = doc_id
    data = buffer.getvalue()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(args.out)
    print(f"documents: {count}  ({', '.join(f'{g} {n}' for g, n in groups.items())}; last: {last})")
    print(f"characters: {chars:,}")
    print(f"text bytes (UTF-8): {total:,}")
    print(f"compressed bytes: {len(data):,}")
    print(f"sha256: {hashlib.sha256(data).hexdigest()}  {args.out}")


if __name__ == "__main__":
    main()
