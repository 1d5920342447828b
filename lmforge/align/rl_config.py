"""Config of `lmforge rl`: the shared training sections plus prompts, rollouts, GRPO and rewards.

One optimizer step trains on `prompts_per_step x group_size / minibatches` completions;
each rollout batch (`prompts_per_step` prompts, `group_size` completions each) is trained
on for `epochs x minibatches` steps before the next one is sampled from the new weights.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.align.rewards import RewardsConfig
from lmforge.config import Section
from lmforge.monitor.alerts import AlertConfig
from lmforge.store.adapter import LoraSettings
from lmforge.train.config import LoopConfig, OptimConfig, RunConfig, ScheduleConfig, TrainingRun


class RLDataConfig(Section):
    """The prompts to learn from and the held-out test prompts."""

    train: str = Field(description="prompt set JSONL(.gz): one record per prompt, with the fields its rewards read")
    test: str | None = Field(None, description="held-out prompts: greedy replies scored at every eval (val_reward)")
    test_limit: int | None = Field(200, ge=1, description="first N held-out prompts; None: all")
    prompt_field: str = Field("prompt", description="record field sent as the user's message")
    system_prompt: str | None = Field(None, description="a system message before every prompt")


class RolloutConfig(Section):
    """How answers are sampled each step: prompts, group size, tokens, temperature, epochs."""

    prompts_per_step: int = Field(16, ge=1, description="prompts per rollout batch, over all ranks")
    group_size: int = Field(8, ge=2, description="completions sampled per prompt (GRPO's G)")
    max_tokens: int = Field(128, ge=1, description="longest completion; longer ones are cut (finish 'length')")
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    epochs: int = Field(1, ge=1, description="optimisation passes over each rollout batch")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass over a rollout batch")
    max_num_seqs: int = Field(256, ge=1, description="engine: sequences decoded together (vLLM's default)")

    @property
    def steps_per_rollout(self) -> int:
        return self.epochs * self.minibatches

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.group_size // self.minibatches


class GRPOSettings(Section):
    """GRPO's clipped objective: clip range, KL penalty, loss aggregation and reward scaling."""

    clip_low: float = Field(0.2, ge=0, lt=1, description="ratio floor 1 - clip_low")
    clip_high: float = Field(0.2, ge=0, description="ratio ceiling 1 + clip_high (DAPO's clip-higher: 0.28)")
    kl_coef: float = Field(0.0, ge=0, description="weight of the k3 KL to the starting model; 0: no reference kept")
    aggregation: Literal["token", "sequence"] = Field(
        "token", description="token: mean over every completion token of the step; sequence: per completion, then mean")
    scale_rewards: bool = Field(True, description="divide advantages by the group's reward std (False: Dr. GRPO)")


class RLConfig(TrainingRun, RewardsConfig):
    """The shared training sections (RL defaults) plus the starting model, prompts, rollouts, GRPO, rewards."""

    model: str = Field(description="model to start from (usually an SFT run): model dir, run dir or checkpoint")
    data: RLDataConfig
    run: RunConfig = RunConfig(name="rl")
    optim: OptimConfig = OptimConfig(lr=1e-5, weight_decay=0.0)
    schedule: ScheduleConfig = ScheduleConfig(name="constant", warmup_steps=0)
    train: LoopConfig = LoopConfig(max_steps=100, micro_batch_size=8, log_every=1, eval_every=25, checkpoint_every=0)
    rollout: RolloutConfig = RolloutConfig()
    grpo: GRPOSettings = GRPOSettings()
    lora: LoraSettings = LoraSettings()
    alerts: AlertConfig = AlertConfig(spike_factor=None)  # a policy-gradient loss has no scale to spike from

    @model_validator(mode="after")
    def _check(self) -> RLConfig:
        rollout = self.rollout
        if rollout.prompts_per_step * rollout.group_size % rollout.minibatches:
            raise ValueError(f"rollout.prompts_per_step x group_size = {rollout.prompts_per_step * rollout.group_size} "
                             f"completions do not split into rollout.minibatches {rollout.minibatches}")
        if self.optim.name != "adamw" and self.lora.enabled:
            raise ValueError("LoRA adapters train with optim.name=adamw (Muon needs full 2-D weights)")
        if self.train.global_batch_tokens != LoopConfig().global_batch_tokens:
            raise ValueError("train.global_batch_tokens is not used by rl: a step trains on "
                             "rollout.prompts_per_step x group_size / minibatches completions")
        return self
