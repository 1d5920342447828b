"""What ships inside the package: the YAML recipes (`lmforge configs`, a verb takes one by name)
and bundled data named `lmforge://...`, found from any directory and from a built wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from lmforge import shipped
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import ConfigError, DataError
from lmforge.shipped import config_path, resolve_path, shipped_config, shipped_configs

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lmforge"


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def test_every_shipped_config_is_listed_by_name_with_its_first_comment_as_description():
    listed = shipped_configs()
    assert [c.name for c in listed] == sorted(p.stem for p in (PACKAGE / "configs").glob("*.yaml"))
    assert {"sft", "dpo", "curate", "tokenize", "serve", "moderation", "release", "pretrain-small"} <= {c.name for c in listed}
    for config in listed:
        first = config.path.read_text().splitlines()[0]
        assert first == f"# {config.description}" and not config.description.startswith("lmforge ")


def test_the_checkout_configs_dir_is_the_package_configs_dir():
    assert (ROOT / "configs").resolve() == (PACKAGE / "configs").resolve()
    assert (ROOT / "configs" / "sft.yaml").read_text() == shipped_config("sft").path.read_text()


def test_a_config_argument_is_an_existing_file_first_then_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_path("dpo") == config_path("dpo.yaml") == PACKAGE.resolve() / "configs" / "dpo.yaml"
    (tmp_path / "sft.yaml").write_text("run: {name: mine}\n")
    assert config_path("sft.yaml") == Path("sft.yaml")  # a file in the working directory wins
    assert config_path("sft") == shipped_config("sft").path
    with pytest.raises(ConfigError, match=r"config file not found: nope\.yaml \(nor a shipped config: curate, dpo, "):
        config_path("nope.yaml")
    with pytest.raises(ConfigError, match=r"config file not found: configs/sft\.yaml"):
        config_path("configs/sft.yaml")  # a path is a path: no fallback to a name
    with pytest.raises(ConfigError, match=r"no shipped config 'my-sft' \(shipped: curate, "):
        shipped_config("my-sft")


def test_package_paths_resolve_inside_the_installed_package_and_other_paths_pass_unchanged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    chat = resolve_path("lmforge://data/chat/python_docs_chat.jsonl.gz")
    assert Path(chat).is_file() and Path(chat) == shipped.PACKAGE_DIR / "data" / "chat" / "python_docs_chat.jsonl.gz"
    assert Path(resolve_path("lmforge://data/corpus")).is_dir()
    for other in ("data/x.jsonl", "/abs/x.jsonl", "s3://bucket/x.jsonl", "lmforge/data/chat/x"):
        assert resolve_path(other) == other
    with pytest.raises(DataError, match=r"lmforge://data/chat/nope\.jsonl: no such file ships with lmforge"):
        resolve_path("lmforge://data/chat/nope.jsonl")
    with pytest.raises(DataError, match="no such file ships with lmforge"):
        resolve_path("lmforge://../pyproject.toml")  # outside the package


def test_every_reader_of_user_paths_resolves_package_paths(tmp_path, monkeypatch):
    from lmforge.align.data import read_conversations, read_preferences
    from lmforge.data.curate.reader import expand_inputs as curate_inputs
    from lmforge.data.readers import expand_inputs
    from lmforge.eval.tasks import resolve_task, resolve_tasks
    from lmforge.safety.release import load_policy

    monkeypatch.chdir(tmp_path)
    corpus = shipped.PACKAGE_DIR / "data" / "corpus" / "python_docs.jsonl.gz"
    assert expand_inputs(["lmforge://data/corpus/python_docs.jsonl.gz"]) == [corpus]
    assert expand_inputs(["lmforge://data/corpus"]) == [corpus]
    assert curate_inputs(["lmforge://data/corpus/python_docs.jsonl.gz"]) == [str(corpus)]
    assert len(read_conversations("lmforge://data/chat/python_docs_chat.jsonl.gz")) == 144
    pairs = read_preferences("lmforge://data/chat/python_docs_preferences.jsonl.gz")
    assert len(pairs) == 388 and pairs[0][0] == "lmforge://data/chat/python_docs_preferences.jsonl.gz:1"
    assert resolve_task("lmforge://eval/tasks/arithmetic.yaml").spec.name == resolve_task("arithmetic").spec.name
    assert [t.spec.name for t in resolve_tasks("lmforge://eval/tasks/safety.yaml")] == ["safety_harmful", "safety_benign"]
    assert load_policy("lmforge://configs/release.yaml")[1] == load_policy("release")[1]
    with pytest.raises(DataError, match="lmforge://data/chat/missing.jsonl: no such file ships with lmforge"):
        read_preferences("lmforge://data/chat/missing.jsonl")


def test_shipped_configs_name_bundled_data_only_through_the_package():
    for config in shipped_configs():
        data = yaml.safe_load(config.path.read_text()) or {}
        for value in _strings(data):
            assert not value.startswith(("lmforge/", "./lmforge/", "configs/")), (config.name, value)
            if value.startswith("lmforge://"):
                assert Path(resolve_path(value)).exists(), (config.name, value)


def test_every_shipped_config_validates_against_its_verb(tmp_path, monkeypatch):
    from lmforge.align.config import AlignConfig
    from lmforge.data.curate.config import CurateConfig
    from lmforge.data.tokenize import TokenizeConfig
    from lmforge.safety import policy, release
    from lmforge.serve.config import ServeConfig

    monkeypatch.chdir(tmp_path)  # nothing may depend on the checkout being the working directory
    from lmforge.align.rl_config import RLConfig

    verbs = {"curate": CurateConfig, "tokenize": TokenizeConfig, "serve": ServeConfig,
             "sft": AlignConfig, "dpo": AlignConfig, "rm": AlignConfig, "rl": RLConfig}
    for config in shipped_configs():
        if config.name == "moderation":
            assert policy.load_policy("moderation").input["secrets"] == "block"
        elif config.name == "release":
            assert release.load_policy("release")[0].name == "default-release"
        elif config.name.startswith("pretrain-"):
            continue  # the next test
        elif config.name.startswith("sweep-"):  # a sweep spec: its own keys, and its base a shipped recipe
            from lmforge.experiments.spec import SweepSpec, trial_config

            spec = SweepSpec.model_validate(yaml.safe_load(config.path.read_text()))
            assert spec.grid_size() > 1 and trial_config(spec, []).data.dataset
        else:  # curate's recipe leaves input.paths for the command line to give
            overrides = ["input.paths=[raw/]"] if config.name == "curate" else []
            verb = config.name.split("-")[0]  # sft-arithmetic: an sft recipe
            load_config(verbs[verb], config_path(config.name), overrides,
                        base={"model": "m"} if verb in ("sft", "dpo", "rm", "rl") else None)


def test_a_shipped_pretrain_recipe_loads_as_written_with_its_preset_shape(tmp_path, monkeypatch):
    from lmforge.train.config import TrainConfig

    monkeypatch.chdir(tmp_path)
    for config in shipped_configs():
        if config.name.startswith("pretrain-"):
            # What the command line loads is what the YAML says: the preset's dim, layers and
            # context, not the default model's filled in around a new preset name.
            written = TrainConfig.model_validate(yaml.safe_load(config.path.read_text()))
            assert load_config(TrainConfig, config_path(config.name), []) == written, config.name


def test_lmforge_configs_lists_them_and_shows_one_by_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["configs"]) == 0
    listing = capsys.readouterr().out
    assert all(c.name in listing for c in shipped_configs())
    assert main(["configs", "show", "dpo"]) == 0
    assert capsys.readouterr().out == shipped_config("dpo").path.read_text()
    assert main(["configs", "show", "sft.yaml", "--path"]) == 0
    assert capsys.readouterr().out.strip() == str(shipped_config("sft").path)
    assert main(["configs", "show", "nope"]) == 2
    assert "no shipped config 'nope'" in capsys.readouterr().err


def test_a_verb_takes_a_shipped_config_by_name_from_any_directory(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # tokenize's shipped recipe reads the bundled corpus; its tokenizer is not there: a one-line
    # error about the tokenizer (not the config or the corpus) shows both were found.
    assert main(["tokenize", "tokenize", "tokenizer=missing-tok", "out=toks"]) == 2
    err = capsys.readouterr().err
    assert "missing-tok" in err and "config" not in err and not (tmp_path / "toks").exists()
    assert main(["train", "nope", "train.max_steps=1"]) == 2
    assert "config file not found: nope (nor a shipped config: curate, dpo" in capsys.readouterr().err


def _build_wheel(tmp_path: Path) -> Path:
    """Build a wheel from a copy of the checkout (no build/ or egg-info left in the tree)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "lmforge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           str(src), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PIP_NO_INDEX": "1"})
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("lmforge-*.whl")
    return wheel


