"""The lm-evaluation-harness adapter gives the harness's own `hf` backend numbers on the exported model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # local task data only; never the Hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # the harness's hf backend needs it

from lm_eval.tasks import TaskManager  # noqa: E402

from lmforge.eval import runner, tasks  # noqa: E402
from lmforge.eval.harness import run_harness  # noqa: E402
from lmforge.eval.runner import EvalConfig  # noqa: E402
from lmforge.eval.scoring import Scorer  # noqa: E402
from lmforge.interop import export  # noqa: E402
from lmforge.interop.export import ExportConfig  # noqa: E402
from lmforge.store.loading import load_model  # noqa: E402

MC = [
    {"question": "Which keyword defines a function in Python?", "choices": ["def", "func", "define", "lambda"], "answer": 0},
    {"question": "Which built-in returns the number of items in a container?", "choices": ["size", "count", "len"], "answer": 2},
    {"question": "Which module provides regular expression matching?", "choices": ["os", "re", "sys", "json"], "answer": 1},
    {"question": "What does a for statement iterate over?", "choices": ["a sequence", "a class", "an exception"], "answer": 0},
    {"question": "Which type is immutable?", "choices": ["list", "dict", "tuple", "set"], "answer": 2},
    {"question": "What does the print function write to by default?", "choices": ["standard output", "a file", "the network"], "answer": 0},
]


@pytest.fixture(scope="module")
def harness_tasks(tmp_path_factory, corpus_texts) -> Path:
    """A multiple-choice, a generation and a rolling-perplexity task on local JSONL files."""
    root = tmp_path_factory.mktemp("harness")
    (root / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC))
    gen = [{"question": r["question"], "answer": r["choices"][r["answer"]]} for r in MC[:3]]
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t[:700]}) + "\n" for t in corpus_texts[:3]))
    data = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\ntest_split: test\n"
    (root / "mc.yaml").write_text(
        "task: lmforge_mc\n" + data.format(path=root / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (root / "gen.yaml").write_text(
        "task: lmforge_gen\n" + data.format(path=root / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: \" {{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\", \".\"]\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    (root / "docs.yaml").write_text(
        "task: lmforge_docs\n" + data.format(path=root / "docs.jsonl") +
        "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
    )
    return root


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("harness-model") / "model"
    export.run(ExportConfig(model=str(trained_run), out=str(out)))
    return out


def evaluate(backend: str, model_args: dict, task: str, include: Path) -> dict:
    import lmforge.eval.harness  # noqa: F401  (registers the lmforge backend)

    return lm_eval.simple_evaluate(
        model=backend, model_args=model_args, tasks=[task], task_manager=TaskManager(include_path=str(include)),
        log_samples=True, random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0,
    )


def responses(out: dict, task: str) -> list:
    return [sample["filtered_resps"] for sample in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def test_multiple_choice_matches_the_hf_backend_and_lmforge_own_tasks(trained_run, exported, harness_tasks):
    theirs = evaluate("hf", {"pretrained": str(exported), "device": "cpu"}, "lmforge_mc", harness_tasks)
    ours = evaluate("lmforge", {"pretrained": str(trained_run)}, "lmforge_mc", harness_tasks)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["lmforge_mc"][metric] == pytest.approx(theirs["results"]["lmforge_mc"][metric])
    for mine, hf in zip(responses(ours, "lmforge_mc"), responses(theirs, "lmforge_mc"), strict=True):
        assert [lp for lp, _ in mine] == pytest.approx([lp for lp, _ in hf], abs=1e-4)
    # lmforge's own evaluator on the same records gives the same numbers.
    model, tokenizer, _ = load_model(trained_run)
    native = tasks.evaluate(tasks.resolve_task(str(harness_tasks / "mc.jsonl")), Scorer(model, tokenizer))
    assert native["metrics"]["acc"]["value"] == pytest.approx(ours["results"]["lmforge_mc"]["acc,none"])
    assert native["metrics"]["acc_norm"]["value"] == pytest.approx(ours["results"]["lmforge_mc"]["acc_norm,none"])


def test_greedy_generation_matches_the_hf_backend(trained_run, exported, harness_tasks):
    theirs = evaluate("hf", {"pretrained": str(exported), "device": "cpu"}, "lmforge_gen", harness_tasks)
    ours = evaluate("lmforge", {"pretrained": str(trained_run)}, "lmforge_gen", harness_tasks)
    assert responses(ours, "lmforge_gen") == responses(theirs, "lmforge_gen")


def test_rolling_perplexity_matches_the_hf_backend(trained_run, exported, harness_tasks):
    theirs = evaluate("hf", {"pretrained": str(exported), "device": "cpu"}, "lmforge_docs", harness_tasks)
    ours = evaluate("lmforge", {"pretrained": str(trained_run)}, "lmforge_docs", harness_tasks)
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["lmforge_docs"][metric] == pytest.approx(theirs["results"]["lmforge_docs"][metric], rel=1e-4)


def test_lmforge_eval_harness_writes_results_like_its_own_tasks(trained_run, harness_tasks, tmp_path):
    results = runner.run(EvalConfig(
        model=str(trained_run), harness=["lmforge_mc"], harness_include=str(harness_tasks), out=str(tmp_path),
    ))
    saved = json.loads((tmp_path / "harness-lmforge_mc.json").read_text())
    assert saved == json.loads(json.dumps(results["harness-lmforge_mc"]))
    assert set(saved["metrics"]) == {"acc", "acc_norm"} and saved["n"] == len(MC)
    assert saved["metrics"]["acc"]["stderr"] > 0
    direct = run_harness(str(trained_run), ["lmforge_mc"], str(harness_tasks))
    assert saved["metrics"]["acc"]["value"] == pytest.approx(direct["results"]["lmforge_mc"]["acc,none"])


def test_the_harness_cli_runs_lmforge_models_through_python_m(trained_run, harness_tasks, tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "lmforge.eval.harness", "run", "--model", "lmforge", "--model_args", f"pretrained={trained_run}",
         "--tasks", "lmforge_mc", "--include_path", str(harness_tasks), "--output_path", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "lmforge_mc" in done.stdout and "acc" in done.stdout
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert results and "lmforge_mc" in json.loads(results[0].read_text())["results"]
