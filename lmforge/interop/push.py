"""`lmforge export ... --push-to-hub org/name`: upload an exported model dir to the Hugging Face Hub.

`create_repo` (kept if it exists) then one `upload_folder` commit, as `push_to_hub` does in
transformers. Credentials are huggingface_hub's own (`hf auth login`, `HF_TOKEN`). A dry
run lists the files, their sizes and the repo, and touches no network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lmforge import hub
from lmforge.errors import ConfigError, OutputError

HUB_URL = "https://huggingface.co"


@dataclass
class PushResult:
    repo: str
    private: bool
    files: list[tuple[str, int]]  # (path inside the repo, bytes)
    dry_run: bool
    url: str = ""
    commit: str | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # unreachable


def files_to_upload(directory: Path) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file the upload sends: all but hidden ones (lmforge's markers)."""
    found = sorted(p for p in directory.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    return [(p.relative_to(directory).as_posix(), p.stat().st_size) for p in found]


def check_push(repo: str, dry_run: bool = False) -> None:
    """A one-line error unless `repo` is `org/name` and (for a real upload) the Hub is not off:
    checked before the export, not after it."""
    parsed = hub.parse(repo)
    if parsed is None or parsed[1] is not None or repo.startswith("hf://"):
        raise ConfigError(f"--push-to-hub: {repo!r} is not a Hub repo id (org/name)")
    if not dry_run and hub.offline():
        raise ConfigError(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set; unset it to upload (or pass --dry-run)")


def push_to_hub(directory: str | os.PathLike, repo: str, private: bool = False, dry_run: bool = False,
                commit_message: str | None = None) -> PushResult:
    """Upload `directory` (an exported model dir) as the Hub model repo `repo`; with `dry_run`, only plan it."""
    directory = Path(directory)
    check_push(repo, dry_run)
    files = files_to_upload(directory)
    if not files:
        raise OutputError(f"--push-to-hub: {directory} holds no files to upload")
    result = PushResult(repo, private, files, dry_run, url=f"{HUB_URL}/{repo}")
    visibility = "private" if private else "public"
    verb = "would upload" if dry_run else "uploaded"
    result.lines = [f"{verb} {len(files)} files ({_size(result.total_bytes)}) to {result.url} ({visibility} model repo)"]
    result.lines += [f"  {name}  {_size(size)}" for name, size in files]
    if dry_run:
        return result
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id=repo, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, repo_type="model", folder_path=str(directory),
                                   ignore_patterns=[".*", "**/.*"],
                                   commit_message=commit_message or f"Upload {directory.name} with lmforge")
    except (OSError, ValueError) as err:  # HTTP errors (401, 403, 409), no network: huggingface_hub's are OSErrors
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OutputError(f"--push-to-hub {repo}: upload failed ({reason}); log in with `hf auth login` "
                          "or set HF_TOKEN") from None
    result.commit = getattr(commit, "oid", None)
    result.url = getattr(commit, "repo_url", None) or result.url
    return result
