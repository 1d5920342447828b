"""Byte-level BPE tokenizer trained with HF `tokenizers`, with special tokens reserved up front.

Byte-level means every Unicode string maps to byte tokens, so decode(encode(x)) == x.
Special tokens for document boundaries and chat roles are reserved at training time so
later stages (SFT, chat, serving) never need to resize the embedding.

Chat format (token-exact; `CHAT_TEMPLATE` renders the same ids in transformers):

    <|endoftext|> <|system|>...<|end|> <|user|>...<|end|> <|assistant|>...<|end|>

Tool calling (OpenAI function calling, Hermes/Qwen2.5 style, in plain text so no token is
added): the tools are listed in the system turn, an assistant's calls follow its content as
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` blocks, and tool results are
a user turn of `<tool_response>\n...\n</tool_response>` blocks (`chat_turns`).

Tokenizers of imported models (no lmforge special tokens) load too: their BOS/EOS and
chat template come from the model dir's `tokenizer_config.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from lmforge import atomic, hub
from lmforge.errors import DataError, TokenizerError

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
TOKENIZER_KIND = "tokenizer"  # the output marker's kind (atomic.check_output_dir)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

CHAT_ROLES = ("system", "user", "assistant", "tool")
END_OF_TURN = "<|end|>"

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
# The instruction around the tools' signatures: short, since every prompt with tools carries it.
TOOLS_HEADER = "You may call these functions:\n<tools>"
TOOLS_FOOTER = '\n</tools>\nTo call one, write a block per call:\n<tool_call>\n{"name": <name>, "arguments": <object>}\n</tool_call>'



def _jinja(text: str) -> str:
    return json.dumps(text)  # a Jinja string literal: Jinja reads JSON's escapes as Python's


# The same format as `chat_turns` and `LmTokenizer.encode_chat`, as a Jinja template for HF
# `apply_chat_template(messages, tools=...)` (which tokenizes the rendered string with special
# tokens parsed). Every piece of text is an expression: transformers renders with trim_blocks.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(listing='') %}"
    "{% if tools %}"
    "{% set ns.listing = " + _jinja(TOOLS_HEADER) + " %}"
    "{% for tool in tools %}{% set ns.listing = ns.listing + '\\n' + (tool | tojson) %}{% endfor %}"
    "{% set ns.listing = ns.listing + " + _jinja(TOOLS_FOOTER) + " %}"
    "{% if messages[0]['role'] != 'system' %}{{ '<|system|>' + ns.listing + '<|end|>' }}{% endif %}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% set role = message['role'] %}"
    "{% if role not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown chat role ' + role) }}"
    "{% endif %}"
    "{% if role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{ '<|user|>' }}{% else %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{ '<|end|>' }}{% endif %}"
    "{% else %}"
    "{{ '<|' + role + '|>' }}{% if message['content'] %}{{ message['content'] }}{% endif %}"
    "{% if loop.first and role == 'system' and tools %}"
    "{% if message['content'] %}{{ '\\n\\n' }}{% endif %}{{ ns.listing }}"
    "{% endif %}"
    "{% if role == 'assistant' and message['tool_calls'] %}{% for call in message['tool_calls'] %}"
    "{% set function = call['function'] if call['function'] is defined else call %}"
    "{% if message['content'] or not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '<tool_call>\\n{\"name\": ' + (function['name'] | tojson) + ', \"arguments\": ' }}"
    "{% if function['arguments'] is string %}{{ function['arguments'] }}{% else %}{{ function['arguments'] | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _call_arguments(value: Any, where: str) -> dict:
    """A call's arguments as an object: OpenAI sends a JSON string, HF templates take a dict."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where} has arguments that are not valid JSON") from None
    if not isinstance(value, dict):
        raise DataError(f"{where} must have arguments that are a JSON object")
    return value


def _tool_calls(calls: Any, i: int) -> list[dict]:
    """OpenAI's {"id", "type", "function": {"name", "arguments"}} (or HF's flat {"name", "arguments"}),
    normalized to the OpenAI shape with the arguments as a dict."""
    if not isinstance(calls, list):
        raise DataError(f"chat message {i} must have 'tool_calls' as a list")
    out = []
    for j, call in enumerate(calls):
        where = f"chat message {i} tool call {j}"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise DataError(f"{where} must be an object with a function 'name'")
        arguments = _call_arguments(function.get("arguments", {}), where)
        rest = {k: v for k, v in call.items() if k not in ("name", "arguments", "function", "type")}  # the id
        out.append({**rest, "type": "function", "function": {"name": function["name"], "arguments": arguments}})
    return out


