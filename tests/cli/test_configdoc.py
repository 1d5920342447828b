"""Configs you can see, through the real `lmforge` command: `--print-config` on every config-taking
verb (prints what the run would use, loads back as the same config), config sections in
`VERB --help`, `--version`, shell completion; and `auto` devices for the verbs that load a model."""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
import yaml

from lmforge.cli import app, main
from lmforge.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# Every config-taking verb, with the positional arguments it needs before its CONFIG.
CONFIG_VERBS = [
    ["train"], ["sft", "some-model"], ["dpo", "some-model"], ["rm", "some-model"], ["rl", "some-model"],
    ["tokenize"], ["curate", "input.paths=[raw.jsonl]"], ["quickstart"], ["serve", "some-model"], ["eval", "run", "some-model"],
    ["eval", "some-model"], ["tokenizer", "train"], ["train-classifier", "some-model"], ["export", "some-model"],
    ["import", "some-model"], ["lora", "merge", "some-adapter"],
]
# Values for required keys that are not plain strings.
VALUES = {"rewards": "[{name: numeric_match, weight: 1.0}]", "inputs": "[some-file]", "input.paths": "[some-file]"}


@pytest.fixture(autouse=True)
def wide_help(monkeypatch):
    """Help rendered on one wide line per entry, whatever the terminal."""
    monkeypatch.setenv("TERMINAL_WIDTH", "400")
    monkeypatch.setenv("COLUMNS", "400")


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def body(printed: str) -> dict:
    """The YAML a --print-config printed, loaded (its comments dropped by the loader)."""
    return yaml.safe_load(printed)


@pytest.mark.parametrize("verb", CONFIG_VERBS, ids=" ".join)
def test_print_config_output_fed_back_as_config_resolves_to_the_same_config(verb, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *verb, "--print-config")
    assert code == 0, err
    # Required keys nobody set are printed as null and named on stderr; give each a value.
    required = re.findall(r"'([\w.]+)'", err.split("note: set", 1)[1].split("before")[0]) if "note: set" in err else []
    filled = [f"{key}={VALUES.get(key, 'some-value')}" for key in required]
    code, first, err = run(capsys, *verb, *filled, "--print-config")
    assert code == 0 and "note:" not in err, err
    assert "REQUIRED" not in first
    saved = tmp_path / "resolved.yaml"
    saved.write_text(first)
    code, again, err = run(capsys, *verb, str(saved), "--print-config")
    assert code == 0, err
    assert body(again) == body(first)
    assert again.splitlines()[1:] == first.splitlines()[1:]  # only the header names the file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resolved.yaml"]  # nothing ran, nothing written


