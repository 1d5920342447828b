"""`lmforge import`: a Hugging Face Llama-family dir or Hub id -> an lmforge model dir or checkpoint.

Llama, Mistral and Qwen2 share lmforge's layout and map exactly; other architectures are
refused by name. Output is either a normalised model dir (what every lmforge verb reads)
or a run dir holding a DCP checkpoint at step 0 plus the tokenizer, for training code
that starts from checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, field_validator

from lmforge import atomic
from lmforge import device as devices
from lmforge.config import Section
from lmforge.errors import CheckpointError
from lmforge.interop import model_card
from lmforge.interop.export import check_out_dir, verify_round_trip
from lmforge.store import checkpoint, hashes, hf
from lmforge.store import lineage as lineage_record
from lmforge.store.loading import local_path
from lmforge.store.model_dir import (
    MODEL_DIR_KIND,
    load_model_dir,
    save_model_dir,
    tokenizer_files,
)
from lmforge.store.run_dir import RunDir, lineage

log = logging.getLogger(__name__)


class ImportConfig(Section):
    source: str = Field(description="Hugging Face model dir (config.json + safetensors + tokenizer) or Hub id org/name[@revision]")
    out: str = Field(description="model dir or run dir to write")
    to: Literal["model", "checkpoint"] = Field("model", description="write a model dir or a run dir with a checkpoint")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: as stored (model dir), float32 (checkpoint: training keeps fp32 weights)"
    )
    max_seq_len: int | None = Field(None, ge=2, description="cap the context (RoPE tables); default: the config's")
    max_shard_size: int | str = "5GB"
    overwrite: bool = False

    @field_validator("max_shard_size")
    @classmethod
    def _check_size(cls, value: int | str) -> int | str:
        hf.parse_size(value)  # raises ValueError naming the bad size
        return value


@dataclass
class ImportResult:
    out: Path
    architecture: str
    params: int
    dtype: str


CHECKPOINT_RUN_KIND = "imported checkpoint run"


def run(config: ImportConfig) -> ImportResult:
    source, out = local_path(config.source), Path(config.out)  # a Hub id: its snapshot in the Hub cache
    hf_config = hf.read_hf_config(source)
    architecture = (hf_config.get("architectures") or ["?"])[0]
    check_out_dir(out, source, config.overwrite, MODEL_DIR_KIND if config.to == "model" else CHECKPOINT_RUN_KIND)
    if config.dtype != "auto":
        dtype = devices.dtype(config.dtype, "import.dtype")
    else:
        dtype = torch.float32 if config.to == "checkpoint" else None
    model, tokenizer = load_model_dir(source, dtype=dtype, max_seq_len=config.max_seq_len)
    dtype = next(model.parameters()).dtype
    origin = lineage(kind="import", parent=str(source.resolve()), architecture=architecture,
                     source_config_sha256=hashes.sha256_file(source / hf.CONFIG_FILE),
                     tokenizer_hash=tokenizer.hash())
    if config.to == "model":

        def finish(tmp: Path, files: list[str]) -> str:
            verify_round_trip(tmp, model, dtype)
            write_import_lineage(tmp, source, files)
            digests = {f: hashes.sha256_file(tmp / f) for f in files if f.endswith(".safetensors")}
            card_lineage = {k: origin[k] for k in ("kind", "parent", "architecture", "source_config_sha256",
                                                   "tokenizer_hash", "lmforge_version", "created_at")}
            return model_card.render(out.resolve().name, model.config, devices.dtype_name(dtype), digests,
                                     card_lineage, {}, None)

        save_model_dir(out, model, tokenizer, dtype, hf.parse_size(config.max_shard_size), finish)
    else:
        write_checkpoint_run(out, model, tokenizer, origin)
    log.info("imported %s (%s) -> %s", source, architecture, out)
    return ImportResult(out, architecture, model.config.num_params(), devices.dtype_name(dtype))


IMPORTED_INPUTS = (".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")  # weights, configs, tokenizer files


def write_import_lineage(directory: Path, source: Path, weight_files: list[str]) -> None:
    """The imported dir's lineage: its files, and the source dir's files by content (its raw inputs),
    so `lmforge verify` can tell a changed source or a changed import."""
    written = [directory / f for f in (*weight_files, hf.CONFIG_FILE, "tokenizer.json") if (directory / f).is_file()]
    inputs = [lineage_record.raw_file(p) for p in sorted(source.iterdir()) if p.is_file() and p.suffix in IMPORTED_INPUTS]
    lineage_record.write(directory, lineage_record.MODEL_DIR, inputs, lineage_record.file_hashes(directory, written),
                         imported_from=str(source.resolve()))


def write_checkpoint_run(out: Path, model, tokenizer, origin: dict) -> None:
    """A run dir: tokenizer/, manifest.json and checkpoints/step-0000000 (+ `latest`)."""
    with atomic.atomic_dir(out, CHECKPOINT_RUN_KIND) as tmp:
        run_dir = RunDir(tmp)
        for name, text in tokenizer_files(tokenizer, model.config.max_seq_len).items():
            atomic.write_text(run_dir.tokenizer / name, text)
        run_dir.write_manifest(origin)
        state = {
            "step": 0,
            "model": model.config.model_dump(mode="json"),
            "model_shape": model.config.shape(),
            "imported_from": origin["parent"],
        }
        try:
            checkpoint.save(run_dir.checkpoints, 0, model, [], state, keep=1)
        except OSError as err:
            raise CheckpointError(f"cannot write checkpoint under {out}: {err}") from None
