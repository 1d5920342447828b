"""`lmforge chat`: a conversation with a model in the chat format, streamed token by token.

Each turn encodes the conversation with the tokenizer's chat format (lmforge's, or an
imported model's own template), opens the assistant's turn and samples with a KV cache
until an end-of-turn token. When the conversation outgrows the context, the oldest turns
are dropped (a system message is kept).
"""

from __future__ import annotations

from collections.abc import Iterator

from lmforge.errors import ConfigError
from lmforge.generate import SamplingConfig, generate_tokens
from lmforge.model import Transformer
from lmforge.tokenizer import LmTokenizer


class ChatSession:
    def __init__(
        self, model: Transformer, tokenizer: LmTokenizer, sampling: SamplingConfig, system: str | None = None
    ):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt(self) -> list[int]:
        """The conversation so far plus the opened assistant turn, trimmed to fit the context."""
        budget = self.model.config.max_seq_len - self.sampling.max_tokens
        while True:
            ids = self.tokenizer.encode_chat(self.messages, add_generation_prompt=True)
            if len(ids) <= budget:
                return ids
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                raise ConfigError(
                    f"the message is {len(ids)} tokens; the model's context is {self.model.config.max_seq_len} "
                    f"with {self.sampling.max_tokens} kept for the reply"
                )
            del self.messages[first]  # oldest turn first

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn; yield the reply as it is generated (whole UTF-8 characters)."""
        self.messages.append({"role": "user", "content": text})
        prompt = self._prompt()
        new: list[int] = []
        shown = ""
        for token in generate_tokens(self.model, prompt, self.sampling, stop_ids=self.tokenizer.stop_ids):
            new.append(token)
            decoded = self.tokenizer.decode(new)
            if not decoded.endswith("\ufffd"):
                yield decoded[len(shown):]
                shown = decoded
        reply = self.tokenizer.decode(new)
        if len(reply) > len(shown):
            yield reply[len(shown):]
        self.messages.append({"role": "assistant", "content": reply})
