"""`lmforge tokenizer train`: stream documents from files through the BPE trainer.

Reading files is the data layer's job (`data.readers`); the tokenizer itself
(`lmforge.tokenizer`) only sees an iterator of texts.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from lmforge import atomic
from lmforge.config import Section
from lmforge.data.readers import TextSplit, expand_inputs, read_documents
from lmforge.errors import OutputError, TokenizerError
from lmforge.monitor.progress import Progress, bars_enabled
from lmforge.store import lineage
from lmforge.tokenizer import (
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    TOKENIZER_KIND,
    LmTokenizer,
    train_tokenizer,
)


class TokenizerTrainConfig(Section):
    inputs: list[str] = Field(min_length=1, description="files or directories of txt/jsonl/parquet")
    out: str = Field(description="directory to write tokenizer.json into")
    vocab_size: int = Field(8192, ge=256 + len(SPECIAL_TOKENS))
    min_frequency: int = Field(2, ge=1)
    text_field: str = "text"
    text_split: TextSplit = "file"
    overwrite: bool = Field(False, description="replace a tokenizer.json in `out` that lmforge did not train")


def run_train(config: TokenizerTrainConfig) -> LmTokenizer:
    """`lmforge tokenizer train`: stream the inputs through the BPE trainer, save atomically."""
    for existing in (Path(config.out) / TOKENIZER_FILE, Path(config.out) / lineage.LINEAGE_FILE):
        if existing.exists() and atomic.output_kind(config.out) != TOKENIZER_KIND and not config.overwrite:
            raise OutputError(f"refusing to replace {existing}: lmforge did not train it "
                              "(pass --overwrite to replace it, or choose another --out)")
    files = expand_inputs(config.inputs)
    # On a terminal the BPE trainer draws its own bars (reading, counting pairs, merges);
    # ours only counts the documents (and tells a `progress.listen` callback).
    reading = Progress("tokenizer train", unit="doc", bar=False)

    def documents() -> Iterator[str]:
        for text in read_documents(files, config.text_field, config.text_split):
            if text:
                reading.update()
                yield text

    with reading:
        tokenizer = train_tokenizer(documents(), config.vocab_size, config.min_frequency, show_progress=bars_enabled())
    if reading.done == 0:
        raise TokenizerError(f"no non-empty documents in {', '.join(config.inputs)}")
    tokenizer.save(config.out)
    lineage.write(config.out, lineage.TOKENIZER, [lineage.raw_file(f) for f in files],
                  lineage.file_hashes(config.out, [tokenizer.path]), tokenizer_hash=tokenizer.hash())
    atomic.mark_output_dir(config.out, TOKENIZER_KIND)
    return tokenizer
