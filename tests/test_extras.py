"""A capability whose extra is not installed says which `pip install 'lmforge[EXTRA]'` brings it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lmforge import extras
from lmforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter where every extra's package fails to import, as in a core install.
WITHOUT_EXTRAS = """
import sys
for name in {names!r}:
    sys.modules[name] = None  # `import name` now raises ModuleNotFoundError(name=name)
{body}
"""


def without_extras(body: str, cwd: Path) -> subprocess.CompletedProcess:
    code = WITHOUT_EXTRAS.format(names=sorted(extras.EXTRAS), body=body)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "LMFORGE_LOG_LEVEL": "WARNING"})


def test_lmforge_serve_without_the_serve_extra_prints_the_install_command_and_exits_2(tmp_path):
    done = without_extras("from lmforge.cli import main\nsys.exit(main(['serve', 'models/small']))", tmp_path)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("error: lmforge serve needs ") and lines[0].endswith("pip install 'lmforge[serve]'")


def test_the_core_verbs_import_and_answer_help_without_any_extra(tmp_path):
    core = ["lmforge.quickstart", "lmforge.data.curate.pipeline", "lmforge.data.tokenize", "lmforge.train.trainer",
            "lmforge.align.run", "lmforge.align.rl", "lmforge.eval.runner", "lmforge.eval.harness",
            "lmforge.interop.export", "lmforge.interop.importer", "lmforge.chat", "lmforge.safety.release",
            "lmforge.monitor.trackers", "lmforge.monitor.report", "lmforge.store.adapter"]
    body = "\n".join(f"import {m}" for m in core) + "\nfrom lmforge.cli import main\nsys.exit(main(['--help']))"
    done = without_extras(body, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "quickstart" in done.stdout


@pytest.mark.parametrize(("module", "purpose", "extra"), [
    ("peft", "LoRA", "align"),
    ("lm_eval", "the lm-evaluation-harness adapter", "eval"),
    ("ray", "executor.kind=ray", "ray"),
    ("llguidance.torch", "structured outputs", "serve"),
    ("wandb", "tracker wandb", "track"),
])
def test_require_names_the_extra_of_a_missing_module_in_one_line(monkeypatch, module, purpose, extra):
    monkeypatch.setitem(sys.modules, module.split(".")[0], None)
    if "." in module:  # a submodule imported earlier would be returned from the cache
        monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ConfigError) as caught:
        extras.require(module, purpose)
    message = str(caught.value)
    assert isinstance(caught.value, extras.MissingExtraError) and "\n" not in message
    assert message.startswith(f"{purpose} needs {module.split('.')[0]}")
    assert message.endswith(f"pip install 'lmforge[{extra}]'")


def test_require_returns_an_installed_module_and_lets_a_broken_install_raise(monkeypatch, tmp_path):
    import json

    assert extras.require("json", "anything") is json
    # The package is there but one of its own imports is missing: a broken install, not a hint.
    (tmp_path / "lmforge_broken_extra.py").write_text("import lmforge_missing_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="lmforge_missing_dependency"):
        extras.require("lmforge_broken_extra", "x")
    # A package no extra declares: the hint names the package itself.
    with pytest.raises(extras.MissingExtraError, match="x needs lmforge_missing_dependency, which is not installed: "
                       "pip install lmforge_missing_dependency"):
        extras.require("lmforge_missing_dependency", "x")


def test_the_peft_lora_path_raises_the_align_hint_when_peft_is_missing(monkeypatch):
    from lmforge.store.adapter import peft_module

    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(extras.MissingExtraError, match=r"LoRA needs peft, which is not installed: pip install 'lmforge\[align\]'"):
        peft_module()
