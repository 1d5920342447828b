"""`lmforge eval run` saving its results: earlier results are replaced, a user's files never."""

from __future__ import annotations

from lmforge.cli import main


def test_eval_replaces_its_own_results_but_never_a_file_it_did_not_write(trained_run, pretrain_data, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text(pretrain_data["docs"].read_text(encoding="utf-8")[:2000], encoding="utf-8")
    out = tmp_path / "results"
    args = ["eval", "run", str(trained_run), "--data", str(text), "--limit", "2", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    assert main(args) == 0  # a rerun replaces the results it wrote
    (result,) = out.glob("*.json")
    result.write_text('{"mine": true}\n', encoding="utf-8")  # now the user's own file of that name
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the log lines, when logging goes to stderr
    assert err == f"error: refusing to replace {result}: it is not an lmforge eval result (choose another --out)"
    assert result.read_text(encoding="utf-8") == '{"mine": true}\n'


def test_a_bits_per_byte_result_records_its_text_files_hash_so_verify_reaches_it(trained_run, pretrain_data, tmp_path,
                                                                                  capsys):
    text = tmp_path / "held-out.txt"
    text.write_text(pretrain_data["docs"].read_text(encoding="utf-8")[:2000], encoding="utf-8")
    out = tmp_path / "results"
    assert main(["eval", "run", str(trained_run), "--data", str(text), "--limit", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    (result,) = out.glob("*.json")
    capsys.readouterr()
    assert main(["verify", str(result)]) == 0
    assert f"raw file: {text}" in capsys.readouterr().out
    text.write_text(text.read_text(encoding="utf-8") + " ", encoding="utf-8")
    assert main(["verify", str(result)]) == 1
    assert f"lineage BROKEN at raw file {text}: recorded " in capsys.readouterr().err
