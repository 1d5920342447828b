"""`lmforge train`: the training loop, shared by pretraining, SFT and DPO.

What is trained on and how the loss is computed is an `Objective` (pretraining: token
windows and cross-entropy, here; SFT and DPO: lmforge/align/). The loop around it is the
same for all: order of a step is lr from the schedule -> grad_accum_steps micro-batches
(forward under autocast, backward) -> clip the global grad norm -> optimizer step.
Validation, in-training evals, alerts, logging and checkpoints happen between steps;
SIGINT/SIGTERM finish the current step, save a checkpoint and return.

A run dir belongs to one run (lmforge/runs.py): `resume` continues it from its latest
checkpoint with the same tokenizer; without checkpoints the same config starts it over;
anything else is refused unless `overwrite`, which starts it over from nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from lmforge import atomic
from lmforge.config import to_yaml
from lmforge.data.loader import TokenDataset, WindowLoader
from lmforge.data.tokenize import MANIFEST
from lmforge.errors import CheckpointError, ConfigError, DataError, LmforgeError, TokenizerError
from lmforge.eval.perplexity import bits_per_byte, evaluate_loss
from lmforge.model import ModelConfig, Transformer
from lmforge.monitor.alerts import AlertConfig, AlertMonitor
from lmforge.monitor.trackers import TrackerConfig, build_trackers
from lmforge.runs import MetricsLogger, RunDir, lineage
from lmforge.tokenizer import LmTokenizer, load_tokenizer
from lmforge.train import checkpoint, distributed
from lmforge.train.config import (
    FaultConfig,
    LoopConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    ScheduleConfig,
    TrainConfig,
)
from lmforge.train.faults import StepGuard, inject
from lmforge.train.mfu import peak_flops_basis
from lmforge.train.optim import build_optimizers
from lmforge.train.parallel import (
    autocast,
    clip_gradients,
    grad_norm,
    gradient_sync,
    inner_model,
    parallelize,
    resolve_dtype,
)
from lmforge.train.schedules import lr_factor

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


class TrainingError(LmforgeError):
    """The run cannot go on: bad steps that do not recover, or a peer rank that is gone."""


class Objective(Protocol):
    """What a run trains on: batches as a pure function of the step, a loss, validation."""

    kind: str
    tokens_per_step: int  # for tokens/s and MFU
    seq_len: int  # for the attention term of FLOPs/token

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]: ...
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...
    def state_dict(self, next_step: int) -> dict[str, Any]: ...
    def check_resume(self, state: dict[str, Any]) -> int: ...
    def validate(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, float]: ...


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("received %s: finishing the step and saving a checkpoint", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def resolve_vocab(config: TrainConfig, tokenizer_vocab: int) -> TrainConfig:
    """Fill model.vocab_size from the tokenizer, padded to a multiple of 64 for fast matmuls."""
    if config.model.vocab_size is None:
        config.model.vocab_size = math.ceil(tokenizer_vocab / 64) * 64
    elif config.model.vocab_size < tokenizer_vocab:
        raise ConfigError(
            f"model.vocab_size {config.model.vocab_size} is smaller than the tokenizer's {tokenizer_vocab}"
        )
    return config


def grad_accum_steps(config: TrainConfig, world_size: int = 1) -> int:
    return accumulation(config.train, config.data.seq_len, world_size)


def accumulation(loop: LoopConfig, seq_len: int, world_size: int = 1) -> int:
    tokens_per_micro_step = loop.micro_batch_size * seq_len * world_size
    if loop.global_batch_tokens % tokens_per_micro_step:
        raise ConfigError(
            f"train.global_batch_tokens {loop.global_batch_tokens} is not a multiple of "
            f"train.micro_batch_size x seq_len x world size = {tokens_per_micro_step}"
        )
    return loop.global_batch_tokens // tokens_per_micro_step


def unwrap(model: nn.Module) -> Transformer:
    """The lmforge Transformer inside DDP and/or a peft wrapper (its LoRA layers stay active)."""
    model = inner_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# ----------------------------------------------------------------------------- pretraining


class PretrainObjective:
    """Next-token prediction on windows of a token dataset; validation loss and bits per byte."""

    kind = "pretrain"

    sharded = True  # batches are this rank's block of each step's windows

    def __init__(self, config: TrainConfig, train_data: TokenDataset, val_data: TokenDataset | None, accum: int,
                 rank: int = 0, world_size: int = 1):
        self.seq_len = config.data.seq_len
        self.tokens_per_step = config.train.global_batch_tokens
        self.loader = WindowLoader(
            train_data, self.seq_len, config.train.micro_batch_size, accum, config.run.seed, rank, world_size
        )
        self.val_data = val_data
        self.val_loader = (
            WindowLoader(val_data, self.seq_len, config.train.micro_batch_size, shuffle=False) if val_data else None
        )
        self.eval_batches = config.train.eval_batches

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        inputs, targets = self.loader.batch(step, micro_step)
        return {"inputs": inputs, "targets": targets}

    def loss(self, model, batch):
        return model(batch["inputs"], batch["targets"]), {}

    def state_dict(self, next_step: int) -> dict[str, Any]:
        return self.loader.state_dict(next_step)

    def check_resume(self, state: dict[str, Any]) -> int:
        return self.loader.check_resume(state)

    def validate(self, model, device, dtype) -> dict[str, float]:
        if self.val_loader is None:
            return {}
        val_loss = evaluate_loss(model, self.val_loader, self.eval_batches, device, dtype)
        return {"val_loss": val_loss, "val_bpb": bits_per_byte(val_loss, self.val_data.bytes_per_token)}


def run(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Pretrain per `config`; with `resume`, continue from the run's latest complete checkpoint;
    with `overwrite`, replace whatever an earlier run left in the run dir.

    Under `torchrun` every process calls this; each trains on its block of every step's
    windows (the union over ranks is the same global batch whatever the world size).
    """
    config = config.model_copy(deep=True)
    env = init_distributed(config.train, config.parallel)
    try:
        train_data = TokenDataset(config.data.dataset, "train")
        has_val = train_data.manifest["splits"].get("val", {}).get("tokens", 0) > config.data.seq_len
        val_data = TokenDataset(config.data.dataset, "val") if has_val else None
        tokenizer = load_tokenizer(config.data.tokenizer or train_data.manifest["tokenizer"]["path"])
        if tokenizer.hash() != train_data.tokenizer_hash:
            raise DataError(
                f"tokenizer {tokenizer.path} does not match dataset {config.data.dataset} "
                "(it was tokenized with a different tokenizer)"
            )
        resolve_vocab(config, tokenizer.vocab_size)
        accum = grad_accum_steps(config, env.world_size)
        objective = PretrainObjective(config, train_data, val_data, accum, env.rank, env.world_size)

        def build_model() -> nn.Module:
            generator = torch.Generator().manual_seed(config.run.seed)
            with torch.device("meta"):
                model = Transformer(config.model)
            model.to_empty(device="cpu")
            model.init_weights(generator)
            return model

        manifest = {
            "kind": "pretrain",
            "parent": None,
            "dataset": str(Path(config.data.dataset).resolve()),
            "dataset_manifest_sha256": atomic.sha256_file(Path(config.data.dataset) / MANIFEST),
        }
        return fit(config, config.model, build_model, tokenizer, objective, manifest, resume, env=env,
                   overwrite=overwrite)
    finally:
        distributed.shutdown(env)


