"""`lmforge train`: the training loop, shared by pretraining, SFT, DPO, reward models and RL.

What is trained on and how the loss is computed is an `Objective` (train/objective.py for
pretraining; lmforge/align/ for SFT, DPO, reward models and GRPO). The `Trainer` around it is the same for all,
in named phases: `setup` (run dir, model, optimizers, resume, monitors), then per step
`train_step` (lr from the schedule -> `forward_backward` over grad_accum_steps micro-batches
-> clip the global grad norm -> optimizer step) and, between steps, `report` (metrics,
alerts), `validate` and `save_checkpoint`. SIGINT/SIGTERM finish the current step, save a
checkpoint and return. Whether a run may use its run dir is train/run_setup.py's call.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.device import autocast, compute_dtype, log_choice
from lmforge.errors import ConfigError
from lmforge.eval.tasks import evaluate_all, resolve_tasks
from lmforge.model import ModelConfig
from lmforge.store import checkpoint
from lmforge.store.run_dir import RunDir, lineage
from lmforge.tokenizer import LmTokenizer
from lmforge.train import distributed, pretrain, run_setup
from lmforge.train.checkpointing import RunCheckpoints
from lmforge.train.config import LoopConfig, ParallelConfig, TrainConfig, TrainingRun
from lmforge.train.expert_balance import ExpertBalance, pop_aux_losses
from lmforge.train.faults import StepGuard, TrainingError, inject
from lmforge.train.mfu import peak_flops_basis
from lmforge.train.monitoring import RunMonitors
from lmforge.train.objective import Objective, accumulation
from lmforge.train.optim import build_optimizers
from lmforge.train.parallel import (
    clip_gradients,
    decide_compile,
    grad_norm,
    gradient_sync,
    inner_model,
    parallelize,
    unwrap,
)
from lmforge.train.schedules import lr_factor
from lmforge.train.stop import StopFlag

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
    run_dir: Path
    status: str  # "completed" | "interrupted"
    step: int
    losses: list[float]  # train loss of every step this call ran
    val_loss: float | None
    val_bpb: float | None
    checkpoint: Path | None
    signal: int | None = None
    val_metrics: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StepOutcome:
    """One optimizer step as every rank agreed on it."""

    loss: float  # mean over micro-batches and ranks
    grad_norm: float  # global
    skipped: str | None  # why the update was not applied (None: it was)
    stopping: bool  # some rank was asked to stop
    extras: dict[str, float]  # the objective's metrics, averaged over ranks


class Trainer:
    """Trains `build_model()` on `objective` per the shared training sections of `config`.

    `trainable_only` checkpoints just the trainable parameters (LoRA); `extra_state` goes into
    every checkpoint (its `*_sha256` keys must match on resume).
    """

    def __init__(self, config: TrainingRun, model_config: ModelConfig, build_model: Callable[[], nn.Module],
                 tokenizer: LmTokenizer, objective: Objective, manifest: dict[str, Any], env: distributed.DistEnv,
                 trainable_only: bool = False, extra_state: dict[str, Any] | None = None):
        self.config, self.model_config, self.build_model = config, model_config, build_model
        self.tokenizer, self.objective, self.manifest, self.env = tokenizer, objective, manifest, env
        self.trainable_only, self.extra_state = trainable_only, extra_state or {}
        self.loop, self.parallel = config.train, config.parallel
        self.guard = StepGuard(config.faults)
        self.device = env.device
        self.dtype = compute_dtype(self.loop.dtype, self.device)
        log_choice("train.device", self.loop.device, self.device, self.dtype)
        # FSDP2's mixed-precision policy casts weights itself; autocast is for single and DDP.
        self.compute_dtype = torch.float32 if self.parallel.strategy == "fsdp" else self.dtype
        self.run_dir = RunDir(Path(config.run.out_dir) / config.run.name)
        self.step = 0
        self.losses: list[float] = []
        self.val: dict[str, float] = {}
        self.saved: Path | None = None
        self.peak = self.loop.peak_flops  # None: looked up at the first logged step
        self.flops_per_token = model_config.flops_per_token(objective.seq_len)

    # ------------------------------------------------------------------------------ setup

    def setup(self, resume: bool = False, overwrite: bool = False) -> None:
        """Check the config, claim the run dir, build the model and optimizers, load the checkpoint
        to resume from, record the run and open its monitors."""
        env, objective = self.env, self.objective
        if env.world_size > 1 and not objective.sharded:
            raise ConfigError(f"{objective.kind} runs on one process for now (got {env.world_size}; use parallel.strategy=single)")
        if self.parallel.strategy == "fsdp" and self.config.optim.name == "muon":
            raise ConfigError("optim.name=muon needs whole weight matrices; with parallel.strategy=fsdp use adamw")
        self.accum = getattr(objective, "grad_accum_steps", None) or accumulation(self.loop, objective.seq_len, env.world_size)
        plan = run_setup.plan_run(self.run_dir, self.config, self.tokenizer, self.manifest, resume, overwrite,
                                  self.extra_state)
        distributed.barrier(env)  # every rank has read the run dir before rank 0 may clear it
        # Tasks resolve before any training: a bad task file fails in a second, not at step N.
        self.eval_tasks = [task for name in self.loop.eval_tasks for task in resolve_tasks(name)]
        if env.is_main:
            self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self._build()
        if plan.resume and plan.latest is not None:
            self._resume_from(plan.latest)
        if plan.resume and env.is_main:
            self.run_dir.truncate_metrics(self.step)  # records a crashed attempt logged after its last checkpoint
        if self.step >= self.loop.max_steps:
            log.info("run already at step %d of %d", self.step, self.loop.max_steps)
        if env.is_main:
            run_setup.record_run(self.run_dir, plan, self.config, self.tokenizer, self.model_config.max_seq_len,
                                 self._lineage())
        distributed.barrier(env)
        self.monitors = RunMonitors(self.config, self.run_dir, env, self.step)

    def _build(self) -> None:
        """The model, parallelized; its optimizers (peak lr kept per group); the checkpointer."""
        self.model = parallelize(self.build_model().to(self.device), self.parallel, self.env, self.dtype,
                                 compile=decide_compile(self.loop, self.device, self.objective, self.model_config))
        # Validation runs on every rank (FSDP needs all of them for each forward); under DDP on
        # the bare replica, which needs no collectives.
        self.eval_model = inner_model(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.experts = ExpertBalance(self.model, self.env)
        self.optimizers = build_optimizers(inner_model(self.model), self.config.optim, self.device)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["peak_lr"] = group["lr"]
        run_state = {
            "kind": self.objective.kind,
            "model": self.model_config.model_dump(mode="json"),
            "model_shape": self.model_config.shape(),
            "world_size": self.env.world_size,
            "strategy": self.parallel.strategy,
            "tokenizer_hash": self.tokenizer.hash(),
            **self.extra_state,
        }
        self.checkpoints = RunCheckpoints(self.run_dir.checkpoints, self.loop, self.model, self.optimizers,
                                          self.objective, self.guard, self.env, run_state, self.trainable_only)

    def _resume_from(self, latest: Path) -> None:
        self.step, state = self.checkpoints.resume(latest)
        written_by = state.get("world_size", 1)
        log.info("resumed from %s at step %d%s", latest, self.step,
                 f" (written by {written_by} processes)" if written_by != self.env.world_size else "")

    def _lineage(self) -> dict[str, Any]:
        return lineage(
            **self.manifest,
            tokenizer_hash=self.tokenizer.hash(),
            model_params=self.model_config.num_params(),
            active_params=self.model_config.num_params(active=True) if self.model_config.moe else None,
            trainable_params=sum(p.numel() for p in inner_model(self.model).parameters() if p.requires_grad),
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            strategy=self.parallel.strategy,
            world_size=self.env.world_size,
        )

    # ------------------------------------------------------------------------------- loop

    def train(self) -> TrainResult:
        """Steps until train.max_steps or a stop signal; then validation and a final checkpoint."""
        monitors, loop = self.monitors, self.loop
        self.model.train()
        self._restart_window()
        watchdog = distributed.StepWatchdog(self.env, self.parallel.timeout_seconds)
        try:
            with StopFlag() as stop:
                while self.step < loop.max_steps:
                    watchdog.beat(self.step)
                    outcome = self.train_step(stop.signum is not None)
                    self.step += 1
                    inject(self.env.rank, self.step, distributed.restart_count())
                    if monitors.profiler is not None:
                        monitors.profiler.step()
                    if not math.isfinite(outcome.loss):
                        log.warning("non-finite loss %s at step %d", outcome.loss, self.step)
                    self.losses.append(outcome.loss)
                    self._window_tokens += self.objective.tokens_per_step
                    monitors.bar.update(1)
                    if outcome.skipped is not None:
                        if self.report_skip(outcome):
                            continue  # rolled back: self.step is the checkpoint's
                    else:
                        self.report(outcome)
                    if loop.eval_every and self.step % loop.eval_every == 0:
                        self.validate()
                        self._window_start = time.perf_counter()
                    if outcome.stopping:
                        return self._stop(stop.signum)
                    if loop.checkpoint_every and self.step % loop.checkpoint_every == 0:
                        self.save_checkpoint()
                        self._window_start = time.perf_counter()
            if not self.val or not (loop.eval_every and self.step % loop.eval_every == 0):
                self.validate()
            final = checkpoint.step_dir_name(self.step)
            if not (self.saved and self.saved.name == final):
                self.save_checkpoint()
            self.saved = self.checkpoints.close() or self.saved
        except torch.OutOfMemoryError:
            snapshot = monitors.memory.dump(f"oom-step-{self.step + 1}.pickle")
            monitors.alerts.alert("out_of_memory", self.step + 1, f"out of memory; allocator snapshot {snapshot}")
            raise
        except Exception as err:
            if self.env.world_size > 1 and distributed.is_collective_failure(err):
                raise self._collective_failure(err) from err
            raise
        finally:
            watchdog.close()
            monitors.close()
        return self._result("completed", None)

    def train_step(self, stop_requested: bool) -> StepOutcome:
        """One optimizer step: lr from the schedule -> forward_backward -> one all-reduce -> judge -> update."""
        factor = lr_factor(self.step, self.loop.max_steps, self.config.schedule)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * factor
        with torch.profiler.record_function(f"lmforge/train_step_{self.step + 1}"):
            self.prepare_step()
            loss_sum, extras = self.forward_backward(self.guard.poisoned(self.step))
            norm = grad_norm(self.params)
            # One all-reduce per step: the loss summed over ranks, whether any rank was asked to
            # stop (so that every rank decides the same), and the objective's extra metrics
            # (averaged over ranks like the loss).
            names = sorted(extras)
            stats = torch.tensor([0.0, float(stop_requested), *(extras[k] for k in names)], device=self.device)
            stats[0] = loss_sum
            stats = distributed.all_reduce_sum(self.env, stats).tolist()
            world_size = self.env.world_size
            loss, stopping = stats[0] / (self.accum * world_size), stats[1] > 0
            extras = {k: v / world_size for k, v in zip(names, stats[2:], strict=True)}
            norm_value = norm.item()
            reason = self.guard.judge(loss, norm_value)
            if reason is None:
                clip_gradients(self.params, self.config.optim.grad_clip or math.inf, norm)
                for opt in self.optimizers:
                    opt.step()
            self.experts.after_step(applied=reason is None)
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
        return StepOutcome(loss, norm_value, reason, stopping, extras)

    def prepare_step(self) -> None:
        """The objective's data for this step, when it makes its own (RL rollouts from the current
        weights); that time is not training, so it is left out of the tokens/s window."""
        prepare = getattr(self.objective, "prepare_step", None)
        if prepare is None:
            return
        started = time.perf_counter()
        prepare(self.model, self.step + self.guard.data_offset)
        self._window_start += time.perf_counter() - started

    def forward_backward(self, poisoned: bool) -> tuple[torch.Tensor, dict[str, float]]:
        """grad_accum_steps micro-batches of this rank: forward under autocast, backward (gradients
        sync across ranks on the last). Returns the summed loss and the objective's mean extras."""
        loss_sum = torch.zeros((), device=self.device)
        extras: dict[str, float] = {}
        aux_sum: dict[str, torch.Tensor] = {}  # read once per step: no host sync per micro-batch
        data_step = self.step + self.guard.data_offset
        for micro_step in range(self.accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in self.objective.batch(data_step, micro_step).items()}
            with gradient_sync(self.model, micro_step == self.accum - 1):
                with autocast(self.device, self.compute_dtype):
                    pop_aux_losses(self.model)  # drop any a forward outside this loss left (none expected)
                    loss, micro_extras = self.objective.loss(self.model, batch)
                    aux = pop_aux_losses(self.model)  # MoE balancing, z-losses: trained on, logged apart
                if poisoned:  # fault injection (faults.debug_nan_steps)
                    loss = loss * torch.nan
                ((loss + sum(aux.values())) / self.accum).backward()
            loss_sum += loss.detach()
            for key, value in micro_extras.items():
                extras[key] = extras.get(key, 0.0) + value / self.accum
            for key, value in aux.items():
                aux_sum[key] = aux_sum.get(key, 0) + value.detach() / self.accum
        if aux_sum:
            extras.update(zip(aux_sum, torch.stack(list(aux_sum.values())).tolist(), strict=True))
        return loss_sum, extras

    # ------------------------------------------------------------------- between the steps

    def report(self, outcome: StepOutcome) -> None:
        """An applied step: to the alert monitor; every log_every steps also to the metrics with
        throughput and MFU over the steps since the last report."""
        step, alerts, bar = self.step, self.monitors.alerts, self.monitors.bar
        if not (step % self.loop.log_every == 0 or step == self.loop.max_steps):
            alerts.observe(step, outcome.loss, outcome.grad_norm)
            return
        tokens_per_second = self._window_tokens / (time.perf_counter() - self._window_start)
        if self.peak is None:
            self.peak, basis = peak_flops_basis(self.device, self.dtype)
            if self.env.is_main:  # the two bases are not comparable: say which one the figures use
                log.info("MFU is against the %s: %.2f TFLOP/s per device", basis, self.peak / 1e12)
        mfu = self.flops_per_token * tokens_per_second / (self.peak * self.env.world_size)
        lr = self.optimizers[0].param_groups[0]["lr"]
        expert_load = self.experts.metrics()
        self.monitors.log(step, loss=outcome.loss, lr=lr, grad_norm=outcome.grad_norm,
                          tokens_per_second=tokens_per_second, mfu=mfu,
                          tokens_seen=step * self.objective.tokens_per_step, **outcome.extras, **expert_load)
        alerts.observe(step, outcome.loss, outcome.grad_norm, tokens_per_second)
        alerts.observe_experts(step, expert_load.get("expert_load", []), expert_load.get("expert_load_layers"))
        bar.set_postfix(loss=f"{outcome.loss:.3f}", tok_s=f"{tokens_per_second:,.0f}", mfu=f"{mfu:.1%}")
        if bar.disable and self.env.is_main:
            log.info("step %d loss %.4f lr %.2e tok/s %.0f mfu %.1f%%", step, outcome.loss, lr,
                     tokens_per_second, 100 * mfu)
        self._restart_window()

    def report_skip(self, outcome: StepOutcome) -> bool:
        """A skipped step: logged and alerted; True when it was one too many and the run rolled back."""
        step, alerts = self.step, self.monitors.alerts
        alerts.observe(step, outcome.loss, outcome.grad_norm)
        log.warning("step %d skipped (no optimizer update): %s", step, outcome.skipped)
        self.monitors.log(step, loss=outcome.loss if math.isfinite(outcome.loss) else None,
                          grad_norm=outcome.grad_norm if math.isfinite(outcome.grad_norm) else None,
                          skipped=outcome.skipped)
        alerts.alert("step_skipped", step, f"optimizer update skipped: {outcome.skipped}",
                     reason=outcome.skipped, data_step=step + self.guard.data_offset)
        if not self.guard.record_skip(step):
            return False
        self.step = self.roll_back(step)
        self.monitors.bar.n = self.step
        self.monitors.bar.refresh()
        self._restart_window()
        return True

    def validate(self) -> None:
        """The objective's validation and the in-training eval tasks, on every rank; rank 0 logs them."""
        results = self.objective.validate(self.eval_model, self.device, self.compute_dtype)
        if self.eval_tasks:
            results.update(evaluate_all(unwrap(self.eval_model), self.tokenizer, self.eval_tasks,
                                        self.loop.eval_task_limit, self.config.run.seed))
        if results:
            self.val = results
            self.monitors.log(self.step, **results)
            if self.env.is_main:
                self.monitors.bar.write(f"step {self.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def save_checkpoint(self) -> Path:
        """A checkpoint of this step: weights, optimizers, and the state resume and rollback need."""
        try:
            self.saved = self.checkpoints.save(self.step, self.val.get("val_loss"))
        except OSError as err:
            self.monitors.alerts.checkpoint_failed(self.step, err)
            raise
        return self.saved

    def roll_back(self, bad_step: int) -> int:
        """Reload the newest checkpoint from before the bad stretch; skip the stretch's data."""
        to_step, skipped_data, message = self.checkpoints.roll_back(bad_step)
        log.warning(message)
        self.monitors.alerts.alert("rollback", bad_step, message, from_step=bad_step, to_step=to_step,
                                   skipped_data_steps=list(skipped_data))
        self.monitors.log(self.step, rollback_from_step=bad_step, rollback_to_step=to_step)
        return to_step

    # ------------------------------------------------------------------------------ ending

    def _stop(self, signum: int | None) -> TrainResult:
        """Asked to stop (here or on another rank): checkpoint this step and return."""
        self.save_checkpoint()
        self.saved = self.checkpoints.close() or self.saved
        if self.env.is_main:
            self.monitors.bar.write(f"interrupted at step {self.step}; checkpoint {self.saved}; continue with --resume")
        return self._result("interrupted", signum or signal.SIGTERM)  # another rank's signal: same exit

    def _collective_failure(self, err: Exception) -> TrainingError:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        log.error("rank %d: a collective failed at step %d (timeout %.0f s): %s; a peer rank has died or "
                  "hangs. torchrun --max-restarts relaunches resume from the last complete checkpoint",
                  self.env.rank, self.step + 1, self.parallel.timeout_seconds, first_line)
        return TrainingError(f"rank {self.env.rank}: collective failed at step {self.step + 1}: {first_line}")

    def _restart_window(self) -> None:
        """Throughput is measured over the steps since the last report, without evals and saves."""
        self._window_start, self._window_tokens = time.perf_counter(), 0

    def _result(self, status: str, signum: int | None) -> TrainResult:
        val = self.val
        return TrainResult(self.run_dir.path, status, self.step, self.losses, val.get("val_loss"), val.get("val_bpb"),
                           self.saved, signum, dict(val))


# ------------------------------------------------------------------------------ entry points


def fit(config: TrainingRun, model_config: ModelConfig, build_model: Callable[[], nn.Module], tokenizer: LmTokenizer,
        objective: Objective, manifest: dict[str, Any], resume: bool = False, trainable_only: bool = False,
        extra_state: dict[str, Any] | None = None, env: distributed.DistEnv | None = None,
        overwrite: bool = False) -> TrainResult:
    """Train `build_model()` on `objective` (see `Trainer`). `env`: the process group the caller
    joined (None: join it here). `resume`/`overwrite`: see train/run_setup.py."""
    own_env = env is None
    if env is None:
        env = init_distributed(config.train, config.parallel)
    try:
        trainer = Trainer(config, model_config, build_model, tokenizer, objective, manifest, env,
                          trainable_only=trainable_only, extra_state=extra_state)
        trainer.setup(resume, overwrite)
        return trainer.train()
    finally:
        if own_env:
            distributed.shutdown(env)


def run(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Pretrain per `config`; with `resume`, continue from the run's latest complete checkpoint;
    with `overwrite`, replace whatever an earlier run left in the run dir.

    Under `torchrun` every process calls this; each trains on its block of every step's
    windows (the union over ranks is the same global batch whatever the world size).
    """
    config = config.model_copy(deep=True)
    env = init_distributed(config.train, config.parallel)
    try:
        tokenizer, objective, build_model, manifest = pretrain.prepare(config, env)
        return fit(config, config.model, build_model, tokenizer, objective, manifest, resume, env=env,
                   overwrite=overwrite)
    finally:
        distributed.shutdown(env)


def init_distributed(loop: LoopConfig, parallel: ParallelConfig) -> distributed.DistEnv:
    return distributed.init(
        loop.device, parallel.backend, parallel.timeout_seconds, need_group=parallel.strategy != "single"
    )
