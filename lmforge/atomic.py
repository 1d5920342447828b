"""Atomic writes and output guards.

Writes go to a temp name, are fsynced, then renamed: a crash never leaves a file a later
step would trust. Output dirs are replaced only when lmforge wrote them: every dir that
`atomic_dir(path, kind)` publishes holds a marker naming its kind, and `check_output_dir`
refuses to replace anything else unless the user says `--overwrite` -- and refuses, even
then, an output that would swallow an input, a run dir or the current directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge import __version__
from lmforge.errors import OutputError

# Beside every output dir lmforge publishes: {"kind": ..., "created_by": ...}.
MARKER_FILE = ".lmforge-output.json"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object that lmforge wrote, or {} when it is absent, unreadable or not an object.

    For records a reader can do without (manifests, trainer state, eval results in a listing).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str | None = None) -> Iterator[Path]:
    """Yield a temp dir beside `path`; on success it replaces `path`, on failure it is removed.

    With `kind`, the published dir carries lmforge's marker for that kind of artifact, so a
    later run may replace it (see `check_output_dir`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create {path.parent}: {err.strerror}") from None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if kind is not None:
            write_json(tmp / MARKER_FILE, {"kind": kind, "created_by": _created_by()})
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _created_by() -> str:
    return f"lmforge {__version__}"


def output_kind(path: str | os.PathLike) -> str | None:
    """The kind of artifact lmforge's marker in `path` names, or None."""
    try:
        return json.loads((Path(path) / MARKER_FILE).read_text(encoding="utf-8")).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def is_run_dir(path: Path) -> bool:
    """A training run dir: a resolved config beside checkpoints or metrics."""
    return (path / "config.yaml").is_file() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file())


def _run_dir_within(root: Path, depth: int = 2) -> Path | None:
    """A run dir at `root` or up to `depth` levels below it (a `runs/` dir holds them one level down)."""
    if is_run_dir(root):
        return root
    if depth == 0:
        return None
    with contextlib.suppress(OSError):
        for child in sorted(root.iterdir()):
            if child.is_dir() and not child.is_symlink() and (found := _run_dir_within(child, depth - 1)):
                return found
    return None


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output_dir(
    out: str | os.PathLike,
    kind: str,
    *,
    overwrite: bool = False,
    inputs: tuple[str | os.PathLike, ...] | list[str | os.PathLike] = (),
    signature: str | None = None,
    allow_run_dir: bool = False,
    read_inputs_recursively: bool = False,
) -> Path:
    """Refuse, with one line naming both paths, an output dir whose replacement would lose data.

    Always refused: the current directory or one of its parents, a dir that is or contains
    one of `inputs`, a dir that is or contains a training run dir (unless `allow_run_dir`),
    and, for readers that walk input dirs (`read_inputs_recursively`), a dir inside an input
    dir: the next run would read the output back as input.
    Replaced: a missing or empty dir, one that holds lmforge's marker for `kind` (or, for
    outputs written before markers, the `signature` file of that kind), or any dir with
    `overwrite`. Anything else is refused with a hint to pass --overwrite.
    """
    out = Path(out)
    resolved = out.resolve()
    here = Path.cwd().resolve()
    if _contains(resolved, here):
        raise OutputError(f"refusing to write the {kind} to {out}: it is or contains the current directory ({here})")
    for source in inputs:
        if source is None or "://" in str(source):
            continue
        source_path = Path(source).resolve()
        if _contains(resolved, source_path):
            raise OutputError(f"refusing to write the {kind} to {out}: it is or contains the input {source}")
        if read_inputs_recursively and source_path.is_dir() and source_path in resolved.parents:
            raise OutputError(f"refusing to write the {kind} to {out}: it lies inside the input dir {source}, "
                              "whose files the next run would read back")
    if out.exists() and not out.is_dir():
        raise OutputError(f"refusing to write the {kind} to {out}: a file of that name exists")
    if not allow_run_dir and out.is_dir() and (run := _run_dir_within(resolved)) is not None:
        raise OutputError(f"refusing to write the {kind} to {out}: it is or contains the run dir {run}")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        found = output_kind(out)
        if found != kind and not (found is None and signature is not None and (out / signature).exists()):
            what = f"lmforge {found}" if found else "something lmforge did not write"
            raise OutputError(f"refusing to replace {out}: it holds {what}, not a {kind} "
                              "(pass --overwrite to replace it, or choose another output dir)")
    parent = next((p for p in [resolved, *resolved.parents] if p.exists()), resolved.anchor)
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write the {kind} to {out}: {parent} is not writable")
    return out


def mark_output_dir(path: str | os.PathLike, kind: str) -> None:
    """Claim a dir that lmforge fills in place (not through `atomic_dir`) as a `kind` output."""
    if output_kind(path) != kind:
        write_json(Path(path) / MARKER_FILE, {"kind": kind, "created_by": _created_by()})
