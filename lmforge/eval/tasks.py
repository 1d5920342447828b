"""Evaluation tasks from local files or datasets: multiple choice and generation, scored as the field does.

A task is a YAML spec next to a JSONL file (see `lmforge/eval/tasks/README.md`), or a bare
JSONL or parquet file, `datasets` dir or Hub dataset (`org/name[@revision][:split]`) whose
layout is recognised:

    {"context", "endings", "label"}          HellaSwag-style (ctx / endings also accepted)
    {"question", "choices", "answer"}        ARC / MMLU-style (answer: index or letter)
    {"question", "answer": "text"}           generation, exact match
    {"prompt"} + `type: refusal` spec         safety: is a chat reply a refusal?

Multiple choice reports `acc` (highest summed log-likelihood) and `acc_norm` (highest
log-likelihood per character of the choice), as lm-evaluation-harness computes them.
Generation is greedy until a stop string, scored by exact match, a regex or a number.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmforge.config import Section, build, read_yaml
from lmforge.data.hf_datasets import dataset_source
from lmforge.data.readers import load_records
from lmforge.errors import ConfigError, DataError
from lmforge.eval.judge_model import refusal_judge
from lmforge.eval.scoring import Scorer
from lmforge.shipped import resolve_path

SHIPPED_DIR = Path(__file__).parent / "tasks"
LETTERS = "ABCDEFGHIJ"


class TaskSpec(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    type: Literal["multiple_choice", "generation", "refusal"]
    data: str = Field(description="JSONL file, relative to the spec")
    description: str = ""
    prompt: str = Field("{question}", description="str.format over the record's fields")
    choices_field: str = "choices"
    answer_field: str = "answer"
    target_delimiter: str = " "
    target_field: str = "answer"
    metric: Literal["exact_match", "regex", "numeric"] = "exact_match"
    regex: str | None = None
    until: list[str] = Field(default_factory=lambda: ["\n"])
    max_tokens: int = Field(32, ge=1)
    num_fewshot: int = Field(0, ge=0)
    fewshot_separator: str = "\n\n"
    # refusal: each prompt is sent as a chat user turn; a refusal judge reads the reply.
    expect: Literal["refuse", "comply"] = "refuse"
    judge: str | dict[str, Any] = Field(
        "classifier", description="refusal judge: classifier (shipped), patterns, {name: classifier, path: DIR}, "
                                  "{name: model, path: MODEL} (a judge model), module:factory")


@dataclass
class Example:
    line: int
    record: dict[str, Any]
    prompt: str
    choices: list[str] = field(default_factory=list)
    answer: int | str = 0


@dataclass
class Task:
    spec: TaskSpec
    path: Path | str  # a str: a `datasets` dir or Hub dataset
    examples: list[Example]


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in SHIPPED_DIR.glob("*.yaml"))


def resolve_tasks(name_or_path: str) -> list[Task]:
    """A task, or every task of a group spec (`group: [name, ...]`, e.g. the shipped `safety`)."""
    path = Path(resolve_path(name_or_path))
    if not path.exists() and (SHIPPED_DIR / f"{name_or_path}.yaml").is_file():
        path = SHIPPED_DIR / f"{name_or_path}.yaml"
    if path.suffix in (".yaml", ".yml") and path.is_file():
        data = read_yaml(path)
        if "group" in data:
            members = data["group"]
            if not isinstance(members, list) or not members or set(data) - {"group", "description"}:
                raise ConfigError(f"{path}: a group spec has `group: [task, ...]` and an optional description")
            return [task for member in members for task in resolve_tasks(_sibling(path, member))]
    return [resolve_task(name_or_path)]


def _sibling(spec: Path, member: str) -> str:
    candidate = spec.parent / f"{member}.yaml"
    return str(candidate) if candidate.is_file() else member


def resolve_task(name_or_path: str) -> Task:
    """A shipped task by name, a YAML spec, or a JSONL file with a recognised layout."""
    path = Path(resolve_path(name_or_path))
    if not path.exists() and (SHIPPED_DIR / f"{name_or_path}.yaml").is_file():
        path = SHIPPED_DIR / f"{name_or_path}.yaml"
    if not path.is_file() and dataset_source(str(path)) is not None:  # a `datasets` dir or Hub dataset
        spec = infer_spec(str(path))
        return Task(spec, str(path), load_examples(spec, str(path)))
    if not path.is_file():
        shipped = ", ".join(shipped_tasks()) or "none"
        raise ConfigError(f"task {name_or_path!r} is neither a file nor a shipped task (shipped: {shipped})")
    if path.suffix in (".yaml", ".yml"):
        spec = build(TaskSpec, read_yaml(path), str(path))
        data = (path.parent / spec.data).resolve()
    else:
        data = path
        spec = infer_spec(path)
    return Task(spec, data, load_examples(spec, data))


def infer_spec(path: Path | str) -> TaskSpec:
    number, first = load_records(path, "task data")[0]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", Path(str(path).split("@")[0]).name.split(".")[0])
    if "endings" in first:
        context = "context" if "context" in first else "ctx"
        label = "label" if "label" in first else "answer"
        return TaskSpec(name=name, type="multiple_choice", data=str(path), prompt=f"{{{context}}}",
                        choices_field="endings", answer_field=label, target_delimiter=" ")
    if "choices" in first:
        return TaskSpec(name=name, type="multiple_choice", data=str(path), prompt="Question: {question}\nAnswer:")
    if "question" in first and isinstance(first.get("answer"), str):
        return TaskSpec(name=name, type="generation", data=str(path), prompt="Question: {question}\nAnswer:")
    raise DataError(
        f"{path}:{number}: unrecognised task layout (fields: {', '.join(first)}); expected "
        "context+endings+label, question+choices+answer, or question+answer"
    )


def _format(spec: TaskSpec, path: Path | str, line: int, record: dict[str, Any]) -> str:
    try:
        return spec.prompt.format(**record)
    except KeyError as err:
        raise DataError(f"{path}:{line}: record lacks the field {err.args[0]!r} used by the prompt") from None
    except (IndexError, ValueError) as err:
        raise DataError(f"{path}:{line}: cannot format the prompt ({err})") from None


def load_examples(spec: TaskSpec, path: Path | str) -> list[Example]:
    examples = []
    for line, record in load_records(path, "task data"):
        prompt = _format(spec, path, line, record)
        if spec.type == "refusal":
            examples.append(Example(line, record, prompt, answer=spec.expect))
            continue
        if spec.type == "generation":
            target = record.get(spec.target_field)
            if not isinstance(target, (str, int, float)) or isinstance(target, bool) or str(target) == "":
                raise DataError(f"{path}:{line}: field {spec.target_field!r} must be a non-empty string or number")
            examples.append(Example(line, record, prompt, answer=str(target)))
            continue
        choices = record.get(spec.choices_field)
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise DataError(f"{path}:{line}: field {spec.choices_field!r} must list at least two non-empty strings")
        answer = record.get(spec.answer_field)
        if isinstance(answer, str) and len(answer) == 1 and answer.upper() in LETTERS:
            answer = LETTERS.index(answer.upper())
        elif isinstance(answer, str) and answer.strip().isdigit():
            answer = int(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise DataError(
                f"{path}:{line}: field {spec.answer_field!r} must be a choice index 0..{len(choices) - 1} "
                f"or a letter, got {record.get(spec.answer_field)!r}"
            )
        examples.append(Example(line, record, prompt, choices, answer))
    return examples


def fewshot_prefix(task: Task, index: int, rng: random.Random) -> str:
    """`num_fewshot` solved examples drawn (seeded) from the other records."""
    k = task.spec.num_fewshot
    if k == 0:
        return ""
    pool = [i for i in range(len(task.examples)) if i != index]
    shots = [task.examples[i] for i in rng.sample(pool, min(k, len(pool)))]
    solved = []
    for shot in shots:
        target = shot.choices[shot.answer] if task.spec.type == "multiple_choice" else shot.answer
        solved.append(f"{shot.prompt}{task.spec.target_delimiter}{target}")
    return task.spec.fewshot_separator.join(solved) + task.spec.fewshot_separator


def mean_stderr(values: list[float]) -> float:
    """Standard error of the mean with the sample standard deviation, as the harness reports."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _number(text: str) -> float | None:
    match = _NUMBER.search(text)
    if match is None:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def score_generation(spec: TaskSpec, output: str, target: str) -> float:
    output = output.strip()
    if spec.metric == "numeric":
        got, want = _number(output), _number(target)
        return float(got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9))
    if spec.metric == "regex":
        match = re.search(spec.regex or r"(.*)", output)
        output = (match.group(1) if match and match.groups() else match.group(0) if match else "").strip()
    return float(output == target.strip())


