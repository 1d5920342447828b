"""`lmforge verify PATH`: walk an artifact's lineage back to the raw files, recomputing every hash.

Each link is one line: the artifact (kind, path), its hash, and OK, BROKEN (and why: missing,
or the hash now differs from the one recorded downstream) or UNRECORDED (an older or foreign
artifact that records nothing to check). A branch stops at its first break: what lies above a
changed file was not what the record vouched for. The records themselves: `store.lineage`.

With `check=False` the walk trusts the recorded hashes and reads no data: how the model
card lists the chain at export without hashing the whole data set again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmforge import atomic
from lmforge.errors import LmforgeError
from lmforge.store import checkpoint, hashes, lineage, token_dataset
from lmforge.store.adapter import is_adapter_dir
from lmforge.store.loading import resolve_checkpoint
from lmforge.store.model_dir import is_model_dir
from lmforge.store.run_dir import EVAL_DIR, RunDir
from lmforge.store.weights import digest_of, weight_files
from lmforge.tokenizer import TOKENIZER_FILE, load_tokenizer

OK, BROKEN, UNRECORDED = "OK", "BROKEN", "UNRECORDED"


class NotAnArtifact(LmforgeError):
    """PATH is not something lmforge wrote a lineage for."""


@dataclass
class Link:
    depth: int
    kind: str
    path: str
    digest: str | None
    status: str
    note: str = ""

    def line(self) -> str:
        digest = (self.digest or "-")[:16]
        note = f"  ({self.note})" if self.note else ""
        return f"{self.status:<10} {'  ' * self.depth}{self.kind}: {self.path}  {digest}{note}"


def kind_of(path: str | os.PathLike) -> str:
    """What kind of artifact `path` is (a file or dir lmforge wrote, or a raw input file)."""
    path = Path(path)
    if path.is_file():
        if path.name == lineage.RELEASE_FILE:
            return lineage.RELEASE
        if path.suffix == ".json" and (path.parent.name == EVAL_DIR or _is_eval_result(path)):
            return lineage.EVAL_RESULT
        if path.name == TOKENIZER_FILE:
            return lineage.TOKENIZER
        return lineage.RAW_FILE
    if not path.is_dir():
        raise NotAnArtifact(f"not found: {path}")
    record = lineage.read(path)
    if atomic.read_json(token_dataset.manifest_path(path)).get("format") == token_dataset.FORMAT:
        return lineage.TOKEN_DATASET
    if record is not None:
        return record["kind"]
    if is_model_dir(path):
        return lineage.MODEL_DIR
    if is_adapter_dir(path):
        return lineage.ADAPTER
    if (path / TOKENIZER_FILE).is_file():
        return lineage.TOKENIZER
    results = sorted(path.glob("*.json"))
    if results and (path.name == EVAL_DIR or all(map(_is_eval_result, results))):  # eval/ or `eval --out DIR`
        return "eval results"
    if checkpoint.STEP_DIR.match(path.name) or RunDir(path).checkpoints.is_dir():
        return lineage.CHECKPOINT
    raise NotAnArtifact(f"{path} is not an lmforge artifact (a model, run, checkpoint, token dataset, curated "
                        "dataset, tokenizer, eval result or release record)")


def _is_eval_result(path: Path) -> bool:
    """A JSON file `lmforge eval` wrote (its task, kind and metrics), wherever --out put it."""
    record = atomic.read_json(path) if path.is_file() else {}
    return isinstance(record, dict) and {"task", "kind", "metrics"} <= record.keys()


class Walk:
    """One walk: the links found so far, the artifacts already expanded, file hashes memoised."""

    def __init__(self, check: bool = True):
        self.check, self.links, self._seen, self._memo = check, [], set(), {}

    # ------------------------------------------------------------------------ primitives

    def sha(self, path: str | os.PathLike) -> str:
        key = str(Path(path).resolve())
        if key not in self._memo:
            self._memo[key] = hashes.sha256_file(key)
        return self._memo[key]

    def weights(self, model: str | os.PathLike) -> dict[str, str]:
        return {f.name: self.sha(f) for f in weight_files(model)}

    def changed_files(self, model: Path, recorded: dict[str, str]) -> list[str]:
        try:
            now = {f.name: f for f in weight_files(model)}
        except (OSError, LmforgeError):
            return sorted(recorded)
        return [str(now[n]) if n in now else n for n, d in recorded.items() if n not in now or self.sha(now[n]) != d]

    def content_hash(self, kind: str, path: Path) -> str:
        """The hash a record keeps of an input of this kind (a token dataset: its manifest's)."""
        if kind == lineage.TOKEN_DATASET:
            return self.sha(token_dataset.manifest_path(path))
        if kind == lineage.TOKENIZER:
            return load_tokenizer(path).hash()
        return self.sha(path)

    def emit(self, depth: int, kind: str, path: Any, digest: str | None, status: str, note: str = "") -> bool:
        self.links.append(Link(depth, kind, str(path), digest, status, note))
        return status != BROKEN

    def link(self, depth: int, kind: str, path: Any, recorded: str | None, compute: Callable[[], str],
             note: str = "") -> bool:
        """Recompute one recorded hash and compare; True when it holds (or nothing was recorded)."""
        if not path:
            return self.emit(depth, kind, "?", recorded, UNRECORDED, "no path recorded")
        if recorded is None:
            return self.emit(depth, kind, path, None, UNRECORDED, note or "no hash recorded")
        if not self.check:
            return self.emit(depth, kind, path, recorded, OK, note)
        try:
            now = compute()
        except (OSError, LmforgeError):
            return self.emit(depth, kind, path, recorded, BROKEN, "missing or unreadable")
        if now != recorded:
            return self.emit(depth, kind, path, now, BROKEN, f"recorded {recorded[:12]}, now {now[:12]}")
        return self.emit(depth, kind, path, now, OK, note)

    def files(self, depth: int, kind: str, directory: Path, recorded: dict[str, str]) -> bool:
        """An artifact's own files against their recorded hashes: one line for all when whole."""
        intact = True
        for name, digest in recorded.items():
            path = directory / name
            if self.check and (not path.is_file() or self.sha(path) != digest):
                intact = self.link(depth, kind, path, digest, lambda p=path: self.sha(p))
        if intact and recorded:
            count = f"{len(recorded)} file" + ("s" if len(recorded) != 1 else "")
            self.emit(depth, f"{kind}s", directory, hashes.sha256_json(recorded), OK, count)
        return intact

    # ------------------------------------------------------------------------ the walk

    def root(self, path: str | os.PathLike) -> list[Link]:
        """Walk `path` and everything it came from."""
        path = Path(path)
        kind = kind_of(path)
        target = resolve_checkpoint(path) if kind == lineage.CHECKPOINT else path
        self.emit(0, kind, target, self.own_digest(kind, target), OK, "verifying")
        self.expand(kind, target, 1)
        return self.links

    def own_digest(self, kind: str, path: Path) -> str | None:
        """The hash downstream records keep of this artifact (a curated dataset: of its shard hashes)."""
        try:
            if kind in (lineage.MODEL_DIR, lineage.CHECKPOINT, lineage.ADAPTER):
                return digest_of(self.weights(path))
            if kind in (lineage.TOKEN_DATASET, lineage.TOKENIZER) or path.is_file():
                return self.content_hash(kind, path)
            return hashes.sha256_json((lineage.read(path) or {}).get("outputs", {}))
        except (OSError, LmforgeError):
            return None

    def expand(self, kind: str, path: Path, depth: int) -> None:
        """Check what `path` holds and what it was made from (each artifact once per walk)."""
        key = (kind, str(path.resolve()))
        if key in self._seen:
            return
        self._seen.add(key)
        expanders = {
            lineage.RAW_FILE: self.raw_origin, lineage.CURATED: self.curated, lineage.TOKENIZER: self.tokenizer,
            lineage.TOKEN_DATASET: self.token_dataset, lineage.CHECKPOINT: self.run,
            lineage.MODEL_DIR: self.model_dir, lineage.ADAPTER: self.adapter, lineage.EVAL_RESULT: self.eval_result,
            "eval results": self.eval_results, lineage.RELEASE: self.release,
        }
        expanders[kind](path, depth)

    def input(self, entry: dict[str, Any], depth: int) -> None:
        """One recorded input: check its hash, then walk on from it."""
        kind, path = entry.get("kind", lineage.RAW_FILE), entry.get("path")
        if kind == lineage.RAW_FILE and path and not Path(path).is_absolute() and not Path(path).exists():
            self.emit(depth, kind, path, entry.get("sha256"), UNRECORDED, "remote input (URL or Hub id): not rehashed")
            return
        if "weights_digest" in entry:
            ok = self.link(depth, kind, path, entry["weights_digest"], lambda: digest_of(self.weights(path)))
            if not ok and entry.get("weight_files"):  # the record kept each file's hash: name the changed ones
                self.links[-1].note += "; changed: " + ", ".join(self.changed_files(Path(path), entry["weight_files"]))
        else:
            ok = self.link(depth, kind, path, entry.get("sha256"), lambda: self.content_hash(kind, Path(path)))
        if ok and path and Path(path).exists():
            self.expand(kind, Path(path), depth + 1)

    # ------------------------------------------------------------------------ artifacts

    def raw_origin(self, path: Path, depth: int) -> None:
        """A raw file lmforge's curation wrote leads on to the curated dataset that holds it."""
        for parent in list(path.resolve().parents)[:4]:
            if atomic.output_kind(parent) == lineage.CURATED and lineage.read(parent) is not None:
                self.emit(depth, lineage.CURATED, parent, self.own_digest(lineage.CURATED, parent), OK,
                          "holds this file")
                self.expand(lineage.CURATED, parent, depth + 1)
                return

    def curated(self, path: Path, depth: int) -> None:
        record = lineage.read(path)
        if record is None:
            self.emit(depth, lineage.CURATED, path, None, UNRECORDED, "no lineage.json")
            return
        if self.files(depth, "curated shard", path, record.get("outputs", {})):
            for entry in record.get("inputs", []):
                self.input(entry, depth)

    def tokenizer(self, path: Path, depth: int) -> None:
        directory = path.parent if path.is_file() else path
        record = lineage.read(directory)
        if record is None:
            self.emit(depth, "tokenizer inputs", directory, None, UNRECORDED, "no lineage.json: training files not recorded")
            return
        if self.link(depth, "tokenizer.json", directory / TOKENIZER_FILE, record.get("tokenizer_hash"),
                     lambda: load_tokenizer(directory).hash(), "as trained"):
            for entry in record.get("inputs", []):
                self.input(entry, depth)

    def token_dataset(self, path: Path, depth: int) -> None:
        manifest = token_dataset.read_manifest(path)
        shards = {s["file"]: s["sha256"] for split in manifest["splits"].values() for s in split.get("shards", [])}
        if not self.files(depth, "token shard", path, shards):
            return
        tok = manifest.get("tokenizer", {})
        if self.link(depth, lineage.TOKENIZER, tok.get("path"), tok.get("hash"), lambda: load_tokenizer(tok["path"]).hash()):
            self.expand(lineage.TOKENIZER, Path(tok["path"]), depth + 1)
        for entry in manifest.get("source", {}).get("files", []):
            self.input({"kind": lineage.RAW_FILE, **entry}, depth)

    def run(self, path: Path, depth: int) -> None:
        """A checkpoint: the record is its run's manifest (data, tokenizer, config, parent)."""
        run = RunDir.of_checkpoint(path)
        manifest = run.read_manifest()
        if not manifest:
            self.emit(depth, "run manifest", run.manifest_path, None, UNRECORDED, "missing")
            return
        state = atomic.read_json(path / checkpoint.STATE_FILE)
        self.link(depth, "run config", run.config_path, manifest.get("config_sha256"), lambda: self.sha(run.config_path))
        self.link(depth, "run tokenizer", run.tokenizer, state.get("tokenizer_hash") or manifest.get("tokenizer_hash"),
                  lambda: load_tokenizer(run.tokenizer).hash())
        if manifest.get("dataset_manifest_sha256"):
            self.input({"kind": lineage.TOKEN_DATASET, "path": manifest.get("dataset"),
                        "sha256": manifest["dataset_manifest_sha256"]}, depth)
        elif manifest.get("dataset"):
            self.input({"kind": lineage.RAW_FILE, "path": manifest["dataset"], "sha256": manifest.get("dataset_sha256")}, depth)
        if manifest.get("source_config_sha256"):  # imported weights: the chain ends at the source's config
            source = Path(manifest.get("parent") or "") / "config.json"
            self.link(depth, "imported source config", source, manifest["source_config_sha256"], lambda: self.sha(source))
        elif manifest.get("parent"):
            parent = manifest["parent"]
            kind = kind_of(parent) if Path(parent).exists() else lineage.MODEL_DIR
            if manifest.get("parent_weights_digest"):
                self.input({"kind": kind, "path": parent, "weights_digest": manifest["parent_weights_digest"]}, depth)
            else:
                self.emit(depth, kind, parent, None, UNRECORDED, "only the loaded weights' hash is recorded")

    def model_dir(self, path: Path, depth: int) -> None:
        record = lineage.read(path)
        if record is None:
            self.emit(depth, "model inputs", path, None, UNRECORDED, "no lineage.json (imported, or exported before lineage)")
            return
        if self.files(depth, "model file", path, record.get("outputs", {})):
            for entry in record.get("inputs", []):
                self.input(entry, depth)

    def adapter(self, path: Path, depth: int) -> None:
        latest = checkpoint.latest_checkpoint(RunDir(path.parent).checkpoints)
        if latest is None:
            self.emit(depth, "adapter run", path.parent, None, UNRECORDED, "no checkpoint beside the adapter")
            return
        self.run(latest, depth)

    def eval_result(self, path: Path, depth: int) -> None:
        result = atomic.read_json(path)
        source = result.get("source")
        kind = kind_of(source) if source and Path(source).exists() else lineage.MODEL_DIR
        self.input({"kind": kind, "path": source, "weights_digest": result.get("weights_digest")}, depth)
        data = result.get("data") or {}
        if data.get("sha256"):
            self.input({"kind": lineage.RAW_FILE, "path": data.get("path"), "sha256": data["sha256"]}, depth)

    def eval_results(self, path: Path, depth: int) -> None:
        for file in sorted(path.glob("*.json")):
            self.emit(depth, lineage.EVAL_RESULT, file, self.sha(file), OK)
            self.expand(lineage.EVAL_RESULT, file, depth + 1)

    def release(self, path: Path, depth: int) -> None:
        record = atomic.read_json(path)
        policy = record.get("policy_file")
        if policy:
            self.link(depth, "release policy", policy, record.get("policy_sha256"), lambda: self.sha(policy))
        model, files = record.get("model"), record.get("weight_files") or {}
        kind = kind_of(model) if model and Path(model).exists() else lineage.MODEL_DIR
        self.input({"kind": kind, "path": model, "weights_digest": digest_of(files) if files else None,
                    "weight_files": files}, depth)
        for name, digest in (record.get("evals") or {}).items():
            self.input({"kind": lineage.EVAL_RESULT, "path": name, "sha256": digest}, depth)


def verify(path: str | os.PathLike, check: bool = True) -> list[Link]:
    """The chain of `path`: one Link per artifact, file set or input, in walk order."""
    return Walk(check).root(path)


def first_break(links: list[Link]) -> Link | None:
    return next((link for link in links if link.status == BROKEN), None)


def to_json(path: str | os.PathLike, links: list[Link]) -> str:
    broken = first_break(links)
    return json.dumps({"path": str(path), "intact": broken is None, "first_break": asdict(broken) if broken else None,
                       "links": [asdict(link) for link in links]}, indent=2)
