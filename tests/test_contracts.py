"""The command line means what it says, and no verb loses data: every verb through its real CLI.

- one precedence rule: built-in defaults < CONFIG.yaml < flags < section.key=value,
  each layer merged key by key into its section;
- outputs replace only what lmforge wrote (or with --overwrite), and never an input, a run
  dir or the current directory;
- a user's mistake is one line and exit 2; an unexpected error says what lmforge was doing
  and where the traceback went.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import yaml

from lmforge import atomic
from lmforge.cli import main
from tests.conftest import free_port, wait_until_serving

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


@pytest.fixture
def captured(monkeypatch):
    """Replace a stage's `run` with one that records the config the CLI resolved."""
    seen: dict[str, object] = {}

    class Stop(Exception):
        pass

    def capture(module, name="run"):
        def fake(config, *args, **kwargs):
            seen["config"] = config
            raise Stop

        monkeypatch.setattr(module, name, fake)

    def call(args):
        with pytest.raises(Stop):
            main(args)
        return seen["config"]

    capture.call = call
    monkeypatch.setenv("LMFORGE_DEBUG", "1")  # let Stop through main's error handling
    return capture


# -- one precedence rule ------------------------------------------------------------------


def test_serve_flags_beat_the_yaml_so_a_keys_file_always_means_authentication(trained_run, tmp_path):
    """`lmforge serve MODEL serve.yaml --api-keys-file keys.txt --port P`: the YAML says port 8000
    and no keys; the flags win, so the server listens on P and refuses a request without a key."""
    port = free_port()
    keys = tmp_path / "keys.txt"
    keys.write_text("ci:sk-contract-key\n")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": 8000, "log_level": "warning"},
        "auth": {"api_keys_file": None, "api_keys_env": "LMFORGE_NO_SUCH_ENV"},
        "engine": {"device": "auto"},
        "allow_unreleased": False,
        "audit": {"path": None},
    }))
    env = {k: v for k, v in os.environ.items() if k != "LMFORGE_API_KEYS"}
    server = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", str(trained_run), str(config), "--api-keys-file", str(keys),
         "--port", str(port), "--device", "cpu", "--allow-unreleased"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )
    try:
        wait_until_serving(server, port)  # on the --port it was given, not the YAML's 8000
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).status_code == 401
        wrong = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer sk-other"}, timeout=10)
        assert wrong.status_code == 401
        right = httpx.get(f"http://127.0.0.1:{port}/v1/models",
                          headers={"Authorization": "Bearer sk-contract-key"}, timeout=10)
        assert right.status_code == 200 and right.json()["data"]
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_serve_resolves_flags_above_the_yaml_and_overrides_above_the_flags(captured, tmp_path):
    from lmforge.serve import server

    captured(server)
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"server": {"port": 8000, "host": "0.0.0.0", "log_level": "debug"},
                                      "engine": {"device": "cuda", "max_num_seqs": 4}}))
    resolved = captured.call(["serve", "m", str(config), "--port", "9000", "--host", "127.0.0.1",
                              "--api-keys-file", "keys.txt", "--device", "cpu", "--allow-unreleased"])
    assert (resolved.server.port, resolved.server.host) == (9000, "127.0.0.1")
    assert resolved.server.log_level == "debug"  # the YAML's other keys stay
    assert resolved.auth.api_keys_file == "keys.txt" and resolved.allow_unreleased
    assert (resolved.engine.device, resolved.engine.max_num_seqs) == ("cpu", 4)
    resolved = captured.call(["serve", "m", str(config), "--port", "9000", "server.port=9100"])
    assert resolved.server.port == 9100  # section.key=value is the last word