def check_messages(messages: Any) -> list[dict]:
    """Messages as OpenAI/HF send them: a list of {"role", "content"} with string content; assistant
    turns may carry `tool_calls` (and then no content), `tool` turns hold a call's result."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise DataError("chat messages must be a non-empty list of {role, content} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise DataError(f"chat message {i} must be an object with a string 'content'")
        if message.get("role") not in CHAT_ROLES:
            raise DataError(f"chat message {i} has role {message.get('role')!r} (allowed: {', '.join(CHAT_ROLES)})")
        calls = message.get("tool_calls")
        if calls is not None and message["role"] != "assistant":
            raise DataError(f"chat message {i} has 'tool_calls' but only assistant turns make calls")
        if calls:
            message = {**message, "tool_calls": _tool_calls(calls, i)}
        if not isinstance(message.get("content"), str) and not (calls and message.get("content") is None):
            raise DataError(f"chat message {i} must be an object with a string 'content'")
        out.append(message)
    return out


def check_tools(tools: Any) -> list[dict] | None:
    """OpenAI's `tools` ({"type": "function", "function": {"name", "description", "parameters"}});
    None or an empty list: no tools."""
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError("tools must be a list of {type, function} objects")
    return tools or None


def tool_call_text(name: str, arguments: dict) -> str:
    """One call as the assistant writes it; the JSON is json.dumps's (HF's `tojson`)."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def tools_text(tools: list[dict]) -> str:
    """The instruction and the tools' signatures, one JSON object a line, for the system turn."""
    return TOOLS_HEADER + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_FOOTER


def chat_turns(messages: list[dict], tools: list[dict] | None = None) -> list[tuple[str, str]]:
    """(role, text) of each turn in lmforge's chat format, from checked messages: the tools join
    the system turn (or are one), calls follow the assistant's content, and consecutive tool
    results share one user turn."""
    turns: list[tuple[str, str]] = []
    if tools:
        listing = tools_text(tools)
        if messages[0]["role"] == "system":
            content, messages = messages[0]["content"], messages[1:]
            listing = f"{content}\n\n{listing}" if content else listing
        turns.append(("system", listing))
    for message in messages:
        role, text = message["role"], message.get("content") or ""
        if role == "tool":
            text = f"<tool_response>\n{text}\n</tool_response>"
            if turns and turns[-1][0] == "tool":
                turns[-1] = ("tool", f"{turns[-1][1]}\n{text}")
                continue
        for call in message.get("tool_calls") or []:
            block = tool_call_text(call["function"]["name"], call["function"]["arguments"])
            text = f"{text}\n{block}" if text else block
        turns.append((role, text))
    return [("user" if role == "tool" else role, text) for role, text in turns]


