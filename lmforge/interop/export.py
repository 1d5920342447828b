"""`lmforge export`: a run, checkpoint or model dir -> a Hugging Face model dir.

The result loads with `AutoModelForCausalLM.from_pretrained` and no custom code. Before
the directory is renamed into place, it is read back and its logits compared with the
source model's, so a directory that exists is one that round-trips.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import Field, field_validator

from lmforge import __version__, atomic
from lmforge import device as devices
from lmforge.config import Section
from lmforge.errors import CheckpointError, ConfigError
from lmforge.interop import model_card
from lmforge.model import Transformer
from lmforge.monitor.progress import Progress
from lmforge.store import checkpoint, hashes, hf, verify
from lmforge.store import lineage as lineage_record
from lmforge.store.adapter import is_adapter_dir
from lmforge.store.loading import load_model, resolve_model
from lmforge.store.model_dir import (
    MODEL_CARD_FILE,
    MODEL_DIR_KIND,
    TOKENIZER_JSON_HASH,
    is_model_dir,
    load_model_dir,
    read_card_lineage,
    save_model_dir,
)
from lmforge.store.run_dir import RunDir, git_commit
from lmforge.store.weights import weights_digest, weights_digest_or_none
from lmforge.tokenizer import TOKENIZER_FILE, load_tokenizer

log = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16"]


class ExportConfig(Section):
    model: str = Field(description="run dir, checkpoint dir or model dir")
    out: str = Field(description="model dir to write")
    dtype: DType = Field("float32", description="dtype of the saved weights")
    max_shard_size: int | str = Field("5GB", description="split weights into shards past this size")
    name: str | None = Field(None, description="model name in the card; default: the out dir's name")
    overwrite: bool = Field(False, description="replace an existing out dir")
    verify: bool = Field(True, description="reload the written dir and compare logits before keeping it")
    base: str | None = Field(None, description="LoRA adapters: where their base model is now, if it moved "
                             "(its weights must be the ones they were trained on)")

    @field_validator("max_shard_size")
    @classmethod
    def _check_size(cls, value: int | str) -> int | str:
        hf.parse_size(value)  # raises ValueError naming the bad size
        return value


@dataclass
class ExportResult:
    out: Path
    files: list[str]
    params: int
    dtype: str


def check_out_dir(out: Path, source: Path, overwrite: bool, kind: str = MODEL_DIR_KIND) -> None:
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ConfigError(f"out dir {out} must not be (inside) the source {source}")
    atomic.check_output_dir(out, kind, overwrite=overwrite, inputs=[source])


def source_lineage(source: Path) -> tuple[dict[str, Any], Path | None, int | None, str | None]:
    """(lineage, run dir, step, training config YAML) of a checkpoint or model dir."""
    if is_model_dir(source):
        card = source / MODEL_CARD_FILE
        parent = read_card_lineage(card) if card.is_file() else {}
        return {"parent": str(source.resolve()), "parent_lineage": parent or None}, None, None, None
    if is_adapter_dir(source):  # RUN/adapter of a LoRA run: lineage from the run, latest step
        run = RunDir(source.parent)
        try:
            latest = checkpoint.latest_checkpoint(run.checkpoints)
        except CheckpointError:
            latest = None
        state = atomic.read_json(latest / checkpoint.STATE_FILE) if latest is not None else {}
    else:
        run = RunDir.of_checkpoint(source)
        state = atomic.read_json(source / checkpoint.STATE_FILE)
    run_dir = run.path
    manifest = atomic.read_json(run.manifest_path)
    step = state.get("step")
    keys = ("kind", "lmforge_version", "git_commit", "torch_version", "dataset", "dataset_manifest_sha256",
            "tokenizer_hash", "parent", "created_at")
    lineage = {"run_dir": str(run_dir.resolve()), "checkpoint": source.name, "step": step}
    lineage.update({f"train_{k}" if k in ("lmforge_version", "git_commit", "torch_version", "created_at") else k:
                    manifest.get(k) for k in keys})
    config_file = run.config_path
    training = config_file.read_text(encoding="utf-8") if config_file.is_file() else None
    if step is not None and training is not None:
        tokens = _trained_tokens(training, step)
        if tokens:
            lineage["tokens_trained"] = tokens
    return lineage, run_dir, step, training


def _trained_tokens(training_yaml: str, step: int) -> int | None:
    try:
        data = yaml.safe_load(training_yaml)
        return int(data["train"]["global_batch_tokens"]) * step
    except (yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def verify_round_trip(directory: Path, model: Transformer, dtype: torch.dtype) -> None:
    """Reload `directory` and require the same logits as `model` in the saved dtype."""
    reloaded, _ = load_model_dir(directory, dtype=dtype)
    length = min(16, model.config.max_seq_len)
    tokens = torch.arange(length).remainder(model.config.vocab_size)[None]
    reference = model.to(dtype)
    with torch.no_grad():
        expected, got = reference(tokens), reloaded(tokens)
    if not torch.allclose(expected.float(), got.float(), atol=1e-5, rtol=1e-5):
        diff = (expected.float() - got.float()).abs().max().item()
        raise CheckpointError(f"export failed its round-trip check: logits differ by {diff:.3g}")


def record_lineage(directory: Path, source: Path, weight_files: list[str]) -> list[str]:
    """Write the model dir's lineage.json (its files; its source by weights digest) and return
    the chain back to the raw files as the card lists it (from the records: nothing is rehashed)."""
    files = [directory / f for f in (*weight_files, hf.CONFIG_FILE, TOKENIZER_FILE) if (directory / f).is_file()]
    source_entry = {"kind": verify.kind_of(source), "path": str(source.resolve()), "weights_digest": weights_digest_or_none(source)}
    lineage_record.write(directory, lineage_record.MODEL_DIR, [source_entry], lineage_record.file_hashes(directory, files),
                         weights_digest=weights_digest(directory))
    return [f"{'  ' * link.depth}{link.kind}: {link.path}" + (f" sha256 {link.digest[:16]}" if link.digest else "")
            + (f" ({link.note})" if link.note and link.depth else "") for link in verify.verify(directory, check=False)]


def run(config: ExportConfig) -> ExportResult:
    out = Path(config.out)
    source = resolve_model(config.model)
    check_out_dir(out, source, config.overwrite)
    max_shard_bytes = hf.parse_size(config.max_shard_size)
    dtype = devices.dtype(config.dtype, "export.dtype")
    # A bar over four steps on a terminal: loaded, weights written, round trip checked, hashed and carded.
    with Progress(f"export {out.name}", total=4, unit="step", log_end=False) as progress:
        model, tokenizer, source = load_model(source, base=config.base)
        progress.update(1, step="loaded")
        lineage, run_dir, step, training = source_lineage(source)
        lineage.update(
            exported_by=f"lmforge {__version__}",
            export_git_commit=git_commit(),
            exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            export_dtype=config.dtype,
            tokenizer_hash=lineage.get("tokenizer_hash") or tokenizer.hash(),
        )
        name = config.name or out.resolve().name

        def finish(tmp: Path, files: list[str]) -> str:
            progress.update(1, step="written")
            if config.verify:
                verify_round_trip(tmp, model, dtype)
            progress.update(1, step="verified" if config.verify else "not verified")
            lineage[TOKENIZER_JSON_HASH] = load_tokenizer(tmp).hash()
            digests = {f: hashes.sha256_file(tmp / f) for f in files if f.endswith(".safetensors")}
            chain = record_lineage(tmp, source, files)
            return model_card.render(
                name, model.config, config.dtype, digests, lineage, model_card.collect_evals(run_dir, step), training,
                chain=[line.replace(str(tmp), str(out.resolve())) for line in chain],
            )

        files = save_model_dir(out, model, tokenizer, dtype, max_shard_bytes, finish)
        progress.update(1, step="hashed")
    log.info("exported %s -> %s (%s)", source, out, config.dtype)
    return ExportResult(out, files, model.config.num_params(), config.dtype)
