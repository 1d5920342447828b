"""`lmforge.safety.moderation`: the shipped-weights profanity moderator behind the Moderator interface."""

from __future__ import annotations

import pytest

pytest.importorskip("profanity_check")

from lmforge.errors import ConfigError  # noqa: E402
from lmforge.safety.moderation import (  # noqa: E402
    Moderator,
    ProfanityModerator,
    chunks,
    flagged,
    load_moderator,
    profanity_moderator,
)


def test_profanity_moderator_flags_abuse_and_passes_documentation(corpus_texts):
    moderator = load_moderator("profanity")
    assert isinstance(moderator, Moderator)
    abuse = "Shut the fuck up, you stupid worthless piece of shit."
    docs = [c for text in corpus_texts[:5] for c in chunks(text)]
    assert flagged(moderator, [abuse], 0.8) == [["profanity"]]
    assert not any(flagged(moderator, docs, 0.8))


def test_serving_hook_contract_blocks_and_allows():
    moderator = profanity_moderator(threshold=0.8)
    assert not moderator.check_input(["hello", "you fucking idiot"]).allowed
    decision = moderator.check_output("The list type has an append method.")
    assert decision.allowed and decision.categories == []


def test_chunks_keep_paragraphs_under_the_limit_and_lose_no_words():
    text = "\n\n".join(f"paragraph {i} " + "word " * 40 for i in range(30))
    pieces = chunks(text, max_chars=500)
    assert all(len(p) <= 500 for p in pieces)
    assert " ".join(" ".join(pieces).split()) == " ".join(text.split())


def test_unknown_moderator_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown moderator"):
        load_moderator("nope")
    assert isinstance(ProfanityModerator(), Moderator)
