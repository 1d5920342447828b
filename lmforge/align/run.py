"""`lmforge sft`, `lmforge dpo` and `lmforge rm`: fine-tune a model through the shared trainer.

Both start from any model (model dir, run dir or checkpoint), read chat data, build an
objective (align/objectives.py) and hand it to `train.trainer.fit` (the `Trainer`), so they get the same
checkpoints, exact resume, metrics, alerts and evals as pretraining. With `lora.enabled`,
only adapters train and checkpoints hold only them; the run also writes `adapter/` in
peft's layout for `lmforge lora merge`. The run records the sha256 of the starting
weights (manifest `parent_weights_sha256`, checkpoints `init_from_weights_sha256`, the
adapter's `lmforge_adapter.json`): a resume, a merge or a load onto other base weights is
refused.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

import torch

from lmforge.align import data as align_data
from lmforge.align.config import AlignConfig
from lmforge.align.objectives import DPOObjective, SFTObjective, reference_logprobs
from lmforge.align.reward_model import RewardModelObjective, encode_pairs
from lmforge.data.readers import source_record
from lmforge.device import compute_dtype
from lmforge.errors import ConfigError, DataError
from lmforge.model.reward import RewardModel
from lmforge.store.adapter import apply_lora, base_record, save_adapter, weights_hash
from lmforge.store.loading import load_model
from lmforge.store.reward_model_dir import save_reward_model_dir
from lmforge.store.weights import weights_digest_or_none
from lmforge.train import distributed
from lmforge.train.objective import accumulation
from lmforge.train.trainer import TrainResult, fit, init_distributed

log = logging.getLogger(__name__)

REWARD_MODEL_DIR = "reward_model"  # in the run dir: the final weights, transformers' layout


def _start(config: AlignConfig):
    base, tokenizer, source = load_model(config.model, "cpu", torch.float32)
    if not tokenizer.native:
        raise DataError(f"{config.model}: fine-tuning needs a tokenizer with lmforge's chat tokens")
    if config.data.seq_len > base.config.max_seq_len:
        raise ConfigError(f"data.seq_len {config.data.seq_len} exceeds the model's context {base.config.max_seq_len}")
    return base.train(), tokenizer, source


def _split(records: list, val_path: str | None, fraction: float, seed: int, reader) -> tuple[list, list]:
    """Train and validation records: a given val file, or a seeded share held out of train."""
    if val_path:
        return records, reader(val_path)
    if fraction == 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    held = max(1, round(len(records) * fraction))
    held_out = set(order[:held])
    return [r for i, r in enumerate(records) if i not in held_out], [r for i, r in enumerate(records) if i in held_out]


def fine_tune(config: AlignConfig, base, tokenizer, source: Path, objective, kind: str, resume: bool,
         env: distributed.DistEnv, overwrite: bool = False, head=None) -> TrainResult:
    """Train `objective` from `base` (loaded from `source`) through the shared trainer: the run's
    manifest and the starting weights' hash, LoRA when configured, and the rm/LoRA outputs.
    `head(model)`: the module that trains, built on the starting model (rm: its scalar head)."""
    built = []
    run_dir = (Path(config.run.out_dir) / config.run.name).resolve()
    if run_dir == Path(source).resolve() or run_dir in Path(source).resolve().parents:
        # Even --overwrite: clearing the run dir would delete the weights being fine-tuned.
        raise ConfigError(f"run dir {run_dir} holds the model this run starts from ({source}): "
                          "choose another run.name or run.out_dir")
    # The starting weights by content (a path may later hold others): before any training.
    base_hash = weights_hash(base)
    record = base_record(source, base_hash, Path(config.run.out_dir) / config.run.name)

    def build_model():
        model = apply_lora(base, config.lora) if config.lora.enabled else base
        model = head(model) if head is not None else model
        built.append(model)
        return model

    dataset = source_record(config.data.train)  # a file or saved dir by content; a Hub dataset by revision
    manifest = {
        "kind": kind,
        "parent": str(Path(source).resolve()),
        "dataset": dataset["path"],
        "dataset_sha256": dataset["sha256"],
        "parent_weights_sha256": base_hash,
        "parent_weights_digest": weights_digest_or_none(source),  # of the files, as `lmforge verify` rechecks it
    }
    extra = {"init_from": record["path"], "init_from_relative": record["relative"],
             "init_from_weights_sha256": base_hash,
             "lora": config.lora.model_dump(mode="json") if config.lora.enabled else None}
    result = fit(config, base.config, build_model, tokenizer, objective, manifest, resume,
                 trainable_only=config.lora.enabled, extra_state=extra, env=env, overwrite=overwrite)
    if config.lora.enabled and built and env.is_main:
        save_adapter(result.run_dir / "adapter", built[0], str(source), base_hash)
    if kind == "rm" and built and env.is_main:
        save_reward_model_dir(result.run_dir / REWARD_MODEL_DIR, built[0], tokenizer)
    return result


def on_this_rank(work, config: AlignConfig, resume: bool, overwrite: bool) -> TrainResult:
    """Join the process group (one process: none), run `work`, leave it."""
    config = config.model_copy(deep=True)
    env = init_distributed(config.train, config.parallel)
    try:
        return work(config, resume, env, overwrite)
    finally:
        distributed.shutdown(env)


def run_sft(config: AlignConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Under `torchrun` every process calls this and trains on its block of each step's rows.
    `resume` continues the run dir's latest checkpoint; `overwrite` replaces an earlier run there."""
    return on_this_rank(_sft, config, resume, overwrite)


