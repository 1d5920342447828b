"""Alignment data: conversations for SFT and preference pairs for DPO, tokenized in the chat format.

    conversations   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...],
                     "tools": [...]}   (optional: OpenAI's function tools; then assistant turns may
                     carry "tool_calls" and "tool" turns their results, as in OpenAI's fine-tuning files)
    preferences     {"prompt": messages | "text", "chosen": messages | "text", "rejected": ...}

Files are JSONL (.gz, .zst) or parquet, `datasets` dirs or Hub datasets (`data.readers`); every bad record is reported as `file:line: problem`.
SFT examples become (input, target) rows, either packed several to a row (attention and
RoPE positions restart at each conversation, so packing changes no number) or one per row;
a micro-batch is cut to its longest row (`Rows.trimmed`), so padding to data.seq_len costs nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lmforge.data.readers import load_records
from lmforge.errors import DataError, LmforgeError
from lmforge.model.losses import IGNORE_INDEX
from lmforge.tokenizer import LmTokenizer, check_messages, check_tools

LossOn = Literal["assistant", "all"]


def _messages(value: Any, default_role: str, where: str) -> list[dict]:
    if isinstance(value, str):
        value = [{"role": default_role, "content": value}]
    try:
        return check_messages(value)
    except LmforgeError as err:
        raise DataError(f"{where}: {err}") from None


def read_conversations(path: str | os.PathLike) -> list[tuple[str, list[dict], list[dict] | None]]:
    """(where, messages, tools) per record; each conversation must contain an assistant turn."""
    out = []
    for number, record in load_records(path):
        where = f"{path}:{number}"
        if "messages" not in record:
            raise DataError(f"{where}: record has no 'messages' (fields: {', '.join(record) or 'none'})")
        messages = _messages(record["messages"], "user", where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: conversation has no assistant turn to learn from")
        try:
            tools = check_tools(record.get("tools"))
        except LmforgeError as err:
            raise DataError(f"{where}: {err}") from None
        out.append((where, messages, tools))
    return out


def read_preferences(path: str | os.PathLike) -> list[tuple[str, list[dict], list[dict], list[dict]]]:
    """(where, prompt, chosen, rejected); strings become a user prompt / assistant replies."""
    out = []
    for number, record in load_records(path):
        where = f"{path}:{number}"
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
        if missing:
            raise DataError(f"{where}: preference record lacks {', '.join(repr(k) for k in missing)}")
        prompt = _messages(record["prompt"], "user", where)
        chosen = _messages(record["chosen"], "assistant", where)
        rejected = _messages(record["rejected"], "assistant", where)
        for name, reply in (("chosen", chosen), ("rejected", rejected)):
            if any(m["role"] != "assistant" for m in reply):
                raise DataError(f"{where}: '{name}' must hold assistant turns only")
        if prompt[-1]["role"] == "assistant":
            raise DataError(f"{where}: 'prompt' must end with a user (or system) turn")
        out.append((where, prompt, chosen, rejected))
    return out


# ------------------------------------------------------------------------------------ SFT


@dataclass
class Sequence:
    """Token ids and which of them are trained on (the loss falls on predicting them)."""

    ids: list[int]
    trained: list[bool]


def encode_conversation(tokenizer: LmTokenizer, messages: list[dict], loss_on: LossOn, max_len: int,
                        tools: list[dict] | None = None) -> Sequence:
    """A conversation's ids; with loss on the assistant, what it wrote (content, tool calls) is trained."""
    if not tokenizer.native:
        raise DataError("SFT needs a tokenizer with lmforge's chat tokens (imported tokenizers have no assistant mask)")
    ids, mask = tokenizer.encode_chat_with_mask(messages, tools=tools)
    trained = mask if loss_on == "assistant" else [True] * len(ids)
    trained[0] = False  # BOS is never predicted
    return Sequence(ids[: max_len + 1], trained[: max_len + 1])


# A micro-batch is cut to its longest row rounded up to this: few distinct shapes (for compiled
# and cached kernels), and at most 7 pad columns more than the longest row needs.
WIDTH_MULTIPLE = 8


