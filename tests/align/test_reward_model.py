"""`lmforge rm`: a Bradley–Terry reward model on preference pairs learns to rank the shipped
pairs, exports to transformers' sequence-classification layout with the same scores, and
runs by shipped config name (and on two DDP processes like on one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lmforge.align.config import AlignConfig
from lmforge.align.data import read_preferences
from lmforge.align.reward_model import RewardModelObjective, encode_pairs, reward_scorer
from lmforge.align.run import REWARD_MODEL_DIR, run_rm
from lmforge.errors import ConfigError
from lmforge.model.reward import RewardModel, last_token_index
from lmforge.shipped import resolve_path
from lmforge.store import checkpoint
from lmforge.store.loading import load_model
from lmforge.store.reward_model_dir import load_reward_model_dir

ROOT = Path(__file__).resolve().parents[2]
PAIRS = "lmforge://data/chat/python_docs_preferences.jsonl.gz"


def config(model, out, **sections) -> AlignConfig:
    base = {
        "model": str(model),
        "run": {"name": "rm", "out_dir": str(out), "seed": 0},
        "data": {"train": PAIRS, "val_fraction": 0.15, "seq_len": 128},
        "optim": {"lr": 1e-3},
        "schedule": {"warmup_steps": 2},
        "train": {"max_steps": 40, "global_batch_tokens": 128 * 8, "micro_batch_size": 8, "device": "cpu",
                  "eval_every": 20, "checkpoint_every": 0, "log_every": 1, "progress": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return AlignConfig.model_validate(base)


def metric(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


@pytest.fixture(scope="module")
def rm_run(trained_run, tmp_path_factory):
    return run_rm(config(trained_run, tmp_path_factory.mktemp("rm")))


def test_reward_is_read_at_the_last_non_pad_token_so_padding_changes_nothing(trained_run):
    lm, tokenizer, _ = load_model(trained_run)
    model = RewardModel.from_lm(lm, tokenizer.pad_id).eval()
    torch.nn.init.normal_(model.score.weight, generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(5, 300, (2, 20), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([tokens, torch.full((2, 7), tokenizer.pad_id)], dim=1)
    assert last_token_index(padded, tokenizer.pad_id).tolist() == [19, 19]
    with torch.no_grad():
        torch.testing.assert_close(model(padded), model(tokens))


def test_the_bradley_terry_loss_falls_and_held_out_pair_accuracy_beats_chance(rm_run):
    assert rm_run.status == "completed" and rm_run.step == 40
    losses = rm_run.losses
    assert abs(losses[0] - np.log(2)) < 1e-4  # zero score head: every pair starts at margin 0
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    accuracy = metric(rm_run.run_dir, "val_reward_accuracy")
    assert len(accuracy) == 2 and accuracy[-1] >= 0.65, accuracy  # chance: 0.5
    assert metric(rm_run.run_dir, "val_loss")[-1] < np.log(2)
    assert metric(rm_run.run_dir, "val_reward_margin")[-1] > 0
    assert len(metric(rm_run.run_dir, "reward_accuracy")) == 40
    assert json.loads((rm_run.run_dir / "manifest.json").read_text())["kind"] == "rm"


def test_the_export_loads_in_transformers_with_the_same_scores(rm_run, trained_run):
    from transformers import AutoModelForSequenceClassification


    directory = rm_run.run_dir / REWARD_MODEL_DIR
    hf_config = json.loads((directory / "config.json").read_text())
    assert hf_config["architectures"] == ["LlamaForSequenceClassification"] and hf_config["num_labels"] == 1
    hf = AutoModelForSequenceClassification.from_pretrained(directory, torch_dtype=torch.float32).eval()
    lm, tokenizer, _ = load_model(trained_run)
    ours = RewardModel.from_lm(lm, tokenizer.pad_id)
    checkpoint.load(rm_run.checkpoint, ours)  # the run's final weights, score head included
    ours.eval()
    chosen, rejected = encode_pairs(tokenizer, read_preferences(resolve_path(PAIRS))[:6], 128)
    tokens = torch.cat([chosen, rejected])
    assert (tokens == tokenizer.pad_id).any()  # right-padded rows: the pooling is exercised
    with torch.no_grad():
        expected = ours(tokens)
        got = hf(input_ids=tokens).logits.squeeze(-1)
    assert expected.abs().max() > 1e-3  # the head was trained, not left at zero
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # Training batches drop the padding columns no row needs; the rewards stay the same.
    short_chosen, short_rejected = chosen.clone(), rejected.clone()
    short_chosen[:, 37:] = short_rejected[:, 37:] = tokenizer.pad_id  # rows of at most 37 tokens
    objective = RewardModelObjective((short_chosen, short_rejected), None, 128, len(chosen), 1, 0, pad_id=tokenizer.pad_id)
    batch = objective.batch(0, 0)
    assert batch["chosen"].shape[1] == 40  # 37 rounded up to a multiple of 8
    index = objective.loader.rows(0, 0)
    with torch.no_grad():
        torch.testing.assert_close(ours(torch.cat([batch["chosen"], batch["rejected"]])),
                                   ours(torch.cat([short_chosen[index], short_rejected[index]])), rtol=1e-5, atol=1e-5)


def test_the_export_loads_back_as_a_scorer_for_rl_rewards_with_the_same_rewards(rm_run):
    model, tokenizer = load_reward_model_dir(rm_run.run_dir / REWARD_MODEL_DIR)
    prompts = [prompt[-1]["content"] for _, prompt, _, _ in read_preferences(resolve_path(PAIRS))[:6]]
    replies = [reply[-1]["content"] for _, _, reply, _ in read_preferences(resolve_path(PAIRS))[:6]]
    records = [("", [{"role": "user", "content": p}], [{"role": "assistant", "content": r}], [])
               for p, r in zip(prompts, replies, strict=True)]
    chosen, _ = encode_pairs(tokenizer, records, 128)
    score = reward_scorer(model, tokenizer, batch_size=4)
    rewards = score(prompts, replies)
    with torch.no_grad():
        expected = model(chosen)
    assert len(rewards) == len(chosen) == 6  # none cut alike: all six pairs kept
    torch.testing.assert_close(torch.tensor(rewards), expected, rtol=1e-5, atol=1e-5)


def test_rm_refuses_what_it_cannot_train_before_any_work(trained_run, tmp_path):
    with pytest.raises(ConfigError, match="lora"):
        run_rm(config(trained_run, tmp_path, lora={"enabled": True}))


def lmforge(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(LMFORGE_LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


def test_rm_by_shipped_config_name_from_another_directory_writes_a_reward_model(trained_run, tmp_path):
    done = lmforge("rm", str(trained_run), "rm", "data.seq_len=128", "train.global_batch_tokens=1024",
                   "train.micro_batch_size=8", "train.device=cpu", "train.progress=false", "train.max_steps=2",
                   "train.eval_every=2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = tmp_path / "runs" / "rm"
    assert "val_reward_accuracy" in done.stdout and f"reward model runs/rm/{REWARD_MODEL_DIR}" in done.stdout
    assert (run_dir / REWARD_MODEL_DIR / "model.safetensors").is_file()
    assert f"train: {PAIRS}" in (run_dir / "config.yaml").read_text()


@pytest.mark.distributed
@pytest.mark.slow
def test_rm_on_two_ddp_processes_matches_one_process(trained_run, tmp_path):
    cfg = config(trained_run, tmp_path / "single", train={"max_steps": 4, "eval_every": 4, "micro_batch_size": 4,
                                                          "global_batch_tokens": 128 * 8, "dtype": "fp32"})
    single = run_rm(cfg)  # accum 2 on one process, 1 on each of two
    ddp = cfg.model_copy(deep=True)
    ddp.run.out_dir = str(tmp_path / "ddp")
    cfg_file = tmp_path / "rm-ddp.yaml"
    cfg_file.write_text(yaml.safe_dump({k: v for k, v in ddp.model_dump(mode="json").items() if k != "model"}))
    done = lmforge("rm", str(trained_run), str(cfg_file), "parallel.strategy=ddp", "--nproc", "2", cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    run_dir = tmp_path / "ddp" / "rm"
    np.testing.assert_allclose(metric(run_dir, "loss"), single.losses, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(metric(run_dir, "val_reward_accuracy"), metric(single.run_dir, "val_reward_accuracy"))
    np.testing.assert_allclose(metric(run_dir, "val_reward_margin"), metric(single.run_dir, "val_reward_margin"),
                               rtol=1e-4, atol=1e-4)
