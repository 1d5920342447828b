"""What train/parallel.py applies from outside the model, and the fault handling of the loop,
in one process: activation checkpointing, FSDP2 alone, compile's fallback, async
checkpoints, skipped steps and rollbacks."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from lmforge.monitor.alerts import ALERTS_FILE
from lmforge.store.run_dir import RunDir
from lmforge.train import parallel, trainer
from lmforge.train.config import FaultConfig
from lmforge.train.faults import StepGuard

CONSTANT = {"name": "constant", "warmup_steps": 3}
FP32 = {"dtype": "fp32", "device": "cpu", "max_steps": 8}


def alerts_of(run_dir) -> list[dict]:
    path = run_dir / ALERTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_activation_checkpointing_and_fsdp_in_one_process_keep_the_losses(make_config):
    plain = trainer.run(make_config("plain", train=FP32))
    for name, settings in {
        "full-ac": {"activation_checkpointing": "full"},
        "selective-ac": {"activation_checkpointing": "selective", "activation_checkpointing_every": 2},
        "fsdp-alone": {"strategy": "fsdp", "reshard_after_forward": False},
    }.items():
        result = trainer.run(make_config(name, train=FP32, parallel=settings))
        np.testing.assert_allclose(result.losses, plain.losses, rtol=1e-5, atol=1e-5, err_msg=name)


def test_selective_checkpointing_wraps_every_kth_block(make_config):
    from lmforge.model import ModelConfig, Transformer

    model = Transformer(ModelConfig(preset="tiny", n_layers=4, vocab_size=64))
    assert parallel.apply_activation_checkpointing(model, "selective", 2) == 2
    wrapped = [type(block).__name__ == "CheckpointWrapper" for block in model.layers]
    assert wrapped == [False, True, False, True]
    # State-dict keys as DCP's helpers see them are the bare model's: checkpoints do not change.
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    assert all("_checkpoint_wrapped_module" not in k for k in get_model_state_dict(model))


def test_compile_where_unavailable_trains_uncompiled_with_a_clear_message(make_config, monkeypatch, caplog):
    monkeypatch.setattr(parallel, "compile_unavailable", lambda device: "RuntimeError: no C++ compiler")
    with caplog.at_level(logging.WARNING, logger="lmforge.train.parallel"):
        result = trainer.run(make_config("no-compile", train={**FP32, "compile": True, "max_steps": 2}))
    assert result.status == "completed"
    assert "torch.compile is unavailable here (RuntimeError: no C++ compiler): training without it" in caplog.text


def test_compile_auto_compiles_what_pays_back_and_leaves_the_rest_eager():
    from lmforge.errors import ConfigError

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    big, small = 10 * parallel.AUTO_COMPILE_MIN_STEP_FLOPS, parallel.AUTO_COMPILE_MIN_STEP_FLOPS / 10
    assert parallel.compile_decision("auto", cpu, "pretrain", big)[0] is True
    compiled, why = parallel.compile_decision("auto", cpu, "pretrain", small)
    assert compiled is False and "eager on CPU for steps of" in why
    assert parallel.compile_decision("auto", cpu, "sft", big)[0] is False  # rows change shape each step
    assert parallel.compile_decision("auto", cpu, "pretrain", big, moe=True)[0] is False
    assert parallel.compile_decision("auto", cuda, "pretrain", small)[0] is True
    assert parallel.compile_decision("auto", cuda, "sft", big)[0] is False
    assert parallel.compile_decision(False, cuda, "pretrain", big) == (False, "train.compile=false")
    assert parallel.compile_decision(True, cpu, "sft", small) == (True, "train.compile=true")
    with pytest.raises(ConfigError, match="train.compile must be"):
        parallel.compile_decision("yes", cpu, "pretrain", big)


def test_compile_auto_on_a_long_enough_cpu_run_compiles_the_blocks_and_learns_the_same(make_config, monkeypatch, caplog):
    """The compiled path runs on CPU (CI has no GPU): the same losses as eager, within fp32 rounding."""
    settings = {**FP32, "max_steps": 3}
    eager = trainer.run(make_config("eager", schedule=CONSTANT, train={**settings, "compile": False}))
    monkeypatch.setattr(parallel, "AUTO_COMPILE_MIN_STEP_FLOPS", 0.0)
    with caplog.at_level(logging.INFO, logger="lmforge.train.parallel"):
        compiled = trainer.run(make_config("auto", schedule=CONSTANT, train=settings))
    assert "train.compile=auto: steps of" in caplog.text and "compiled 2 blocks with torch.compile" in caplog.text
    assert compiled.losses == pytest.approx(eager.losses, abs=1e-4)


def test_a_world_size_above_one_with_the_single_strategy_is_refused():
    from lmforge.errors import ConfigError
    from lmforge.train.config import ParallelConfig
    from lmforge.train.distributed import DistEnv

    with pytest.raises(ConfigError, match="parallel.strategy=single"):
        parallel.parallelize(None, ParallelConfig(), DistEnv(world_size=2), None)


def test_async_checkpoints_resume_exactly(make_config):
    settings = {**FP32, "async_checkpoint": True, "checkpoint_every": 2, "max_steps": 10}
    full = trainer.run(make_config("async-full", schedule=CONSTANT, train=settings))
    part = trainer.run(make_config("async-part", schedule=CONSTANT, train={**settings, "max_steps": 5}))
    checkpoints = sorted(p.name for p in (part.run_dir / "checkpoints").iterdir())
    assert checkpoints == ["latest", "step-0000002", "step-0000004", "step-0000005"]
    resumed = trainer.run(make_config("async-part", schedule=CONSTANT, train=settings), resume=True)
    assert part.losses + resumed.losses == full.losses


def test_a_planted_nan_step_is_skipped_logged_and_leaves_the_weights_finite(make_config):
    result = trainer.run(make_config("nan", train=FP32, faults={"debug_nan_steps": [4]}))
    assert math.isnan(result.losses[3]) and all(math.isfinite(x) for i, x in enumerate(result.losses) if i != 3)
    assert result.val_loss is not None and math.isfinite(result.val_loss)
    [skipped] = [r for r in RunDir(result.run_dir).read_metrics() if "skipped" in r]
    assert skipped["step"] == 4 and skipped["skipped"] == "non-finite loss"
    assert [a["step"] for a in alerts_of(result.run_dir) if a["alert"] == "step_skipped"] == [4]
    assert not [a for a in alerts_of(result.run_dir) if a["alert"] == "rollback"]


def test_repeated_bad_steps_roll_back_to_the_checkpoint_before_them_and_skip_their_data(make_config):
    faults = {"debug_nan_steps": [5, 6, 7], "rollback_after": 3}
    result = trainer.run(make_config("rollback", schedule=CONSTANT, faults=faults,
                                     train={**FP32, "max_steps": 10, "checkpoint_every": 2, "keep_checkpoints": 10}))
    assert result.step == 10 and len(result.losses) == 10 + 3
    [rollback] = [a for a in alerts_of(result.run_dir) if a["alert"] == "rollback"]
    assert (rollback["from_step"], rollback["to_step"], rollback["skipped_data_steps"]) == (7, 4, [5, 7])
    assert "rolled back from step 7 to checkpoint step 4" in rollback["message"]
    # The step-6 checkpoint written inside the bad stretch is dropped with the rollback.
    names = sorted(p.name for p in (result.run_dir / "checkpoints").glob("step-*"))
    assert names == ["step-0000002", "step-0000004", "step-0000006", "step-0000008", "step-0000010"]
    state = json.loads((result.run_dir / "checkpoints" / "step-0000006" / "trainer_state.json").read_text())
    assert state["faults"]["data_offset"] == 3  # the new step 6, trained on data step 9
    # A run resumed from there keeps skipping the same data: it equals the uninterrupted one.
    resumed_dir = result.run_dir.parent / "rollback-resumed"
    import shutil

    shutil.copytree(result.run_dir, resumed_dir)
    for name in ("step-0000008", "step-0000010"):
        shutil.rmtree(resumed_dir / "checkpoints" / name)
    (resumed_dir / "checkpoints" / "latest").write_text("step-0000006\n")
    resumed = trainer.run(make_config("rollback-resumed", schedule=CONSTANT, faults=faults,
                                      train={**FP32, "max_steps": 10, "checkpoint_every": 2, "keep_checkpoints": 10}), resume=True)
    assert resumed.losses == result.losses[-4:]


def test_keeping_one_checkpoint_still_keeps_the_rollback_target_through_skipped_steps(make_config):
    # keep_checkpoints=1: the step-6 checkpoint, written inside the bad stretch 5..7, would
    # otherwise delete step 4, the only one a rollback can return to.
    faults = {"debug_nan_steps": [5, 6, 7], "rollback_after": 3}
    train = {**FP32, "max_steps": 10, "checkpoint_every": 2}
    keep_all = trainer.run(make_config("keep-all", schedule=CONSTANT, faults=faults, train={**train, "keep_checkpoints": 10}))
    keep_one = trainer.run(make_config("keep-one", schedule=CONSTANT, faults=faults, train={**train, "keep_checkpoints": 1}))
    [rollback] = [a for a in alerts_of(keep_one.run_dir) if a["alert"] == "rollback"]
    assert (rollback["from_step"], rollback["to_step"]) == (7, 4)
    assert keep_one.step == 10
    np.testing.assert_array_equal(keep_one.losses, keep_all.losses)  # the planted NaNs included
    assert sorted(p.name for p in (keep_one.run_dir / "checkpoints").glob("step-*")) == ["step-0000010"]


def test_rollback_without_an_earlier_checkpoint_stops_with_a_clear_error(make_config):
    with pytest.raises(trainer.TrainingError, match="no checkpoint from before step 2"):
        trainer.run(make_config("no-ckpt", train=FP32, faults={"debug_nan_steps": [2, 3], "rollback_after": 2}))


def test_a_gradient_norm_spike_is_judged_against_the_running_median():
    guard = StepGuard(FaultConfig(grad_spike_factor=5.0, grad_spike_min_steps=3))
    assert [guard.judge(2.0, norm) for norm in (1.0, 1.2, 0.9)] == [None, None, None]
    assert "5 x running median 1" in guard.judge(2.0, 7.0)
    assert guard.judge(2.0, 4.0) is None  # below the factor; joins the median
    assert guard.judge(float("inf"), 1.0) == "non-finite loss"
    assert guard.judge(2.0, float("nan")) == "non-finite gradient norm"


def test_a_step_that_outlasts_the_collective_timeout_is_reported_with_rank_and_step(caplog):
    import time

    from lmforge.train.distributed import DistEnv, StepWatchdog

    with caplog.at_level(logging.ERROR, logger="lmforge.train.distributed"):
        watchdog = StepWatchdog(DistEnv(rank=1, world_size=2), timeout_seconds=0.2)
        watchdog.beat(4)
        time.sleep(0.6)
        watchdog.close()
    assert "rank 1: step 5 has not finished after" in caplog.text
    assert caplog.text.count("has not finished") == 1  # once per stuck step
