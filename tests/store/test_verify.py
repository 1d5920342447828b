"""`lmforge verify`: a served model's chain back to the raw files, every hash recomputed.

One small pipeline through the real CLI (raw jsonl -> curate -> tokenizer -> tokenize -> train
-> export -> eval -> release), then verified whole and with one byte changed at each end.
"""

from __future__ import annotations

import gzip
import itertools
import json
from contextlib import contextmanager
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.store import hashes
from lmforge.store.weights import weights_digest
from tests.conftest import bundled_corpus

FAST_CURATION = [f"{step}.enabled=false" for step in ("gopher_repetition", "gopher_quality", "c4", "fineweb",
                                                      "toxicity", "decontaminate")] + ["minhash.enabled=false",
                                                                                       "executor.workers=1"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lineage")
    raw = root / "raw" / "docs.jsonl"
    raw.parent.mkdir()
    with gzip.open(bundled_corpus(), "rt", encoding="utf-8") as src, open(raw, "w", encoding="utf-8") as dst:
        for line in itertools.islice(src, 300):
            dst.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    paths = {"raw": raw, "curated": root / "curated", "tokenizer": root / "tokenizer", "tokens": root / "tokens",
             "run": root / "runs" / "lineage", "model": root / "model"}
    assert main(["curate", "-i", str(raw), "-o", str(paths["curated"]), *FAST_CURATION]) == 0
    assert main(["tokenizer", "train", "-i", str(paths["curated"]), "--out", str(paths["tokenizer"]),
                 "--vocab-size", "512"]) == 0
    assert main(["tokenize", "-i", str(paths["curated"]), "--tokenizer", str(paths["tokenizer"]),
                 "--out", str(paths["tokens"]), "--workers", "1", "--val-fraction", "0.1"]) == 0
    assert main(["train", "run.name=lineage", f"run.out_dir={root / 'runs'}", "model.preset=tiny",
                 "model.max_seq_len=128", f"data.dataset={paths['tokens']}", "data.seq_len=64",
                 "schedule.warmup_steps=1", "train.max_steps=3", "train.global_batch_tokens=512",
                 "train.micro_batch_size=8", "train.device=cpu", "train.eval_every=0", "train.checkpoint_every=0",
                 "train.progress=false"]) == 0
    assert main(["export", str(paths["run"]), "--out", str(paths["model"])]) == 0
    policy = root / "policy.yaml"
    policy.write_text("name: lineage-test\ntasks: [python_mc]\nlimit: 4\nthresholds:\n  python_mc/acc: {min: 0.0}\n")
    assert main(["release", str(paths["model"]), "--policy", str(policy)]) == 0
    return paths


def verify(path: Path, capsys, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["verify", str(path), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


@contextmanager
def one_byte_changed(path: Path):
    data = path.read_bytes()
    path.write_bytes(bytes([data[0] ^ 0x01]) + data[1:])
    try:
        yield path
    finally:
        path.write_bytes(data)


def test_a_released_model_verifies_back_to_the_raw_files(pipeline, capsys):
    code, out = verify(pipeline["model"] / "release.json", capsys)
    assert code == 0, out
    for link in ("release record:", "release policy:", "eval result:", "model dir:", "checkpoint:", "run config:",
                 "token dataset:", "token shards:", "tokenizer:", "curated dataset:", "curated shards:",
                 f"raw file: {pipeline['raw'].resolve()}"):
        assert link in out, link
    assert "BROKEN" not in out
    assert out.rstrip().splitlines()[-1].startswith("lineage intact")


@pytest.mark.parametrize("artifact", ["model", "run", "tokens", "tokenizer", "curated"])
def test_every_artifact_of_the_pipeline_verifies_on_its_own(pipeline, capsys, artifact):
    code, out = verify(pipeline[artifact], capsys)
    assert code == 0, out
    assert f"raw file: {pipeline['raw'].resolve()}" in out


def test_one_changed_byte_in_a_token_shard_is_named_and_fails(pipeline, capsys):
    shard = pipeline["tokens"] / "train" / "shard-00000.bin"
    with one_byte_changed(shard):
        code, out = verify(pipeline["model"], capsys)
        assert code == 1
        assert "BROKEN" in out and str(shard) in out
        assert f"lineage BROKEN at token shard {shard}" in out
        code, out = verify(pipeline["model"], capsys, "--format", "json")
        report = json.loads(out)
        assert code == 1 and not report["intact"]
        assert report["first_break"]["path"] == str(shard) and report["first_break"]["kind"] == "token shard"
    assert verify(pipeline["model"], capsys)[0] == 0


def test_one_changed_byte_in_a_raw_input_file_is_named_and_fails(pipeline, capsys):
    with one_byte_changed(pipeline["raw"]):
        code, out = verify(pipeline["tokens"], capsys)
    assert code == 1
    assert f"lineage BROKEN at raw file {pipeline['raw'].resolve()}" in out


def test_changed_weights_break_the_chain_at_the_model_file(pipeline, capsys):
    weights = pipeline["model"] / "model.safetensors"
    with one_byte_changed(weights):
        code, out = verify(pipeline["model"] / "release.json", capsys)
    assert code == 1 and str(weights) in out


def test_the_model_card_lists_the_chain(pipeline):
    card = (pipeline["model"] / "model_card.md").read_text(encoding="utf-8")
    assert "Chain back to the raw files" in card
    for link in ("checkpoint:", "token dataset:", "tokenizer:", "curated dataset:", str(pipeline["raw"].resolve())):
        assert link in card, link


def test_records_hash_their_inputs(pipeline):
    manifest = json.loads((pipeline["run"] / "manifest.json").read_text())
    assert manifest["config_sha256"] == hashes.sha256_file(pipeline["run"] / "config.yaml")
    lineage = json.loads((pipeline["model"] / "lineage.json").read_text())
    assert lineage["weights_digest"] == weights_digest(pipeline["model"])
    assert lineage["inputs"][0]["kind"] == "checkpoint"
    release = json.loads((pipeline["model"] / "release.json").read_text())
    assert all(hashes.sha256_file(path) == digest for path, digest in release["evals"].items())


def test_a_path_that_is_no_artifact_is_a_one_line_error(tmp_path, capsys):
    code, out = verify(tmp_path, capsys)
    assert code == 2 and "not an lmforge artifact" in out


def test_serve_reports_the_model_and_release_digests(pipeline, monkeypatch, tmp_path):
    from fastapi.testclient import TestClient

    import lmforge.serve.server as server

    served = {}
    monkeypatch.setattr(server.uvicorn, "run", lambda app, **kwargs: served.setdefault("app", app))
    assert main(["serve", str(pipeline["model"]), "engine.device=cpu", "server.log_level=warning",
                 f"audit.path={tmp_path / 'audit.sqlite'}"]) == 0  # not serve_audit.sqlite in the repo root
    model_digest = f"sha256:{weights_digest(pipeline['model'])}"
    release_digest = f"sha256:{hashes.sha256_file(pipeline['model'] / 'release.json')}"
    with TestClient(served["app"]) as client:
        models = client.get("/v1/models")
        assert models.headers["x-lmforge-model-digest"] == model_digest
        assert models.headers["x-lmforge-release-digest"] == release_digest
        entry = models.json()["data"][0]
        assert entry["model_digest"] == model_digest and entry["release_digest"] == release_digest
        reply = client.post("/v1/completions", json={"model": entry["id"], "prompt": "The list", "max_tokens": 2})
        assert reply.status_code == 200 and reply.headers["x-lmforge-model-digest"] == model_digest


def test_a_fine_tune_verifies_through_its_data_file_and_parent_weights(pipeline, tmp_path, capsys):
    texts = [json.loads(line)["text"] for line in pipeline["raw"].read_text(encoding="utf-8").splitlines()[:40]]
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "Continue: " + t[:60]},
                                                      {"role": "assistant", "content": t[60:160]}]}) + "\n"
                             for t in texts), encoding="utf-8")
    assert main(["sft", str(pipeline["run"]), "run.name=sft", f"run.out_dir={tmp_path / 'runs'}",
                 f"data.train={chats}", "data.seq_len=64", "train.max_steps=2", "train.global_batch_tokens=256",
                 "train.micro_batch_size=4", "train.device=cpu", "train.eval_every=0", "train.progress=false"]) == 0
    code, out = verify(tmp_path / "runs" / "sft", capsys)
    assert code == 0, out
    assert f"raw file: {chats}" in out and "checkpoint: " + str(pipeline["run"].resolve()) in out
    assert f"raw file: {pipeline['raw'].resolve()}" in out  # through the parent's token dataset
    with one_byte_changed(chats):
        code, out = verify(tmp_path / "runs" / "sft", capsys)
    assert code == 1 and f"lineage BROKEN at raw file {chats}" in out


def test_eval_results_written_with_out_elsewhere_verify_as_eval_results(pipeline, tmp_path, capsys):
    out = tmp_path / "my-evals"
    assert main(["eval", "run", str(pipeline["model"]), "--tasks", "python_mc", "--limit", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    code, out_text = verify(out / "python_mc.json", capsys)
    assert code == 0 and out_text.startswith(f"OK         eval result: {out / 'python_mc.json'}"), out_text
    assert f"model dir: {pipeline['model']}" in out_text
    code, out_text = verify(out, capsys)  # the whole --out dir
    assert code == 0 and out_text.startswith(f"OK         eval results: {out}"), out_text
