"""Fail when a module under lmforge/ passes 450 lines or a function passes 80 (ARCHITECTURE.md).

    python scripts/check_sizes.py            # exit 1 and one line per offender
    python scripts/check_sizes.py --max-module-lines 450 --max-function-lines 80
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def offenders(package: Path, max_module: int, max_function: int) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(package.parent)
        lines = text.count("\n") + (not text.endswith("\n") and bool(text))
        if lines > max_module:
            found.append(f"{name}: {lines} lines (max {max_module})")
        for node in ast.walk(ast.parse(text, filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > max_function:
                    found.append(f"{name}:{node.lineno}: function {node.name} is {length} lines (max {max_function})")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default=str(ROOT / "lmforge"))
    parser.add_argument("--max-module-lines", type=int, default=450)
    parser.add_argument("--max-function-lines", type=int, default=80)
    args = parser.parse_args(argv)
    found = offenders(Path(args.package), args.max_module_lines, args.max_function_lines)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