def init_distributed(loop: LoopConfig, parallel: ParallelConfig) -> distributed.DistEnv:
    return distributed.init(
        loop.device, parallel.backend, parallel.timeout_seconds, need_group=parallel.strategy != "single"
    )


class _SilentAlerts:
    """Alerts on ranks other than 0: one rank reports for the run."""

    fired: list = []

    def observe(self, *args, **kwargs) -> list:
        return []

    def alert(self, *args, **kwargs) -> dict:
        return {}

    def checkpoint_failed(self, *args) -> dict:
        return {}

    def start_watchdog(self) -> None:
        pass

    def close(self) -> None:
        pass


# ------------------------------------------------------------------------------- the loop


def fit(
    config: Any,
    model_config: ModelConfig,
    build_model,
    tokenizer: LmTokenizer,
    objective: Objective,
    manifest: dict[str, Any],
    resume: bool = False,
    trainable_only: bool = False,
    extra_state: dict[str, Any] | None = None,
    env: distributed.DistEnv | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train `build_model()` on `objective`. `config` has run, optim, schedule, train, alerts and
    trackers sections (parallel and faults optional); `trainable_only` checkpoints just the
    trainable parameters (LoRA). `env`: the process group `run` joined (None: join it here).
    `overwrite`: replace what an earlier run left in the run dir."""
    own_env = env is None
    if env is None:
        env = init_distributed(config.train, getattr(config, "parallel", ParallelConfig()))
    try:
        return _fit(config, model_config, build_model, tokenizer, objective, manifest, resume, trainable_only,
                    extra_state, env, overwrite)
    finally:
        if own_env:
            distributed.shutdown(env)


def _fit(config, model_config, build_model, tokenizer, objective, manifest, resume, trainable_only, extra_state,
         env: distributed.DistEnv, overwrite: bool = False) -> TrainResult:
    run_config: RunConfig = config.run
    optim_config: OptimConfig = config.optim
    schedule: ScheduleConfig = config.schedule
    loop: LoopConfig = config.train
    parallel: ParallelConfig = getattr(config, "parallel", ParallelConfig())
    guard = StepGuard(getattr(config, "faults", FaultConfig()))
    alert_config: AlertConfig = getattr(config, "alerts", AlertConfig())
    tracker_config: TrackerConfig = getattr(config, "trackers", TrackerConfig())
    device = env.device
    dtype = resolve_dtype(loop.dtype, device)
    main = env.is_main
    if env.world_size > 1 and not getattr(objective, "sharded", False):
        raise ConfigError(f"{objective.kind} runs on one process for now (got {env.world_size}; use parallel.strategy=single)")
    if parallel.strategy == "fsdp" and optim_config.name == "muon":
        raise ConfigError("optim.name=muon needs whole weight matrices; with parallel.strategy=fsdp use adamw")
    accum = accumulation(loop, objective.seq_len, env.world_size)

    run_dir = RunDir(Path(run_config.out_dir) / run_config.name)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in the run dir and --overwrite replaces it: pass one of them")
    relaunched = distributed.restart_count() > 0
    # A torchrun relaunch repeats the command line: the first attempt did the overwrite, this one resumes it.
    overwrite = overwrite and not relaunched
    latest = None if overwrite else checkpoint.latest_checkpoint(run_dir.checkpoints)
    resume = not overwrite and (resume or loop.resume == "always" or (loop.resume == "auto" and relaunched))
    start_over = claim_run_dir(run_dir, config, tokenizer, manifest, latest, resume, overwrite, extra_state)
    distributed.barrier(env)  # every rank has read the run dir before rank 0 may clear it
    # Tasks resolve before any training: a bad task file fails in a second, not at step N.
    from lmforge.eval.tasks import resolve_tasks

    eval_tasks = [task for name in loop.eval_tasks for task in resolve_tasks(name)]
    if main:
        run_dir.path.mkdir(parents=True, exist_ok=True)

    model = parallelize(build_model().to(device), parallel, env, dtype, compile=loop.compile)
    # FSDP2's mixed-precision policy casts weights itself; autocast is for single and DDP.
    compute_dtype = torch.float32 if parallel.strategy == "fsdp" else dtype
    optimizers = build_optimizers(inner_model(model), optim_config, device)
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    use_async = loop.async_checkpoint if loop.async_checkpoint is not None else device.type == "cuda"
    checkpointer = checkpoint.Checkpointer(run_dir.checkpoints, loop.keep_checkpoints, use_async, trainable_only)

    start_step = 0
    if resume and latest is not None:
        state = checkpoint.load(latest, model, optimizers, trainable_only=trainable_only)
        start_step = _resume_step(objective, state, latest)
        guard.load_state_dict(state.get("faults", {}))
        log.info("resumed from %s at step %d%s", latest, start_step,
                 f" (written by {state['world_size']} processes)" if state.get("world_size", 1) != env.world_size else "")
    if resume and main:
        run_dir.truncate_metrics(start_step)  # records a crashed attempt logged after its last checkpoint
    if start_step >= loop.max_steps:
        log.info("run already at step %d of %d", start_step, loop.max_steps)

    if main:
        if start_over:
            log.info("starting %s over (%s)", run_dir.path, "--overwrite" if overwrite else "same config, no checkpoint")
            run_dir.clear()
        run_dir.write_config(config)
        if not (run_dir.tokenizer / "tokenizer.json").is_file():
            _save_tokenizer(tokenizer, run_dir, model_config.max_seq_len)
        run_dir.write_manifest(lineage(
            **manifest,
            tokenizer_hash=tokenizer.hash(),
            model_params=model_config.num_params(),
            trainable_params=sum(p.numel() for p in inner_model(model).parameters() if p.requires_grad),
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            strategy=parallel.strategy,
            world_size=env.world_size,
        ))
    distributed.barrier(env)

    flops_per_token = model_config.flops_per_token(objective.seq_len)
    peak = loop.peak_flops
    metrics = MetricsLogger(run_dir) if main else None
    trackers = build_trackers(tracker_config, run_dir.path, run_config.name, config.model_dump(mode="json")) if main else []
    alerts = AlertMonitor(run_dir.path, alert_config, run_config.name) if main else _SilentAlerts()
    alerts.start_watchdog()
    from lmforge.monitor.profiler import CudaMemoryRecorder

    memory = CudaMemoryRecorder(run_dir.path / "profile", device)
    profiler = None
    if loop.profile:
        from lmforge.monitor.profiler import StepProfiler, parse_steps

        first, last = parse_steps(loop.profile)
        profiler = StepProfiler(run_dir.path / "profile", first, last, start_step, device.type == "cuda")
    losses: list[float] = []
    val: dict[str, float] = {}
    saved: Path | None = None
    step = start_step
    # Validation runs on every rank (FSDP needs all of them for each forward); under DDP on
    # the bare replica, which needs no collectives.
    eval_model = inner_model(model)

    def log_values(**values: float) -> None:
        if metrics is None:
            return
        metrics.log(step, **values)
        for tracker in trackers:
            tracker.log(step, {k: v for k, v in values.items() if isinstance(v, (int, float))})

    def validate() -> None:
        nonlocal val
        results = objective.validate(eval_model, device, compute_dtype)
        if eval_tasks:
            results.update(_run_eval_tasks(unwrap(eval_model), tokenizer, eval_tasks, loop.eval_task_limit, run_config.seed))
        if results:
            val = results
            log_values(**results)
            if main:
                bar.write(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in results.items()))

    def save() -> Path:
        state = {
            "step": step,
            "kind": objective.kind,
            "loader": objective.state_dict(step),
            "model": model_config.model_dump(mode="json"),
            "model_shape": model_config.shape(),
            "val_loss": val.get("val_loss"),
            "world_size": env.world_size,
            "strategy": parallel.strategy,
            "faults": guard.state_dict(),
            "tokenizer_hash": tokenizer.hash(),
            **(extra_state or {}),
        }
        checkpointer.rollback_floor = rollback_floor()
        try:
            path = checkpointer.save(step, model, optimizers, state)
        except OSError as err:
            alerts.checkpoint_failed(step, err)
            raise
        return path

    def rollback_floor() -> int | None:
        """The first skipped step that a rollback could still go back before (None: no rollback
        pending); retention keeps the checkpoint from before it."""
        if not guard.config.rollback_after:
            return None
        recent = [s for s in guard.skipped if s > step - guard.config.rollback_window]
        return recent[0] if recent else None

    def roll_back(bad_step: int) -> int:
        """Reload the newest checkpoint from before the bad stretch; skip the stretch's data."""
        checkpointer.rollback_floor = rollback_floor()
        checkpointer.wait()
        distributed.barrier(env)
        first_bad = guard.skipped[0]
        target = checkpoint.checkpoint_before(run_dir.checkpoints, first_bad)
        if target is None:
            raise TrainingError(
                f"{len(guard.skipped)} steps in {first_bad}..{bad_step} were skipped and there is no checkpoint "
                f"from before step {first_bad} to roll back to: set train.checkpoint_every, or lower optim.lr"
            )
        if guard.rollbacks >= guard.config.max_rollbacks:
            raise TrainingError(
                f"steps {first_bad}..{bad_step} were skipped after {guard.rollbacks} rollbacks "
                f"(faults.max_rollbacks): the run does not recover; lower optim.lr or inspect the data"
            )
        state = checkpoint.load(target, model, optimizers, trainable_only=trainable_only)
        to_step = _resume_step(objective, state, target)
        checkpoint.discard_after(run_dir.checkpoints, target)
        distributed.barrier(env)
        skipped_data = (to_step + 1 + guard.data_offset, bad_step + guard.data_offset)
        guard.rolled_back(bad_step, to_step, state.get("faults", {}))
        message = (f"rolled back from step {bad_step} to checkpoint step {to_step} after skipped steps "
                   f"{first_bad}..{bad_step}; skipping data steps {skipped_data[0]}..{skipped_data[1]}")
        log.warning(message)
        alerts.alert("rollback", bad_step, message, from_step=bad_step, to_step=to_step,
                     skipped_data_steps=list(skipped_data))
        log_values(rollback_from_step=bad_step, rollback_to_step=to_step)
        return to_step

    bar = tqdm(total=loop.max_steps, initial=start_step, desc=run_config.name,
               disable=not (loop.progress and main) or None, dynamic_ncols=True)
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = optim_config.grad_clip if optim_config.grad_clip > 0 else math.inf
    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    watchdog = distributed.StepWatchdog(env, parallel.timeout_seconds)
    try:
        with _StopFlag() as stop:
            while step < loop.max_steps:
                watchdog.beat(step)
                factor = lr_factor(step, loop.max_steps, schedule)
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["lr"] = group["peak_lr"] * factor
                loss_sum = torch.zeros((), device=device)
                extras: dict[str, float] = {}
                poisoned = guard.poisoned(step)
                with torch.profiler.record_function(f"lmforge/train_step_{step + 1}"):
                    for micro_step in range(accum):
                        data_step = step + guard.data_offset
                        batch = {k: v.to(device, non_blocking=True) for k, v in objective.batch(data_step, micro_step).items()}
                        with gradient_sync(model, micro_step == accum - 1):
                            with autocast(device, compute_dtype):
                                loss, micro_extras = objective.loss(model, batch)
                            if poisoned:  # fault injection (faults.debug_nan_steps)
                                loss = loss * torch.nan
                            (loss / accum).backward()
                        loss_sum += loss.detach()
                        for key, value in micro_extras.items():
                            extras[key] = extras.get(key, 0.0) + value / accum
                    norm = grad_norm(params)
                    # One all-reduce per step: the loss summed over ranks, whether any rank was
                    # asked to stop (so that every rank decides the same), and the objective's
                    # extra metrics (averaged over ranks like the loss).
                    names = sorted(extras)
                    stats = torch.tensor([0.0, float(stop.signum is not None), *(extras[k] for k in names)], device=device)
                    stats[0] = loss_sum
                    stats = distributed.all_reduce_sum(env, stats).tolist()
                    step_loss, stopping = stats[0] / (accum * env.world_size), stats[1] > 0
                    extras = {k: v / env.world_size for k, v in zip(names, stats[2:], strict=True)}
                    reason = guard.judge(step_loss, norm.item())
                    if reason is None:
                        clip_gradients(params, max_norm, norm)
                        for opt in optimizers:
                            opt.step()
                    for opt in optimizers:
                        opt.zero_grad(set_to_none=True)
                step += 1
                inject(env.rank, step, distributed.restart_count())
                if profiler is not None:
                    profiler.step()
                if not math.isfinite(step_loss):
                    log.warning("non-finite loss %s at step %d", step_loss, step)
                losses.append(step_loss)
                window_tokens += objective.tokens_per_step
                bar.update(1)
                grad_norm_value = norm.item()
                if reason is not None:
                    alerts.observe(step, step_loss, grad_norm_value)
                    log.warning("step %d skipped (no optimizer update): %s", step, reason)
                    log_values(loss=step_loss if math.isfinite(step_loss) else None,
                               grad_norm=grad_norm_value if math.isfinite(grad_norm_value) else None,
                               skipped=reason)
                    alerts.alert("step_skipped", step, f"optimizer update skipped: {reason}",
                                 reason=reason, data_step=step + guard.data_offset)
                    if guard.record_skip(step):
                        step = roll_back(step)
                        bar.n = step
                        bar.refresh()
                        window_start, window_tokens = time.perf_counter(), 0
                        continue
                elif step % loop.log_every == 0 or step == loop.max_steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_second = window_tokens / elapsed
                    if peak is None:
                        peak, basis = peak_flops_basis(device, dtype)
                        if main:  # the two bases are not comparable: say which one the figures use
                            log.info("MFU is against the %s: %.2f TFLOP/s per device", basis, peak / 1e12)
                    mfu = flops_per_token * tokens_per_second / (peak * env.world_size)
                    log_values(loss=step_loss, lr=optimizers[0].param_groups[0]["lr"], grad_norm=grad_norm_value,
                               tokens_per_second=tokens_per_second, mfu=mfu,
                               tokens_seen=step * objective.tokens_per_step, **extras)
                    alerts.observe(step, step_loss, grad_norm_value, tokens_per_second)
                    bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_second:,.0f}", mfu=f"{mfu:.1%}")
                    if bar.disable and main:
                        log.info(
                            "step %d loss %.4f lr %.2e tok/s %.0f mfu %.1f%%",
                            step, step_loss, factor * optimizers[0].param_groups[0]["peak_lr"],
                            tokens_per_second, 100 * mfu,
                        )
                    window_start, window_tokens = time.perf_counter(), 0
                else:
                    alerts.observe(step, step_loss, grad_norm_value)
                if loop.eval_every and step % loop.eval_every == 0:
                    validate()
                    window_start = time.perf_counter()
                if stopping:
                    saved = save()
                    saved = checkpointer.close() or saved
                    signum = stop.signum or signal.SIGTERM  # another rank's signal: same exit
                    if main:
                        bar.write(f"interrupted at step {step}; checkpoint {saved}; continue with --resume")
                    return _result(run_dir, "interrupted", step, losses, val, saved, signum)
                if loop.checkpoint_every and step % loop.checkpoint_every == 0:
                    saved = save()
                    window_start = time.perf_counter()
            if not val or not (loop.eval_every and step % loop.eval_every == 0):
                validate()
            final = checkpoint.step_dir_name(step)
            saved = run_dir.checkpoints / final if saved and saved.name == final else save()
            saved = checkpointer.close() or saved
    except torch.OutOfMemoryError:
        snapshot = memory.dump(f"oom-step-{step + 1}.pickle")
        alerts.alert("out_of_memory", step + 1, f"out of memory; allocator snapshot {snapshot}")
        raise
    except Exception as err:
        if env.world_size > 1 and distributed.is_collective_failure(err):
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            log.error("rank %d: a collective failed at step %d (timeout %.0f s): %s; a peer rank has died or "
                      "hangs. torchrun --max-restarts relaunches resume from the last complete checkpoint",
                      env.rank, step + 1, parallel.timeout_seconds, first_line)
            raise TrainingError(f"rank {env.rank}: collective failed at step {step + 1}: {first_line}") from err
        raise
    finally:
        watchdog.close()
        bar.close()
        if metrics is not None:
            metrics.close()
        alerts.close()
        if profiler is not None:
            profiler.close()
        for tracker in trackers:
            tracker.close()
    return _result(run_dir, "completed", step, losses, val, saved, None)


