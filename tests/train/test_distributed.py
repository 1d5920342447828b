"""Training on several processes: torchrun with gloo on CPU, two ranks, the tiny preset.

The reference runs are module-scoped and shared: a one-process run and a two-process FSDP
run of the same config (same global batch), each checkpointing every 2 steps.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmforge.config import load_config
from lmforge.data.loader import TokenDataset, WindowLoader
from lmforge.monitor.alerts import ALERTS_FILE
from lmforge.store.run_dir import RunDir
from lmforge.train import trainer
from lmforge.train.config import TrainConfig

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10


def losses_of(run_dir: Path) -> list[float]:
    return [r["loss"] for r in RunDir(run_dir).read_metrics() if "loss" in r]


def alerts_of(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / ALERTS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


class Runs:
    """A base YAML config and ways to run it: in this process, or under torchrun."""

    def __init__(self, root: Path, dataset: Path):
        self.root = root
        self.config = root / "base.yaml"
        self.config.write_text(yaml.safe_dump({
            "run": {"out_dir": str(root / "runs"), "seed": 7},
            "model": {"preset": "tiny", "max_seq_len": 128},
            "data": {"dataset": str(dataset), "seq_len": 64},
            # Constant after warmup: a continuation does not depend on where it started.
            "schedule": {"name": "constant", "warmup_steps": 3},
            "train": {
                "max_steps": STEPS, "global_batch_tokens": 1024, "micro_batch_size": 4, "device": "cpu",
                "dtype": "fp32", "eval_every": 0, "eval_batches": 2, "checkpoint_every": 2,
                "keep_checkpoints": 10, "log_every": 1, "progress": False,
            },
        }))

    def run_dir(self, name: str) -> Path:
        return self.root / "runs" / name

    def in_process(self, name: str, *overrides: str, resume: bool = False) -> trainer.TrainResult:
        config = load_config(TrainConfig, self.config, [f"run.name={name}", *overrides])
        return trainer.run(config, resume=resume)

    def torchrun(self, name: str, *overrides: str, fault: str | None = None, restarts: int = 0,
                 resume: bool = False, expect_ok: bool = True) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                   f"--max-restarts={restarts}", "-m", "lmforge", "train", str(self.config),
                   f"run.name={name}", *overrides, *(["--resume"] if resume else [])]
        return self._launch(command, fault, expect_ok)

    def cli(self, name: str, *args: str) -> subprocess.CompletedProcess:
        """`lmforge train ... --nproc 2`: the CLI launches torchrun itself."""
        command = [sys.executable, "-m", "lmforge", "train", str(self.config), f"run.name={name}", *args]
        return self._launch(command, None, True)

    def _launch(self, command, fault, expect_ok) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        if fault:
            env["LMFORGE_DEBUG_FAULT"] = fault
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        if expect_ok:
            assert done.returncode == 0, done.stderr[-4000:]
        return done

    def copy_until(self, source: str, name: str, step: int) -> Path:
        """A copy of a run dir as if it had stopped right after its checkpoint at `step`."""
        target = self.run_dir(name)
        shutil.copytree(self.run_dir(source), target)
        for path in (target / "checkpoints").glob("step-*"):
            if int(path.name.removeprefix("step-")) > step:
                shutil.rmtree(path)
        (target / "checkpoints" / "latest").write_text(f"step-{step:07d}\n")
        return target


@pytest.fixture(scope="module")
def runs(pretrain_data, tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("distributed"), pretrain_data["tokens"])


@pytest.fixture(scope="module")
def single(runs) -> list[float]:
    result = runs.in_process("single")
    assert result.status == "completed" and len(result.losses) == STEPS
    return result.losses


@pytest.fixture(scope="module")
def fsdp(runs) -> list[float]:
    runs.torchrun("fsdp", "parallel.strategy=fsdp")
    return losses_of(runs.run_dir("fsdp"))


def test_the_union_of_ranks_batches_is_the_same_windows_for_any_world_size(pretrain_data):
    data = TokenDataset(pretrain_data["tokens"], "train")
    global_batch = 16
    for step in (0, 7):
        seen = {}
        for world in (1, 2, 4):
            accum = global_batch // (4 * world)
            loaders = [WindowLoader(data, 64, 4, accum, seed=3, rank=r, world_size=world) for r in range(world)]
            windows = [loader.window_index(k) for loader in loaders
                       for micro in range(accum) for k in loader.samples(step, micro)]
            assert len(windows) == global_batch
            seen[world] = sorted(windows)
        assert seen[1] == seen[2] == seen[4]


def test_fsdp_on_two_processes_matches_one_process_with_the_same_global_batch(single, fsdp, runs):
    assert len(fsdp) == STEPS
    np.testing.assert_allclose(fsdp, single, rtol=1e-5, atol=1e-5)
    manifest = json.loads((runs.run_dir("fsdp") / "manifest.json").read_text())
    assert manifest["strategy"] == "fsdp" and manifest["world_size"] == 2
    state = json.loads((runs.run_dir("fsdp") / "checkpoints" / "step-0000010" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["loader"]["samples_consumed"] == STEPS * 16


def test_ddp_with_planted_nans_skips_and_rolls_back_exactly_like_one_process(runs):
    # Steps 5-7 get a NaN loss: each is skipped on every rank, and the third triggers a
    # rollback to the step-4 checkpoint that skips their data. Launched by `--nproc 2`.
    faults = ["faults.debug_nan_steps=[5,6,7]", "faults.rollback_after=3"]
    reference = runs.in_process("faults-single", *faults)
    runs.cli("faults-ddp", "parallel.strategy=ddp", *faults, "--nproc", "2")
    run_dir = runs.run_dir("faults-ddp")
    alerts = alerts_of(run_dir)
    assert [a["step"] for a in alerts if a["alert"] == "step_skipped"] == [5, 6, 7]
    [rollback] = [a for a in alerts if a["alert"] == "rollback"]
    assert (rollback["from_step"], rollback["to_step"], rollback["skipped_data_steps"]) == (7, 4, [5, 7])
    records = RunDir(run_dir).read_metrics()
    assert [r["step"] for r in records if "skipped" in r] == [5, 6, 7]
    finite = [r["loss"] for r in records if r.get("loss") is not None]
    assert len(finite) == STEPS + 3 - 3 and all(np.isfinite(finite))  # 4 + 6 after the rollback
    expected = [x for x in reference.losses if np.isfinite(x)]
    np.testing.assert_allclose(finite, expected, rtol=1e-5, atol=1e-5)
    state = json.loads((run_dir / "checkpoints" / "step-0000010" / "trainer_state.json").read_text())
    assert state["faults"]["data_offset"] == 3 and state["faults"]["rollbacks"] == 1


def test_a_two_process_fsdp_checkpoint_continues_in_one_process_with_the_same_losses(fsdp, runs):
    runs.copy_until("fsdp", "fsdp-to-single", 4)
    resumed = runs.in_process("fsdp-to-single", resume=True)
    assert resumed.step == STEPS and len(resumed.losses) == STEPS - 4
    np.testing.assert_allclose(resumed.losses, fsdp[4:], rtol=1e-5, atol=1e-5)


def test_a_one_process_checkpoint_continues_on_two_ddp_processes(single, runs):
    runs.copy_until("single", "single-to-ddp", 6)
    runs.torchrun("single-to-ddp", "parallel.strategy=ddp", resume=True)
    np.testing.assert_allclose(losses_of(runs.run_dir("single-to-ddp")), single, rtol=1e-5, atol=1e-5)


def test_a_killed_rank_is_relaunched_and_the_run_ends_with_the_uninterrupted_losses(fsdp, runs):
    # Rank 1 SIGKILLs itself after step 5 (checkpoints at 2 and 4, written in the background);
    # torchrun relaunches both ranks, which resume from step 4 by themselves (train.resume=auto).
    done = runs.torchrun("killed", "parallel.strategy=fsdp", "train.async_checkpoint=true",
                         fault="kill:1:5", restarts=1)
    assert "exitcode: -9" in done.stderr and "resumed from" in done.stderr and "step-0000004" in done.stderr
    assert "rank 0: a collective failed at step 6" in done.stderr
    assert losses_of(runs.run_dir("killed")) == fsdp


def test_a_stuck_rank_makes_its_peer_fail_naming_rank_and_step(runs):
    done = runs.torchrun("stuck", "parallel.strategy=ddp", "parallel.timeout_seconds=3",
                         fault="hang:1:3", expect_ok=False)
    assert done.returncode != 0
    assert "rank 0: collective failed at step 4" in done.stderr, done.stderr[-3000:]
    # The last complete checkpoint is intact for a relaunch.
    assert (runs.run_dir("stuck") / "checkpoints" / "latest").read_text().strip() == "step-0000002"


def test_sigterm_to_torchrun_makes_every_rank_save_the_same_checkpoint_before_exit(fsdp, runs):
    # As a scheduler does at preemption: SIGTERM to the launcher, which forwards it to the
    # ranks; they agree on the step to stop at (the flag rides the step's all-reduce).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "lmforge", "train", str(runs.config), "run.name=preempted", "parallel.strategy=fsdp",
               "train.max_steps=100000", "train.checkpoint_every=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = runs.run_dir("preempted") / "metrics.jsonl"
    try:
        for _ in range(6000):
            if metrics.is_file() and '"step": 3,' in metrics.read_text():
                break
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode != 0
    latest = (runs.run_dir("preempted") / "checkpoints" / "latest").read_text().strip()
    step = int(latest.removeprefix("step-"))
    assert 3 <= step < 1000, stderr[-3000:]
    assert "received SIGTERM: finishing the step and saving a checkpoint" in stderr
    # The run continues from there (here in one process) with the reference losses.
    resumed = runs.in_process("preempted", f"train.max_steps={step + 2}", "train.checkpoint_every=0", resume=True)
    assert resumed.step == step + 2
    # Against the reference run (it usually stops at step 3 or 4); past its end, one extended in one process.
    reference = fsdp if step + 2 <= STEPS else runs.in_process(
        "preempted-reference", f"train.max_steps={step + 2}", "train.checkpoint_every=0").losses
    np.testing.assert_allclose(resumed.losses, reference[step:step + 2], rtol=1e-5, atol=1e-5)
