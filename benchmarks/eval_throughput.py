"""Evaluation throughput: lm-evaluation-harness's `hf` backend against lmforge on the same model dir.

One model dir (the `small` preset, random weights, a BPE trained on the bundled corpus),
one multiple-choice task built from the bundled corpus (HellaSwag-style: a passage's
opening, its true continuation and three continuations from other passages), scored:

- by lm-evaluation-harness with its `hf` backend (transformers' LlamaForCausalLM),
- by lm-evaluation-harness with the `lmforge` backend (lmforge.eval.harness),
- by lmforge's own evaluator (`lmforge eval --tasks FILE`).

Each is run in alternating rounds; the best round counts. Accuracies must agree.

    .venv/bin/python benchmarks/eval_throughput.py
    .venv/bin/python benchmarks/eval_throughput.py --examples 100 --rounds 1 --no-write
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from lmforge.eval import tasks as lm_tasks  # noqa: E402
from lmforge.eval.scoring import Scorer  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402
from lmforge.store.loading import load_model  # noqa: E402
from lmforge.store.model_dir import save_model_dir  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

CORPUS = ROOT / "lmforge" / "data" / "corpus" / "python_docs.jsonl.gz"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--examples", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return p.parse_args(argv)


def build_task(directory: Path, examples: int) -> Path:
    """HellaSwag-style records from the corpus: 24 words of context, 4 endings of 10 words."""
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        paragraphs = [p.split() for line in f for p in json.loads(line)["text"].split("\n\n")]
    paragraphs = [p for p in paragraphs if len(p) >= 34]
    rng = random.Random(0)
    rng.shuffle(paragraphs)
    records = []
    for i in range(examples):
        words = paragraphs[i]
        others = [paragraphs[(i + 1 + k * 97) % len(paragraphs)] for k in range(3)]
        endings = [" ".join(words[24:34])] + [" ".join(o[24:34]) for o in others]
        label = rng.randrange(4)
        endings[0], endings[label] = endings[label], endings[0]
        records.append({"context": " ".join(words[:24]), "endings": endings, "label": label})
    path = directory / "corpus_mc.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    (directory / "corpus_mc.yaml").write_text(
        f"task: corpus_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{context}}\"\n"
        "doc_to_choice: \"{{endings}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return path


def build_model(directory: Path, preset: str) -> Path:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tokenizer = train_tokenizer(iter(texts), vocab_size=8192)
    model = Transformer(ModelConfig(preset=preset, vocab_size=8192))
    model.init_weights(torch.Generator().manual_seed(0))
    save_model_dir(directory / "model", model, tokenizer)
    return directory / "model"


def run_harness(backend: str, model_dir: Path, include: Path, batch_size: int) -> tuple[float, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    import lmforge.eval.harness  # noqa: F401  (registers the lmforge backend)

    args = {"pretrained": str(model_dir), "device": "cpu", "batch_size": batch_size}
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=backend, model_args=args, tasks=["corpus_mc"],
                                  task_manager=TaskManager(include_path=str(include)), log_samples=False)
    return time.perf_counter() - start, out["results"]["corpus_mc"]["acc,none"]


def run_native(model_dir: Path, task_file: Path, batch_size: int) -> tuple[float, float]:
    start = time.perf_counter()
    model, tokenizer, _ = load_model(model_dir)
    result = lm_tasks.evaluate(lm_tasks.resolve_task(str(task_file)), Scorer(model, tokenizer, batch_size))
    return time.perf_counter() - start, result["metrics"]["acc"]["value"]


def main(argv=None) -> None:
    args = parse_args(argv)
    import lm_eval
    import transformers

    work = Path(tempfile.mkdtemp(prefix="lmforge-evalbench-"))
    task_file = build_task(work, args.examples)
    model_dir = build_model(work, args.preset)
    runners = {
        "lm-eval `hf` backend (transformers)": lambda: run_harness("hf", model_dir, work, args.batch_size),
        "lm-eval `lmforge` backend": lambda: run_harness("lmforge", model_dir, work, args.batch_size),
        "lmforge eval (own evaluator)": lambda: run_native(model_dir, task_file, args.batch_size),
    }
    timings: dict[str, list[float]] = {name: [] for name in runners}
    accuracy: dict[str, float] = {}
    begin = time.perf_counter()
    for round_index in range(args.rounds):
        order = list(runners) if round_index % 2 == 0 else list(reversed(runners))
        for name in order:
            seconds, acc = runners[name]()
            timings[name].append(seconds)
            accuracy[name] = acc
            print(f"round {round_index + 1}: {name}: {seconds:.2f} s, acc {acc:.4f}", flush=True)
    total = time.perf_counter() - begin
    base = min(timings["lm-eval `hf` backend (transformers)"])
    config = ModelConfig(preset=args.preset, vocab_size=8192)
    flags = shlex.join(sys.argv[1:] if argv is None else argv)
    command = f".venv/bin/python benchmarks/eval_throughput.py {flags}".strip()
    lines = [
        f"### Evaluation throughput: lm-evaluation-harness `hf` backend vs lmforge ({args.preset}, fp32)",
        "",
        "Multiple choice, 4 endings per example (HellaSwag-style, built from the bundled corpus), one",
        "exported model dir scored by each; wall time includes loading the model and the task.",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, lm_eval {lm_eval.__version__}, python {platform.python_version()}",
        f"- CPU threads: {torch.get_num_threads()}; model: {config.num_params():,} parameters, vocab 8192, context {config.max_seq_len}",
        f"- {args.examples} examples = {4 * args.examples} log-likelihood requests, batch size {args.batch_size}; "
        f"{args.rounds} alternating rounds, best counts; total {total:.0f} s",
        "",
        "| evaluator | examples/s | speedup vs hf | seconds (rounds) | acc |",
        "|---|---:|---:|---|---:|",
    ]
    for name, seconds in timings.items():
        best = min(seconds)
        lines.append(
            f"| {name} | {args.examples / best:,.1f} | {base / best:.2f}x | "
            f"{', '.join(f'{s:.2f}' for s in seconds)} | {accuracy[name]:.4f} |"
        )
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        write_section("eval_throughput", block)


if __name__ == "__main__":
    main()
