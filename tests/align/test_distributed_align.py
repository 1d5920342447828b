"""SFT and DPO on two FSDP processes (torchrun, gloo on CPU) follow the one-process run step for step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmforge.align.run import run_dpo, run_sft
from tests.align.test_sft_dpo import chat_files, config, metric  # noqa: F401  (chat_files is a fixture)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
STEPS = 6


def launch(kind: str, model: Path, cfg_file: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "lmforge", kind, str(model), str(cfg_file), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def both(kind: str, trained_run, tmp_path: Path, data: dict, **sections):
    """The one-process run in this process, then the same config on 2 FSDP processes by `--nproc 2`."""
    sections.setdefault("train", {})["max_steps"] = STEPS
    # fp32: bf16 autocast (one process) and FSDP bf16 parameters round differently, by ~1e-4.
    sections["train"].update(eval_every=STEPS, checkpoint_every=STEPS, micro_batch_size=4, dtype="fp32")  # accum 2 on one process, 1 on two
    single_cfg = config(trained_run, tmp_path / "single", data, **sections)
    single = (run_sft if kind == "sft" else run_dpo)(single_cfg)
    fsdp_cfg = single_cfg.model_copy(deep=True)
    fsdp_cfg.run.out_dir = str(tmp_path / "fsdp")
    cfg_file = tmp_path / f"{kind}-fsdp.yaml"
    cfg_file.write_text(yaml.safe_dump({k: v for k, v in fsdp_cfg.model_dump(mode="json").items() if k != "model"}))
    done = launch(kind, trained_run, cfg_file, "parallel.strategy=fsdp", "--nproc", "2")
    assert done.stdout.count("completed at step") == 1  # one summary, from rank 0
    run_dir = tmp_path / "fsdp" / single_cfg.run.name
    return single, run_dir


def test_sft_on_two_fsdp_processes_matches_one_process(trained_run, chat_files, tmp_path):  # noqa: F811
    data = {"train": str(chat_files / "sft.jsonl"), "val_fraction": 0.1}
    single, run_dir = both("sft", trained_run, tmp_path, data)
    losses = metric(run_dir, "loss")
    assert len(losses) == STEPS
    np.testing.assert_allclose(losses, single.losses, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(metric(run_dir, "val_loss"), metric(single.run_dir, "val_loss"), rtol=2e-5, atol=2e-5)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["kind"] == "sft" and manifest["strategy"] == "fsdp" and manifest["world_size"] == 2
    state = json.loads((run_dir / "checkpoints" / f"step-{STEPS:07d}" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["loader"]["samples_consumed"] == STEPS * 8


def test_dpo_on_two_fsdp_processes_matches_one_process(trained_run, chat_files, tmp_path):  # noqa: F811
    data = {"train": str(chat_files / "prefs.jsonl"), "val": str(chat_files / "prefs_val.jsonl")}
    single, run_dir = both("dpo", trained_run, tmp_path, data, optim={"lr": 5e-4})
    assert len(single.losses) == STEPS  # the comparisons below are of whole curves, never of two empty lists
    np.testing.assert_allclose(metric(run_dir, "loss"), single.losses, rtol=2e-5, atol=2e-5)
    for key in ("reward_margin", "preference_accuracy"):
        assert len(metric(single.run_dir, key)) == STEPS, key
        np.testing.assert_allclose(metric(run_dir, key), metric(single.run_dir, key), rtol=1e-4, atol=1e-4)
    assert len(metric(single.run_dir, "val_reward_margin")) == 1
    np.testing.assert_allclose(metric(run_dir, "val_reward_margin"), metric(single.run_dir, "val_reward_margin"),
                               rtol=1e-4, atol=1e-4)