def rounded_width(longest: int, full: int) -> int:
    """A micro-batch's width: its longest row rounded up to WIDTH_MULTIPLE, at most `full`."""
    return min(full, -(-max(longest, 1) // WIDTH_MULTIPLE) * WIDTH_MULTIPLE)


@dataclass
class Rows:
    """Right-padded training rows: inputs, targets (IGNORE_INDEX where untrained), document ids, and
    how many leading positions of each row hold tokens (the rest is padding)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    document_ids: torch.Tensor | None
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def select(self, index: list[int]) -> Rows:
        docs = None if self.document_ids is None else self.document_ids[index]
        return Rows(self.inputs[index], self.targets[index], docs, self.lengths[index])

    def narrow(self, width: int) -> Rows:
        """The first `width` columns. Rows are right-padded and the model is causal, so cutting
        padding changes no logit of a real token and no loss."""
        docs = None if self.document_ids is None else self.document_ids[:, :width]
        return Rows(self.inputs[:, :width], self.targets[:, :width], docs, self.lengths.clamp(max=width))

    def needed_width(self) -> int:
        """The longest row rounded up to WIDTH_MULTIPLE, at most the rows' width."""
        return rounded_width(int(self.lengths.max()) if len(self) else 1, self.inputs.shape[1])

    def trimmed(self) -> Rows:
        """These rows without the padding columns no row needs: a micro-batch of short
        conversations costs what its tokens cost, not data.seq_len per row."""
        return self.narrow(self.needed_width())


def _pair(sequence: Sequence) -> tuple[list[int], list[int]]:
    inputs = sequence.ids[:-1]
    targets = [t if trained else IGNORE_INDEX for t, trained in zip(sequence.ids[1:], sequence.trained[1:], strict=True)]
    return inputs, targets


def build_rows(sequences: list[Sequence], seq_len: int, pad_id: int, pack: bool) -> Rows:
    """Pack sequences in order into rows of `seq_len` (first fit, no splitting), or one per row."""
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = 0
    for sequence in sequences:
        inputs, targets = _pair(sequence)
        if not any(t != IGNORE_INDEX for t in targets):
            continue  # nothing to learn (all trained tokens truncated away)
        if pack and rows and used + len(inputs) <= seq_len:
            rows[-1].append((inputs, targets))
            used += len(inputs)
        else:
            rows.append([(inputs, targets)])
            used = len(inputs)
    if not rows:
        raise DataError("no training tokens: every conversation lost its assistant turns to truncation")
    inputs = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    documents = torch.full((len(rows), seq_len), -1, dtype=torch.long)
    lengths = torch.zeros(len(rows), dtype=torch.long)
    for r, row in enumerate(rows):
        position = 0
        for d, (row_inputs, row_targets) in enumerate(row):
            end = position + len(row_inputs)
            inputs[r, position:end] = torch.tensor(row_inputs)
            targets[r, position:end] = torch.tensor(row_targets)
            documents[r, position:end] = d
            position = end
        lengths[r] = position
    return Rows(inputs, targets, documents if pack else None, lengths)


# ------------------------------------------------------------------------------------ DPO


@dataclass
class PreferencePair:
    chosen: Sequence
    rejected: Sequence


def encode_preference(
    tokenizer: LmTokenizer, prompt: list[dict], chosen: list[dict], rejected: list[dict], max_len: int
) -> PreferencePair:
    """Both replies after the same prompt; only the reply tokens are scored."""
    if not tokenizer.native:
        raise DataError("DPO needs a tokenizer with lmforge's chat tokens")
    prompt_len = len(tokenizer.encode_chat(prompt, add_generation_prompt=True))

    def reply(messages: list[dict]) -> Sequence:
        ids = tokenizer.encode_chat(prompt + messages)
        trained = [i >= prompt_len for i in range(len(ids))]
        return Sequence(ids[: max_len + 1], trained[: max_len + 1])

    return PreferencePair(reply(chosen), reply(rejected))


def build_rows_exact(sequences: list[Sequence], width: int, pad_id: int) -> Rows:
    inputs = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    targets = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    lengths = torch.zeros(len(sequences), dtype=torch.long)
    for r, sequence in enumerate(sequences):
        row_inputs, row_targets = _pair(sequence)
        inputs[r, : len(row_inputs)] = torch.tensor(row_inputs)
        targets[r, : len(row_targets)] = torch.tensor(row_targets)
        lengths[r] = len(row_inputs)
    return Rows(inputs, targets, None, lengths)


def pair_width(chosen: Rows, rejected: Rows) -> int:
    """The width that holds both sides of these pairs (they run as one batch)."""
    return max(chosen.needed_width(), rejected.needed_width())
