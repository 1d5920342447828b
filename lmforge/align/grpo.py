"""GRPO as a trainer objective: rollouts from the current weights, then clipped policy-gradient steps.

Data step s belongs to rollout batch r = s // S (S = rollout.epochs x minibatches): at its
first step the batch is sampled (`prepare_step`, align/rollouts.py); step k = s mod S trains
on minibatch k mod M of pass k // M (each pass a seeded permutation of the batch when M > 1).
A step's completions split into micro-batches of train.micro_batch_size, one contiguous
block of them per rank, so the union over ranks is the same whatever the world size; the
loss is normalised by the whole step's tokens (or completions), so gradients match too.

With one step per rollout batch (S = 1, the default) the policy that sampled is the one
being trained: the old log-probs equal the current ones detached (ratio 1, as in TRL with
num_iterations=1) and the extra forward pass that would compute them is skipped.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.align.grpo_loss import grpo_loss
from lmforge.align.rewards import RewardSet
from lmforge.align.rollouts import Rollout, RolloutWorker, pad_rows
from lmforge.errors import ConfigError, DataError
from lmforge.serve.sampling import SamplingParams
from lmforge.train import distributed
from lmforge.train.parallel import unwrap

log = logging.getLogger(__name__)


class GRPOObjective:
    """Group relative policy optimisation (align/grpo_loss.py) on rollouts sampled in the trainer's process."""

    kind = "rl"
    sharded = True

    def __init__(self, worker: RolloutWorker, config, env: distributed.DistEnv,
                 test: tuple[list[dict], list[list[int]]] | None = None):
        rollout, self.grpo = config.rollout, config.grpo
        self.worker, self.env, self.test, self.seed = worker, env, test, config.run.seed
        self.micro_batch_size = config.train.micro_batch_size
        self.group_size, self.minibatches = rollout.group_size, rollout.minibatches
        self.steps_per_rollout, self.completions_per_step = rollout.steps_per_rollout, rollout.completions_per_step
        chunks, remainder = divmod(self.completions_per_step, self.micro_batch_size * env.world_size)
        if remainder or not chunks:
            raise ConfigError(f"a step's {self.completions_per_step} completions (rollout.prompts_per_step x group_size / "
                              f"minibatches) do not split into train.micro_batch_size {self.micro_batch_size} x "
                              f"{env.world_size} ranks")
        self.grad_accum_steps = chunks
        self.seq_len = worker.context
        self.max_tokens, self.temperature = rollout.max_tokens, rollout.temperature
        self.tokens_per_step = 0  # the current step's tokens over all ranks (set by prepare_step)
        self.rollout: Rollout | None = None
        self._step_rows: list[list[int]] = []  # this rank's micro-batches of the current step
        self._scale = 1.0  # micro-batch loss -> share of the step's normalised loss

    # ------------------------------------------------------------------ the trainer's hooks

    def prepare_step(self, model, data_step: int) -> None:
        """Sample the rollout batch at its first step; pick this step's minibatch and its micro-batches."""
        index, within = divmod(data_step, self.steps_per_rollout)
        if self.rollout is None or self.rollout.index != index:
            policy = unwrap(model)
            was_training = policy.training
            self.rollout = self.worker.sample(policy, index)
            policy.train(was_training)
        epoch, minibatch = divmod(within, self.minibatches)
        order = np.arange(len(self.rollout))
        if self.minibatches > 1:
            order = np.random.default_rng([self.seed, index, epoch]).permutation(len(self.rollout))
        rows = order[minibatch * self.completions_per_step: (minibatch + 1) * self.completions_per_step].tolist()
        chunks = [rows[i: i + self.micro_batch_size] for i in range(0, len(rows), self.micro_batch_size)]
        per_rank = len(chunks) // self.env.world_size
        self._step_rows = chunks[self.env.rank * per_rank: (self.env.rank + 1) * per_rank]
        completion_tokens = self.rollout.completion_tokens(rows)
        denominator = completion_tokens if self.grpo.aggregation == "token" else len(rows)
        self._scale = len(chunks) / max(denominator, 1)
        self.tokens_per_step = sum(len(self.rollout.sequences[i]) for i in rows)

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        """Micro-batch `micro_step` of this step (the step's rows were chosen by prepare_step)."""
        rollout, index = self.rollout, self._step_rows[micro_step]
        tokens = pad_rows([rollout.sequences[i] for i in index], self.worker.tokenizer.pad_id)
        width = tokens.shape[1] - 1
        mask = torch.zeros(len(index), width)
        old = torch.zeros(len(index), width)
        ref = torch.zeros(len(index), width)
        for row, i in enumerate(index):
            start, end = rollout.prompt_lens[i] - 1, len(rollout.sequences[i]) - 1
            mask[row, start:end] = 1
            if rollout.old_logprobs is not None:
                old[row, start:end] = rollout.old_logprobs[i]
            if rollout.ref_logprobs is not None:
                ref[row, start:end] = rollout.ref_logprobs[i]
        # Positions before the shortest prompt's end predict no completion token: no logits for them.
        first = min(rollout.prompt_lens[i] for i in index) - 1
        batch = {"tokens": tokens, "mask": mask, "advantages": rollout.advantages[index], "first": torch.tensor(first)}
        if rollout.old_logprobs is not None:
            batch["old_logprobs"] = old
        if rollout.ref_logprobs is not None:
            batch["ref_logprobs"] = ref
        return batch

    def loss(self, model, batch):
        first = int(batch["first"])
        tokens, mask = batch["tokens"], batch["mask"][:, first:]
        # The policy that sampled is softmax(logits / temperature): ratios and KL are of that one (as TRL, verl).
        logits = model(tokens[:, :-1], logits_to_keep=tokens.shape[1] - 1 - first).float() / self.temperature
        log_probs = F.log_softmax(logits, dim=-1)
        logprobs = log_probs.gather(-1, tokens[:, first + 1:, None]).squeeze(-1)
        old = batch["old_logprobs"][:, first:] if "old_logprobs" in batch else logprobs.detach()
        ref = batch["ref_logprobs"][:, first:] if "ref_logprobs" in batch else None
        stats = grpo_loss(logprobs, old, batch["advantages"], mask, ref,
                          self.grpo.clip_low, self.grpo.clip_high, self.grpo.kl_coef, self.grpo.aggregation,
                          denominator=1.0)
        with torch.no_grad():
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            entropy = ((entropy * mask).sum() / mask.sum().clamp(min=1)).item()
        extras = {"kl": stats.kl, "clip_fraction": stats.clip_fraction, "ratio_mean": stats.ratio_mean,
                  "entropy": entropy, **self.rollout.metrics}
        return stats.loss * self._scale, extras

    # --------------------------------------------------------------------- resume, validation

    def _schedule(self) -> dict[str, int]:
        """What fixes which prompts and completions each step sees: a resume must find it unchanged."""
        return {"seed": self.seed, "num_prompts": self.worker.stream.num_prompts,
                "prompts_per_step": self.worker.stream.prompts_per_rollout, "group_size": self.group_size,
                "steps_per_rollout": self.steps_per_rollout}

    def state_dict(self, next_step: int) -> dict[str, Any]:
        state = {"next_step": next_step, **self._schedule(), "rollout": None}
        if self.rollout is not None and next_step % self.steps_per_rollout:
            state["rollout"] = self.rollout.state_dict()  # mid-batch: the next steps train on it
        return state

    def check_resume(self, state: dict[str, Any]) -> int:
        for key, value in self._schedule().items():
            if state.get(key) != value:
                raise DataError(f"cannot resume: {key} was {state.get(key)}, is {value} now (prompts or rollout config changed)")
        self.rollout = Rollout.from_state_dict(state["rollout"]) if state.get("rollout") else None
        return int(state["next_step"])

    @torch.no_grad()
    def validate(self, model, device, dtype) -> dict[str, float]:
        """Greedy replies to the held-out prompts, scored by the run's rewards: `val_reward` (weighted
        total) and `val_reward/<label>` (a 0/1 reward: accuracy), with its standard error."""
        if self.test is None:
            return {}
        records, prompt_ids = self.test
        policy = unwrap(model)
        was_training = policy.training
        engine = self.worker.engine(policy)
        completions = engine.run_to_completion(prompt_ids, SamplingParams(max_tokens=self.max_tokens, temperature=0.0))
        policy.train(was_training)
        rewards: RewardSet = self.worker.rewards
        scores = rewards.score(records, [c.text for c in completions])
        out = {"val_reward": sum(scores.total) / len(scores.total),
               "val_completion_length": sum(len(c.token_ids) for c in completions) / len(completions)}
        for label, values in scores.scores.items():
            mean = sum(values) / len(values)
            out[f"val_reward/{label}"] = mean
            out[f"val_reward/{label}/stderr"] = float(np.std(values) / np.sqrt(len(values)))
        return out
