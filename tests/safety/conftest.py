"""Shared fixtures of the safety tests: a released-model setup (an exported model dir and a small task)."""

from __future__ import annotations

import json

import pytest

from lmforge.interop import export
from lmforge.interop.export import ExportConfig


@pytest.fixture
def released_setup(trained_run, tmp_path):
    model_dir = tmp_path / "model"
    export.run(ExportConfig(model=str(trained_run), out=str(model_dir)))
    task = tmp_path / "mc.jsonl"
    task.write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Which keyword defines a function?", "choices": ["def", "class", "with"], "answer": 0},
        {"question": "Which type is immutable?", "choices": ["list", "tuple", "dict"], "answer": 1},
        {"question": "Which statement handles exceptions?", "choices": ["try", "for", "while"], "answer": 0},
    ]))
    return model_dir, task
