"""Flags against CONFIG.yaml: a flag the user typed wins, both its `--x` and its `--no-x` form."""

from __future__ import annotations

import pytest
import yaml

from lmforge.cli import main


@pytest.mark.parametrize("verb", [["tokenize"], ["tokenizer", "train"], ["quickstart"], ["export", "m"],
                                  ["import", "m"], ["lora", "merge", "m"], ["train-classifier", "m"]])
def test_no_overwrite_on_the_command_line_wins_over_overwrite_true_in_the_config_file(verb, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(f"overwrite: true\nout: {tmp_path / 'out'}\n", encoding="utf-8")

    def printed(*flags: str) -> bool:
        assert main([*verb, str(config), *flags, "--print-config"]) == 0
        return yaml.safe_load(capsys.readouterr().out)["overwrite"]

    assert printed() is True  # the file decides when no flag is given
    assert printed("--no-overwrite") is False
    config.write_text(f"overwrite: false\nout: {tmp_path / 'out'}\n", encoding="utf-8")
    assert printed("--overwrite") is True


def test_curate_no_overwrite_wins_over_its_config_file(tmp_path, capsys):
    config = tmp_path / "curate.yaml"
    config.write_text(f"input:\n  paths: [{tmp_path}]\noutput:\n  overwrite: true\n", encoding="utf-8")
    assert main(["curate", str(config), "--no-overwrite", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["output"]["overwrite"] is False
