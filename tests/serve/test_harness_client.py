"""lm-evaluation-harness's `local-completions` model, pointed at the server, scores like `lmforge eval`."""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task data only; never the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from lm_eval.tasks import TaskManager  # noqa: E402

from lmforge.eval import tasks  # noqa: E402
from lmforge.eval.scoring import Scorer  # noqa: E402
from lmforge.store.model_dir import tokenizer_files  # noqa: E402
from tests.serve.conftest import KEY, MODEL_NAME  # noqa: E402

MC = [
    {"question": "Which keyword defines a function in Python?", "choices": ["def", "func", "define", "lambda"], "answer": 0},
    {"question": "Which built-in returns the number of items in a container?", "choices": ["size", "count", "len"], "answer": 2},
    {"question": "Which module provides regular expression matching?", "choices": ["os", "re", "sys", "json"], "answer": 1},
    {"question": "What does a for statement iterate over?", "choices": ["a sequence", "a class", "an exception"], "answer": 0},
    {"question": "Which type is immutable?", "choices": ["list", "dict", "tuple", "set"], "answer": 2},
    {"question": "What does the print function write to by default?", "choices": ["standard output", "a file", "the network"], "answer": 0},
]


def test_lm_eval_local_completions_against_the_server_equals_lmforge_eval(served, serve_model, tmp_path, monkeypatch):
    model, tokenizer = serve_model
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    (tmp_path / "mc.yaml").write_text(
        f"task: serve_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    # The client tokenizes (as lmforge does, BOS first) with the HF files an export would write.
    hf_tokenizer = tmp_path / "tokenizer"
    hf_tokenizer.mkdir()
    for name, text in tokenizer_files(tokenizer, model.config.max_seq_len).items():
        (hf_tokenizer / name).write_text(text)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": MODEL_NAME, "base_url": served.base_url + "/completions", "tokenizer_backend": "huggingface",
            "tokenizer": str(hf_tokenizer), "add_bos_token": True, "max_length": model.config.max_seq_len,
            "max_retries": 1,
        },
        batch_size=4, tasks=["serve_mc"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )
    native = tasks.evaluate(tasks.resolve_task(str(tmp_path / "mc.jsonl")), Scorer(model, tokenizer))
    results = out["results"]["serve_mc"]
    assert results["acc,none"] == pytest.approx(native["metrics"]["acc"]["value"])
    assert results["acc_norm,none"] == pytest.approx(native["metrics"]["acc_norm"]["value"])
    samples = sorted(out["samples"]["serve_mc"], key=lambda s: s["doc_id"])
    for sample, mine in zip(samples, native["samples"], strict=True):
        assert [lp for lp, _ in sample["filtered_resps"]] == pytest.approx(mine["loglikelihoods"], abs=1e-4)
