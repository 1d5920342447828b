"""TrainConfig: everything `lmforge train` needs, as typed sections with recommended defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import Section
from lmforge.model.config import ModelConfig
from lmforge.monitor.alerts import AlertConfig
from lmforge.monitor.trackers import TrackerConfig


class RunConfig(Section):
    name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$")
    out_dir: str = "runs"
    seed: int = 1337


class DataConfig(Section):
    dataset: str = Field(description="token dataset dir written by `lmforge tokenize`")
    seq_len: int = Field(512, ge=8)
    tokenizer: str | None = Field(None, description="None: the tokenizer named in the dataset manifest")


class OptimConfig(Section):
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = Field(3e-3, gt=0, description="peak AdamW learning rate")
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")
    muon_lr: float = Field(0.02, gt=0, description="peak Muon learning rate for 2-D hidden weights")
    muon_momentum: float = Field(0.95, ge=0, lt=1)


class ScheduleConfig(Section):
    name: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of steps spent decaying")


class LoopConfig(Section):
    max_steps: int = Field(1000, ge=1)
    global_batch_tokens: int = Field(65536, ge=1, description="tokens per optimizer step, all ranks")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward pass per rank")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 autocast where the device has fast bf16 matmul"
    )
    compile: bool = False
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(200, ge=0, description="0 disables periodic validation")
    eval_batches: int = Field(20, ge=1)
    checkpoint_every: int = Field(500, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(3, ge=1)
    peak_flops: float | None = Field(None, gt=0, description="for MFU; None: table (GPU) or measured (CPU)")
    progress: bool = True
    eval_tasks: list[str] = Field(default_factory=list, description="`lmforge eval` tasks run at every eval_every")
    eval_task_limit: int | None = Field(None, ge=1, description="first N examples of each in-training task")
    profile: str | None = Field(None, description="steps=A:B: torch profiler trace of those steps into RUN/profile/")


class TrainConfig(Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig(preset="small")
    data: DataConfig
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: LoopConfig = LoopConfig()
    alerts: AlertConfig = AlertConfig()
    trackers: TrackerConfig = TrackerConfig()

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len {self.data.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}"
            )
        return self
