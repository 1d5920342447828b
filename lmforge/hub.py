"""Hugging Face Hub ids where lmforge takes a path: `org/name[@revision]` -> a local snapshot dir.

A name that exists on disk is always a local path. Otherwise a name shaped `org/name`,
`org/name@revision` or `hf://org/name[@revision]` is a Hub repo, fetched (or found in the
cache) by `huggingface_hub.snapshot_download`: its cache is the one transformers uses
(`HF_HUB_CACHE`, else `$HF_HOME/hub`), and with `HF_HUB_OFFLINE=1` only the cache is read.
Both are read when the id is resolved, not when huggingface_hub was imported, so a test
or a script may set them late. A repo or revision that does not exist, or one not cached
while offline, is a one-line error naming the id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from lmforge.errors import LmforgeError

RepoType = Literal["model", "dataset"]

# owner and name as the Hub spells them; a revision is a branch, tag or commit (branches may hold '/').
_ID = re.compile(r"(?:hf://)?(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")

# What lmforge reads from a model repo: weights as safetensors, configs, tokenizer, chat template,
# card. Other weight formats (pytorch_model.bin, GGUF, ONNX) and remote code stay on the Hub.
MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.md"]
TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "chat_template.jinja", "*.txt", "*.model"]


def parse(name: str | os.PathLike) -> tuple[str, str | None] | None:
    """(repo, revision or None) when `name` is shaped like a Hub id, else None. Local paths are not checked."""
    match = _ID.fullmatch(str(name))
    if match is None or str(name).startswith((".", "/")):
        return None
    return match["repo"], match["revision"]


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether `name` means a Hub repo: shaped `org/name[@revision]` and not a path on this disk."""
    return parse(name) is not None and (str(name).startswith("hf://") or not Path(name).exists())


def offline() -> bool:
    """`HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) set to a true value: read the cache only."""
    return any(os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> str | None:
    """The Hub cache as the environment names it now (None: huggingface_hub's default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def snapshot(repo: str, revision: str | None = None, repo_type: RepoType = "model",
             allow_patterns: list[str] | None = None, error: type[LmforgeError] = LmforgeError) -> Path:
    """The local snapshot dir of `repo` at `revision` (default: main), downloaded unless cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    shown = f"{repo}@{revision}" if revision else repo
    kind = "dataset" if repo_type == "dataset" else "model"
    try:
        return Path(snapshot_download(repo, revision=revision, repo_type=repo_type, cache_dir=cache_dir(),
                                      local_files_only=offline(), allow_patterns=allow_patterns))
    except RevisionNotFoundError:
        raise error(f"Hugging Face Hub {kind} {shown}: no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise error(f"Hugging Face Hub {kind} {shown}: no such repo (or it is private or gated: "
                    "`hf auth login`), and no local path of that name") from None
    except LocalEntryNotFoundError:
        where = cache_dir() or "the default Hugging Face cache"
        reason = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached"
        flags = (" --repo-type dataset" if kind == "dataset" else "") + (f" --revision {revision}" if revision else "")
        raise error(f"{shown}: no local path of that name, and Hugging Face Hub {kind} {shown} is not in {where} "
                    f"({reason}): download it once online (`hf download {repo}{flags}`)") from None
    except (OSError, ValueError) as err:  # HTTP errors, a bad revision name, a full disk
        raise error(f"Hugging Face Hub {kind} {shown}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def resolve(name: str | os.PathLike, repo_type: RepoType = "model", allow_patterns: list[str] | None = None,
            error: type[LmforgeError] = LmforgeError) -> Path:
    """`name` as a local path: itself when it is one (or is not shaped like a Hub id), else its snapshot."""
    if not is_hub_id(name):
        return Path(name)
    repo, revision = parse(name)  # type: ignore[misc]
    return snapshot(repo, revision, repo_type, allow_patterns, error)
