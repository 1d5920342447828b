"""Configs of `lmforge sft` and `lmforge dpo`: the shared training sections plus data, LoRA and DPO."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import Section
from lmforge.store.adapter import LoraSettings
from lmforge.train.config import LoopConfig, OptimConfig, RunConfig, ScheduleConfig, TrainingRun


class AlignDataConfig(Section):
    """The conversations (sft) or preference pairs (dpo, rm), the validation split and packing."""

    train: str = Field(description="conversations (sft) or preference pairs (dpo): JSONL(.gz/.zst) or parquet file, "
                       "`datasets` dir or Hub dataset org/name[@revision][:split]")
    val: str | None = Field(None, description="held-out file; None: split val_fraction off train")
    val_fraction: float = Field(0.05, ge=0, lt=1)
    seq_len: int = Field(512, ge=8, description="tokens per row; longer examples are truncated")
    pack: bool = Field(True, description="sft: several conversations per row, attention kept inside each")
    loss_on: Literal["assistant", "all"] = Field("assistant", description="sft: which tokens are trained on")


class DPOSettings(Section):
    """DPO's loss and its beta."""

    beta: float = Field(0.1, gt=0, description="strength of the KL anchor to the reference model")
    loss: Literal["sigmoid", "ipo"] = "sigmoid"


class AlignConfig(TrainingRun):
    """The shared training sections (fine-tuning defaults) plus the starting model, data, LoRA and DPO."""

    model: str = Field(description="model to start from: model dir, run dir, checkpoint or Hub id org/name[@revision]")
    data: AlignDataConfig
    run: RunConfig = RunConfig(name="align")
    optim: OptimConfig = OptimConfig(lr=1e-4, weight_decay=0.0)
    schedule: ScheduleConfig = ScheduleConfig(warmup_steps=10)
    train: LoopConfig = LoopConfig(max_steps=200, global_batch_tokens=16384, micro_batch_size=8, eval_every=50, checkpoint_every=0)
    lora: LoraSettings = LoraSettings()
    dpo: DPOSettings = DPOSettings()

    @model_validator(mode="after")
    def _check(self) -> AlignConfig:
        if self.optim.name != "adamw" and self.lora.enabled:
            raise ValueError("LoRA adapters train with optim.name=adamw (Muon needs full 2-D weights)")
        return self