# Config keys that do not change what a run computes: a rerun may differ in them.
_NOT_THE_RUN = frozenset({"run.out_dir", "train.progress", "train.resume", "train.profile"})
# Lineage that identifies a run's inputs beside its config (the same paths may hold new data).
_INPUT_HASHES = ("dataset_manifest_sha256", "dataset_sha256", "parent_weights_sha256")


def _saved_tokenizer_hash(run_dir: RunDir) -> str | None:
    if not (run_dir.tokenizer / "tokenizer.json").is_file():
        return None
    try:
        return load_tokenizer(run_dir.tokenizer).hash()
    except TokenizerError:
        return "unreadable"


def run_changes(run_dir: RunDir, config: Any, tokenizer: LmTokenizer, manifest: dict[str, Any]) -> list[str]:
    """How the run recorded in `run_dir` differs from this one: config keys, tokenizer, inputs."""
    from lmforge.monitor.catalog import flatten

    changes = []
    saved = _saved_tokenizer_hash(run_dir)
    if saved is not None and saved != tokenizer.hash():
        changes.append(f"tokenizer {saved[:12]} -> {tokenizer.hash()[:12]}")
    lineage = run_dir.read_manifest()
    changes += [f"{key} {lineage[key][:12]} -> {manifest[key][:12]}" for key in _INPUT_HASHES
                if lineage.get(key) and manifest.get(key) and lineage[key] != manifest[key]]
    recorded = run_dir.read_config()
    if recorded is None:
        return [*changes, f"no readable {run_dir.path / 'config.yaml'}"]
    import yaml

    old, new = flatten(recorded), flatten(yaml.safe_load(to_yaml(config)))
    return changes + [f"{key} {old.get(key)!r} -> {new.get(key)!r}" for key in sorted((set(old) | set(new)) - _NOT_THE_RUN)
                      if old.get(key) != new.get(key)]


