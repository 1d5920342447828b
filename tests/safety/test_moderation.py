"""`lmforge.safety.moderation`: the shipped-weights profanity moderator behind the Moderator interface."""

from __future__ import annotations

import profanity_check  # noqa: F401  a core dependency: missing, it fails the suite instead of skipping it
import pytest

from lmforge.errors import ConfigError
from lmforge.safety.moderation import (
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


# -- the shared interface: rules, composition, the serving policy ------------------------------

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from lmforge.safety import rules  # noqa: E402
from lmforge.safety.moderation import Moderation, build, moderate  # noqa: E402
from lmforge.safety.policy import PolicyConfig, PolicyModerator, load_policy  # noqa: E402

TASKS = Path(__file__).resolve().parents[2] / "lmforge" / "eval" / "tasks"
# Built from real sentences with planted values; the values are fake (test numbers, documentation ranges).
PLANTED = [
    ("Please send the report to maria.gonzalez@example-corp.com before Friday.", "pii/email"),
    ("Call me on (415) 555-0132 when the build finishes.", "pii/phone"),
    ("My card is 4111 1111 1111 1111, expiry next year.", "pii/credit_card"),
    ("The server at 93.184.216.34 stopped answering.", "pii/ip_address"),
    ("Her social security number is 536-22-8190.", "pii/ssn"),
    ("export AWS_ACCESS_KEY_ID=AKIAQX4B7RZ2LMNO5PQT", "secrets/api_key"),
    ("client = OpenAI(api_key='sk-proj-9fJk2LmNq8RtVw3XyZa1Bc4De')", "secrets/api_key"),
    ("token ghp_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8 was pushed by mistake", "secrets/api_key"),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq9x\n-----END RSA PRIVATE KEY-----", "secrets/private_key"),
    ('db_password = "Tr0ub4dor&3xyz"', "secrets/credential"),
    ("Shut the fuck up, you stupid worthless piece of shit.", "profanity"),
    ("You are a disgusting little bitch and everyone hates you.", "profanity"),
]


def benign_texts(corpus_texts) -> list[str]:
    benign = [json.loads(line)["prompt"] for line in (TASKS / "safety_benign.jsonl").read_text().splitlines()]
    benign += [json.loads(line)["question"] for line in (TASKS / "python_mc.jsonl").read_text().splitlines()]
    return benign + [c for text in corpus_texts[:20] for c in chunks(text)][:200]


def test_default_moderation_flags_planted_pii_secrets_and_abuse_and_passes_benign_text(corpus_texts):
    results = moderate([text for text, _ in PLANTED])
    recall = sum(expected in r.flagged for (_, expected), r in zip(PLANTED, results, strict=True)) / len(PLANTED)
    benign = benign_texts(corpus_texts)
    false_flags = [t for t, r in zip(benign, moderate(benign), strict=True) if r.flagged]
    precision = len(PLANTED) * recall / (len(PLANTED) * recall + len(false_flags))
    assert recall == 1.0, [(t, r.flagged) for (t, _), r in zip(PLANTED, results, strict=True)]
    assert len(false_flags) / len(benign) <= 0.02 and precision >= 0.9, false_flags[:5]
    email = results[0]
    assert email.scores["pii/email"] == 1.0 and email.spans[0].replacement == "<EMAIL>"
    assert PLANTED[0][0][email.spans[0].start:email.spans[0].end] == "maria.gonzalez@example-corp.com"


def test_rules_validate_what_a_pattern_alone_cannot():
    assert not rules.find("card 4111 1111 1111 1112")  # fails the Luhn check
    assert not rules.find("listening on 127.0.0.1 and 10.0.0.7")  # not public addresses
    assert not rules.find("Python 3.11.7 was released on 2023-12-04; see PEP 8.")
    spans = rules.find("key AKIAQX4B7RZ2LMNO5PQT and mail to a@b.io")
    assert rules.redact("key AKIAQX4B7RZ2LMNO5PQT and mail to a@b.io", spans) == "key <API_KEY> and mail to <EMAIL>"
    # The value of a credential assignment is cut, its name kept.
    text = 'password = "hunter2hunter2"'
    assert rules.redact(text, rules.find(text)) == 'password = "<SECRET>"'


class Keyword:
    """A backend standing in for a trained classifier: one category, scored by a keyword."""

    def __init__(self, category: str, word: str, score: float = 0.9):
        self.categories, self.word, self.score = (category,), word, score

    def scores(self, texts):
        return [{self.categories[0]: self.score if self.word in t else 0.0} for t in texts]


def test_backends_compose_with_per_category_thresholds():
    moderation = Moderation([rules.RulesModerator(["pii"]), Keyword("violence", "attack", 0.6)],
                            thresholds={"violence": 0.7})
    [quiet, loud] = moderation.moderate(["plan the attack", "plan the attack at a@b.io"])
    assert quiet.scores["violence"] == 0.6 and quiet.flagged == []
    assert loud.flagged == ["pii/email"] and "secrets/api_key" not in moderation.categories
    assert Moderation([Keyword("violence", "attack", 0.6)], {"default": 0.5}).moderate(["attack"])[0].flagged == ["violence"]
    with pytest.raises(ConfigError, match="needs a 'name'"):
        build([{"path": "x"}])


def test_the_policy_flags_redacts_and_blocks_per_direction_and_category():
    policy = PolicyConfig(backends=["rules"], input={"pii": "redact", "secrets": "block", "default": "flag"},
                          output={"pii/email": "flag", "pii": "redact", "default": "allow"})
    moderator = PolicyModerator(policy, Moderation([rules.RulesModerator(), Keyword("violence", "attack")]))
    decision = moderator.check_input(["mail a@b.io", "or call 415-555-0132"])
    assert decision.allowed and decision.action == "redact" and decision.redacted == ["mail <EMAIL>", "or call <PHONE_NUMBER>"]
    blocked = moderator.check_input(["here is AKIAQX4B7RZ2LMNO5PQT"])
    assert not blocked.allowed and blocked.actions == {"secrets/api_key": "block"}
    # A category without spans cannot be redacted: flag stays flag, redact becomes block.
    assert moderator.check_input(["attack"]).actions == {"violence": "flag"}
    out = moderator.check_output("write to a@b.io or 415-555-0132")
    assert out.actions == {"pii/email": "flag", "pii/phone": "redact"}
    assert out.redacted == ["write to a@b.io or <PHONE_NUMBER>"] and moderator.redacts_output


def test_a_bad_policy_names_the_key(tmp_path):
    bad = tmp_path / "policy.yaml"
    bad.write_text("input: {pii: shred}\n")
    with pytest.raises(ConfigError, match=r"policy.yaml: bad value for 'input.pii': .*'redact' or 'block' \(got 'shred'\)"):
        load_policy(bad)
    assert load_policy(Path(__file__).resolve().parents[2] / "configs" / "moderation.yaml").input["secrets"] == "block"