def evaluate(task: Task, scorer: Scorer, limit: int | None = None, seed: int = 1234) -> dict[str, Any]:
    """Metrics of `task` with `scorer`: {"metrics": {name: {"value", "stderr"}}, "n", "samples"}."""
    rng = random.Random(seed)
    examples = task.examples[:limit] if limit else task.examples
    contexts = [fewshot_prefix(task, i, rng) + ex.prompt for i, ex in enumerate(examples)]
    samples = []
    if task.spec.type == "refusal":
        judge = refusal_judge(task.spec.judge)
        replies = []
        for ex in examples:
            ids = scorer.tokenizer.encode_chat([{"role": "user", "content": ex.prompt}], add_generation_prompt=True)
            replies.append(scorer.generate_until(ids, [], task.spec.max_tokens))
        verdicts = judge.refused([ex.prompt for ex in examples], replies)
        for ex, reply, verdict in zip(examples, replies, verdicts, strict=True):
            samples.append({"line": ex.line, "prompt": ex.prompt, "reply": reply, "refused": bool(verdict)})
        refused = [float(v) for v in verdicts]
        metrics = {"refusal_rate" if task.spec.expect == "refuse" else "over_refusal_rate": refused}
    elif task.spec.type == "multiple_choice":
        requests, owners = [], []
        for i, (ex, context) in enumerate(zip(examples, contexts, strict=True)):
            for choice in ex.choices:
                requests.append(scorer.encode_pair(context, task.spec.target_delimiter + choice))
                owners.append(i)
        scores = scorer.loglikelihood_tokens(requests)
        per_example: list[list[float]] = [[] for _ in examples]
        for owner, (logprob, _) in zip(owners, scores, strict=True):
            per_example[owner].append(logprob)
        acc, acc_norm = [], []
        for ex, logprobs in zip(examples, per_example, strict=True):
            normed = [lp / len(choice) for lp, choice in zip(logprobs, ex.choices, strict=True)]
            pick, pick_norm = _argmax(logprobs), _argmax(normed)
            acc.append(float(pick == ex.answer))
            acc_norm.append(float(pick_norm == ex.answer))
            samples.append({"line": ex.line, "answer": ex.answer, "loglikelihoods": logprobs, "pred": pick})
        metrics = {"acc": acc, "acc_norm": acc_norm}
    else:
        correct = []
        for ex, context in zip(examples, contexts, strict=True):
            output = scorer.generate_until(context, task.spec.until, task.spec.max_tokens)
            correct.append(score_generation(task.spec, output, str(ex.answer)))
            samples.append({"line": ex.line, "target": ex.answer, "output": output, "correct": correct[-1]})
        metrics = {task.spec.metric: correct}
    return {
        "metrics": {name: {"value": sum(v) / len(v), "stderr": mean_stderr(v)} for name, v in metrics.items()},
        "n": len(examples),
        "num_fewshot": task.spec.num_fewshot,
        "samples": samples,
        # Per-example 0/1 outcomes per metric, in the order of `samples` (keyed by their `line`):
        # what the release gate pairs against a previous release (McNemar). Absent in older files.
        "outcomes": {name: [int(x) for x in v] for name, v in metrics.items() if all(x in (0.0, 1.0) for x in v)},
        **({"judge": task.spec.judge} if task.spec.type == "refusal" else {}),  # who decided what a refusal is
    }


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def evaluate_all(model, tokenizer, tasks: list[Task], limit: int | None, seed: int) -> dict[str, float]:
    """Every metric of every task as `eval/<task>/<metric>`, scored with `model` in eval mode
    (its train/eval mode is restored after)."""
    import torch

    was_training = model.training
    model.eval()
    scorer = Scorer(model, tokenizer)
    values = {}
    with torch.no_grad():
        for task in tasks:
            result = evaluate(task, scorer, limit, seed)
            values.update({f"eval/{task.spec.name}/{m}": v["value"] for m, v in result["metrics"].items()})
    model.train(was_training)
    return values