def claim_run_dir(run_dir: RunDir, config: Any, tokenizer: LmTokenizer, manifest: dict[str, Any],
                  latest: Path | None, resume: bool, overwrite: bool, extra_state: dict[str, Any] | None = None) -> bool:
    """Whether this run may use `run_dir` (a one-line error if not) and must first clear it.

    Continued: a run with checkpoints, with `resume`, the same tokenizer and the same hashes
    in `extra_state` (`*_sha256`: e.g. a fine-tune's starting weights); the checkpoint checks
    the model's shape, the data loader its position. Started over: anything, with
    `overwrite`; or a run with the same config and inputs that wrote no checkpoint (a rerun
    never appends to stale metrics). Refused: the rest, naming what differs."""
    if overwrite:
        return run_dir.has_contents()
    if latest is not None and resume:
        state = checkpoint.read_state(latest)
        recorded = state.get("tokenizer_hash") or _saved_tokenizer_hash(run_dir)
        if recorded is not None and recorded != tokenizer.hash():
            raise CheckpointError(
                f"cannot resume {run_dir.path}: it was trained with tokenizer {recorded[:12]}, this run's "
                f"{tokenizer.path or 'tokenizer'} is {tokenizer.hash()[:12]} (pass --overwrite to start over, "
                "or choose another run.name)"
            )
        for key, value in (extra_state or {}).items():
            if key.endswith("_sha256") and state.get(key) and value and state[key] != value:
                raise CheckpointError(f"cannot resume from {latest}: its {key} is {state[key][:12]}, this run's is "
                                      f"{value[:12]} (pass --overwrite to start over, or choose another run.name)")
        return False
    if not run_dir.has_contents():
        return False
    changes = run_changes(run_dir, config, tokenizer, manifest)
    shown = "; ".join(changes[:4]) + (f"; and {len(changes) - 4} more" if len(changes) > 4 else "")
    if latest is not None:
        if changes:
            raise ConfigError(f"run dir {run_dir.path} holds another run ({shown}): pass --overwrite to replace it, "
                              "or choose another run.name")
        raise ConfigError(f"run dir {run_dir.path} already has checkpoints: pass --resume to continue it, "
                          "--overwrite to start over, or choose another run.name")
    if changes:
        raise ConfigError(f"run dir {run_dir.path} holds an earlier run without checkpoints ({shown}): "
                          "pass --overwrite to replace it, or choose another run.name")
    return True


