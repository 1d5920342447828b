"""Hugging Face Hub ids (`org/name[@revision]`) wherever a model path is accepted, read from a
Hub cache built in the test (`HF_HUB_OFFLINE=1`): nothing is downloaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lmforge import hub
from lmforge.cli import main
from lmforge.errors import LmforgeError

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, files: Path, repo_type: str = "model", commit: str = COMMIT,
               refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay `files` out as huggingface_hub caches a repo: <type>s--org--name/snapshots/<commit>/, refs/<branch>."""
    root = cache / f"{repo_type}s--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    shutil.copytree(files, snapshot)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (root / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Path:
    """The tiny trained model exported as a Hugging Face model dir."""
    out = tmp_path_factory.mktemp("hub") / "tiny"
    assert main(["export", str(trained_run), "--out", str(out)]) == 0
    return out


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_hub_ids_are_told_from_local_paths():
    assert hub.parse("org/name") == ("org/name", None)
    assert hub.parse("org/name@v1.0") == ("org/name", "v1.0")
    assert hub.parse("hf://org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for local in ("./org/name", "/abs/name", "runs/a/b", "name", "org/name/extra"):
        assert hub.parse(local) is None


def test_an_existing_local_dir_wins_over_a_hub_id_of_the_same_name(tmp_path, monkeypatch, offline_cache):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert not hub.is_hub_id("org/name")
    assert hub.resolve("org/name") == Path("org/name")


def test_a_cached_repo_resolves_by_branch_and_by_commit_offline(tmp_path, offline_cache):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "config.json").write_text("{}")
    snapshot = cache_repo(offline_cache, "org/tiny", tmp_path / "files")
    assert hub.resolve("org/tiny") == snapshot
    assert hub.resolve("org/tiny@main") == snapshot
    assert hub.resolve(f"org/tiny@{COMMIT}") == snapshot


def test_generate_eval_and_import_take_a_hub_id_from_the_cache(exported, offline_cache, tmp_path, capsys):
    cache_repo(offline_cache, "org/tiny", exported)
    prompt = ["--prompt", "The interpreter", "--max-tokens", "8", "--seed", "1", "--temperature", "0"]
    assert main(["generate", str(exported), *prompt, "--device", "cpu"]) == 0
    local = capsys.readouterr().out
    assert main(["generate", "org/tiny@main", *prompt, "--device", "cpu"]) == 0
    assert capsys.readouterr().out == local

    text = tmp_path / "held_out.txt"
    text.write_text("Exceptions propagate up the stack until a handler catches them.\n")
    assert main(["eval", "org/tiny", "--data", str(text), "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    (result,) = (tmp_path / "eval").glob("*.json")
    assert json.loads(result.read_text())["model"] == "org/tiny"

    assert main(["import", "org/tiny", "--out", str(tmp_path / "imported")]) == 0
    assert (tmp_path / "imported" / "config.json").is_file()


def test_a_hub_id_neither_cached_nor_local_is_one_line_naming_it(exported, offline_cache, capsys):
    cache_repo(offline_cache, "org/tiny", exported)
    assert main(["generate", "org/absent", "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "org/absent" in err and "HF_HUB_OFFLINE" in err and "\n" not in err
    assert main(["generate", "org/tiny@v9", "--prompt", "x"]) == 2
    assert "org/tiny@v9" in capsys.readouterr().err


def test_a_tokenizer_is_named_by_hub_id(exported, offline_cache):
    from lmforge.tokenizer import load_tokenizer

    cache_repo(offline_cache, "org/tiny", exported)
    assert load_tokenizer("org/tiny").hash() == load_tokenizer(exported).hash()
    with pytest.raises(LmforgeError, match="org/missing"):
        load_tokenizer("org/missing")


def test_eval_reads_a_task_from_a_cached_hub_dataset_as_from_its_jsonl(exported, offline_cache, tmp_path):
    pytest.importorskip("datasets")
    from lmforge.eval.tasks import SHIPPED_DIR

    cache_repo(offline_cache, "org/tiny", exported)
    (tmp_path / "repo" / "data").mkdir(parents=True)
    shutil.copy(SHIPPED_DIR / "python_mc.jsonl", tmp_path / "repo" / "data" / "test.jsonl")
    cache_repo(offline_cache, "org/python_mc", tmp_path / "repo", repo_type="dataset")
    scores = {}
    for task in ("org/python_mc:test", str(SHIPPED_DIR / "python_mc.jsonl")):
        out = tmp_path / f"eval-{len(scores)}"
        assert main(["eval", "org/tiny", "--tasks", task, "--limit", "6", "--device", "cpu", "--out", str(out)]) == 0
        (result,) = (json.loads(p.read_text()) for p in out.glob("*.json"))
        scores[task] = (result["n"], result["metrics"])
    assert scores["org/python_mc:test"] == scores[str(SHIPPED_DIR / "python_mc.jsonl")]


def test_the_serve_gate_reads_the_release_record_beside_a_hub_snapshot(exported, offline_cache):
    from lmforge.safety.release import RELEASE_FILE, check_released
    from lmforge.store.weights import weight_file_hashes

    snapshot = cache_repo(offline_cache, "org/tiny", exported)
    with pytest.raises(LmforgeError, match="org/tiny has no release record"):
        check_released("org/tiny")
    (snapshot / RELEASE_FILE).write_text(json.dumps({"passed": True, "weight_files": weight_file_hashes(exported)}))
    assert check_released("org/tiny@main")["passed"]


def test_sft_fine_tunes_a_hub_model_from_the_cache(exported, offline_cache, tmp_path):
    import yaml

    from tests.align.test_sft_dpo import config

    snapshot = cache_repo(offline_cache, "org/tiny", exported)
    chats = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                           {"role": "assistant", "content": str(2 * i)}]} for i in range(16)]
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    cfg = config("org/tiny", tmp_path / "runs", {"train": str(tmp_path / "sft.jsonl"), "val_fraction": 0},
                 train={"max_steps": 2, "eval_every": 0, "checkpoint_every": 0})
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["sft", "org/tiny@main", str(tmp_path / "sft.yaml")]) == 0
    manifest = json.loads((tmp_path / "runs" / "a" / "manifest.json").read_text())
    assert manifest["parent"] == str(snapshot.resolve())


def test_the_download_hint_for_an_uncached_hub_id_names_its_revision_and_repo_type(offline_cache, capsys):
    from lmforge import hub
    from lmforge.errors import LmforgeError

    with pytest.raises(LmforgeError) as err:
        hub.resolve("org/absent@v2", "dataset")
    assert str(err.value).endswith("(`hf download org/absent --repo-type dataset --revision v2`)")
    assert main(["generate", "org/absent@v2", "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip().endswith("(`hf download org/absent --revision v2`)")
