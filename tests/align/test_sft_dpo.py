"""`lmforge sft` / `dpo` end to end on real text: loss falls, margins grow, resume is exact, LoRA merges."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.align.config import AlignConfig
from lmforge.align.run import run_dpo, run_sft
from lmforge.errors import DataError
from lmforge.store.loading import load_model

ROOT = Path(__file__).resolve().parents[2]


def passages(corpus_texts, n):
    words = [w for text in corpus_texts for w in text.split()]
    return [words[i * 40 : i * 40 + 40] for i in range(n)]


@pytest.fixture(scope="module")
def chat_files(corpus_texts, tmp_path_factory):
    """Continuation conversations and preference pairs (true vs word-shuffled continuation)."""
    root = tmp_path_factory.mktemp("chat")
    rng = random.Random(0)
    conversations, pairs = [], []
    for words in passages(corpus_texts, 120):
        prompt = "Continue: " + " ".join(words[:15])
        answer = " ".join(words[15:35])
        shuffled = words[15:35]
        rng.shuffle(shuffled)
        conversations.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]})
        pairs.append({"prompt": prompt, "chosen": answer, "rejected": " ".join(shuffled)})
    (root / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in conversations))
    (root / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[:100]))
    (root / "prefs_val.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs[100:]))
    return root


def config(model, out, data, **sections) -> AlignConfig:
    base = {
        "model": str(model),
        "run": {"name": "a", "out_dir": str(out), "seed": 0},
        "data": {"seq_len": 96, **data},
        "optim": {"lr": 2e-3},
        "schedule": {"warmup_steps": 2},
        "train": {"max_steps": 20, "global_batch_tokens": 96 * 8, "micro_batch_size": 8, "device": "cpu",
                  "eval_every": 10, "checkpoint_every": 10, "log_every": 1, "progress": False},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return AlignConfig.model_validate(base)


def metric(run_dir: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if key in r]


def test_sft_loss_falls_on_assistant_tokens_and_resume_reproduces_it(trained_run, chat_files, tmp_path):
    cfg = config(trained_run, tmp_path, {"train": str(chat_files / "sft.jsonl"), "val_fraction": 0.1})
    result = run_sft(cfg)
    assert result.status == "completed" and result.step == 20
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3 - 0.3
    val = metric(result.run_dir, "val_loss")
    assert len(val) == 2 and val[1] < val[0]
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["kind"] == "sft" and manifest["parent"] == str((Path(trained_run) / "checkpoints" / "step-0000150").resolve())
    # Cut the run back to its step-10 checkpoint and resume: the same losses again.
    shutil.rmtree(result.run_dir / "checkpoints" / "step-0000020")
    (result.run_dir / "checkpoints" / "latest").write_text("step-0000010\n")
    resumed = run_sft(cfg, resume=True)
    assert resumed.losses == pytest.approx(result.losses[10:], abs=1e-5)
    # The fine-tuned run is a model like any other: it generates in the chat format.
    model, tokenizer, _ = load_model(result.run_dir)
    assert tokenizer.native and model.config == load_model(trained_run)[0].config


def test_dpo_grows_the_held_out_margin_and_preference_accuracy(trained_run, chat_files, tmp_path):
    cfg = config(trained_run, tmp_path, {"train": str(chat_files / "prefs.jsonl"), "val": str(chat_files / "prefs_val.jsonl")},
                 train={"eval_every": 5, "max_steps": 20, "checkpoint_every": 0}, dpo={"beta": 0.1}, optim={"lr": 5e-4})
    result = run_dpo(cfg)
    margins = metric(result.run_dir, "val_reward_margin")
    accuracy = metric(result.run_dir, "val_preference_accuracy")
    assert len(margins) == 4 and margins[-1] > margins[0] and margins[-1] > 0
    assert accuracy[-1] >= 0.75
    assert metric(result.run_dir, "reward_margin")[-1] > 0 and result.losses[-1] < 0.6931


def test_lora_sft_checkpoints_only_adapters_and_merges_to_the_same_model(trained_run, chat_files, tmp_path):
    cfg = config(trained_run, tmp_path, {"train": str(chat_files / "sft.jsonl")}, lora={"enabled": True, "r": 4},
                 train={"max_steps": 8, "eval_every": 0, "checkpoint_every": 0})
    result = run_sft(cfg)
    assert result.losses[-1] < result.losses[0]
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["lora"]["r"] == 4 and state["init_from"].endswith("checkpoints/step-0000150")
    checkpoint_bytes = sum(f.stat().st_size for f in result.checkpoint.iterdir())
    base_bytes = sum(f.stat().st_size for f in (Path(trained_run) / "checkpoints" / "step-0000150").iterdir())
    assert checkpoint_bytes < base_bytes / 3  # adapters and their optimizer state only
    merged, _, _ = load_model(result.run_dir)
    base, _, _ = load_model(trained_run)
    tokens = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (merged(tokens) - base(tokens)).abs().max() > 1e-4  # the adapters changed the model
    done = subprocess.run([sys.executable, "-m", "lmforge", "lora", "merge", str(result.run_dir / "adapter"),
                           "--out", str(tmp_path / "merged")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    from_dir, _, _ = load_model(tmp_path / "merged")
    with torch.no_grad():
        assert (from_dir(tokens) - merged(tokens)).abs().max() < 1e-4


def test_bad_records_stop_the_run_before_training_naming_the_line(trained_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
                   + "\n" + json.dumps({"messages": [{"role": "user", "content": "no reply"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: conversation has no assistant turn"):
        run_sft(config(trained_run, tmp_path, {"train": str(bad)}))
    assert not (tmp_path / "a").exists()


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_lora_refuses_base_weights_it_was_not_trained_on_and_finds_a_moved_base(trained_run, chat_files, tmp_path,
                                                                               capsys):
    from lmforge.cli import main
    from lmforge.errors import CheckpointError
    from lmforge.store import checkpoint

    base = shutil.copytree(trained_run, tmp_path / "base")
    cfg = config(base, tmp_path / "runs", {"train": str(chat_files / "sft.jsonl")}, lora={"enabled": True, "r": 4},
                 train={"max_steps": 4, "eval_every": 0, "checkpoint_every": 0})
    result = run_sft(cfg)
    adapter = result.run_dir / "adapter"
    merged, _, _ = load_model(adapter)
    original = shutil.copytree(base, tmp_path / "original-base")
    # The base is retrained in place: the same path now holds other weights.
    changed, _, _ = load_model(base)
    with torch.no_grad():
        next(changed.parameters()).add_(0.01)
    ckpt = base / "checkpoints" / "step-0000150"
    state = checkpoint.read_state(ckpt)
    shutil.rmtree(ckpt)
    checkpoint.save(base / "checkpoints", 150, changed, [], state, keep=10)

    capsys.readouterr()
    assert main(["lora", "merge", str(adapter), "--out", str(tmp_path / "merged")]) == 2
    [err] = error_lines(capsys)
    assert f"adapter {adapter} was trained on base weights" in err and "holds other weights" in err
    assert not (tmp_path / "merged").exists()
    with pytest.raises(CheckpointError, match="LoRA adapters.*holds other weights"):
        load_model(result.run_dir)
    with pytest.raises(CheckpointError, match="init_from_weights_sha256"):
        run_sft(config(base, tmp_path / "runs", {"train": str(chat_files / "sft.jsonl")},
                       lora={"enabled": True, "r": 4}, train={"max_steps": 6, "eval_every": 0}), resume=True)

    # The original weights, moved: named explicitly, or found by the path relative to the adapter.
    tokens = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    assert main(["lora", "merge", str(adapter), "--out", str(tmp_path / "merged"),
                 "--base", str(original / "checkpoints" / "step-0000150")]) == 0
    from_dir, _, _ = load_model(tmp_path / "merged")
    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved / "runs" / "a" / "adapter")
    shutil.copytree(original, moved / "base")
    from_moved, _, _ = load_model(moved / "runs" / "a" / "adapter")
    with torch.no_grad():
        assert (from_dir(tokens) - merged(tokens)).abs().max() < 1e-4
        assert (from_moved(tokens) - merged(tokens)).abs().max() < 1e-5


def test_sft_into_the_run_dir_of_another_run_is_refused_unless_overwrite(trained_run, chat_files, tmp_path, capsys):
    import yaml

    from lmforge.cli import main

    cfg = config(trained_run, tmp_path, {"train": str(chat_files / "sft.jsonl")},
                 train={"max_steps": 2, "eval_every": 0, "checkpoint_every": 0})
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["sft", str(trained_run), str(recipe)]) == 0
    capsys.readouterr()
    assert main(["sft", str(trained_run), str(recipe), "optim.lr=0.01", "train.max_steps=3"]) == 2
    [err] = error_lines(capsys)
    assert f"run dir {tmp_path / 'a'} holds another run (optim.lr 0.002 -> 0.01" in err and "--overwrite" in err
    assert main(["sft", str(trained_run), str(recipe), "optim.lr=0.01", "train.max_steps=3", "--overwrite"]) == 0
    assert [r["step"] for r in map(json.loads, (tmp_path / "a" / "metrics.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2, 3]