def test_tokenize_and_curate_flags_beat_the_yaml(captured, tmp_path):
    from lmforge.data import curate, tokenize

    config = tmp_path / "tokenize.yaml"
    config.write_text(yaml.safe_dump({"inputs": ["yaml-corpus.jsonl"], "tokenizer": "yaml-tok", "out": "yaml-out",
                                      "num_workers": 3}))
    captured(tokenize)
    resolved = captured.call(["tokenize", str(config), "-i", "mine.jsonl", "--out", "mine-out", "--workers", "1"])
    assert (resolved.inputs, resolved.out, resolved.tokenizer, resolved.num_workers) == (
        ["mine.jsonl"], "mine-out", "yaml-tok", 1)

    config = tmp_path / "curate.yaml"
    config.write_text(yaml.safe_dump({"input": {"paths": ["yaml-raw/"], "text_field": "body"},
                                      "output": {"dir": "yaml-curated", "keep_work": True}}))
    captured(curate)
    resolved = captured.call(["curate", str(config), "-i", "raw/", "-o", "out"])
    assert resolved.input.paths == ["raw/"] and resolved.input.text_field == "body"
    assert resolved.output.dir == "out" and resolved.output.keep_work


def test_an_override_keeps_the_rest_of_its_section(captured, tmp_path):
    """`lmforge sft MODEL train.max_steps=50` keeps SFT's batch and checkpoint defaults."""
    from lmforge.align import run as align_run
    from lmforge.align.config import AlignConfig

    defaults = AlignConfig.model_fields["train"].default
    captured(align_run, "run_sft")
    resolved = captured.call(["sft", "model", "data.train=chat.jsonl", "train.max_steps=50"])
    assert resolved.train.max_steps == 50
    assert resolved.train.global_batch_tokens == defaults.global_batch_tokens != 65536
    assert resolved.train.checkpoint_every == defaults.checkpoint_every != 500
    assert resolved.optim.lr == AlignConfig.model_fields["optim"].default.lr
    assert resolved.run.name == "sft" and resolved.model == "model"

    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": "chat.jsonl"}, "train": {"max_steps": 7},
                                      "optim": {"weight_decay": 0.01}}))
    resolved = captured.call(["sft", "model", str(config)])
    assert resolved.train.max_steps == 7 and resolved.train.global_batch_tokens == defaults.global_batch_tokens
    assert resolved.optim.weight_decay == 0.01 and resolved.optim.lr == AlignConfig.model_fields["optim"].default.lr


