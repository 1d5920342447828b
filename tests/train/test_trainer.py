"""The pretraining loop: learning on real text, exact resume, signals, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest
import torch

import lmforge
from lmforge.data.loader import TokenDataset
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.store import hashes
from lmforge.store.run_dir import RunDir
from lmforge.tokenizer import load_tokenizer
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
    from lmforge.data.tokenizer_train import TokenizerTrainConfig, run_train

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
    assert manifest["dataset_manifest_sha256"] == hashes.sha256_file(pretrain_data["tokens"] / "manifest.json")
    assert manifest["tokenizer_hash"] == load_tokenizer(pretrain_data["tokenizer"]).hash()
    assert (manifest["torch_version"], manifest["lmforge_version"]) == (torch.__version__, lmforge.__version__)
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


# ----------------------------------------------------------------- one run per run dir


def error_lines(capsys) -> list[str]:
    """What the CLI printed as errors since the last read (the one line a user error gets)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def cli_config(config, path) -> str:
    """`config` as a YAML file for `lmforge train`."""
    import yaml

    path.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return str(path)


@pytest.fixture
def other_dataset(pretrain_data, tmp_path):
    """The same documents tokenized with another (smaller) tokenizer."""
    from lmforge.data.tokenize import TokenizeConfig
    from lmforge.data.tokenize import run as tokenize_run
    from lmforge.data.tokenizer_train import TokenizerTrainConfig, run_train

    run_train(TokenizerTrainConfig(inputs=[str(pretrain_data["docs"])], out=str(tmp_path / "tok600"), vocab_size=600))
    tokenize_run(TokenizeConfig(inputs=[str(pretrain_data["docs"])], tokenizer=str(tmp_path / "tok600"),
                                out=str(tmp_path / "tokens600"), val_fraction=0.1, num_workers=1))
    return tmp_path / "tokens600"


def test_a_rerun_with_another_tokenizer_and_no_checkpoint_is_refused_and_overwrite_starts_clean(
        make_config, other_dataset, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.store.loading import load_model
    from lmforge.tokenizer import load_tokenizer

    first = make_config("reuse", train={"max_steps": 5})
    assert main(["train", cli_config(first, tmp_path / "first.yaml")]) == 0
    capsys.readouterr()
    run = RunDir(tmp_path / "runs" / "reuse")
    shutil.rmtree(run.checkpoints)  # a run that died before its first checkpoint
    old_tokenizer = (run.tokenizer / "tokenizer.json").read_text()

    second = cli_config(make_config("reuse", data={"dataset": str(other_dataset)}, train={"max_steps": 3}),
                        tmp_path / "second.yaml")
    assert main(["train", second]) == 2
    [err] = error_lines(capsys)
    assert str(run.path) in err and "--overwrite" in err and "tokenizer " in err and "data.dataset" in err
    assert (run.tokenizer / "tokenizer.json").read_text() == old_tokenizer
    assert [r["step"] for r in run.read_metrics() if "loss" in r] == [1, 2, 3, 4, 5]  # left as it was

    assert main(["train", second, "--overwrite"]) == 0
    assert [r["step"] for r in run.read_metrics() if "loss" in r] == [1, 2, 3]  # the new run's steps only
    new_tokenizer = load_tokenizer(json.loads((other_dataset / "manifest.json").read_text())["tokenizer"]["path"])
    assert load_tokenizer(run.tokenizer).hash() == new_tokenizer.hash()
    model, tokenizer, _ = load_model(run.path)
    assert tokenizer.hash() == new_tokenizer.hash() and model.config.vocab_size == 640


def test_a_rerun_of_the_same_config_without_a_checkpoint_starts_fresh_metrics(make_config):
    config = make_config("again", train={"max_steps": 4})
    first = trainer.run(config)
    shutil.rmtree(first.run_dir / "checkpoints")
    again = trainer.run(config)
    assert again.losses == first.losses
    assert [r["step"] for r in RunDir(again.run_dir).read_metrics() if "loss" in r] == [1, 2, 3, 4]


def test_a_run_dir_with_checkpoints_and_another_config_names_what_differs(make_config, tmp_path, capsys):
    from lmforge.cli import main

    trainer.run(make_config("taken", train={"max_steps": 2}))
    changed = cli_config(make_config("taken", optim={"lr": 1e-2}, train={"max_steps": 2}), tmp_path / "c.yaml")
    assert main(["train", changed]) == 2
    err = capsys.readouterr().err
    assert "holds another run (optim.lr 0.003 -> 0.01)" in err and "--overwrite" in err and "run.name" in err
    assert main(["train", changed, "--resume", "--overwrite"]) == 2
    assert "pass one of them" in capsys.readouterr().err
    assert main(["train", changed, "--overwrite"]) == 0
    assert json.loads((tmp_path / "runs" / "taken" / "checkpoints" / "step-0000002" / "trainer_state.json")
                      .read_text())["step"] == 2
    assert "lr: 0.01" in (tmp_path / "runs" / "taken" / "config.yaml").read_text()


def test_overwrite_travels_with_the_torchrun_relaunch(make_config, tmp_path, monkeypatch):
    import subprocess

    from lmforge.cli import main

    launched = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: launched.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    config = cli_config(make_config("ddp"), tmp_path / "ddp.yaml")
    assert main(["train", config, "parallel.strategy=ddp", "--nproc", "2", "--overwrite"]) == 0
    assert launched and launched[0][-4:] == ["train", config, "parallel.strategy=ddp", "--overwrite"]


def test_resuming_with_another_tokenizer_is_refused(make_config, other_dataset):
    trainer.run(make_config("tok", train={"max_steps": 2}))
    with pytest.raises(CheckpointError, match=r"cannot resume .*tok: it was trained with tokenizer"):
        trainer.run(make_config("tok", data={"dataset": str(other_dataset)}, train={"max_steps": 4}), resume=True)


def test_a_checkpoint_state_missing_a_key_is_a_one_line_error(make_config, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.store.loading import load_model

    result = trainer.run(make_config("keys", train={"max_steps": 2}))
    state_file = result.checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    config = cli_config(make_config("keys", train={"max_steps": 4}), tmp_path / "keys.yaml")
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "loader"}))
    capsys.readouterr()
    assert main(["train", config, "--resume"]) == 2
    [err] = error_lines(capsys)
    assert "lacks 'loader'" in err
    state_file.write_text(json.dumps({**state, "loader": {k: v for k, v in state["loader"].items()
                                                           if k != "samples_consumed"}}))
    assert main(["train", config, "--resume"]) == 2
    assert "loader state lacks 'samples_consumed'" in capsys.readouterr().err
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "model_shape"}))
    with pytest.raises(CheckpointError, match="lacks 'model_shape'"):
        load_model(result.run_dir)
    state_file.write_text(json.dumps({**state, "model": {"dim": "wide"}}))
    with pytest.raises(CheckpointError, match="model config is invalid"):
        load_model(result.run_dir)