def _resume_step(objective: Objective, state: dict[str, Any], path: Path) -> int:
    """The step a checkpoint's loader state resumes at; a state missing keys is a CheckpointError."""
    if "loader" not in state:
        raise CheckpointError(f"checkpoint {path} is corrupt: {checkpoint.STATE_FILE} lacks 'loader'")
    try:
        return objective.check_resume(state["loader"])
    except KeyError as err:
        raise CheckpointError(f"checkpoint {path} is corrupt: its loader state lacks {err}") from None
    except (TypeError, AttributeError):
        raise CheckpointError(f"checkpoint {path} is corrupt: its loader state is malformed") from None


def _result(run_dir, status, step, losses, val, saved, signum) -> TrainResult:
    return TrainResult(run_dir.path, status, step, losses, val.get("val_loss"), val.get("val_bpb"), saved, signum, dict(val))


def _save_tokenizer(tokenizer: LmTokenizer, run_dir: RunDir, max_seq_len: int) -> None:
    """The run's tokenizer; imported ones keep their tokenizer_config (BOS/EOS, template)."""
    if tokenizer.native:
        tokenizer.save(run_dir.tokenizer)
        return
    from lmforge.interop.model_dir import tokenizer_files

    for name, text in tokenizer_files(tokenizer, max_seq_len).items():
        atomic.write_text(run_dir.tokenizer / name, text)


def _run_eval_tasks(model: Transformer, tokenizer: LmTokenizer, tasks: list, limit: int | None, seed: int) -> dict[str, float]:
    """In-training evals: every metric of every task as `eval/<task>/<metric>`."""
    from lmforge.eval.scoring import Scorer
    from lmforge.eval.tasks import evaluate

    was_training = model.training
    model.eval()
    scorer = Scorer(model, tokenizer)
    values = {}
    with torch.no_grad():
        for task in tasks:
            result = evaluate(task, scorer, limit, seed)
            values.update({f"eval/{task.spec.name}/{m}": v["value"] for m, v in result["metrics"].items()})
    model.train(was_training)
    return values
