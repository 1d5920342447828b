"""Rollouts for RL: G sampled completions per prompt on lmforge's engine, scored, gathered.

Rollout batch r takes the prompts at positions [r*P, (r+1)*P) of a stream of seeded
per-epoch permutations of the prompt set, and completion (p, g) samples with its own seed
drawn from (run seed, r): what is sampled depends on the run's seed, the rollout index and
the weights, never on the number of ranks or on what else shares the engine's batch. Under
torchrun each rank samples a contiguous block of the prompts, scores its completions and
computes their log-probs; every rank then holds the whole batch (`all_gather_objects`).

The engine decodes with the policy's own modules (`Engine(model, ...)` shares its
parameters), so a rollout after an optimizer step samples from the updated weights with
no copy and no checkpoint round trip.
"""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.align.grpo_loss import group_advantages
from lmforge.align.rewards import RewardBatch, RewardSet
from lmforge.device import autocast
from lmforge.errors import DataError
from lmforge.serve.config import EngineConfig
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams
from lmforge.tokenizer import LmTokenizer
from lmforge.train import distributed


@dataclass
class Rollout:
    """One rollout batch over all ranks, completions ordered by prompt position, then by g."""

    index: int  # rollout number: the r of data steps [r*S, (r+1)*S)
    sequences: list[list[int]]  # prompt + completion ids (+ the stop token it ended with)
    prompt_lens: list[int]
    advantages: torch.Tensor  # [completions] fp32
    old_logprobs: list[torch.Tensor] | None = None  # per completion: log-probs of its tokens when sampled
    ref_logprobs: list[torch.Tensor] | None = None  # the same under the frozen reference
    metrics: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.sequences)

    def completion_tokens(self, index: list[int]) -> int:
        return sum(len(self.sequences[i]) - self.prompt_lens[i] for i in index)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able and exact (float32 log-probs as base64 bytes): a checkpoint taken mid-batch resumes on it."""
        def pack(values: list[torch.Tensor] | None) -> str | None:
            if values is None:
                return None
            return base64.b64encode(torch.cat(values).float().numpy().tobytes()).decode("ascii")

        return {"index": self.index, "sequences": self.sequences, "prompt_lens": self.prompt_lens,
                "advantages": self.advantages.tolist(), "old_logprobs": pack(self.old_logprobs),
                "ref_logprobs": pack(self.ref_logprobs), "metrics": self.metrics}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Rollout:
        lengths = [len(s) - p for s, p in zip(state["sequences"], state["prompt_lens"], strict=True)]

        def unpack(text: str | None) -> list[torch.Tensor] | None:
            if text is None:
                return None
            flat = torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=np.float32).copy())
            return list(flat.split(lengths))

        return cls(state["index"], state["sequences"], state["prompt_lens"],
                   torch.tensor(state["advantages"], dtype=torch.float32), unpack(state["old_logprobs"]),
                   unpack(state["ref_logprobs"]), dict(state["metrics"]))


class PromptStream:
    """Prompt indices of rollout r: positions [r*P, (r+1)*P) of seeded per-epoch permutations."""

    def __init__(self, num_prompts: int, prompts_per_rollout: int, seed: int):
        self.num_prompts, self.prompts_per_rollout, self.seed = num_prompts, prompts_per_rollout, seed
        self._epoch, self._perm = -1, np.arange(0)

    def prompts(self, rollout: int) -> list[int]:
        out = []
        for position in range(rollout * self.prompts_per_rollout, (rollout + 1) * self.prompts_per_rollout):
            epoch, within = divmod(position, self.num_prompts)
            if epoch != self._epoch:
                self._perm, self._epoch = np.random.default_rng([self.seed, epoch]).permutation(self.num_prompts), epoch
            out.append(int(self._perm[within]))
        return out


def encode_prompts(tokenizer: LmTokenizer, records: list[dict], prompt_field: str, system_prompt: str | None,
                   max_tokens: int, context: int, path: str) -> list[list[int]]:
    """Each record's prompt as a chat turn awaiting the assistant's reply; a DataError naming the
    first prompt that leaves no room for `max_tokens` in the model's context."""
    prefix = [{"role": "system", "content": system_prompt}] if system_prompt else []
    out = []
    for number, record in enumerate(records, 1):
        ids = tokenizer.encode_chat([*prefix, {"role": "user", "content": str(record[prompt_field])}],
                                    add_generation_prompt=True)
        if len(ids) + max_tokens > context:
            raise DataError(f"{path}: prompt {number} is {len(ids)} tokens; with rollout.max_tokens {max_tokens} "
                            f"it exceeds the model's context of {context}")
        out.append(ids)
    return out


