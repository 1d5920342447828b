"""`lmforge tokenizer train` into a dir that holds other things: it never replaces what it did not write."""

from __future__ import annotations

from lmforge.cli import main


def test_tokenizer_train_refuses_to_replace_a_lineage_json_it_did_not_write(corpus_subset, tmp_path, capsys):
    out = tmp_path / "curated"
    out.mkdir()
    theirs = out / "lineage.json"
    theirs.write_text('{"kind": "curated dataset, from another tool"}\n', encoding="utf-8")
    args = ["tokenizer", "train", "-i", str(corpus_subset), "--out", str(out), "--vocab-size", "300"]
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: refusing to replace {theirs}: lmforge did not train it (pass --overwrite to replace it, "
        "or choose another --out)")
    assert theirs.read_text(encoding="utf-8") == '{"kind": "curated dataset, from another tool"}\n'
    assert not (out / "tokenizer.json").exists()
    assert main([*args, "--overwrite"]) == 0  # asked: replaced
    assert main(args) == 0  # its own output now: a rerun replaces it