def test_the_wheel_ships_every_config_and_every_bundled_data_file_and_finds_them_installed(tmp_path):
    wheel = _build_wheel(tmp_path)
    files = set(zipfile.ZipFile(wheel).namelist())
    shipped_files = [p for d in ("configs", "data/chat", "data/corpus", "data/moderation", "eval/tasks")
                     for p in (PACKAGE / d).iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")]
    missing = [str(p.relative_to(ROOT)) for p in shipped_files if str(p.relative_to(ROOT)) not in files]
    assert not missing, f"not in the wheel: {missing}"
    assert "lmforge/configs/dpo.yaml" in files and "lmforge/data/chat/python_docs_preferences.jsonl.gz" in files

    # Installed from the wheel (its files unpacked onto the path), run from an unrelated
    # directory: shipped names and lmforge:// paths resolve inside the installed package.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import yaml; from lmforge.shipped import config_path, resolve_path, shipped_configs\n"
             "for c in shipped_configs():\n"
             "    print(config_path(c.name))\n"
             "    stack = [yaml.safe_load(c.path.read_text())]\n"
             "    while stack:\n"
             "        v = stack.pop()\n"
             "        if isinstance(v, dict): stack += v.values()\n"
             "        elif isinstance(v, list): stack += v\n"
             "        elif isinstance(v, str) and v.startswith('lmforge://'): print(resolve_path(v))\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(site)})
    assert done.returncode == 0, done.stderr
    paths = [Path(line) for line in done.stdout.splitlines()]
    # One path per config, plus the data each names: sft, dpo, rm, sft-arithmetic one file each,
    # rl-arithmetic two (train and test prompts), tokenize the corpus.
    assert len(paths) == len(shipped_configs()) + 7
    assert all(p.is_relative_to(site / "lmforge") and p.exists() for p in paths), paths