class LmTokenizer:
    """A thin wrapper over `tokenizers.Tokenizer`: encoding, document and chat framing.

    `bos_id` starts every document and prompt (lmforge: `<|endoftext|>`, which also ends
    documents, so `bos_id == eos_id`); `stop_ids` end generation.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        path: Path | None = None,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ):
        self.tk = tokenizer
        self.path = path
        # Raw text that happens to contain "<|endoftext|>" must stay text, not become a
        # control token (a prompt-injection and data-poisoning hazard).
        self.tk.encode_special_tokens = True
        self._template_tk: Tokenizer | None = None
        self.native = all(self.tk.token_to_id(t) is not None for t in SPECIAL_TOKENS)
        if self.native:
            bos_token = eos_token = ENDOFTEXT
            pad_token, chat_template = PAD, CHAT_TEMPLATE
        elif eos_token is None:
            raise TokenizerError(
                f"tokenizer {path or ''} has neither lmforge's special tokens nor an eos_token "
                f"in {TOKENIZER_CONFIG_FILE}"
            )
        self.bos_token, self.eos_token, self.chat_template = bos_token, eos_token, chat_template
        self.bos_id = self._special_id(bos_token)
        self.eos_id: int = self._special_id(eos_token)
        self.pad_id = self._special_id(pad_token)
        self.stop_ids = {self.eos_id}
        if self.native:
            self.stop_ids.add(self.tk.token_to_id(END_OF_TURN))

    def _special_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self.tk.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"tokenizer {self.path or ''} has no token {token!r}")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        return self.tk.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def encode_prompt(self, text: str) -> list[int]:
        """A completion prompt: BOS (when the tokenizer has one), then the text."""
        return ([] if self.bos_id is None else [self.bos_id]) + self.encode(text)

    def encode_chat(
        self, messages: Sequence[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
    ) -> list[int]:
        """Token ids of a conversation; `add_generation_prompt` opens the assistant's turn; `tools`
        (OpenAI's function definitions) are listed in the system turn."""
        return self.encode_chat_with_mask(messages, add_generation_prompt, tools)[0]

    def encode_chat_with_mask(
        self, messages: Sequence[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
    ) -> tuple[list[int], list[bool]]:
        """Ids and a mask of the tokens the assistant wrote (its content, tool calls and `<|end|>`).

        Native tokenizers build ids piecewise, so message content is always text. Imported
        ones render their own Jinja template (as transformers does); no mask is known then.
        """
        messages, tools = check_messages(messages), check_tools(tools)
        if not self.native:
            ids = self._render_template(messages, add_generation_prompt, tools)
            return ids, [False] * len(ids)
        end = self.tk.token_to_id(END_OF_TURN)
        ids, mask = [self.bos_id], [False]
        for role, text in chat_turns(messages, tools):
            body = [*self.encode(text), end]
            ids += [self.tk.token_to_id(f"<|{role}|>"), *body]
            mask += [False] + [role == "assistant"] * len(body)
        if add_generation_prompt:
            ids.append(self.tk.token_to_id("<|assistant|>"))
            mask.append(False)
        return ids, mask

    def _render_template(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None) -> list[int]:
        if not self.chat_template:
            raise TokenizerError(f"tokenizer {self.path or ''} has no chat_template")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str):
            raise DataError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        # transformers' tojson: json.dumps as is (Jinja's own escapes <, >, & and ' for HTML).
        env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        try:
            text = env.from_string(self.chat_template).render(
                messages=[{k: v for k, v in m.items() if v is not None} for m in messages],  # as transformers
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token,
            )
        except TemplateError as err:
            raise TokenizerError(f"chat template of {self.path or 'tokenizer'} failed: {err}") from None
        if self._template_tk is None:  # a copy that parses special tokens in the rendered text
            self._template_tk = Tokenizer.from_str(self.tk.to_str())
            self._template_tk.encode_special_tokens = False
        return self._template_tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def hash(self) -> str:
        # sha256 of the canonical JSON (the rule of store.hashes.sha256_json, which sits a layer
        # above): equal for equal tokenizers however their tokenizer.json was formatted.
        return hashlib.sha256(json.dumps(json.loads(self.tk.to_str()), sort_keys=True).encode()).hexdigest()

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


def _token_text(value: Any) -> str | None:
    """HF writes special tokens as strings or as AddedToken dicts with a "content" key."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | os.PathLike) -> LmTokenizer:
    """Load from a directory holding `tokenizer.json`, or from the file itself.

    A `tokenizer_config.json` beside it (HF model dirs) supplies BOS/EOS/pad and the chat
    template of tokenizers that were not trained by lmforge. A Hub id `org/name[@revision]`
    that names no local path means that repo's tokenizer files (`lmforge.hub`).
    """
    path = hub.resolve(path, "model", hub.TOKENIZER_FILES, TokenizerError)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise TokenizerError(f"tokenizer not found: {file}")
    try:
        tk = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise TokenizerError(f"cannot read tokenizer {file}: {str(err).splitlines()[0]}") from None
    extra: dict[str, Any] = {}
    config_file = file.parent / TOKENIZER_CONFIG_FILE
    if config_file.is_file():
        try:
            hf = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise TokenizerError(f"{config_file} is not valid JSON") from None
        template = hf.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        jinja_file = file.parent / "chat_template.jinja"  # where transformers 5 saves it
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        extra = dict(
            bos_token=_token_text(hf.get("bos_token")),
            eos_token=_token_text(hf.get("eos_token")),
            pad_token=_token_text(hf.get("pad_token")),
            chat_template=template if isinstance(template, str) else None,
        )
    return LmTokenizer(tk, file, **extra)
