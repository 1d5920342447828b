"""`lmforge chat`: a conversation with a model in the chat format, streamed from the inference engine.

Each turn encodes the conversation with the tokenizer's chat format (lmforge's, or an
imported model's own template), opens the assistant's turn and hands the ids to the
engine (`lmforge.serve.engine.Engine`, the one behind `lmforge serve`), which samples with
its KV cache until an end-of-turn token or a stop string. When the conversation outgrows
the context, the oldest turns are dropped (a system message is kept).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from lmforge.errors import ConfigError
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams


class ChatSession:
    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        self.engine, self.tokenizer, self.params = engine.start(), engine.tokenizer, params
        self.system = system
        self.messages: list[dict[str, str]] = []
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def _prompt(self) -> list[int]:
        """The conversation so far plus the opened assistant turn, trimmed to fit the context."""
        budget = self.engine.max_len - self.params.max_tokens
        while True:
            ids = self.tokenizer.encode_chat(self.messages, add_generation_prompt=True)
            if len(ids) <= budget:
                return ids
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            if len(self.messages) - first <= 1:
                raise ConfigError(
                    f"the message is {len(ids)} tokens; the model's context is {self.engine.max_len} "
                    f"with {self.params.max_tokens} kept for the reply"
                )
            del self.messages[first]  # oldest turn first

    def send(self, text: str) -> Iterator[str]:
        """Add a user turn; yield the reply as it is generated (whole UTF-8 characters)."""
        self.messages.append({"role": "user", "content": text})
        prompt = self._prompt()
        params = dataclasses.replace(self.params, max_tokens=min(self.params.max_tokens, self.engine.max_len - len(prompt)))
        handle = self.engine.submit(prompt, params)
        reply = []
        try:
            for output in handle:
                if output.text:
                    reply.append(output.text)
                    yield output.text
        finally:
            handle.cancel()  # a caller that stops reading frees the engine's slot
        self.messages.append({"role": "assistant", "content": "".join(reply)})
