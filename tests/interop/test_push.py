"""`lmforge export ... --push-to-hub REPO`: a dry run lists what would go up; the upload goes
through huggingface_hub's HfApi (replaced here by a recorder: nothing leaves the machine)."""

from __future__ import annotations

import huggingface_hub
import pytest

from lmforge.cli import main


class RecordingApi:
    """HfApi's create_repo and upload_folder, recorded instead of sent."""

    calls: list[tuple[str, dict]] = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return type("Commit", (), {"oid": "f" * 40, "repo_url": f"https://huggingface.co/{kwargs['repo_id']}"})()


class NoNetworkApi:
    def __init__(self, *args, **kwargs):
        raise AssertionError("a dry run must not reach the Hub")


@pytest.fixture
def recording(monkeypatch):
    RecordingApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingApi)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return RecordingApi.calls


def test_a_dry_run_lists_the_files_sizes_and_repo_and_sends_nothing(trained_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "HfApi", NoNetworkApi)
    out = tmp_path / "tiny"
    assert main(["export", str(trained_run), "--out", str(out), "--push-to-hub", "me/tiny", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert "would upload" in printed and "https://huggingface.co/me/tiny (public model repo)" in printed
    assert f"{len(files)} files" in printed
    for name in files:
        assert f"  {name}  " in printed
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files


def test_the_upload_creates_the_repo_and_sends_the_exported_dir(trained_run, tmp_path, recording, capsys):
    out = tmp_path / "tiny"
    assert main(["export", str(trained_run), "--out", str(out), "--push-to-hub", "me/tiny", "--private"]) == 0
    (create, created), (upload, uploaded) = recording
    assert create == "create_repo" and created == {"repo_id": "me/tiny", "repo_type": "model", "private": True,
                                                   "exist_ok": True}
    assert upload == "upload_folder" and uploaded["repo_id"] == "me/tiny" and uploaded["folder_path"] == str(out)
    assert ".*" in uploaded["ignore_patterns"]  # lmforge's hidden markers stay home
    assert "uploaded" in capsys.readouterr().out


def test_a_bad_repo_id_or_offline_mode_is_one_line_before_anything_is_sent(trained_run, tmp_path, recording,
                                                                          monkeypatch, capsys):
    assert main(["export", str(trained_run), "--out", str(tmp_path / "a"), "--push-to-hub", "not a repo"]) == 2
    assert "not a Hub repo id" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main(["export", str(trained_run), "--out", str(tmp_path / "b"), "--dry-run"]) == 2
    assert "--push-to-hub" in capsys.readouterr().err
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export", str(trained_run), "--out", str(tmp_path / "c"), "--push-to-hub", "me/tiny"]) == 2
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and recording == [] and not (tmp_path / "c").exists()