@torch.no_grad()
def token_logprobs(model, sequences: list[list[int]], prompt_lens: list[int], batch_size: int, pad_id: int,
                   device: torch.device, dtype: torch.dtype, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per sequence, the fp32 log-probs of its completion tokens under softmax(`model`'s logits /
    temperature) (right-padded batches)."""
    out: list[torch.Tensor] = []
    for start in range(0, len(sequences), batch_size):
        rows = sequences[start: start + batch_size]
        tokens = pad_rows(rows, pad_id).to(device)
        lens = prompt_lens[start: start + batch_size]
        first = min(lens) - 1  # logits from the shortest prompt's last token on
        with autocast(device, dtype):
            logits = model(tokens[:, :-1], logits_to_keep=tokens.shape[1] - 1 - first)
        logprobs = F.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens[:, first + 1:, None]).squeeze(-1).cpu()
        for row, ids, prompt_len in zip(logprobs, rows, lens, strict=True):
            out.append(row[prompt_len - 1 - first: len(ids) - 1 - first].clone())
    return out


def pad_rows(rows: list[list[int]], pad_id: int) -> torch.Tensor:
    tokens = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for i, ids in enumerate(rows):
        tokens[i, : len(ids)] = torch.tensor(ids)
    return tokens


class RolloutWorker:
    """Samples, scores and gathers rollout batches for one rank (see the module docstring)."""

    def __init__(self, tokenizer: LmTokenizer, records: list[dict], prompt_ids: list[list[int]], rewards: RewardSet,
                 rollout, grpo, seed: int, env: distributed.DistEnv, dtype: torch.dtype, micro_batch_size: int,
                 reference=None, need_old_logprobs: bool = True):
        if rollout.prompts_per_step % env.world_size:
            raise DataError(f"rollout.prompts_per_step {rollout.prompts_per_step} does not split over {env.world_size} ranks")
        self.tokenizer, self.records, self.prompt_ids, self.rewards = tokenizer, records, prompt_ids, rewards
        self.rollout, self.grpo, self.seed, self.env, self.dtype = rollout, grpo, seed, env, dtype
        self.micro_batch_size, self.reference, self.need_old_logprobs = micro_batch_size, reference, need_old_logprobs
        self.stream = PromptStream(len(records), rollout.prompts_per_step, seed)
        self.context = max(map(len, prompt_ids)) + rollout.max_tokens
        self._engine: Engine | None = None

    def engine(self, model) -> Engine:
        """One engine for the run, decoding with `model`'s own parameters (rebuilt if the module changes)."""
        if self._engine is None or self._engine.model is not model:
            config = EngineConfig(max_num_seqs=self.rollout.max_num_seqs, max_model_len=self.context)
            self._engine = Engine(model, self.tokenizer, config)
        return self._engine

    def sample(self, policy, index: int) -> Rollout:
        """Rollout batch `index` from `policy` (the bare model, not a DDP wrapper); left in eval mode."""
        rollout, env = self.rollout, self.env
        prompts = self.stream.prompts(index)
        share = len(prompts) // env.world_size
        first = env.rank * share
        seeds = np.random.default_rng([self.seed, index]).integers(0, 2**62, size=len(prompts) * rollout.group_size)
        mine = [(first + p, prompts[first + p], g) for p in range(share) for g in range(rollout.group_size)]
        params = [SamplingParams(max_tokens=rollout.max_tokens, temperature=rollout.temperature, top_p=rollout.top_p,
                                 top_k=rollout.top_k, seed=int(seeds[position * rollout.group_size + g]))
                  for position, _, g in mine]
        started = time.perf_counter()
        completions = self.engine(policy).run_to_completion([self.prompt_ids[i] for _, i, _ in mine], params)
        seconds = time.perf_counter() - started
        sequences = [[*c.prompt_ids, *c.token_ids, *([c.stop_token_id] if c.stop_token_id is not None else [])]
                     for c in completions]
        prompt_lens = [len(c.prompt_ids) for c in completions]
        scored = self.rewards.score([self.records[i] for _, i, _ in mine], [c.text for c in completions],
                                    [i for _, i, _ in mine])
        local = {"sequences": sequences, "prompt_lens": prompt_lens, "scores": scored, "seconds": seconds,
                 "generated": sum(len(c.token_ids) for c in completions),
                 "truncated": sum(c.finish_reason == "length" for c in completions)}
        local["old"], local["ref"] = self._logprobs(policy, sequences, prompt_lens)
        return self._combine(index, distributed.all_gather_objects(env, local))

    def _logprobs(self, policy, sequences, prompt_lens):
        """Old (several updates per batch) and reference (KL) log-probs of this rank's completions."""
        args = (sequences, prompt_lens, self.micro_batch_size, self.tokenizer.pad_id, self.env.device, self.dtype,
                self.rollout.temperature)
        old = token_logprobs(policy, *args) if self.need_old_logprobs else None
        ref = token_logprobs(self.reference, *args) if self.reference is not None else None
        return old, ref

    def _combine(self, index: int, parts: list[dict]) -> Rollout:
        """Every rank's share in rank order (= prompt order): advantages per group and the batch's metrics."""
        group = self.rollout.group_size
        sequences = [s for part in parts for s in part["sequences"]]
        prompt_lens = [n for part in parts for n in part["prompt_lens"]]
        scores = merge_scores([part["scores"] for part in parts])
        rewards = torch.tensor(scores.total, dtype=torch.float32).view(-1, group)
        advantages = group_advantages(rewards, scale=self.grpo.scale_rewards)
        lengths = [len(s) - p for s, p in zip(sequences, prompt_lens, strict=True)]
        generated, seconds = sum(p["generated"] for p in parts), max(p["seconds"] for p in parts)
        metrics = {
            **scores.metrics(),
            "advantage_std": advantages.std(unbiased=False).item(),
            "zero_variance_groups": (rewards.std(dim=-1, unbiased=False) == 0).float().mean().item(),
            "completion_length": sum(lengths) / len(lengths),
            "completion_truncated": sum(p["truncated"] for p in parts) / len(lengths),
            "rollout_tokens": float(generated),
            "rollout_seconds": seconds,
            "rollout_tokens_per_second": generated / max(seconds, 1e-9),
        }
        old = [t for part in parts for t in part["old"]] if parts[0]["old"] is not None else None
        ref = [t for part in parts for t in part["ref"]] if parts[0]["ref"] is not None else None
        return Rollout(index, sequences, prompt_lens, advantages.flatten(), old, ref, metrics)


def merge_scores(batches: list[RewardBatch]) -> RewardBatch:
    """Several ranks' reward batches as one (scores concatenated in order, failures summed)."""
    merged = RewardBatch(total=[v for b in batches for v in b.total],
                         scores={label: [v for b in batches for v in b.scores[label]] for label in batches[0].scores})
    for label in batches[0].errors:
        merged.errors[label] = sum(b.errors[label] for b in batches)
        merged.timeouts[label] = sum(b.timeouts[label] for b in batches)
    return merged
