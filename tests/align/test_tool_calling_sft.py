"""`lmforge sft` on OpenAI-format tool-calling conversations: the loss falls on the calls the
assistant writes, never on the tool listing or the tools' results."""

from __future__ import annotations

import json
import random

from lmforge.align import data as align_data
from lmforge.align.config import AlignConfig
from lmforge.align.run import run_sft

ADD = {"type": "function", "function": {
    "name": "add", "description": "The sum of two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}


def conversation(a: int, b: int, with_tools: bool) -> dict:
    """A question, the assistant's call (OpenAI's shape: arguments as a JSON string), the result, the answer."""
    record = {"messages": [
        {"role": "user", "content": f"What is {a} plus {b}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{a}_{b}", "type": "function", "function": {"name": "add", "arguments": json.dumps({"a": a, "b": b})}}]},
        {"role": "tool", "tool_call_id": f"call_{a}_{b}", "content": str(a + b)},
        {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
    ]}
    if with_tools:
        record["tools"] = [ADD]
    return record


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_tool_calling_file_trains_on_the_call_json_and_answers_only(trained_tokenizer, tmp_path):
    path = write(tmp_path / "tools.jsonl", [conversation(12, 30, with_tools=True)])
    [(where, messages, tools)] = align_data.read_conversations(path)
    assert where.endswith(":1") and tools == [ADD] and messages[1]["tool_calls"][0]["function"]["arguments"] == {"a": 12, "b": 30}
    sequence = align_data.encode_conversation(trained_tokenizer, messages, "assistant", 4096, tools)
    trained = trained_tokenizer.decode([t for t, on in zip(sequence.ids, sequence.trained, strict=True) if on])
    assert trained == ('<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 30}}\n</tool_call><|end|>'
                       "12 plus 30 is 42.<|end|>")
    everything = trained_tokenizer.decode(sequence.ids)
    assert '"description": "The sum of two integers."' in everything and "<tool_response>\n42\n</tool_response>" in everything


def test_sft_on_tool_calls_lowers_the_loss_on_them(trained_run, tmp_path):
    # Without the tool listing: with it, a conversation outgrows the tiny model's 128-token context.
    rng = random.Random(0)
    records = [conversation(rng.randint(1, 99), rng.randint(1, 99), with_tools=False) for _ in range(160)]
    cfg = AlignConfig.model_validate({
        "model": str(trained_run),
        "run": {"name": "tools", "out_dir": str(tmp_path), "seed": 0},
        "data": {"seq_len": 96, "train": str(write(tmp_path / "sft.jsonl", records)), "val_fraction": 0.1},
        "optim": {"lr": 2e-3},
        "schedule": {"warmup_steps": 2},
        "train": {"max_steps": 20, "global_batch_tokens": 96 * 8, "micro_batch_size": 8, "device": "cpu",
                  "eval_every": 10, "checkpoint_every": 0, "log_every": 1, "progress": False},
    })
    result = run_sft(cfg)
    assert result.status == "completed" and result.step == 20
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 0.5
