"""`lmforge rl`: GRPO on rollouts from lmforge's engine raises the reward of a real model, samples
from the updated weights, resumes exactly mid rollout batch, refuses bad input before training,
runs by shipped config name and on two DDP processes like on one."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmforge.align.rl import RLConfig, run_rl
from lmforge.align.rollouts import RolloutWorker
from lmforge.align.run import REWARD_MODEL_DIR
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.model.reward import RewardModel
from lmforge.monitor.report import render
from lmforge.serve.config import EngineConfig
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams
from lmforge.store.loading import load_model
from lmforge.store.reward_model_dir import save_reward_model_dir
from lmforge.tokenizer import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TRAIN = "lmforge://data/rl/arithmetic_train.jsonl.gz"
TEST = "lmforge://data/rl/arithmetic_test.jsonl.gz"
# The tiny test model has read Python docs, not arithmetic: reward a reply that breaks the line,
# which about half of its replies do, so groups have reward variance from the first step.
NEWLINE = {"name": "format", "label": "newline", "options": {"pattern": "\n", "fullmatch": False}}


def config(model, out, **sections) -> RLConfig:
    base = {
        "model": str(model),
        "run": {"name": "rl", "out_dir": str(out), "seed": 0},
        "data": {"train": TRAIN},
        "rollout": {"prompts_per_step": 4, "group_size": 4, "max_tokens": 12},
        "rewards": [NEWLINE],
        "optim": {"lr": 3e-3},
        "train": {"max_steps": 4, "micro_batch_size": 4, "device": "cpu", "dtype": "fp32", "eval_every": 0,
                  "log_every": 1, "progress": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return RLConfig.model_validate(base)


def metric(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(LMFORGE_LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_grpo_raises_the_reward_and_logs_what_a_user_watches(trained_run, tmp_path):
    result = run_rl(config(trained_run, tmp_path, train={"max_steps": 24}, rollout={"prompts_per_step": 8}))
    assert result.status == "completed" and result.step == 24
    rewards = metric(result.run_dir, "reward/newline/mean")
    assert len(rewards) == 24
    assert np.mean(rewards[-6:]) > np.mean(rewards[:6]) + 0.15, rewards
    record = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward/total/mean", "reward/newline/std", "reward/newline/errors", "advantage_std", "kl",
                "clip_fraction", "entropy", "completion_length", "rollout_tokens_per_second", "tokens_per_second",
                "zero_variance_groups"):
        assert key in record, key
    assert 0 < record["completion_length"] <= 12


def test_rollouts_after_an_update_sample_from_the_updated_weights(trained_run, tmp_path):
    cfg = config(trained_run, tmp_path, train={"max_steps": 2})
    result = run_rl(cfg)
    start, tokenizer, _ = load_model(trained_run, "cpu", torch.float32)
    trained, _, _ = load_model(result.run_dir, "cpu", torch.float32)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": f"What is {i} + 2?"}], add_generation_prompt=True)
               for i in range(6)]
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=i) for i in range(6)]

    def sample(model) -> list[list[int]]:
        return [c.token_ids for c in Engine(model, tokenizer, EngineConfig(max_num_seqs=8)).run_to_completion(prompts, params)]

    # The run's engine decodes with the policy's own parameters: after loading other weights into
    # that same module, its next rollout samples exactly what a fresh engine on those weights does.
    policy = copy.deepcopy(start)
    engine = Engine(policy, tokenizer, EngineConfig(max_num_seqs=8))
    before = [c.token_ids for c in engine.run_to_completion(prompts, params)]
    policy.load_state_dict(trained.state_dict())
    after = [c.token_ids for c in engine.run_to_completion(prompts, params)]
    assert before == sample(start) and after == sample(trained) and after != before


def test_the_run_samples_each_rollout_with_the_training_module_as_its_last_step_left_it(trained_run, tmp_path):
    seen = []
    original = RolloutWorker.sample

    def spy(self, policy, index):
        seen.append((policy, {k: v.detach().clone() for k, v in policy.state_dict().items()}))
        rollout = original(self, policy, index)
        assert self._engine.model is policy  # no copy: the engine decodes with the trained parameters
        return rollout

    RolloutWorker.sample = spy
    try:
        run_rl(config(trained_run, tmp_path, train={"max_steps": 3}))
    finally:
        RolloutWorker.sample = original
    assert len(seen) == 3 and all(policy is seen[0][0] for policy, _ in seen)
    for (_, before), (_, after) in zip(seen, seen[1:], strict=False):
        assert any(not torch.equal(before[k], after[k]) for k in before)  # each rollout after an update


def test_resume_mid_rollout_batch_reproduces_the_uninterrupted_losses(trained_run, tmp_path):
    # Two rollout batches of 2 minibatches x 2 epochs: step 3 ends inside the first... and the checkpoint
    # at step 3 holds the rest of that batch (old log-probs included).
    sections = dict(rollout={"epochs": 2, "minibatches": 2}, train={"max_steps": 8, "checkpoint_every": 3})
    whole = run_rl(config(trained_run, tmp_path / "whole", **sections))
    first = run_rl(config(trained_run, tmp_path / "split", rollout=sections["rollout"],
                          train={"max_steps": 3, "checkpoint_every": 3}))
    assert first.step == 3
    rest = run_rl(config(trained_run, tmp_path / "split", **sections), resume=True)
    assert rest.step == 8
    np.testing.assert_allclose(first.losses + rest.losses, whole.losses, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metric(rest.run_dir, "reward/newline/mean"), metric(whole.run_dir, "reward/newline/mean"))


def test_kl_to_the_starting_model_is_zero_until_the_policy_moves_and_held_out_prompts_are_scored(trained_run, tmp_path):
    result = run_rl(config(trained_run, tmp_path, grpo={"kl_coef": 0.1}, rollout={"minibatches": 2},
                           data={"train": TRAIN, "test": TEST, "test_limit": 8}, train={"max_steps": 4, "eval_every": 2}))
    kl = metric(result.run_dir, "kl")
    assert kl[0] < 1e-6 and max(kl[1:]) > 1e-6
    assert set(result.val_metrics) >= {"val_reward", "val_reward/newline", "val_reward/newline/stderr"}
    assert len(metric(result.run_dir, "val_reward")) == 2
    page = render(result.run_dir)  # `lmforge report` draws what an RL run logs
    for chart in ("reward", "val_reward", "policy", "groups", "completions", "rollout"):
        assert (page.parent / f"{chart}.png").is_file(), chart
    assert "last val_reward/newline" in page.read_text()


def test_a_reward_that_raises_counts_as_zero_and_is_counted_and_the_run_goes_on(trained_run, tmp_path):
    broken = {"name": "operator:truediv", "label": "broken"}
    result = run_rl(config(trained_run, tmp_path, rewards=[NEWLINE, broken], train={"max_steps": 2}))
    assert result.status == "completed"
    assert metric(result.run_dir, "reward/broken/errors") == [16.0, 16.0]
    assert metric(result.run_dir, "reward/broken/mean") == [0.0, 0.0]


def test_bad_input_fails_before_training_with_the_file_line_or_key(trained_run, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n{"prompt": "What is 2 + 2?"}\n')
    with pytest.raises(DataError, match=rf"{prompts}:2: no field 'answer'"):
        run_rl(config(trained_run, tmp_path, data={"train": str(prompts)}, rewards=[{"name": "numeric_match"}]))
    prompts.write_text('{"question": "What is 1 + 1?", "answer": "2"}\n')
    with pytest.raises(DataError, match=rf"{prompts}:1: no text in field 'prompt'"):
        run_rl(config(trained_run, tmp_path, data={"train": str(prompts)}))
    prompts.write_text(json.dumps({"prompt": "What is " + " + ".join(["1"] * 200) + "?"}) + "\n")
    with pytest.raises(DataError, match="exceeds the model's context"):
        run_rl(config(trained_run, tmp_path, data={"train": str(prompts)}))
    with pytest.raises(ConfigError, match="micro_batch_size"):
        run_rl(config(trained_run, tmp_path, train={"micro_batch_size": 3}))
    with pytest.raises(ValueError, match="global_batch_tokens is not used"):
        config(trained_run, tmp_path, train={"global_batch_tokens": 4096})
    assert not (tmp_path / "rl").exists()  # nothing was written


def test_a_tokenizer_larger_than_the_model_vocabulary_fails_at_start_up(trained_run, corpus_texts, tmp_path):
    model_dir = tmp_path / "mismatch"
    done = lmforge("export", str(trained_run), "--out", str(model_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    # Someone put a bigger tokenizer beside the weights: ids past the embedding would index out of range.
    train_tokenizer(iter(corpus_texts), vocab_size=1536).tk.save(str(model_dir / "tokenizer.json"))
    with pytest.raises(CheckpointError, match="does not match the weights"):  # the card's hash catches it
        run_rl(config(model_dir, tmp_path))
    (model_dir / "model_card.md").unlink()  # a model dir from elsewhere records no tokenizer hash
    with pytest.raises(ConfigError, match="the tokenizer has 1536 tokens but the model's vocabulary is 1024"):
        run_rl(config(model_dir, tmp_path))
    assert not (tmp_path / "rl").exists()


def test_rl_by_shipped_config_name_runs_and_exports_like_any_run(trained_run, tmp_path):
    done = lmforge("rl", str(trained_run), "rl-arithmetic", "train.max_steps=2", "train.eval_every=2",
                   "train.checkpoint_every=0", "rollout.prompts_per_step=2", "rollout.group_size=2",
                   "rollout.max_tokens=8", "data.test_limit=4", "train.micro_batch_size=4", "train.device=cpu",
                   "train.progress=false", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "completed at step 2" in done.stdout and "val_reward/numeric_match" in done.stdout
    run_dir = tmp_path / "runs" / "rl-arithmetic"
    exported = lmforge("export", str(run_dir), "--out", str(tmp_path / "model"), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    bad = lmforge("rl", str(trained_run), "rl-arithmetic", "rollout.group_sise=4", cwd=tmp_path)
    assert bad.returncode == 2 and "group_size" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.distributed
@pytest.mark.slow
def test_rl_on_two_ddp_processes_matches_one_process(trained_run, tmp_path):
    cfg = config(trained_run, tmp_path / "single", rollout={"epochs": 2}, train={"max_steps": 4})
    single = run_rl(cfg)  # accum 4 on one process, 2 on each of two; each samples half the prompts
    ddp = cfg.model_copy(deep=True)
    ddp.run.out_dir = str(tmp_path / "ddp")
    cfg_file = tmp_path / "rl-ddp.yaml"
    cfg_file.write_text(yaml.safe_dump({k: v for k, v in ddp.model_dump(mode="json").items() if k != "model"}))
    done = lmforge("rl", str(trained_run), str(cfg_file), "parallel.strategy=ddp", "--nproc", "2", cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = tmp_path / "ddp" / "rl"
    np.testing.assert_allclose(metric(run_dir, "reward/newline/mean"), metric(single.run_dir, "reward/newline/mean"))
    np.testing.assert_allclose(metric(run_dir, "loss"), single.losses, rtol=1e-4, atol=1e-6)


def test_a_trained_reward_model_named_by_its_run_dir_is_a_reward(trained_run, tmp_path):
    lm, tokenizer, _ = load_model(trained_run, "cpu", torch.float32)
    scorer = RewardModel.from_lm(lm, tokenizer.pad_id).eval()
    torch.nn.init.normal_(scorer.score.weight, generator=torch.Generator().manual_seed(0))
    save_reward_model_dir(tmp_path / "rm" / REWARD_MODEL_DIR, scorer, tokenizer)  # as `lmforge rm` leaves it
    judged = {"name": "reward_model", "options": {"path": str(tmp_path / "rm")}}
    result = run_rl(config(trained_run, tmp_path, rewards=[judged], train={"max_steps": 1}))
    assert metric(result.run_dir, "reward/reward_model/std")[0] > 0
    assert metric(result.run_dir, "reward/reward_model/errors") == [0.0]
    with pytest.raises(ConfigError, match="needs options.path"):
        run_rl(config(trained_run, tmp_path, rewards=[{"name": "reward_model"}]))


def test_rl_with_lora_trains_only_adapters_and_samples_through_them(trained_run, tmp_path):
    result = run_rl(config(trained_run, tmp_path, lora={"enabled": True, "r": 4, "alpha": 8}, train={"max_steps": 2}))
    assert result.status == "completed"
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()
    assert metric(result.run_dir, "grad_norm")[-1] > 0


def test_a_run_dir_that_holds_the_starting_model_is_refused_even_with_overwrite(trained_run, tmp_path):
    first = run_rl(config(trained_run, tmp_path, train={"max_steps": 1}))
    again = config(first.run_dir, tmp_path)  # start from the rl run, writing into that same run dir
    with pytest.raises(ConfigError, match="holds the model this run starts from"):
        run_rl(again, overwrite=True)
    assert any((first.run_dir / "checkpoints").iterdir())
