"""Rewards for RL: shipped checks, weighted composition, failures counted as 0, the sandbox."""

from __future__ import annotations

import json
import logging
import math
import sys
import textwrap
import time
import types

import pytest

from lmforge.align.rewards import (
    RewardsConfig,
    RewardSpec,
    build_rewards,
    extract_code,
    last_number,
)
from lmforge.config import build
from lmforge.errors import ConfigError, DataError

GSM8K = {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                     "clips in May. How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
                   "clips altogether in April and May.\n#### 72"}


def rewards_of(*specs: dict, reward_model=None):
    return build_rewards(RewardsConfig(rewards=list(specs)).rewards, reward_model=reward_model)


def score_of(spec: dict, record: dict, completion: str) -> float:
    return rewards_of(spec).score([record], [completion]).scores[RewardSpec(**spec).key][0]


# --- the shipped rewards -------------------------------------------------------------------


def test_numeric_match_reads_the_last_number_and_the_gsm8k_marker():
    spec = {"name": "numeric_match"}
    assert score_of(spec, GSM8K, "In May she sold 24, so 48 + 24 = 72 clips.") == 1.0
    assert score_of(spec, GSM8K, "Reasoning...\n#### 72\n") == 1.0
    assert score_of(spec, GSM8K, "She sold 72 clips? No: 48 + 48 = 96") == 0.0
    assert score_of(spec, GSM8K, "I cannot tell.") == 0.0
    assert score_of(spec, {"answer": 1234.5}, "The total is $1,234.50.") == 1.0
    assert score_of(spec, {"answer": "-3"}, "x = - 3? no, x = -3") == 1.0
    assert last_number("no digits") is None


def test_exact_and_regex_match_compare_against_the_record():
    exact = {"name": "exact_match", "options": {"ignore_case": True}}
    assert score_of(exact, {"answer": "Paris"}, "  paris\n") == 1.0
    assert score_of(exact, {"answer": ["NYC", "New York City"]}, "new york   city") == 1.0
    assert score_of(exact, {"answer": "Paris"}, "Paris, France") == 0.0
    regex = {"name": "regex_match", "options": {"field": "accept"}}
    assert score_of(regex, {"accept": r"\b(?:yes|true)\b"}, "The answer is yes.") == 1.0
    assert score_of(regex, {"accept": r"\b(?:yes|true)\b"}, "eyes only") == 0.0


def test_format_rewards_the_required_shape_only():
    spec = {"name": "format", "options": {"pattern": r"<think>.*</think>\s*<answer>.*</answer>"}}
    assert score_of(spec, {}, "<think>48/2 = 24\n48 + 24 = 72</think>\n<answer>72</answer>") == 1.0
    assert score_of(spec, {}, "<answer>72</answer>") == 0.0