def test_an_unknown_key_names_its_closest_valid_spelling(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sft", "model", "data.train=x.jsonl", "train.max_step=5"]) == 2
    assert "unknown key 'train.max_step'; did you mean 'train.max_steps'?" in one_line_error(capsys)
    Path("c.yaml").write_text("optim:\n  learning_rate: 0.1\n")
    assert main(["train", "c.yaml", "data.dataset=x"]) == 2
    message = one_line_error(capsys)
    assert "c.yaml: unknown key 'optim.learning_rate'" in message and "allowed: name, lr" in message


def test_help_states_the_precedence_rule_and_overwrite():
    for verb in (["train"], ["serve"], ["tokenize"]):
        done = subprocess.run([sys.executable, "-m", "lmforge", *verb, "--help"], capture_output=True, text=True,
                              env={**os.environ, "COLUMNS": "200"}, timeout=60)
        text = " ".join(done.stdout.replace("│", " ").split())  # rich's boxes wrap long help lines
        assert done.returncode == 0 and "CONFIG.yaml < flags < section.key=value" in text, text
    text = " ".join(subprocess.run([sys.executable, "-m", "lmforge", "tokenize", "--help"], capture_output=True,
                                   text=True, env={**os.environ, "COLUMNS": "200"}, timeout=60).stdout.split())
    assert "--overwrite" in text


# -- outputs never destroy what lmforge did not write ------------------------------------


def _raw(tmp_path: Path, corpus_subset: Path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "docs.jsonl").write_bytes(corpus_subset.read_bytes())
    (raw / "notes.txt").write_text("mine, not lmforge's\n")
    return raw


def test_tokenize_refuses_an_out_dir_that_holds_its_input_or_is_not_its_own(
        corpus_subset, trained_tokenizer, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = _raw(tmp_path, corpus_subset)
    tok = ["--tokenizer", str(trained_tokenizer.path), "--workers", "1", "--val-fraction", "0.1"]
    assert main(["tokenize", "-i", "raw/docs.jsonl", "--out", "raw", *tok]) == 2
    assert "refusing to write the token dataset to raw: it is or contains the input raw/docs.jsonl" in one_line_error(capsys)
    assert sorted(p.name for p in raw.iterdir()) == ["docs.jsonl", "notes.txt"]
    assert main(["tokenize", "-i", "raw/docs.jsonl", "--out", ".", *tok]) == 2
    assert "it is or contains the current directory" in one_line_error(capsys)
    assert main(["tokenize", "-i", "raw/docs.jsonl", "--out", "raw", "--overwrite", *tok]) == 2  # never an input
    assert "the input raw/docs.jsonl" in one_line_error(capsys) and (raw / "notes.txt").is_file()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    assert main(["tokenize", "-i", "raw/docs.jsonl", "--out", "mine", *tok]) == 2
    assert "pass --overwrite" in one_line_error(capsys) and (mine / "thesis.tex").is_file()

    assert main(["tokenize", "-i", "raw/docs.jsonl", "--out", "tokens", *tok]) == 0
    assert atomic.output_kind(tmp_path / "tokens") == "token dataset"
    assert main(["tokenize", "-i", "raw/docs.jsonl", "--out", "tokens", *tok]) == 0  # its own: replaced
    assert main(["tokenize", "-i", "raw/docs.jsonl", "--out", "mine", "--overwrite", *tok]) == 0
    assert not (mine / "thesis.tex").exists() and (mine / "manifest.json").is_file()


def test_report_never_replaces_the_run_dir_or_a_foreign_dir(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.relative_to(trained_run) for p in trained_run.rglob("*"))
    assert main(["report", str(trained_run), "--out", str(trained_run)]) == 2
    assert "it is or contains the input" in one_line_error(capsys)
    assert main(["report", str(trained_run), "--out", str(trained_run.parent), "--overwrite"]) == 2
    assert "contains" in one_line_error(capsys)
    assert sorted(p.relative_to(trained_run) for p in trained_run.rglob("*")) == before

    foreign = tmp_path / "site"
    foreign.mkdir()
    (foreign / "index.html").write_text("my homepage")
    assert main(["report", str(trained_run), "--out", str(foreign)]) == 2
    assert "pass --overwrite" in one_line_error(capsys) and (foreign / "index.html").read_text() == "my homepage"
    assert main(["report", str(trained_run), "--out", "report"]) == 0
    assert main(["report", str(trained_run), "--out", "report"]) == 0  # its own report: replaced
    assert main(["report", str(trained_run), "--out", str(foreign), "--overwrite"]) == 0
    assert "lmforge report" in (foreign / "index.html").read_text()


def test_curate_refuses_a_work_dir_or_output_it_did_not_write(tmp_path, capsys, monkeypatch, corpus_subset):
    monkeypatch.chdir(tmp_path)
    _raw(tmp_path, corpus_subset)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data.bin").write_bytes(b"\0" * 16)
    assert main(["curate", "-i", "raw/docs.jsonl", "-o", "curated", f"output.work_dir={precious}"]) == 2
    assert "refusing to replace" in one_line_error(capsys) and (precious / "data.bin").is_file()
    assert main(["curate", "-i", "raw/docs.jsonl", "-o", "precious"]) == 2
    assert "pass --overwrite" in one_line_error(capsys) and (precious / "data.bin").is_file()
    assert main(["curate", "-i", "raw/docs.jsonl", "-o", "raw"]) == 2
    assert "it is or contains the input" in one_line_error(capsys)
    assert main(["curate", "-i", "raw/", "-o", "raw/curated"]) == 2  # the output would be read back next time
    assert "input" in one_line_error(capsys)


def test_train_classifier_refuses_to_replace_a_foreign_dir(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "weights.safetensors").write_bytes(b"x")
    data = tmp_path / "labelled.jsonl"
    data.write_text('{"text": "hello there", "label": "safe"}\n{"text": "I will hurt you", "label": "violence"}\n')
    assert main(["train-classifier", str(trained_run), "--data", str(data), "--out", str(mine)]) == 2
    assert "pass --overwrite" in one_line_error(capsys) and (mine / "weights.safetensors").is_file()


def test_export_refuses_a_foreign_dir_and_replaces_its_own(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(trained_run), "--out", "model"]) == 0
    assert atomic.output_kind(tmp_path / "model") == "model dir"
    assert main(["export", str(trained_run), "--out", "model"]) == 0  # lmforge's own model dir
    hub = tmp_path / "hub-model"
    hub.mkdir()
    (hub / "config.json").write_text("{}")
    assert main(["export", str(trained_run), "--out", str(hub)]) == 2
    assert "pass --overwrite" in one_line_error(capsys) and (hub / "config.json").read_text() == "{}"
    assert main(["export", str(trained_run), "--out", str(trained_run.parent), "--overwrite"]) == 2
    one_line_error(capsys)
    assert (trained_run / "checkpoints").is_dir()


# -- one line for the user's mistakes; a pointer to the log for lmforge's --------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("verb", [["generate", "{run}"], ["eval", "{run}", "--tasks", "python_mc"],
                                  ["chat", "{run}"], ["serve", "{run}", "--allow-unreleased"],
                                  ["release", "{run}", "--policy", str(ROOT / "configs" / "release.yaml")]])
