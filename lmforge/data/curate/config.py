"""`CurateConfig`: one section per curation step, defaults = the recommended (FineWeb-style) recipe.

Thresholds are datatrove's own parameters under their own names; `enabled: false` skips a
step. `configs/curate.yaml` is the same recipe written out to copy.
"""

from __future__ import annotations

import os
import sys
from typing import Literal

from pydantic import Field, model_validator

from lmforge.config import Section
from lmforge.data.readers import TextSplit


class InputConfig(Section):
    """The raw files, dirs or fsspec URLs to curate and how their text is read."""

    paths: list[str] = Field(default_factory=list, description="files or dirs: txt, jsonl(.gz), parquet; local or fsspec URLs")
    text_field: str = "text"
    id_field: str = "id"
    text_split: TextSplit = Field("file", description="txt files: one document per file | paragraph | line")


class OutputConfig(Section):
    """Where the curated shards, the report and the work dir go."""

    dir: str = Field("curated", description="shards + report; replaced atomically when the run finishes")
    format: Literal["jsonl.gz", "parquet"] = "jsonl.gz"
    work_dir: str | None = Field(None, description="intermediate files and completion markers (default: <dir>.work)")
    keep_work: bool = Field(False, description="keep the work dir after a successful run")
    overwrite: bool = Field(False, description="replace dir/work_dir even when lmforge's curate did not write them")


class NormalizeConfig(Section):
    """Unicode normalization of the text."""

    enabled: bool = True
    form: Literal["NFC", "NFKC"] = "NFC"


class LanguageConfig(Section):
    """Language identification: keep documents in these languages."""

    enabled: bool = True
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1, description="ISO 639-1 codes to keep")
    min_score: float = Field(0.65, ge=0, le=1, description="py3langid probability of the top language")
    max_chars: int = Field(2000, ge=100, description="classify the first N characters (speed)")


class GopherRepetitionConfig(Section):
    """Gopher's repetition filter: duplicated lines, paragraphs and n-grams."""

    enabled: bool = True
    dup_line_frac: float | None = 0.3
    dup_para_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    dup_para_char_frac: float | None = 0.2


class GopherQualityConfig(Section):
    """Gopher's quality filter: word counts and lengths, symbols, bullets, stop words."""

    enabled: bool = True
    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: int | None = 3
    max_avg_word_length: int | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    max_non_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2


class C4Config(Section):
    """C4's line and document filters: punctuation, sentences, lorem ipsum, javascript, policies."""

    enabled: bool = True
    # FineWeb keeps lines without terminal punctuation (C4 drops them); the rest is C4's rules.
    filter_no_terminal_punct: bool = False
    min_num_sentences: int = 5
    min_words_per_line: int = 3
    max_word_length: int = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


class FineWebConfig(Section):
    """FineWeb's filters: line punctuation, short lines, duplicated characters, new lines."""

    enabled: bool = True
    line_punct_thr: float = 0.12
    short_line_thr: float = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float = 0.01
    new_line_ratio: float = 0.3


class PiiConfig(Section):
    """PII scrubbing: emails, IP addresses and phone numbers replaced by placeholders."""

    enabled: bool = True
    emails: bool = True
    ips: bool = True
    phones: bool = True
    only_public_ips: bool = Field(True, description="leave 127.0.0.1, 192.168.x.x and friends alone")
    email_placeholder: str = "<EMAIL>"
    ip_placeholder: str = "<IP_ADDRESS>"
    phone_placeholder: str = "<PHONE_NUMBER>"


class ToxicityConfig(Section):
    """Removal of documents a moderation classifier flags."""

    enabled: bool = True
    moderator: str = Field("profanity", description="built-in name or module:factory returning a Moderator")
    threshold: float = Field(0.8, gt=0, le=1, description="a chunk is flagged at this probability")
    max_flagged_share: float = Field(0.1, ge=0, le=1, description="drop a document when more of its text is flagged")


class ExactDedupConfig(Section):
    """Exact deduplication of documents."""

    enabled: bool = True


class MinhashConfig(Section):
    """Near-duplicate removal with MinHash over word n-grams."""

    enabled: bool = True
    ngram: int = Field(5, ge=1, description="shingle size in words")
    num_buckets: int = Field(14, ge=1)
    hashes_per_bucket: int = Field(8, ge=1)
    seed: int = 1


class DecontaminateConfig(Section):
    """Removal of documents that overlap lmforge's eval sets (n-gram matches)."""

    enabled: bool = True
    tasks: list[str] = Field(
        default_factory=lambda: ["python_mc", "stdlib_completion", "arithmetic"],
        description="shipped task names, task YAML/JSONL files, or .txt files of passages",
    )
    ngram: int = Field(13, ge=1, description="drop documents sharing an n-gram of this many words")
    min_words: int = Field(8, ge=1, description="shorter passages are matched whole; shorter still, ignored")


class ReportConfig(Section):
    """The curation report: examples per removal reason, and when to warn."""

    examples_per_reason: int = Field(3, ge=0)
    example_chars: int = Field(300, ge=20)
    warn_removed_share: float = Field(0.8, ge=0, le=1, description="warn loudly when more documents are removed")


class ExecutorConfig(Section):
    """How datatrove runs: local processes or Ray, workers and tasks."""

    kind: Literal["local", "ray"] = "local"
    workers: int = Field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)), ge=1)
    tasks: int | None = Field(None, ge=1, description="shards of the input (default: workers)")
    # fork starts workers in milliseconds with datatrove already imported; forkserver/spawn
    # re-import it (seconds per worker and stage) but are safe where the parent holds threads.
    start_method: Literal["fork", "forkserver", "spawn"] = "fork" if sys.platform == "linux" else "spawn"
    ray_address: str | None = Field(None, description="ray: cluster address (default: start a local runtime)")
    cpus_per_task: int = Field(1, ge=1)


class CurateConfig(Section):
    input: InputConfig = Field(default_factory=InputConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    normalize: NormalizeConfig = Field(default_factory=NormalizeConfig)
    language: LanguageConfig = Field(default_factory=LanguageConfig)
    gopher_repetition: GopherRepetitionConfig = Field(default_factory=GopherRepetitionConfig)
    gopher_quality: GopherQualityConfig = Field(default_factory=GopherQualityConfig)
    c4: C4Config = Field(default_factory=C4Config)
    fineweb: FineWebConfig = Field(default_factory=FineWebConfig)
    pii: PiiConfig = Field(default_factory=PiiConfig)
    toxicity: ToxicityConfig = Field(default_factory=ToxicityConfig)
    exact_dedup: ExactDedupConfig = Field(default_factory=ExactDedupConfig)
    minhash: MinhashConfig = Field(default_factory=MinhashConfig)
    decontaminate: DecontaminateConfig = Field(default_factory=DecontaminateConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)

    @model_validator(mode="after")
    def _needs_input(self) -> CurateConfig:
        if not self.input.paths:
            raise ValueError("no input: set input.paths (or pass --input FILE_OR_DIR)")
        return self

    @property
    def tasks(self) -> int:
        return self.executor.tasks or self.executor.workers

    @property
    def quality_language(self) -> str:
        """The word tokenizer the quality filters and MinHash use (spaCy's blank pipeline, offline)."""
        return self.language.languages[0] if len(self.language.languages) == 1 else "en"
