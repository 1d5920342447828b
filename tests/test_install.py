"""The install is lean and honest: pyproject.toml declares exactly what lmforge imports, core or
per capability; constraints.txt pins it for CI; the wheel carries the configs and bundled data,
and installs into an empty venv where `lmforge quickstart` runs from any directory.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata as metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lmforge import extras

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
NOT_CAPABILITIES = {"dev", "bench"}  # the test suite's and the benchmarks' sets, not features
# Declared in the core although lmforge does not import them: a library lmforge uses needs them
# for what lmforge does with it, but declares them only in its own extras (datatrove's [io] and
# [processing]: the steps `lmforge curate` runs; fsspec's codecs: `.zst` inputs).
INDIRECT = {"orjson": "datatrove.pipeline.readers.jsonl", "regex": "datatrove.utils.word_tokenizers",
            "spacy": "datatrove.utils.word_tokenizers", "zstandard": "fsspec.compression"}
# Imported under another distribution's name, which pins it exactly.
ALIASES = {"pydantic_core": "pydantic"}
# Test-set entries the suite runs as tools rather than imports.
TOOLS = {"pytest": "runs the suite", "ruff": "`make lint`", "import-linter": "tests/test_architecture.py",
         "tenacity": "lm_eval's API models (local-completions, tests/serve/test_harness_client.py) need it"}


def group(name: str) -> dict[str, Requirement]:
    """The requirements of the core ("core") or of one extra, by canonical distribution name."""
    specs = PROJECT["dependencies"] if name == "core" else PROJECT["optional-dependencies"][name]
    requirements = [Requirement(spec) for spec in specs]
    return {canonicalize_name(r.name): r for r in requirements if canonicalize_name(r.name) != "lmforge"}


def capabilities() -> list[str]:
    return [name for name in PROJECT["optional-dependencies"] if name not in NOT_CAPABILITIES]


def third_party_imports(where: Path, requires: bool = True) -> dict[str, list[str]]:
    """Top-level name -> the `file:line`s importing it, for every import that is neither stdlib nor this
    repo's (lmforge, tests, benchmarks), and, with `requires`, every `extras.require("name", ...)`."""
    found: dict[str, list[str]] = {}
    for path in sorted(where.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif requires and _is_require(node):  # extras.require("peft", ...)
                names = [node.args[0].value]
            else:
                continue
            for name in names:
                top = "tensorboard" if name.startswith("torch.utils.tensorboard") else name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in {"lmforge", "tests", "benchmarks"}:
                    found.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def _is_require(node: ast.AST) -> bool:
    called = getattr(node.func, "attr", None) or getattr(node.func, "id", None) if isinstance(node, ast.Call) else None
    return (called == "require"  # extras.require(...) or a bare require(...) imported from lmforge.extras
            and bool(node.args) and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str))


@cache
def distributions_of(import_name: str) -> set[str]:
    """The distributions that install a top-level import name (an extra's uninstalled one: its own)."""
    if import_name in ALIASES:
        return {ALIASES[import_name]}
    installed = metadata.packages_distributions().get(import_name)
    if installed:
        return {canonicalize_name(d) for d in installed}
    if import_name in extras.EXTRAS:
        return {canonicalize_name(extras.EXTRAS[import_name][0])}
    return {canonicalize_name(import_name)}  # not installed here (a bench-only package in CI): its own name


def test_every_third_party_import_in_lmforge_is_declared_in_the_core_or_its_capabilitys_extra():
    core = group("core")
    wrong = []
    for name, where in third_party_imports(ROOT / "lmforge").items():
        dists = distributions_of(name)
        if name in extras.EXTRAS:
            extra = extras.EXTRAS[name][1]
            if not dists & set(group(extra)):
                wrong.append(f"{name} ({where[0]}) is not declared in the {extra!r} extra")
        elif not dists & set(core):
            wrong.append(f"{name} ({where[0]}) is not a core dependency (and not in lmforge.extras.EXTRAS)")
    assert not wrong, "\n".join(wrong)


def test_every_declared_dependency_is_used_and_every_capability_extra_has_its_install_hint():
    imported = {d for name in third_party_imports(ROOT / "lmforge") for d in distributions_of(name)}
    unused = [f"core: {name}" for name in group("core") if name not in imported and name not in INDIRECT]
    for extra in capabilities():
        unused += [f"{extra}: {name}" for name in group(extra) if name not in imported]
        hinted = {canonicalize_name(dist) for dist, ex in extras.EXTRAS.values() if ex == extra}
        assert hinted == set(group(extra)), f"lmforge.extras.EXTRAS and pyproject's {extra!r} extra differ"
    assert not unused, "declared but never imported by lmforge: " + ", ".join(unused)
    for name, module in INDIRECT.items():  # still needed by the library that lmforge uses
        source = Path(importlib.util.find_spec(module).origin).read_text(encoding="utf-8")
        assert re.search(rf"import {name}\b|\"{name}\"", source), f"{module} no longer needs {name}"