def test_unit_tests_pass_correct_code_and_give_partial_credit_to_wrong_code():
    record = {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]}
    right = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    wrong = "```python\ndef add(a, b):\n    return a * b if a > 0 else a + b\n```"
    spec = {"name": "unit_tests", "options": {"timeout_s": 10}}
    assert score_of(spec, record, right) == 1.0
    assert score_of(spec, record, wrong) == pytest.approx(2 / 3)
    strict = {"name": "unit_tests", "options": {"timeout_s": 10, "partial_credit": False}}
    assert score_of(strict, record, wrong) == 0.0
    script = {"tests": "assert add(2, 3) == 5\nprint('ok')"}
    assert score_of(spec, script, right) == 1.0
    assert score_of(spec, record, "def add(a, b) return a + b") == 0.0  # does not compile
    assert score_of(spec, record, "print('\\n0 3'); raise SystemExit(0)") == 0.0  # no forged tally
    assert extract_code("no fences here") == "no fences here"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_the_unit_test_reward_kills_a_runaway_subprocess_and_its_children(tmp_path, caplog):
    pids = tmp_path / "pids"
    runaway = textwrap.dedent(f"""
        import os
        child = os.fork()
        if child == 0:
            while True:
                pass
        with open({str(pids)!r}, "w") as f:
            f.write(f"{{os.getpid()}} {{child}}")
        while True:
            pass
    """)
    rewards = rewards_of({"name": "unit_tests", "options": {"timeout_s": 1.5}})
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        batch = rewards.score([{"tests": ["assert True"]}], [runaway], prompt_indices=[7])
    assert time.monotonic() - started < 6  # 1.5 s limit plus interpreter start-up, not forever
    assert batch.scores["unit_tests"] == [0.0] and batch.total == [0.0]
    assert batch.metrics()["reward/unit_tests/timeouts"] == 1.0
    assert "prompt 7" in caplog.text and "RewardTimeout" in caplog.text
    parent, child = (int(p) for p in pids.read_text().split())
    deadline = time.monotonic() + 2  # the orphaned grandchild is reaped by init, not by us
    while (_alive(parent) or _alive(child)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(parent) and not _alive(child)


def test_a_memory_hog_scores_zero_without_touching_the_trainer_process():
    hog = "blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))\n"
    big = "data = bytearray(8 << 30)\n"  # 8 GiB at once
    chatty = "while True:\n    print('x' * 4096)\n"  # output is bounded too (RLIMIT_FSIZE)
    rewards = rewards_of({"name": "unit_tests", "options": {"timeout_s": 10, "memory_mb": 256}})
    batch = rewards.score([{"tests": ["assert True"]}] * 3, [hog, big, chatty])
    assert batch.scores["unit_tests"] == [0.0, 0.0, 0.0]
    assert batch.errors["unit_tests"] == 0  # failing code, not a failing reward
    assert len(bytearray(300 << 20)) == 300 << 20  # this process has no such limit


# --- composition and failures ---------------------------------------------------------------


def test_rewards_combine_by_weight_and_report_metrics():
    rewards = rewards_of({"name": "numeric_match", "weight": 1.0},
                         {"name": "format", "weight": 0.5, "options": {"pattern": r".*#### -?\d+"}})
    batch = rewards.score([GSM8K] * 3, ["#### 72", "72", "#### 71"])
    assert batch.scores == {"numeric_match": [1.0, 1.0, 0.0], "format": [1.0, 0.0, 1.0]}
    assert batch.total == [1.5, 1.0, 0.5]
    metrics = batch.metrics()
    assert metrics["reward/total/mean"] == pytest.approx(1.0)
    assert metrics["reward/total/std"] == pytest.approx(math.sqrt(1 / 6))
    assert metrics["reward/numeric_match/errors"] == 0.0


def _install_module(monkeypatch) -> str:
    module = types.ModuleType("reward_fixtures")

    def brevity(record, completion, max_words=5):
        return float(len(completion.split()) <= max_words)

    def fragile(record, completion):
        if "boom" in completion:
            raise RuntimeError("parser crashed")
        return math.nan if "nan" in completion else 1.0

    module.brevity, module.fragile = brevity, fragile
    monkeypatch.setitem(sys.modules, "reward_fixtures", module)
    return module.__name__


def test_a_raising_or_nan_reward_counts_zero_and_the_run_goes_on(monkeypatch, caplog):
    name = _install_module(monkeypatch)
    rewards = rewards_of({"name": f"{name}:fragile", "weight": 2.0},
                         {"name": f"{name}:brevity", "options": {"max_words": 3}})
    with caplog.at_level(logging.WARNING):
        batch = rewards.score([{}] * 4, ["fine", "boom", "nan here", "ok then"], prompt_indices=[10, 11, 12, 13])
    assert batch.scores["fragile"] == [1.0, 0.0, 0.0, 1.0]
    assert batch.scores["brevity"] == [1.0, 1.0, 1.0, 1.0]
    assert batch.total == [3.0, 1.0, 1.0, 3.0]
    assert batch.metrics()["reward/fragile/errors"] == 2.0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "prompt 11" in warnings[0].getMessage()


def test_the_reward_model_hook_scores_prompts_and_completions():
    seen = {}

    def scorer(prompts, completions):
        seen["prompts"] = prompts
        return [len(c) / 10 for c in completions[:-1]] + [float("nan")]

    rewards = rewards_of({"name": "reward_model", "weight": 0.5}, reward_model=scorer)
    batch = rewards.score([{"prompt": "hi"}, {"prompt": "yo"}], ["hello", "x"])
    assert seen["prompts"] == ["hi", "yo"]
    assert batch.scores["reward_model"] == [0.5, 0.0] and batch.errors["reward_model"] == 1
    with pytest.raises(ConfigError, match="no reward model"):
        rewards_of({"name": "reward_model"})


def test_a_prompt_set_missing_a_field_fails_with_file_and_line(tmp_path, monkeypatch):
    name = _install_module(monkeypatch)
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "2+2?", "answer": "4", "tests": ["assert True"]},
            {"prompt": "3+3?", "answer": "6"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert len(rewards_of({"name": "numeric_match"}).load_prompts(path)) == 2
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: no field 'tests', which reward 'unit_tests'"):
        rewards_of({"name": "numeric_match"}, {"name": "unit_tests"}).load_prompts(path)
    with pytest.raises(DataError, match=r"prompts\.jsonl:1: no field 'rubric'"):
        rewards_of({"name": f"{name}:brevity", "fields": ["rubric"]}).load_prompts(path)


def test_bad_reward_configs_fail_naming_the_key():
    with pytest.raises(ConfigError, match="unknown reward 'numeric'"):
        build(RewardsConfig, {"rewards": [{"name": "numeric"}]}, "rl.yaml")
    with pytest.raises(ConfigError, match="option 'timeout': unknown option; did you mean 'timeout_s'"):
        build(RewardsConfig, {"rewards": [{"name": "unit_tests", "options": {"timeout": 5}}]}, "rl.yaml")
    with pytest.raises(ConfigError, match="pattern"):
        build(RewardsConfig, {"rewards": [{"name": "format"}]}, "rl.yaml")
    with pytest.raises(ConfigError, match="two rewards named 'format'"):
        build(RewardsConfig, {"rewards": [{"name": "format", "options": {"pattern": "a"}},
                                          {"name": "format", "options": {"pattern": "b"}}]}, "rl.yaml")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        rewards_of({"name": "no_such_module_here:fn"})


def test_a_function_reward_that_cannot_take_its_options_fails_before_training(monkeypatch):
    name = _install_module(monkeypatch)
    with pytest.raises(ConfigError, match="brevity.*max_word"):
        rewards_of({"name": f"{name}:brevity", "options": {"max_word": 3}})