def test_release_prints_its_resolved_policy_which_loads_back_the_same(capsys, tmp_path):
    code, first, err = run(capsys, "release", "some-model", "--policy", "release", "--print-config")
    assert code == 0, err
    assert body(first)["thresholds"]["python_mc/acc"]["min"] == 0.3 and "# 'task/metric' -> {min, max}" in first
    saved = tmp_path / "policy.yaml"
    saved.write_text(first)
    code, again, err = run(capsys, "release", "some-model", "--policy", str(saved), "--print-config")
    assert code == 0 and body(again) == body(first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.yaml"]  # no release record written


def test_every_config_taking_verb_has_print_config_and_names_its_config():
    def commands(group, path=()):
        for name, command in getattr(group, "commands", {}).items():
            yield (*path, name), command
            yield from commands(command, (*path, name))

    taking = {path: command for path, command in commands(typer.main.get_command(app))
              if any(p.name == "args" for p in command.params)}
    assert len(taking) >= 15
    for path, command in taking.items():
        assert "print_config" in [p.name for p in command.params], path
        assert getattr(command.callback, "lmforge_config", None), path
    tested = {" ".join(w for w in verb if not w.startswith("some-") and "=" not in w) for verb in CONFIG_VERBS}
    assert {" ".join(path) for path in taking} <= tested  # every one is in the round trip above


def test_print_config_shows_defaults_file_flags_and_overrides_with_each_key_described(capsys, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  lr: 0.001\ntrain:\n  max_steps: 20\n")
    code, out, err = run(capsys, "train", str(recipe), "data.dataset=tokens", "train.max_steps=7", "--print-config")
    assert code == 0, err
    assert "  lr: 0.001  # peak AdamW learning rate" in out  # the file, with the key's description
    assert "  max_steps: 7\n" in out  # the override wins over the file
    assert "  micro_batch_size: 8  # sequences per forward pass per rank" in out  # a built-in default
    assert "  name: adamw  # one of: adamw, muon" in out  # a closed set says what is allowed
    assert "# The optimizer" in out  # each section introduced by one line
    assert str(recipe) in out.splitlines()[0]
    code, out, err = run(capsys, "tokenize", "--out", "my-tokens", "--print-config")  # a flag
    assert code == 0 and body(out)["out"] == "my-tokens"
    code, out, err = run(capsys, "sft", "base-model", "sft", "--print-config")  # a shipped config by name
    assert code == 0 and body(out)["model"] == "base-model" and body(out)["data"]["train"].startswith("lmforge://")
    assert body(out)["run"]["name"] == "sft"


def test_print_config_with_a_bad_override_is_the_usual_one_line_error(capsys):
    code, out, err = run(capsys, "train", "data.dataset=tokens", "train.max_step=3", "--print-config")
    assert code == 2 and out == ""
    assert err.startswith("error: unknown key 'train.max_step'; did you mean 'train.max_steps'?")
    assert len(err.strip().splitlines()) == 1
    code, out, err = run(capsys, "train", "data.dataset=tokens", "optim.lr=-1", "--print-config")
    assert code == 2 and out == "" and err.startswith("error: bad value for 'optim.lr'")


def test_print_config_without_required_keys_prints_them_as_null_and_names_them(capsys):
    code, out, err = run(capsys, "train", "--print-config")
    assert code == 0
    assert "  dataset: null  # REQUIRED: token dataset dir written by `lmforge tokenize`" in out
    assert err.strip() == "note: set 'data.dataset' before running (in CONFIG.yaml, by its flag or as key=value)"


def test_verb_help_lists_its_config_sections_and_where_every_key_is(capsys):
    code, out, _ = run(capsys, "sft", "--help")
    assert code == 0
    assert "--print-config" in out
    assert "lmforge sft ... --print-config" in out
    for line in ("optim: The optimizer", "lora: LoRA adapters", "dpo: DPO's loss", "top-level keys: model"):
        assert line in out, line
    code, out, _ = run(capsys, "eval", "run", "--help")
    assert code == 0 and "top-level keys: model, tasks, data" in out
    code, out, _ = run(capsys, "generate", "--help")  # no config: no sections
    assert code == 0 and "Config sections" not in out


def test_top_level_help_names_the_real_pipeline(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "curate -> tokenizer -> tokenize -> pretrain (train) -> eval -> align (sft, dpo, rm, rl) -> export -> release -> serve" in out
    assert "--version" in out and "--install-completion" in out and "--show-completion" in out


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_names_the_package_and_torch(flag, capsys):
    from importlib import metadata

    code, out, _ = run(capsys, flag)
    assert code == 0
    assert out.startswith(f"lmforge {metadata.version('lmforge')} (torch {metadata.version('torch')}")


def test_shell_completion_completes_verbs_and_options():
    def complete(words: str, index: int) -> list[str]:
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "_LMFORGE_COMPLETE": "complete_bash",
               "COMP_WORDS": words, "COMP_CWORD": str(index)}
        done = subprocess.run([sys.executable, "-m", "lmforge"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("lmforge tra", 1) == ["train", "train-classifier"]
    assert complete("lmforge sft model --print-c", 3) == ["--print-config"]


# ------------------------------------------------------------------------------- devices


def test_generate_runs_on_auto_by_default_and_logs_the_device_and_dtype_once(trained_run, capsys, caplog):
    caplog.set_level(logging.INFO, logger="lmforge.device")
    code, out, err = run(capsys, "generate", str(trained_run), "--prompt", "import", "--max-tokens", "3", "--seed", "0")
    assert code == 0, err
    chosen = [r.getMessage() for r in caplog.records if r.name == "lmforge.device"]
    assert chosen == ["engine.device=auto: running on cpu in float32"]


def test_eval_runs_on_auto_by_default_and_records_the_device_chosen(trained_run, pretrain_data, capsys, caplog, tmp_path):
    import json

    few = tmp_path / "few.jsonl"  # three real documents: enough to place the model and score
    few.write_text("".join(pretrain_data["docs"].read_text().splitlines(keepends=True)[:3]))
    caplog.set_level(logging.INFO, logger="lmforge.device")
    code, out, err = run(capsys, "eval", str(trained_run), "--data", str(few), "--out", str(tmp_path / "ev"))
    assert code == 0, err
    assert [r.getMessage() for r in caplog.records if r.name == "lmforge.device"] == ["eval.device=auto: running on cpu in float32"]
    (result,) = tmp_path.joinpath("ev").glob("*.json")
    assert json.loads(result.read_text())["device"] == "cpu"


def test_generate_chat_and_release_would_pick_cuda_where_it_is_available(monkeypatch, capsys):
    """Without a GPU here: CUDA reported available, the engine is asked for cuda in bf16."""
    from lmforge.safety import release as gate
    from lmforge.serve import engine

    asked: list[tuple] = []

    def load(path, device, dtype, *rest):
        asked.append((device, dtype))
        raise ConfigError("stop here: nothing to load on this machine")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(engine, "load_with_adapters", load)
    for verb in (["generate", "m", "--prompt", "x"], ["chat", "m"]):
        code, _, err = run(capsys, *verb)
        assert code == 2 and "stop here" in err
    assert asked == [(torch.device("cuda"), torch.bfloat16)] * 2
    devices: list[str] = []
    monkeypatch.setattr(gate, "run", lambda model, policy, device, baseline=None: devices.append(device) or (_ for _ in ()).throw(ConfigError("stop")))
    assert run(capsys, "release", "m", "--policy", "release")[0] == 2
    assert devices == ["auto"]


def test_curate_prints_its_config_before_any_input_is_set_and_notes_what_is_needed(capsys):
    code, out, err = run(capsys, "curate", "--print-config")
    assert code == 0 and body(out)["input"]["paths"] == []
    assert err.strip() == "note: before running: no input: set input.paths (or pass --input FILE_OR_DIR)"
