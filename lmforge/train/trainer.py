"""`lmforge train`: the pretraining loop on one device.

Order of a step: lr from the schedule -> grad_accum_steps micro-batches (forward under
autocast, backward) -> clip the global grad norm -> optimizer step. Validation,
logging and checkpoints happen between steps; SIGINT/SIGTERM finish the current step,
save a checkpoint and return.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from lmforge import atomic
from lmforge.data.loader import TokenDataset, WindowLoader
from lmforge.data.tokenize import MANIFEST
from lmforge.errors import ConfigError, DataError
from lmforge.eval.perplexity import bits_per_byte, evaluate_loss
from lmforge.model import Transformer
from lmforge.runs import MetricsLogger, RunDir, lineage
from lmforge.tokenizer import load_tokenizer
from lmforge.train import checkpoint
from lmforge.train.config import TrainConfig
from lmforge.train.mfu import peak_flops
from lmforge.train.optim import build_optimizers
from lmforge.train.parallel import apply_compile, autocast, resolve_device, resolve_dtype
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
    tokens_per_micro_step = config.train.micro_batch_size * config.data.seq_len * world_size
    if config.train.global_batch_tokens % tokens_per_micro_step:
        raise ConfigError(
            f"train.global_batch_tokens {config.train.global_batch_tokens} is not a multiple of "
            f"train.micro_batch_size x data.seq_len x world size = {tokens_per_micro_step}"
        )
    return config.train.global_batch_tokens // tokens_per_micro_step


def run(config: TrainConfig, resume: bool = False) -> TrainResult:
    """Train per `config`; with `resume`, continue from the run's latest complete checkpoint."""
    config = config.model_copy(deep=True)
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
    accum = grad_accum_steps(config)
    device = resolve_device(config.train.device)
    dtype = resolve_dtype(config.train.dtype, device)

    run_dir = RunDir(Path(config.run.out_dir) / config.run.name)
    latest = checkpoint.latest_checkpoint(run_dir.checkpoints)
    if latest is not None and not resume:
        raise ConfigError(
            f"run dir {run_dir.path} already has checkpoints: pass --resume to continue it, "
            "or choose another run.name"
        )
    run_dir.path.mkdir(parents=True, exist_ok=True)

    generator = torch.Generator().manual_seed(config.run.seed)
    with torch.device("meta"):
        model = Transformer(config.model)
    model.to_empty(device="cpu")
    model.init_weights(generator)
    model.to(device)
    optimizers = build_optimizers(model, config.optim, device)
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]

    loader = WindowLoader(train_data, config.data.seq_len, config.train.micro_batch_size, accum, config.run.seed)
    val_loader = (
        WindowLoader(val_data, config.data.seq_len, config.train.micro_batch_size, shuffle=False)
        if val_data
        else None
    )
    start_step = 0
    if resume and latest is not None:
        state = checkpoint.load(latest, model, optimizers)
        start_step = loader.check_resume(state["loader"])
        run_dir.truncate_metrics(start_step)
        log.info("resumed from %s at step %d", latest, start_step)
    if start_step >= config.train.max_steps:
        log.info("run already at step %d of %d", start_step, config.train.max_steps)
    if config.train.compile:
        apply_compile(model)

    run_dir.write_config(config)
    if not (run_dir.tokenizer / "tokenizer.json").is_file():
        tokenizer.save(run_dir.tokenizer)
    run_dir.write_manifest(
        lineage(
            kind="pretrain",
            parent=None,
            dataset=str(Path(config.data.dataset).resolve()),
            dataset_manifest_sha256=atomic.sha256_file(Path(config.data.dataset) / MANIFEST),
            tokenizer_hash=tokenizer.hash(),
            model_params=config.model.num_params(),
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
        )
    )

    tokens_per_step = config.train.global_batch_tokens
    flops_per_token = config.model.flops_per_token(config.data.seq_len)
    peak = config.train.peak_flops
    metrics = MetricsLogger(run_dir)
    losses: list[float] = []
    val_loss = val_bpb = None
    saved: Path | None = None
    step = start_step

    def validate() -> None:
        nonlocal val_loss, val_bpb
        if val_loader is None:
            return
        val_loss = evaluate_loss(model, val_loader, config.train.eval_batches, device, dtype)
        val_bpb = bits_per_byte(val_loss, val_data.bytes_per_token)
        metrics.log(step, val_loss=val_loss, val_bpb=val_bpb)
        bar.write(f"step {step}: val_loss {val_loss:.4f}  val_bpb {val_bpb:.4f}")

    def save() -> Path:
        state = {
            "step": step,
            "loader": loader.state_dict(step),
            "model": config.model.model_dump(mode="json"),
            "model_shape": config.model.shape(),
            "val_loss": val_loss,
        }
        return checkpoint.save(run_dir.checkpoints, step, model, optimizers, state, config.train.keep_checkpoints)

    bar = tqdm(
        total=config.train.max_steps,
        initial=start_step,
        desc=config.run.name,
        disable=not config.train.progress or None,
        dynamic_ncols=True,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    try:
        with _StopFlag() as stop:
            while step < config.train.max_steps:
                factor = lr_factor(step, config.train.max_steps, config.schedule)
                for opt in optimizers:
                    for group in opt.param_groups:
                        group["lr"] = group["peak_lr"] * factor
                loss_sum = torch.zeros((), device=device)
                for micro_step in range(accum):
                    inputs, targets = loader.batch(step, micro_step)
                    inputs = inputs.to(device, non_blocking=True)
                    targets = targets.to(device, non_blocking=True)
                    with autocast(device, dtype):
                        loss = model(inputs, targets)
                    (loss / accum).backward()
                    loss_sum += loss.detach()
                max_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                for opt in optimizers:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                step += 1
                step_loss = (loss_sum / accum).item()
                if not math.isfinite(step_loss):
                    log.warning("non-finite loss %s at step %d", step_loss, step)
                losses.append(step_loss)
                window_tokens += tokens_per_step
                bar.update(1)

                if step % config.train.log_every == 0 or step == config.train.max_steps:
                    elapsed = time.perf_counter() - window_start
                    tokens_per_second = window_tokens / elapsed
                    if peak is None:
                        peak = peak_flops(device, dtype)
                    mfu = flops_per_token * tokens_per_second / peak
                    metrics.log(
                        step,
                        loss=step_loss,
                        lr=optimizers[0].param_groups[0]["lr"],
                        grad_norm=grad_norm.item(),
                        tokens_per_second=tokens_per_second,
                        mfu=mfu,
                        tokens_seen=step * tokens_per_step,
                    )
                    bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens_per_second:,.0f}", mfu=f"{mfu:.1%}")
                    if bar.disable:
                        log.info(
                            "step %d loss %.4f lr %.2e tok/s %.0f mfu %.1f%%",
                            step, step_loss, factor * optimizers[0].param_groups[0]["peak_lr"],
                            tokens_per_second, 100 * mfu,
                        )
                    window_start, window_tokens = time.perf_counter(), 0
                if config.train.eval_every and step % config.train.eval_every == 0:
                    validate()
                    window_start = time.perf_counter()
                if stop.signum is not None:
                    saved = save()
                    bar.write(f"interrupted at step {step}; checkpoint {saved}; continue with --resume")
                    return TrainResult(run_dir.path, "interrupted", step, losses, val_loss, val_bpb, saved, stop.signum)
                if config.train.checkpoint_every and step % config.train.checkpoint_every == 0:
                    saved = save()
                    window_start = time.perf_counter()
            if val_loss is None or not (config.train.eval_every and step % config.train.eval_every == 0):
                validate()
            final = checkpoint.step_dir_name(step)
            saved = run_dir.checkpoints / final if saved and saved.name == final else save()
    finally:
        bar.close()
        metrics.close()
    return TrainResult(run_dir.path, "completed", step, losses, val_loss, val_bpb, saved)