def _sft(config: AlignConfig, resume: bool, env: distributed.DistEnv, overwrite: bool = False) -> TrainResult:
    base, tokenizer, source = _start(config)
    records = align_data.read_conversations(config.data.train)
    train, val = _split(records, config.data.val, config.data.val_fraction, config.run.seed, align_data.read_conversations)

    def rows(items):
        sequences = [align_data.encode_conversation(tokenizer, messages, config.data.loss_on, config.data.seq_len, tools)
                     for _, messages, tools in items]
        return align_data.build_rows(sequences, config.data.seq_len, tokenizer.pad_id, config.data.pack)

    accum = accumulation(config.train, config.data.seq_len, env.world_size)
    objective = SFTObjective(rows(train), rows(val) if val else None, config.data.seq_len,
                             config.train.micro_batch_size, accum, config.run.seed, env.rank, env.world_size)
    log.info("sft: %d conversations -> %d rows (%s), %d held out", len(train), len(objective.train_rows),
             "packed" if config.data.pack else "padded", len(val))
    return fine_tune(config, base, tokenizer, source, objective, "sft", resume, env, overwrite)


def run_dpo(config: AlignConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Under `torchrun` every process computes the reference log-probs and trains on its block of pairs.
    `resume` continues the run dir's latest checkpoint; `overwrite` replaces an earlier run there."""
    return on_this_rank(_dpo, config, resume, overwrite)


def _dpo(config: AlignConfig, resume: bool, env: distributed.DistEnv, overwrite: bool = False) -> TrainResult:
    base, tokenizer, source = _start(config)
    records = align_data.read_preferences(config.data.train)
    train, val = _split(records, config.data.val, config.data.val_fraction, config.run.seed, align_data.read_preferences)
    device = env.device
    dtype = compute_dtype(config.train.dtype, device)

    def rows(items):
        pairs = [align_data.encode_preference(tokenizer, p, c, r, config.data.seq_len) for _, p, c, r in items]
        chosen = align_data.build_rows_exact([pair.chosen for pair in pairs], config.data.seq_len, tokenizer.pad_id)
        rejected = align_data.build_rows_exact([pair.rejected for pair in pairs], config.data.seq_len, tokenizer.pad_id)
        # The reference is the starting model, whatever step a resumed run is at.
        reference = reference_logprobs(base.to(device), chosen, rejected, device, dtype).to("cpu")
        return chosen, rejected, reference

    chosen, rejected, reference = rows(train)
    base.to("cpu").train()
    accum = accumulation(config.train, config.data.seq_len, env.world_size)
    objective = DPOObjective(chosen, rejected, reference, rows(val) if val else None, config.data.seq_len,
                             config.train.micro_batch_size, accum, config.run.seed, config.dpo.beta, config.dpo.loss,
                             env.rank, env.world_size)
    base.to("cpu").train()
    log.info("dpo: %d pairs, %d held out, beta %.3g, %s loss", len(train), len(val), config.dpo.beta, config.dpo.loss)
    return fine_tune(config, base, tokenizer, source, objective, "dpo", resume, env, overwrite)


def run_rm(config: AlignConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Train a reward model on preference pairs; the run dir gains `reward_model/`, a model dir in
    transformers' `*ForSequenceClassification` layout. Under `torchrun` every process trains on its
    block of pairs (parallel.strategy=ddp)."""
    return on_this_rank(_rm, config, resume, overwrite)


def _rm(config: AlignConfig, resume: bool, env: distributed.DistEnv, overwrite: bool = False) -> TrainResult:
    for wrong, why in ((config.lora.enabled, "lora.enabled=true (train the whole model)"),
                       (config.optim.name != "adamw", f"optim.name={config.optim.name} (use adamw)"),
                       (config.parallel.strategy == "fsdp", "parallel.strategy=fsdp (use single or ddp)")):
        if wrong:
            raise ConfigError(f"lmforge rm does not support {why}")
    base, tokenizer, source = _start(config)
    records = align_data.read_preferences(config.data.train)
    train, val = _split(records, config.data.val, config.data.val_fraction, config.run.seed, align_data.read_preferences)
    accum = accumulation(config.train, config.data.seq_len, env.world_size)
    train_rows = encode_pairs(tokenizer, train, config.data.seq_len)
    val_rows = encode_pairs(tokenizer, val, config.data.seq_len) if val else None
    objective = RewardModelObjective(train_rows, val_rows, config.data.seq_len, config.train.micro_batch_size, accum,
                                     config.run.seed, env.rank, env.world_size, pad_id=tokenizer.pad_id)
    log.info("rm: %d pairs, %d held out", len(train_rows[0]), len(val_rows[0]) if val_rows else 0)
    return fine_tune(config, base, tokenizer, source, objective, "rm", resume, env, overwrite,
                  head=lambda model: RewardModel.from_lm(model, tokenizer.pad_id))
