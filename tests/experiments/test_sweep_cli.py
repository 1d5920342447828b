"""`lmforge sweep SPEC.yaml` runs a sweep end to end; a bad spec is one line and exit 2;
`lmforge sweep report DIR` prints the trials and writes the HTML page."""

from __future__ import annotations

import json

import yaml

from lmforge.cli import main
from tests.experiments.test_sweep import spec_data


def test_lmforge_sweep_runs_a_spec_file_with_overrides_and_reports_it(pretrain_data, tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_data(tmp_path, pretrain_data["tokens"], sampler="random", trials=3,
                                             space={"optim.lr": {"low": 1.0e-3, "high": 1.0e-2, "log": True}})))
    assert main(["sweep", str(path), "trials=1", "executor.max_parallel=1"]) == 0
    out = capsys.readouterr().out
    assert "t0000 done" in out and "best t0000: val_loss" in out and "optim.lr=" in out
    directory = tmp_path / "sweeps" / "s"
    assert json.loads((directory / "sweep.json").read_text())["counts"]["done"] == 1
    assert main(["sweep", "report", str(directory), "--out", str(tmp_path / "r.html")]) == 0
    out = capsys.readouterr().out
    assert "t0000 *" in out and (tmp_path / "r.html").read_text().startswith("<!doctype html>")
    assert main(["sweep", str(path), "trials=1"]) == 2  # the dir holds a sweep: --resume or --overwrite
    assert "--resume" in capsys.readouterr().err
    assert main(["sweep", str(path), "trials=1", "--resume"]) == 0  # nothing left to run


def test_a_bad_spec_is_one_line_naming_the_key_and_exit_2(tmp_path, capsys):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_data(tmp_path, tmp_path / "tokens", space={"optim.lr": {"values": []}})))
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "space.optim.lr" in err and "\n" not in err
    assert not (tmp_path / "sweeps").exists()