def test_a_cuda_device_without_cuda_is_one_line(verb, trained_run, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main([v.format(run=trained_run) for v in verb] + ["--device", "cuda"]) == 2
    assert "CUDA is not available" in one_line_error(capsys)


def test_unwritable_and_impossible_outputs_are_one_line(corpus_subset, trained_tokenizer, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a-file").write_text("x")
    tok = ["--tokenizer", str(trained_tokenizer.path), "--workers", "1", "--val-fraction", "0.1"]
    assert main(["tokenize", "-i", str(corpus_subset), "--out", "a-file", *tok]) == 2
    assert "a file of that name exists" in one_line_error(capsys)
    assert main(["tokenize", "-i", str(corpus_subset), "--out", "a-file/tokens", *tok]) == 2
    assert "a-file" in one_line_error(capsys)
    assert main(["tokenizer", "train", "-i", str(corpus_subset), "--out", "a-file/tok", "--vocab-size", "600"]) == 2
    assert "a-file" in one_line_error(capsys)


def test_an_unexpected_error_names_the_verb_and_the_log_and_debug_shows_it(monkeypatch, capsys, tmp_path):
    from lmforge.data import tokenize

    def broken(config):
        raise RuntimeError("an lmforge bug")

    monkeypatch.setattr(tokenize, "run", broken)
    monkeypatch.setenv("LMFORGE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("LMFORGE_DEBUG", "0")  # recorded, so the "1" that --debug sets is undone after the test
    args = ["tokenize", "-i", "x.jsonl", "--tokenizer", "t", "--out", str(tmp_path / "o")]
    assert main(args) == 1
    message = one_line_error(capsys)
    assert "unexpected RuntimeError while running `lmforge tokenize`: an lmforge bug" in message
    logs = list((tmp_path / "logs").glob("crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in message
    assert "Traceback" in logs[0].read_text() and "an lmforge bug" in logs[0].read_text()
    with pytest.raises(RuntimeError, match="an lmforge bug"):
        main([*args, "--debug"])


def test_a_usage_mistake_is_clicks_message_and_exit_2_not_a_crash(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("LMFORGE_DEBUG", "0")
    for args, message in ((["runs", "compare"], "Missing argument"), (["train", "--bogus"], "No such option: --bogus"),
                          (["nosuchverb"], "No such command 'nosuchverb'"), (["release", "x"], "Missing option '--policy'")):
        assert main(args) == 2, args
        err = capsys.readouterr().err
        assert message in err and "unexpected" not in err and "Traceback" not in err
    assert not (tmp_path / "logs").exists()


def test_a_missing_required_value_is_named_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["export", "run-dir"]) == 2
    assert "missing required 'out'" in one_line_error(capsys)
    assert main(["tokenizer", "train"]) == 2
    assert "missing required 'inputs', 'out'" in one_line_error(capsys)
