"""Byte-level BPE tokenizer trained with HF `tokenizers`, with special tokens reserved up front.

Byte-level means every Unicode string maps to byte tokens, so decode(encode(x)) == x.
Special tokens for document boundaries and chat roles are reserved at training time so
later stages (SFT, chat, serving) never need to resize the embedding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import Field
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge import atomic
from lmforge.config import Section
from lmforge.data.readers import TextSplit, expand_inputs, read_documents
from lmforge.errors import TokenizerError

# One token marks document boundaries: it is placed before every document, so the model
# learns to emit it when a document ends and generation can start from it (GPT-2 style).
ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
RESERVED = [f"<|reserved_{i}|>" for i in range(8)]
SPECIAL_TOKENS = [ENDOFTEXT, PAD, *CHAT_TOKENS, *RESERVED]

# GPT-4's split pattern: words, 1-3 digit numbers, punctuation runs and whitespace are
# pre-tokenized separately so merges never cross those boundaries.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)

TOKENIZER_FILE = "tokenizer.json"


class LmTokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` with lmforge's special tokens."""

    def __init__(self, tokenizer: Tokenizer, path: Path | None = None):
        self.tk = tokenizer
        self.path = path
        # Raw text that happens to contain "<|endoftext|>" must stay text, not become a
        # control token (a prompt-injection and data-poisoning hazard).
        self.tk.encode_special_tokens = True
        missing = [t for t in SPECIAL_TOKENS if self.tk.token_to_id(t) is None]
        if missing:
            raise TokenizerError(f"tokenizer {path or ''} lacks lmforge special tokens: {missing[:3]}")
        self.eos_id: int = self.tk.token_to_id(ENDOFTEXT)
        self.pad_id: int = self.tk.token_to_id(PAD)

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        return self.tk.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def hash(self) -> str:
        return atomic.sha256_json(json.loads(self.tk.to_str()))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `tokenizer.json` into `directory` atomically."""
        directory = Path(directory)
        atomic.write_text(directory / TOKENIZER_FILE, self.tk.to_str(pretty=False))
        self.path = directory / TOKENIZER_FILE
        return directory


def train_tokenizer(
    texts: Iterator[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False
) -> LmTokenizer:
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise TokenizerError(
            f"vocab_size {vocab_size} is too small: byte-level BPE needs at least "
            f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return LmTokenizer(tk)


def load_tokenizer(path: str | os.PathLike) -> LmTokenizer:
    """Load from a directory holding `tokenizer.json`, or from the file itself."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"tokenizer not found: {file}")
    try:
        tk = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"cannot read tokenizer {file}: {str(err).splitlines()[0]}") from None
    return LmTokenizer(tk, file)


class TokenizerTrainConfig(Section):
    inputs: list[str] = Field(min_length=1, description="files or directories of txt/jsonl/parquet")
    out: str = Field(description="directory to write tokenizer.json into")
    vocab_size: int = Field(8192, ge=256 + len(SPECIAL_TOKENS))
    min_frequency: int = Field(2, ge=1)
    text_field: str = "text"
    text_split: TextSplit = "file"


def run_train(config: TokenizerTrainConfig) -> LmTokenizer:
    """`lmforge tokenizer train`: stream the inputs through the BPE trainer, save atomically."""
    files = expand_inputs(config.inputs)
    counter = {"documents": 0}

    def documents() -> Iterator[str]:
        for text in read_documents(files, config.text_field, config.text_split):
            if text:
                counter["documents"] += 1
                yield text

    tokenizer = train_tokenizer(documents(), config.vocab_size, config.min_frequency)
    if counter["documents"] == 0:
        raise TokenizerError(f"no non-empty documents in {', '.join(config.inputs)}")
    tokenizer.save(config.out)
    return tokenizer
