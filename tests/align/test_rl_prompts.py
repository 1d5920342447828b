"""The shipped RL arithmetic task: rebuildable byte for byte, disjoint splits, answers right, rewards can read it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from lmforge.align.data import read_conversations
from lmforge.align.rewards import RewardSpec, build_rewards
from lmforge.jsonl import load_jsonl
from lmforge.shipped import resolve_path

ROOT = Path(__file__).resolve().parents[2]
SPLITS = {s: Path(resolve_path(f"lmforge://data/rl/arithmetic_{s}.jsonl.gz")) for s in ("train", "test")}
SFT = Path(resolve_path("lmforge://data/rl/arithmetic_sft.jsonl.gz"))


def test_the_builder_rebuilds_the_shipped_files_byte_for_byte(tmp_path):
    before = {s: hashlib.sha256(p.read_bytes()).hexdigest() for s, p in {**SPLITS, "sft": SFT}.items()}
    script = (ROOT / "scripts" / "build_arithmetic_task.py").read_text()
    copy = tmp_path / "build.py"  # writes under the copy's ROOT: point it at a scratch tree
    copy.write_text(script.replace("ROOT = Path(__file__).resolve().parents[1]", f"ROOT = Path({str(tmp_path)!r})"))
    (tmp_path / "lmforge" / "eval" / "tasks").mkdir(parents=True)
    (tmp_path / "lmforge" / "eval" / "tasks" / "arithmetic.jsonl").write_bytes(
        (ROOT / "lmforge" / "eval" / "tasks" / "arithmetic.jsonl").read_bytes())
    subprocess.run([sys.executable, str(copy)], check=True, capture_output=True)
    rebuilt = {s: hashlib.sha256((tmp_path / "lmforge" / "data" / "rl" / f"arithmetic_{s}.jsonl.gz").read_bytes())
               .hexdigest() for s in before}
    assert rebuilt == before


def test_splits_are_disjoint_answers_are_right_and_eval_questions_are_left_out():
    rows = {s: [r for _, r in load_jsonl(p)] for s, p in SPLITS.items()}
    assert (len(rows["train"]), len(rows["test"])) == (2000, 200)
    prompts = {s: {r["prompt"] for r in rs} for s, rs in rows.items()}
    assert not prompts["train"] & prompts["test"]
    eval_questions = {json.loads(line)["question"] for line in
                      (ROOT / "lmforge" / "eval" / "tasks" / "arithmetic.jsonl").read_text().splitlines() if line}
    assert not (prompts["train"] | prompts["test"]) & eval_questions
    for record in rows["train"] + rows["test"]:
        expression = record["prompt"].removeprefix("What is ").removesuffix("?")
        assert str(eval(expression, {"__builtins__": {}})) == record["answer"]  # noqa: S307 (digits and operators)


def test_numeric_match_reads_the_prompt_set_and_scores_replies():
    rewards = build_rewards([RewardSpec(name="numeric_match")])
    records = rewards.load_prompts(SPLITS["test"])
    replies = [f"The answer is {records[0]['answer']}.", "I think it is 1000000."]
    assert rewards.score(records[:2], replies).total == [1.0, 0.0]


def test_sft_conversations_work_out_unseen_questions_and_end_on_the_right_answer():
    conversations = [messages for _, messages, _ in read_conversations(SFT)]
    assert len(conversations) == 3000
    held_out = {r["prompt"] for p in SPLITS.values() for _, r in load_jsonl(p)}
    held_out |= {json.loads(line)["question"] for line in
                 (ROOT / "lmforge" / "eval" / "tasks" / "arithmetic.jsonl").read_text().splitlines() if line}
    questions = [m[0]["content"] for m in conversations]
    assert len(set(questions)) == len(questions) and not set(questions) & held_out
    answers = []
    for user, assistant in conversations:
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        answers.append(str(eval(user["content"].removeprefix("What is ").removesuffix("?"), {"__builtins__": {}})))  # noqa: S307
        assert assistant["content"].endswith(f"The answer is {answers[-1]}.")
        for step in assistant["content"].split(". ")[:-1]:  # every worked step is itself right
            left, right = step.split(" = ")
            assert eval(left, {"__builtins__": {}}) == int(right)  # noqa: S307 (digits and operators)
    rewards = build_rewards([RewardSpec(name="numeric_match")])  # what RL will score: every worked reply earns 1
    assert rewards.score([{"answer": a} for a in answers], [m[1]["content"] for m in conversations]).total == [1.0] * 3000