def test_the_test_set_holds_exactly_what_the_tests_import_and_every_testable_capability():
    imports = third_party_imports(ROOT / "tests", requires=False)
    for name in re.findall(r"importorskip\(\"(\w+)\"", _text(ROOT / "tests")):
        imports.setdefault(name, ["importorskip"])
    used = {d for name in imports for d in distributions_of(name)}
    unused = [name for name in group("dev") if name not in used and name not in TOOLS]
    assert not unused, "in the dev extra but no test imports them: " + ", ".join(unused)
    declared = {n for g in ["core", *PROJECT["optional-dependencies"]] for n in group(g)}
    undeclared = [f"{name} ({where[0]})" for name, where in imports.items() if not distributions_of(name) & declared]
    assert not undeclared, "tests import what no group declares: " + ", ".join(undeclared)
    untested = set(capabilities()) - {"vllm"}  # vLLM needs CUDA: its test skips without it
    assert untested <= set(Requirement(PROJECT["optional-dependencies"]["dev"][0]).extras)
    bench = {d for name in third_party_imports(ROOT / "benchmarks") for d in distributions_of(name)}
    assert set(group("bench")) <= bench


def test_constraints_pin_every_installed_declared_distribution_inside_its_declared_range():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    for requirement in [r for g in ["core", *PROJECT["optional-dependencies"]] for r in group(g).values()]:
        name = canonicalize_name(requirement.name)
        try:
            installed = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            continue  # vllm: CUDA only, never installed by the test set
        assert pins.get(name) == installed, f"constraints.txt pins {name} {pins.get(name)}, installed {installed}"
        assert requirement.specifier.contains(installed, prereleases=True), f"{name} {installed} not in {requirement}"


def test_package_data_names_only_files_that_exist_and_covers_every_bundled_file():
    package = ROOT / "lmforge"
    patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["lmforge"]
    files = [p.relative_to(package).as_posix() for p in package.rglob("*")
             if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts]
    assert not [p for p in patterns if not fnmatch.filter(files, p)], "package-data globs that match nothing"
    assert not [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)], "files the wheel would miss"


def _text(where: Path) -> str:
    return "\n".join(p.read_text(encoding="utf-8") for p in sorted(where.rglob("*.py")))


QUICK = ["model.preset=tiny", "model.max_seq_len=128", "seq_len=64", "vocab_size=1024", "max_steps=10",
         "global_batch_tokens=1024", "micro_batch_size=16", "eval_every=0", "warmup_steps=2", "progress=false",
         "sampling.max_tokens=8", "sft_steps=2", "safety_eval_limit=1", "planted_duplicates=1"]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LMFORGE_SKIP_WHEEL_TEST", "") not in ("", "0"),
                    reason="LMFORGE_SKIP_WHEEL_TEST is set")
def test_the_wheel_installs_into_an_empty_venv_and_runs_the_quickstart_from_another_directory(tmp_path):
    """~1.5 minutes on 2 cores (venv 45 s, quickstart 40 s); LMFORGE_SKIP_WHEEL_TEST=1 skips it."""
    started = time.monotonic()
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    run = lambda *cmd, cwd=tmp_path: subprocess.run(  # noqa: E731
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    src = tmp_path / "src"  # a copy of the checkout: building in place would leave build/ and *.egg-info in it
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "lmforge", src / "lmforge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", src)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("lmforge-*.whl"))
    venv = tmp_path / "venv"
    assert run(sys.executable, "-m", "venv", venv).returncode == 0
    python, constraints = venv / "bin" / "python", ROOT / "constraints.txt"
    for spec in ("torch==2.13.0", wheel):  # torch first (the CPU build from pip's source), as `make` does
        done = run(python, "-m", "pip", "install", "-q", "-c", constraints, spec)
        assert done.returncode == 0, done.stderr[-3000:]
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    where = run(python, "-c", "import lmforge, importlib.util as u; print(lmforge.__file__, "
                "[m for m in ('fastapi', 'peft', 'lm_eval', 'wandb', 'ray') if u.find_spec(m)])")
    assert str(venv) in where.stdout and "[]" in where.stdout, where.stdout + where.stderr  # the core only

    work = tmp_path / "elsewhere"
    work.mkdir()
    quick = run(venv / "bin" / "lmforge", "quickstart", "--out", "qs", *QUICK, cwd=work)
    assert quick.returncode == 0, quick.stderr[-3000:]
    summary = json.loads((work / "qs" / "summary.json").read_text())
    assert all(s["status"] == "ran" for s in summary.values()) and {"curate", "train", "export"} <= set(summary)
    assert (work / "qs" / "model" / "model.safetensors").is_file()
    assert (work / "qs" / "sample.txt").read_text().startswith("The Python interpreter")
    served = run(venv / "bin" / "lmforge", "serve", "qs/model", cwd=work)
    assert served.returncode == 2 and served.stderr.strip().endswith("pip install 'lmforge[serve]'"), served.stderr
    print(f"wheel -> empty venv -> quickstart: {time.monotonic() - started:.0f} s")
