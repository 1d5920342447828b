"""The pretraining loop: learning on real text, exact resume, signals, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import numpy as np
import pytest

from lmforge.data.loader import TokenDataset
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.runs import RunDir
from lmforge.train import trainer


def unigram_entropy_nats(dataset_dir) -> float:
    tokens = TokenDataset(dataset_dir, "train").read(0, TokenDataset(dataset_dir, "train").num_tokens)
    counts = np.bincount(tokens).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def logged_losses(run_dir) -> list[float]:
    return [r["loss"] for r in RunDir(run_dir).read_metrics() if "loss" in r]


def test_validation_loss_falls_well_below_unigram_entropy_on_real_text(make_config, pretrain_data):
    config = make_config(
        "learn",
        optim={"lr": 1e-2},
        schedule={"warmup_steps": 20},
        train={"max_steps": 150, "global_batch_tokens": 2048, "micro_batch_size": 16, "eval_every": 50, "log_every": 10},
    )
    result = trainer.run(config)
    entropy = unigram_entropy_nats(pretrain_data["tokens"])
    assert result.status == "completed" and result.step == 150
    assert result.losses[0] > entropy  # starts near log(vocab): worse than unigram
    assert result.val_loss < entropy - 0.5, (result.val_loss, entropy)
    assert 0 < result.val_bpb < result.val_loss / math.log(2)  # more than one byte per token
    records = RunDir(result.run_dir).read_metrics()
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "mfu"} <= set(records[0])
    assert any("val_bpb" in r for r in records)


def test_a_run_extended_with_resume_reproduces_the_losses_of_an_uninterrupted_run(make_config):
    # A constant schedule (after warmup) does not depend on max_steps, so 6 steps then 6 more
    # must equal 12 in one go: model, optimizer state and data position all carry over.
    constant = {"name": "constant", "warmup_steps": 3}
    full = trainer.run(make_config("full", schedule=constant, train={"checkpoint_every": 4}))
    part = trainer.run(make_config("part", schedule=constant, train={"max_steps": 6, "checkpoint_every": 4}))
    assert part.step == 6
    resumed = trainer.run(make_config("part", schedule=constant, train={"checkpoint_every": 4}), resume=True)
    assert resumed.step == 12 and len(resumed.losses) == 6
    assert part.losses + resumed.losses == full.losses
    assert logged_losses(resumed.run_dir) == logged_losses(full.run_dir)
    assert resumed.val_loss == full.val_loss


def test_resume_after_a_crash_truncates_metrics_and_replays_from_the_checkpoint(make_config):
    full = trainer.run(make_config("full", train={"checkpoint_every": 4}))
    crashed = trainer.run(make_config("crash", train={"max_steps": 6, "checkpoint_every": 4}))
    run = RunDir(crashed.run_dir)
    # Simulate a crash after step 6 that left step 6 unsaved: latest points at step 4.
    (run.checkpoints / "latest").write_text("step-0000004\n")
    resumed = trainer.run(make_config("crash", train={"checkpoint_every": 4}), resume=True)
    assert len(resumed.losses) == 8
    assert logged_losses(resumed.run_dir) == logged_losses(full.run_dir)


def signal_when_logged(metrics_path, step: int, signum=signal.SIGTERM, pid=None) -> threading.Thread:
    """Send `signum` once `metrics_path` holds a record of `step` (a run mid-way, however fast)."""

    def watch():
        for _ in range(6000):
            if metrics_path.is_file() and f'"step": {step},' in metrics_path.read_text():
                os.kill(pid or os.getpid(), signum)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_exactly(make_config):
    constant = {"name": "constant", "warmup_steps": 3}
    full = trainer.run(make_config("full", schedule=constant, train={"max_steps": 30}))
    # Far more steps than it will run: the signal stops it after step 3 or a little later.
    config = make_config("term", schedule=constant, train={"max_steps": 100_000})
    signal_when_logged(RunDir(f"{config.run.out_dir}/term").metrics_path, 3)
    stopped = trainer.run(config)
    assert stopped.status == "interrupted" and stopped.signal == signal.SIGTERM
    assert 3 <= stopped.step < 30
    assert stopped.checkpoint.name == f"step-{stopped.step:07d}"
    resumed = trainer.run(make_config("term", schedule=constant, train={"max_steps": 30}), resume=True)
    assert stopped.losses + resumed.losses == full.losses


def test_existing_run_without_resume_is_refused_and_left_intact(make_config):
    first = trainer.run(make_config("once"))
    before = sorted(p.name for p in (first.run_dir / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="--resume"):
        trainer.run(make_config("once"))
    assert sorted(p.name for p in (first.run_dir / "checkpoints").iterdir()) == before


def test_resume_with_a_different_model_config_names_the_checkpoint(make_config):
    trainer.run(make_config("shape", train={"max_steps": 2}))
    with pytest.raises(CheckpointError, match=r"step-0000002.*different model config.*dim"):
        trainer.run(make_config("shape", model={"dim": 128}), resume=True)


def test_a_corrupt_checkpoint_gives_a_clear_error(make_config):
    result = trainer.run(make_config("corrupt", train={"max_steps": 2}))
    shards = [p for p in result.checkpoint.iterdir() if p.suffix == ".distcp"]
    for shard in shards:
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        trainer.run(make_config("corrupt", train={"max_steps": 4}), resume=True)
    (result.checkpoint / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        trainer.run(make_config("corrupt", train={"max_steps": 4}), resume=True)


def test_a_tokenizer_that_does_not_match_the_dataset_is_refused(make_config, pretrain_data, tmp_path):
    from lmforge.tokenizer import TokenizerTrainConfig, run_train

    other = tmp_path / "other-tokenizer"
    run_train(TokenizerTrainConfig(inputs=[str(pretrain_data["docs"])], out=str(other), vocab_size=600))
    with pytest.raises(DataError, match="does not match dataset"):
        trainer.run(make_config(data={"tokenizer": str(other)}))


def test_bad_batch_and_sequence_settings_fail_before_any_work(make_config, tmp_path):
    with pytest.raises(ConfigError, match="global_batch_tokens"):
        trainer.run(make_config("batch", train={"global_batch_tokens": 1000}))
    assert not (tmp_path / "runs" / "batch").exists()
    with pytest.raises(Exception, match="exceeds model.max_seq_len"):
        make_config(data={"seq_len": 4096})


def test_checkpoints_are_retained_and_latest_points_at_the_newest(make_config):
    result = trainer.run(make_config("keep", train={"checkpoint_every": 2, "keep_checkpoints": 2}))
    run = RunDir(result.run_dir)
    names = sorted(p.name for p in run.checkpoints.iterdir() if p.name.startswith("step-"))
    assert names == ["step-0000010", "step-0000012"]
    assert (run.checkpoints / "latest").read_text().strip() == "step-0000012"
    assert not [p for p in run.checkpoints.iterdir() if ".tmp" in p.name]


def test_run_dir_records_config_lineage_and_tokenizer(make_config, pretrain_data):
    result = trainer.run(make_config("lineage", train={"max_steps": 2}))
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["dataset_manifest_sha256"]
    assert manifest["tokenizer_hash"] and manifest["torch_version"] and manifest["lmforge_version"]
    assert (result.run_dir / "config.yaml").read_text().count("vocab_size: 1024") == 1
    assert (result.run_dir / "tokenizer" / "tokenizer.json").is_file()
    assert any((result.run_dir / "tb").iterdir())


@pytest.mark.parametrize("optimizer,schedule", [("muon", "wsd"), ("adamw", "constant")])
def test_muon_and_other_schedules_reduce_the_loss(make_config, optimizer, schedule):
    result = trainer.run(
        make_config(f"{optimizer}-{schedule}", optim={"name": optimizer}, schedule={"name": schedule},
                    train={"max_steps": 30})
    )
    assert np.mean(result.losses[-5:]) < result.losses[0] - 0.5
