"""Structured outputs: a grammar that every sampled token must keep the reply inside.

A request's `StructuredSpec` (a JSON schema, any JSON object, a regex, one of a list of
choices, or a Lark grammar) is compiled by llguidance (the grammar engine vLLM uses) against
the served tokenizer. While the request samples, the tokens its grammar cannot take next are
masked out of its logits (the masks of a batch's constrained rows are computed together, on
llguidance's threads), so the reply matches whatever the model prefers.

A reply must match even when its token budget (`max_tokens`, or the end of the context) runs
out. Near the end of the budget the sequence is checked for how many tokens it needs to close
(a greedy walk on a copy of the matcher: forced tokens, else the shortest closing token the
grammar allows); once that walk no longer fits with room to spare, the reply is closed by it
and ends with `finish_reason: length`, still valid. A schema whose smallest value is longer
than the budget is refused up front.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lmforge import extras
from lmforge.errors import LmforgeError
from lmforge.tokenizer import LmTokenizer

log = logging.getLogger(__name__)

StructuredKind = Literal["json_schema", "json_object", "regex", "choice", "lark"]

# Compact JSON, as OpenAI's structured outputs write it: no free whitespace between tokens, which
# a small model could otherwise fill forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Short tokens that close what is open (strings, objects, arrays) or complete a value, tried in
# this order when the budget forces a reply to close: ending tokens before separators, separators
# before values (so a number ends instead of growing digits), values before free text.
CLOSERS = ('"', "}", "]", '"}', '"]', "}]", "]}", "}}", ",", ":", "0", "false", "null", '""', "[]", "{}", "a", " ")
CLOSE_MARGIN = 8  # tokens kept in hand beyond the closing walk's length
MAX_CLOSE_STEPS = 512
GRAMMAR_CACHE = 256


class StructuredError(LmforgeError):
    """A response format, schema, regex, choice list or grammar that cannot be compiled."""


@dataclass(frozen=True)
class StructuredSpec:
    """What the reply must match. `value`: the schema (dict), the regex or Lark text, the choices."""

    kind: StructuredKind
    value: Any = None

    def grammar(self) -> str:
        """The llguidance grammar text of this spec (not yet checked)."""
        from llguidance import LLMatcher

        if self.kind == "json_schema":
            return LLMatcher.grammar_from_json_schema(self.value, defaults=JSON_OPTIONS)
        if self.kind == "json_object":
            return LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(str(c)) for c in self.value))
        return LLMatcher.grammar_from_lark(self.value)


def _llguidance():
    try:
        llguidance = extras.require("llguidance", "structured outputs")
        extras.require("llguidance.torch", "structured outputs")  # the bitmask helpers
    except extras.MissingExtraError as err:
        raise StructuredError(str(err)) from None
    return llguidance


class Grammars:
    """Compiles specs against one tokenizer (cached) and masks the logits of constrained rows."""

    def __init__(self, tokenizer: LmTokenizer, vocab_size: int):
        ll = _llguidance()
        self.vocab_size = vocab_size
        self.tokenizer = ll.LLTokenizer(tokenizer.tk.to_str(), n_vocab=vocab_size, eos_token=sorted(tokenizer.stop_ids))
        self.executor = ll.LLExecutor()
        self._cache: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.closers = []
        for text in CLOSERS:
            ids = self.tokenizer.tokenize_str(text)
            if len(ids) == 1 and ids[0] not in self.closers:
                self.closers.append(ids[0])
        self.mask_seconds = 0.0  # time spent computing masks (read by the benchmark and the engine's stats)

    def compile(self, spec: StructuredSpec) -> tuple[str, int | None]:
        """The checked grammar text and the token count of its shortest reply (None where the greedy
        closing walk finds none, e.g. a regex it would loop in: then the budget is not enforced);
        StructuredError if invalid."""
        try:
            key = json.dumps([spec.kind, spec.value], sort_keys=True)
        except (TypeError, ValueError):
            raise StructuredError(f"{spec.kind}: not JSON-serialisable") from None
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            grammar = spec.grammar()
        except (ValueError, TypeError) as err:
            raise StructuredError(f"{spec.kind}: {err}") from None
        from llguidance import LLMatcher

        error = LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise StructuredError(f"{spec.kind}: {error.strip().splitlines()[0]}")
        shortest = _close(LLMatcher(self.tokenizer, grammar, log_level=0), self)
        compiled = (grammar, None if shortest is None else len(shortest))
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > GRAMMAR_CACHE:
                self._cache.popitem(last=False)
        return compiled

    def state(self, spec: StructuredSpec, budget: int) -> GrammarState:
        """A fresh matcher for one sequence of at most `budget` tokens."""
        grammar, shortest = self.compile(spec)
        from llguidance import LLMatcher

        return GrammarState(LLMatcher(self.tokenizer, grammar, log_level=0), self, budget, shortest)

    def mask(self, states: list[GrammarState], logits: torch.Tensor) -> None:
        """Set to -inf, in place, every token each row's grammar cannot take next (rows of `logits`
        in the order of `states`); computed together on llguidance's threads."""
        import llguidance.torch as llt

        start = time.perf_counter()
        bitmask = llt.allocate_token_bitmask(len(states), self.vocab_size)
        llt.fill_next_token_bitmask_par(self.executor, [(s.matcher, i) for i, s in enumerate(states)], bitmask)
        allowed = unpack_bitmask(bitmask.to(logits.device), logits.shape[-1])
        logits.masked_fill_(~allowed, float("-inf"))
        self.mask_seconds += time.perf_counter() - start


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 words [rows, ceil(vocab / 32)] (bit j of word w: token 32w + j) -> bool [rows, vocab]."""
    bits = (bitmask[:, :, None] >> torch.arange(32, device=bitmask.device, dtype=torch.int32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()


def _close(matcher, grammars: Grammars) -> list[int] | None:
    """Tokens that bring `matcher` (advanced in place) to an accepting state, greedily short:
    forced tokens where the grammar forces them, else the first allowed closer, else the
    allowed token of the shortest text. None if no way was found."""
    tokens: list[int] = []
    while len(tokens) < MAX_CLOSE_STEPS:
        if matcher.is_error():
            return None
        if matcher.is_accepting():
            return tokens
        forced = matcher.compute_ff_tokens()
        if forced:
            if not matcher.consume_tokens(forced):
                return None
            tokens.extend(forced)
            continue
        token = next((t for t in grammars.closers if matcher.validate_tokens([t]) == 1), None)
        if token is None:
            allowed = unpack_bitmask(torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)[None],
                                     grammars.vocab_size)[0]
            candidates = allowed.nonzero()[:, 0].tolist()
            candidates = [t for t in candidates if t not in grammars.tokenizer.eos_tokens]
            if not candidates:
                return None
            token = min(candidates, key=lambda t: (len(grammars.tokenizer.decode_bytes([t])), t))
        if not matcher.consume_token(token):
            return None
        tokens.append(token)
    return None


class GrammarState:
    """One sequence's matcher, and the closing walk it switches to when its budget runs low.

    Far from the end of the budget the row samples freely (masked). Near it (`tight`), each
    sampled token is checked: a token after which the reply could no longer close in the tokens
    left is refused and the row resamples; when the closing walk takes all that is left, the row
    follows it."""

    def __init__(self, matcher, grammars: Grammars, budget: int, shortest: int | None):
        self.matcher, self.grammars = matcher, grammars
        self.budget = budget if shortest is not None else None  # None: no closing walk known, not enforced
        self.generated = 0
        self.walk = shortest or 0  # length of the last closing walk computed
        self.closing: list[int] | None = None  # forced tokens that close the reply, once the budget demands it
        self.closed_by_budget = False
        self._checked: tuple[int, list[int]] | None = None  # (token, walk after it) from the last `fits`
        self._walk_here: list[int] | None = None  # the closing walk from the current state, when known

    @property
    def left(self) -> int:
        return self.budget - self.generated

    @property
    def tight(self) -> bool:
        return self.budget is not None and self.left <= self.walk + CLOSE_MARGIN

    def forced_token(self) -> int | None:
        """The token this step must take to close the reply in budget, or None to sample (masked)."""
        if self.closing is None and self.tight:
            walk = self._walk_here if self._walk_here is not None else _close(self.matcher.deep_copy(), self.grammars)
            if walk is not None:
                self.walk = len(walk)
                if len(walk) >= self.left:
                    self.closing = walk
        if self.closing:
            self.closed_by_budget = True
            return self.closing.pop(0)
        return None

    def fits(self, token: int) -> bool:
        """Whether the reply can still close in budget after `token` (always, while not tight)."""
        if not self.tight or token in self.grammars.tokenizer.eos_tokens:
            return True
        after = self.matcher.deep_copy()
        if not after.consume_token(token):
            return False
        walk = _close(after, self.grammars)
        if walk is None or len(walk) > self.left - 1:
            return False
        self._checked = (token, walk)
        return True

    def close_now(self) -> int:
        """Give up sampling: take the first token of the closing walk (which fits, or nothing does)."""
        walk = _close(self.matcher.deep_copy(), self.grammars) or []
        if not walk:
            log.warning("structured output: no closing walk found with %d tokens left; the reply may be cut", self.left)
            return self.grammars.tokenizer.eos_token
        self.closing, self.closed_by_budget = walk, True
        return self.closing.pop(0)

    def consume(self, token: int) -> bool:
        """Advance past a chosen token; False if the grammar rejects it (a bug: the row was masked)."""
        self.generated += 1
        self._walk_here = list(self._checked[1]) if self._checked and self._checked[0] == token else None
        self._checked = None
        if token in self.grammars.tokenizer.eos_tokens:
            return True
        return self.matcher.consume_token(token)

    @property
    def finished(self) -> str | None:
        """Why the reply is over by the grammar: "length" once a budget-forced close completes,
        "stop" when nothing can follow; None while it goes on."""
        if self.closed_by_budget and not self.closing and self.matcher.is_accepting():
            return "length"
        if self.matcher.is_stopped():
            return "stop"
        return None


def spec_from_request(body) -> StructuredSpec | None:
    """The constraint a chat or completion request asks for: OpenAI's `response_format`, vLLM's
    `structured_outputs`, or vLLM's older `guided_*` fields; at most one. StructuredError otherwise."""
    asked: list[tuple[str, StructuredSpec]] = []
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt.type == "json_object":
        asked.append(("response_format", StructuredSpec("json_object")))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise StructuredError("response_format: type json_schema needs a 'json_schema' object")
        asked.append(("response_format", StructuredSpec("json_schema", fmt.json_schema.schema_ or {})))
    so = getattr(body, "structured_outputs", None)
    if so is not None:
        asked += _vllm_specs("structured_outputs", so.json_, so.regex, so.choice, so.grammar, so.json_object)
    asked += _vllm_specs("guided_*", getattr(body, "guided_json", None), getattr(body, "guided_regex", None),
                         getattr(body, "guided_choice", None), getattr(body, "guided_grammar", None), None)
    if len(asked) > 1:
        raise StructuredError(f"ask for one structured output at a time (got {', '.join(w for w, _ in asked)})")
    return asked[0][1] if asked else None


def _vllm_specs(where, json_, regex, choice, grammar, json_object) -> list[tuple[str, StructuredSpec]]:
    specs = []
    if isinstance(json_, str):
        try:
            json_ = json.loads(json_)
        except ValueError:
            raise StructuredError(f"{where}: json is not a valid JSON schema document") from None
    if json_ is not None:
        specs.append((f"{where}.json", StructuredSpec("json_schema", json_)))
    if regex is not None:
        specs.append((f"{where}.regex", StructuredSpec("regex", regex)))
    if choice is not None:
        specs.append((f"{where}.choice", StructuredSpec("choice", tuple(choice))))
    if grammar is not None:
        specs.append((f"{where}.grammar", StructuredSpec("lark", grammar)))
    if json_object:
        specs.append((f"{where}.json_object", StructuredSpec("json_object")))
    return specs
