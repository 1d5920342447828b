"""TrainConfig: everything `lmforge train` needs, as typed sections with recommended defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import Section
from lmforge.model.config import ModelConfig
from lmforge.monitor.alerts import AlertConfig
from lmforge.monitor.trackers import TrackerConfig


class RunConfig(Section):
    """Where the run lives (out_dir/name) and its seed."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$")
    out_dir: str = "runs"
    seed: int = 1337


class DataConfig(Section):
    """The token dataset to train on and the sequence length."""

    dataset: str = Field(description="token dataset dir written by `lmforge tokenize`")
    seq_len: int = Field(512, ge=8)
    tokenizer: str | None = Field(None, description="None: the tokenizer named in the dataset manifest")


class OptimConfig(Section):
    """The optimizer (AdamW, or Muon for 2-D hidden weights) and its hyperparameters."""

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
    """The learning-rate schedule: warmup, then cosine, warmup-stable-decay or constant."""

    name: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of steps spent decaying")


class LoopConfig(Section):
    """The training loop: steps, batch, device and dtype, logging, validation, checkpoints."""

    max_steps: int = Field(1000, ge=1)
    global_batch_tokens: int = Field(65536, ge=1, description="tokens per optimizer step, all ranks")
    micro_batch_size: int = Field(8, ge=1, description="sequences per forward pass per rank")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "bf16", "bfloat16", "fp32", "float32"] = Field(
        "auto", description="auto: bf16 autocast where the device has fast bf16 matmul"
    )
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each block; auto: pretraining on CUDA, and on CPU dense pretraining steps big "
        "enough to pay the compile back (train.parallel's AUTO_COMPILE_MIN_STEP_FLOPS); eager, with a warning, where unavailable"
    )
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(200, ge=0, description="0 disables periodic validation")
    eval_batches: int = Field(20, ge=1)
    checkpoint_every: int = Field(500, ge=0, description="0: only at the end")
    keep_checkpoints: int = Field(3, ge=1)
    async_checkpoint: bool | None = Field(
        None, description="write checkpoints in the background (dcp.async_save); None: on GPU only"
    )
    resume: Literal["never", "auto", "always"] = Field(
        "auto", description="auto: continue from the latest checkpoint when torchrun relaunches failed "
        "workers; always: whenever one exists (requeued jobs); the --resume flag forces it"
    )
    peak_flops: float | None = Field(None, gt=0, description="for MFU; None: table (GPU) or measured (CPU)")
    progress: bool = True
    eval_tasks: list[str] = Field(default_factory=list, description="`lmforge eval` tasks run at every eval_every")
    eval_task_limit: int | None = Field(None, ge=1, description="first N examples of each in-training task")
    profile: str | None = Field(None, description="steps=A:B: torch profiler trace of those steps into RUN/profile/")


class ParallelConfig(Section):
    """How the model is spread over the processes `torchrun` starts (applied by train/parallel.py)."""

    strategy: Literal["single", "ddp", "fsdp"] = Field(
        "single", description="single: one process; ddp: replicas; fsdp: FSDP2 fully_shard per block"
    )
    reshard_after_forward: bool = Field(
        True, description="fsdp: free gathered weights after forward (less memory, one more all-gather)"
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        "none", description="full: recompute every block in backward; selective: every k-th block"
    )
    activation_checkpointing_every: int = Field(2, ge=1, description="selective: checkpoint every k-th block")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: nccl on GPU, gloo on CPU")
    timeout_seconds: float = Field(600.0, gt=0, description="a collective waiting longer fails, naming rank and step")


class FaultConfig(Section):
    """What the loop does about bad steps: skip their update, roll back when they repeat."""

    skip_non_finite: bool = Field(True, description="skip the update of a step with NaN/inf loss or grad norm")
    # Off by default: early in training (warmup) gradient norms legitimately jump 20-30x their
    # median, and skipping those updates stalls a fresh run. Recipes for long runs turn it on.
    grad_spike_factor: float = Field(
        0.0, ge=0, description="skip a step whose grad norm exceeds this x its running median; 0 disables"
    )
    grad_spike_window: int = Field(20, ge=3, description="grad norms in the running median")
    grad_spike_min_steps: int = Field(10, ge=1, description="grad norms seen before spikes are judged")
    rollback_after: int = Field(
        3, ge=0, description="skipped steps within rollback_window steps that trigger a rollback; 0: never"
    )
    rollback_window: int = Field(100, ge=1, description="steps over which skipped steps are counted")
    max_rollbacks: int = Field(3, ge=0, description="rollbacks in one run before it stops with an error")
    debug_nan_steps: list[int] = Field(
        default_factory=list, description="fault injection: data steps (1-based) whose loss is made NaN"
    )


class TrainingRun(Section):
    """The sections every training verb shares (pretraining, SFT, DPO): the trainer reads these.

    A verb subclasses it, adds its own `model` and `data` (and whatever else it needs), and
    redeclares a section only to change its defaults; a new section is added here, once.
    """

    run: RunConfig = RunConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: LoopConfig = LoopConfig()
    parallel: ParallelConfig = ParallelConfig()
    faults: FaultConfig = FaultConfig()
    alerts: AlertConfig = AlertConfig()
    trackers: TrackerConfig = TrackerConfig()


class TrainConfig(TrainingRun):
    model: ModelConfig = ModelConfig(preset="small")
    data: DataConfig

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(
                f"data.seq_len {self.data.seq_len} exceeds model.max_seq_len {self.model.max_seq_len}"
            )
        return self
