"""lmforge's own tasks: multiple choice and generation from local files, bits per byte, results, errors."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.errors import ConfigError, DataError
from lmforge.eval import runner, tasks
from lmforge.eval.perplexity import evaluate_texts, evaluate_token_split
from lmforge.eval.runner import EvalConfig
from lmforge.eval.scoring import Scorer
from lmforge.eval.tasks import TaskSpec, resolve_task, score_generation
from lmforge.store.loading import load_model

ROOT = Path(__file__).resolve().parents[2]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def scorer(trained_run) -> Scorer:
    model, tokenizer, _ = load_model(trained_run)
    return Scorer(model, tokenizer, batch_size=4)


def test_multiple_choice_accuracy_follows_the_summed_and_per_character_loglikelihoods(scorer, tmp_path):
    records = [
        {"question": "Which statement defines a function?", "choices": ["def", "class", "import", "lambda"], "answer": 0},
        {"question": "Which module handles regular expressions?", "choices": ["os", "re", "sys"], "answer": "B"},
        {"question": "The list method that adds one item at the end is", "choices": ["append", "extend"], "answer": 0},
    ]
    task = resolve_task(str(write_jsonl(tmp_path / "mc.jsonl", records)))
    assert task.spec.type == "multiple_choice" and [e.answer for e in task.examples] == [0, 1, 0]
    result = tasks.evaluate(task, scorer)
    for sample, example in zip(result["samples"], task.examples, strict=True):
        context = f"Question: {example.record['question']}\nAnswer:"
        direct = [lp for lp, _ in scorer.loglikelihood_tokens([scorer.encode_pair(context, " " + c) for c in example.choices])]
        assert sample["loglikelihoods"] == pytest.approx(direct, abs=1e-4)
    acc = [float(s["pred"] == s["answer"]) for s in result["samples"]]
    assert result["metrics"]["acc"]["value"] == pytest.approx(sum(acc) / 3)
    assert result["metrics"]["acc"]["stderr"] == pytest.approx(tasks.mean_stderr(acc))


def test_loglikelihood_of_a_continuation_equals_a_direct_forward_pass(scorer):
    context, continuation = scorer.encode_pair("The interpreter reads", " a line of input.")
    logits = scorer.model(torch.tensor([context + continuation]))[0].float().log_softmax(-1)
    direct = sum(logits[len(context) - 1 + i, token].item() for i, token in enumerate(continuation))
    (logprob, _), = scorer.loglikelihood_tokens([(context, continuation)])
    assert logprob == pytest.approx(direct, abs=1e-4)
    assert context[0] == scorer.tokenizer.bos_id  # contexts start like training documents


def test_bits_per_byte_agrees_with_a_direct_computation(scorer, corpus_texts):
    texts = [t[:300] for t in corpus_texts[:4]]
    got = evaluate_texts(scorer, texts)
    nats = 0.0
    for text in texts:
        ids = [scorer.tokenizer.bos_id, *scorer.tokenizer.encode(text)]
        assert len(ids) <= scorer.max_length + 1  # one window: a plain forward pass is the definition
        logprobs = scorer.model(torch.tensor([ids[:-1]]))[0].float().log_softmax(-1)
        nats -= logprobs.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
    num_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-5)
    assert got["bytes"] == num_bytes and got["documents"] == 4


def test_long_texts_are_scored_in_windows_that_cover_every_token_once(scorer, corpus_texts):
    text = next(t for t in corpus_texts if len(scorer.tokenizer.encode(t)) > 3 * scorer.max_length)
    ids = scorer.tokenizer.encode(text)
    windows = list(scorer.rolling_windows(ids))
    assert [t for _, predicted in windows for t in predicted] == ids
    assert all(len(c) + len(p) <= scorer.max_length + 1 for c, p in windows)
    (nats, count), = scorer.text_loglikelihood([text])
    assert count == len(ids) and nats < 0


def test_a_seen_passage_scores_better_than_the_same_words_shuffled(scorer, pretrain_data):
    seen = [json.loads(line)["text"][:600] for line in pretrain_data["docs"].read_text().splitlines()[:6]]
    for text in seen:
        words = text.split(" ")
        random.Random(0).shuffle(words)
        original, shuffled = evaluate_texts(scorer, [text]), evaluate_texts(scorer, [" ".join(words)])
        assert original["bits_per_byte"] < shuffled["bits_per_byte"] - 0.05


def test_token_dataset_bits_per_byte_matches_consecutive_windows(scorer, pretrain_data):
    from lmforge.data.loader import TokenDataset

    dataset = TokenDataset(pretrain_data["tokens"], "val")
    got = evaluate_token_split(scorer.model, dataset, 64, batch_size=3, max_windows=5)
    nats = 0.0
    for w in range(5):
        window = torch.from_numpy(dataset.read(w * 64, 65))
        logprobs = scorer.model(window[None, :-1])[0].float().log_softmax(-1)
        nats -= logprobs.gather(-1, window[1:, None]).sum().item()
    assert got["tokens"] == 5 * 64
    assert got["bits_per_byte"] == pytest.approx(nats / math.log(2) / (5 * 64 * dataset.bytes_per_token), rel=1e-4)


@pytest.mark.parametrize(
    ("metric", "output", "target", "expected"),
    [
        ("exact_match", " 42 ", "42", 1.0),
        ("exact_match", "42.", "42", 0.0),
        ("numeric", "The answer is 1,234.", "1234", 1.0),
        ("numeric", "-7", "-7.0", 1.0),
        ("numeric", "no number", "3", 0.0),
        ("regex", "Answer: (B) because", "B", 1.0),
    ],
)
def test_generation_scoring(metric, output, target, expected):
    spec = TaskSpec(name="t", type="generation", data="x", metric=metric, regex=r"\(([A-D])\)")
    assert score_generation(spec, output, target) == expected


def test_generation_stops_at_the_stop_string_and_fewshot_is_seeded(scorer, tmp_path):
    records = [{"question": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    data = write_jsonl(tmp_path / "add.jsonl", records)
    spec = tmp_path / "add.yaml"
    spec.write_text(
        "name: add\ntype: generation\ndata: add.jsonl\nprompt: \"Q: {question}\\nA:\"\n"
        "metric: numeric\nuntil: [\"\\n\"]\nmax_tokens: 12\nnum_fewshot: 2\n"
    )
    task = resolve_task(str(spec))
    first, again = tasks.evaluate(task, scorer, seed=5), tasks.evaluate(task, scorer, seed=5)
    assert first["samples"] == again["samples"] and first["n"] == 4 and first["num_fewshot"] == 2
    assert all("\n" not in s["output"] for s in first["samples"])
    prefix = tasks.fewshot_prefix(task, 0, random.Random(5))
    assert prefix.count("Q: What is") == 2 and "Q: What is 1 + 2?" not in prefix  # never the example itself
    assert data.is_file()


def test_eval_writes_results_with_provenance_and_compare_tabulates_them(trained_run, tmp_path):
    from lmforge.interop import export
    from lmforge.interop.export import ExportConfig

    mc = write_jsonl(tmp_path / "mc.jsonl", [
        {"question": "Which keyword starts a loop?", "choices": ["for", "if", "def"], "answer": 0},
        {"question": "Which type is immutable?", "choices": ["list", "dict", "tuple"], "answer": 2},
    ])
    texts = write_jsonl(tmp_path / "docs.jsonl", [{"text": "The for statement iterates over a sequence."}])
    model_dir = tmp_path / "model"
    export.run(ExportConfig(model=str(trained_run), out=str(model_dir)))
    from_run = runner.run(EvalConfig(model=str(trained_run), tasks=[str(mc)], data=[str(texts)], out=str(tmp_path / "a")))
    from_dir = runner.run(EvalConfig(model=str(model_dir), tasks=[str(mc)]))
    result = json.loads((tmp_path / "a" / "mc.json").read_text())
    for key in ("task", "metrics", "n", "seed", "model_hash", "lmforge_version", "torch_version", "data", "step"):
        assert key in result
    assert result["metrics"]["acc"].keys() == {"value", "stderr"} and result["n"] == 2 and result["step"] == 150
    # The exported fp32 weights are the same model: same hash, same numbers.
    assert from_dir["mc"]["model_hash"] == from_run["mc"]["model_hash"]
    assert from_dir["mc"]["metrics"] == from_run["mc"]["metrics"]
    assert (model_dir / "eval" / "mc.json").is_file() and "bpb-docs" in from_run
    header, rows = runner.compare([str(tmp_path / "a"), str(model_dir)])
    assert header[2:] == [str(tmp_path / "a"), str(model_dir)]
    acc_row = next(r for r in rows if r[:2] == ["mc", "acc"])
    assert acc_row[2] == acc_row[3] != "-"
    assert next(r for r in rows if r[0] == "bpb-docs")[3] == "-"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ({"question": "q", "choices": [], "answer": 0}, r"bad.jsonl:2: field 'choices' must list at least two"),
        ({"question": "q", "choices": ["a", ""], "answer": 0}, r"bad.jsonl:2: field 'choices'"),
        ({"question": "q", "choices": ["a", "b"], "answer": 5}, r"bad.jsonl:2: field 'answer' must be a choice index 0..1"),
        ({"choices": ["a", "b"], "answer": 0}, r"bad.jsonl:2: record lacks the field 'question'"),
        ("{not json", r"bad.jsonl:2: malformed JSON"),
    ],
)
def test_bad_task_files_name_the_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "choices": ["a", "b"], "answer": 1}, line])
    with pytest.raises(DataError, match=message):
        resolve_task(str(path))


def test_unknown_tasks_and_layouts_are_refused_before_loading_the_model(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a shipped task"):
        resolve_task("no-such-task")
    weird = write_jsonl(tmp_path / "weird.jsonl", [{"prompt": "x", "label": 1}])
    with pytest.raises(DataError, match="unrecognised task layout"):
        resolve_task(str(weird))
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        runner.run(EvalConfig(model=str(tmp_path)))


def test_cli_reports_a_bad_task_file_on_one_line(trained_run, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "choices": ["only one"], "answer": 0}])
    done = subprocess.run(
        [sys.executable, "-m", "lmforge", "eval", str(trained_run), "--tasks", str(bad)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:1: field 'choices'")


def test_every_shipped_task_loads_is_consistent_and_runs(scorer):
    names = tasks.shipped_tasks()
    assert {"python_mc", "stdlib_completion", "arithmetic", "safety"} <= set(names)
    for name in names:
        for task in tasks.resolve_tasks(name):
            ids = [ex.record["id"] for ex in task.examples]
            assert len(ids) == len(set(ids)), f"{task.spec.name}: duplicate ids"
            result = tasks.evaluate(task, scorer, limit=2)
            # The headline metric is the mean of the per-example verdicts the samples record.
            verdicts = [float(s["pred"] == s["answer"]) if task.spec.type == "multiple_choice"
                        else float(s["refused"]) if task.spec.type == "refusal" else s["correct"]
                        for s in result["samples"]]
            headline = next(iter(result["metrics"].values()))["value"]
            assert result["n"] == len(verdicts) == 2 and headline == pytest.approx(sum(verdicts) / 2), task.spec.name
    for ex in tasks.resolve_task("arithmetic").examples:  # every answer is right
        a, op, b = ex.record["question"].removeprefix("What is ").rstrip("?").split()
        assert str(eval(f"{int(a)} {op} {int(b)}")) == ex.answer
    positions = [ex.answer for ex in tasks.resolve_task("python_mc").examples]
    assert {p: positions.count(p) for p in set(positions)} == {0: 10, 1: 10, 2: 10, 3: 10}
