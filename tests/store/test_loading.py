"""Resolving "a model": weights are only ever paired with the tokenizer they were trained with."""

from __future__ import annotations

import shutil

import pytest

from lmforge.data.tokenizer_train import TokenizerTrainConfig, run_train
from lmforge.errors import CheckpointError
from lmforge.store.loading import load_model


@pytest.fixture(scope="module")
def other_tokenizer(pretrain_data, tmp_path_factory):
    """A different tokenizer of the same size: it loads, and would decode garbage."""
    out = tmp_path_factory.mktemp("other-tokenizer")
    return run_train(TokenizerTrainConfig(inputs=[str(pretrain_data["docs"])], out=str(out), vocab_size=1000))


def error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def test_a_run_dir_whose_tokenizer_was_swapped_is_refused(trained_run, other_tokenizer, tmp_path, capsys):
    from lmforge.cli import main

    run = shutil.copytree(trained_run, tmp_path / "run")
    load_model(run)  # as trained: fine
    shutil.copyfile(other_tokenizer.path, run / "tokenizer" / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer .*run/tokenizer/tokenizer.json does not match the weights"):
        load_model(run)
    capsys.readouterr()
    assert main(["generate", str(run), "--prompt", "The module", "--max-tokens", "4"]) == 2
    [err] = error_lines(capsys)
    assert "does not match the weights" in err and "step-0000150" in err


def test_a_checkpoint_from_before_tokenizer_hashes_is_checked_against_the_run_manifest(trained_run, other_tokenizer,
                                                                                     tmp_path):
    import json

    run = shutil.copytree(trained_run, tmp_path / "run")
    state_file = run / "checkpoints" / "step-0000150" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state_file.write_text(json.dumps({k: v for k, v in state.items() if k != "tokenizer_hash"}))
    load_model(run)
    shutil.copyfile(other_tokenizer.path, run / "tokenizer" / "tokenizer.json")
    with pytest.raises(CheckpointError, match="does not match the weights"):
        load_model(run)


def test_a_model_dir_whose_tokenizer_was_swapped_is_refused(trained_run, other_tokenizer, tmp_path):
    from lmforge.interop import export
    from lmforge.store.model_dir import tokenizer_files

    out = tmp_path / "model"
    export.run(export.ExportConfig(model=str(trained_run), out=str(out)))
    load_model(out)
    (out / "tokenizer.json").write_text(tokenizer_files(other_tokenizer, 128)["tokenizer.json"])
    with pytest.raises(CheckpointError, match=r"model/tokenizer.json does not match the weights in .*model"):
        load_model(out)
