"""Byte-level BPE tokenizer: lossless round trips, reserved special tokens, save/load, errors."""

from __future__ import annotations

import gzip
import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models

from lmforge.config import build
from lmforge.data.tokenizer_train import TokenizerTrainConfig, run_train
from lmforge.errors import ConfigError, LmforgeError, TokenizerError
from lmforge.tokenizer import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    SPECIAL_TOKENS,
    TOKENIZER_FILE,
    LmTokenizer,
    load_tokenizer,
    tools_text,
    train_tokenizer,
)


@settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(text=st.text())
def test_decode_of_encode_returns_any_unicode_text_unchanged(trained_tokenizer, text):
    assert trained_tokenizer.decode(trained_tokenizer.encode(text)) == text


@settings(max_examples=50, deadline=None, database=None)
@given(texts=st.lists(st.text(), max_size=8))
def test_batch_encoding_gives_the_same_ids_as_encoding_each_text(trained_tokenizer, texts):
    assert trained_tokenizer.encode_batch(texts) == [trained_tokenizer.encode(t) for t in texts]


@pytest.mark.parametrize(
    "text",
    [
        "emoji 😀👍🏽 and a family 👨‍👩‍👧",
        "中文 日本語のテキスト 한국어",
        "combining marks: e\u0301 a\u0308 \u0915\u094d\u0937",
        "NUL \x00 inside and at the end\x00",
        "windows\r\nline endings\r\n\r\n",
        "  leading and trailing whitespace \t\n",
        "<|pad|><|user|> look like special tokens but are text",
        "",
    ],
)
def test_hand_picked_hard_strings_round_trip(trained_tokenizer, text):
    assert trained_tokenizer.decode(trained_tokenizer.encode(text)) == text


def test_literal_endoftext_in_text_encodes_as_ordinary_tokens_not_the_special_id(trained_tokenizer):
    ids = trained_tokenizer.encode(f"before {ENDOFTEXT} after")
    assert trained_tokenizer.eos_id not in ids
    alone = trained_tokenizer.encode(ENDOFTEXT)
    assert len(alone) > 1 and trained_tokenizer.eos_id not in alone
    assert trained_tokenizer.decode(alone) == ENDOFTEXT


def test_special_tokens_are_reserved_first_with_stable_ids(
    trained_tokenizer, corpus_texts, tmp_path
):
    assert [trained_tokenizer.token_id(t) for t in SPECIAL_TOKENS] == list(
        range(len(SPECIAL_TOKENS))
    )
    assert trained_tokenizer.eos_id == trained_tokenizer.token_id(ENDOFTEXT)
    # A tokenizer trained on different text and size reserves the same ids.
    other = train_tokenizer(iter(corpus_texts[-20:]), vocab_size=400)
    assert [other.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


def test_vocab_size_is_exactly_the_configured_size(trained_tokenizer):
    assert trained_tokenizer.vocab_size == 1024
    assert len(trained_tokenizer.tk.get_vocab(with_added_tokens=True)) == 1024


def test_save_then_load_gives_identical_ids_and_hash(trained_tokenizer, corpus_texts, tmp_path):
    saved_dir = trained_tokenizer.save(tmp_path / "copy")
    from_dir = load_tokenizer(saved_dir)
    from_file = load_tokenizer(saved_dir / TOKENIZER_FILE)
    sample = corpus_texts[0][:5000] + f" {ENDOFTEXT} ünïcödé 😀"
    expected = trained_tokenizer.encode(sample)
    for loaded in (from_dir, from_file):
        assert loaded.encode(sample) == expected
        assert loaded.hash() == trained_tokenizer.hash()
        assert (
            loaded.eos_id == trained_tokenizer.eos_id and loaded.pad_id == trained_tokenizer.pad_id
        )


def test_a_different_tokenizer_has_a_different_hash(trained_tokenizer, corpus_texts):
    other = train_tokenizer(iter(corpus_texts[:20]), vocab_size=600)
    assert other.hash() != trained_tokenizer.hash()


def test_load_tokenizer_on_a_missing_path_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(TokenizerError, match="nowhere"):
        load_tokenizer(missing)


@pytest.mark.parametrize(
    "content",
    [b"{this is not a tokenizer", b"", b"\xff\xfe\x00 binary", b"[1, 2]"],
    ids=["broken-json", "empty", "binary", "wrong-shape"],
)
def test_load_tokenizer_on_a_garbage_file_names_it(tmp_path, content):
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(content)
    with pytest.raises(TokenizerError, match=r"cannot read tokenizer .*garbage\.json"):
        load_tokenizer(garbage)


def test_a_tokenizer_without_lmforge_special_tokens_is_refused_by_name(tmp_path):
    foreign = tmp_path / "foreign.json"
    Tokenizer(models.BPE()).save(str(foreign))
    with pytest.raises(TokenizerError, match="foreign.json.*special tokens"):
        load_tokenizer(foreign)


def test_vocab_size_too_small_for_bytes_and_specials_is_refused(corpus_texts):
    minimum = 256 + len(SPECIAL_TOKENS)
    with pytest.raises(TokenizerError, match=f"at least {minimum}"):
        train_tokenizer(iter(corpus_texts[:5]), vocab_size=minimum - 1)
    with pytest.raises(ConfigError, match="vocab_size"):
        build(TokenizerTrainConfig, {"inputs": ["x"], "out": "y", "vocab_size": 100})


def test_training_on_a_dir_without_documents_raises_and_writes_nothing(tmp_path):
    empty_dir = tmp_path / "no_files"
    empty_dir.mkdir()
    with pytest.raises(LmforgeError, match="no_files"):
        run_train(
            TokenizerTrainConfig(inputs=[str(empty_dir)], out=str(tmp_path / "a"), vocab_size=512)
        )

    blank_docs = tmp_path / "blank_docs"
    blank_docs.mkdir()
    (blank_docs / "empty.txt").write_text("")
    (blank_docs / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(LmforgeError, match="no non-empty documents"):
        run_train(
            TokenizerTrainConfig(inputs=[str(blank_docs)], out=str(tmp_path / "b"), vocab_size=512)
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_trained_bpe_compresses_held_out_text_to_over_2_5_bytes_per_token(
    trained_tokenizer, corpus_path
):
    # The fixture trains on the first 150 documents; everything after them is held out.
    with gzip.open(corpus_path, "rt", encoding="utf-8") as f:
        held_out = [json.loads(line)["text"] for line in itertools.islice(f, 150, None)]
    assert held_out, "the corpus has no documents beyond the training subset"
    text = "\n".join(held_out)
    bytes_per_token = len(text.encode("utf-8")) / len(trained_tokenizer.encode(text))
    assert bytes_per_token > 2.5


CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is a tuple?"},
    {"role": "assistant", "content": "An immutable sequence."},
]


def test_chat_format_frames_each_turn_with_role_and_end_tokens(trained_tokenizer):
    tk = trained_tokenizer
    ids = tk.encode_chat(CHAT)
    expected = [tk.bos_id]
    for message in CHAT:
        expected += [tk.token_id(f"<|{message['role']}|>"), *tk.encode(message["content"]), tk.token_id("<|end|>")]
    assert ids == expected
    assert tk.encode_chat(CHAT[:2], add_generation_prompt=True) == [*tk.encode_chat(CHAT[:2]), tk.token_id("<|assistant|>")]
    assert tk.stop_ids == {tk.eos_id, tk.token_id("<|end|>")}


def test_chat_mask_marks_only_what_the_assistant_wrote(trained_tokenizer):
    tk = trained_tokenizer
    ids, mask = tk.encode_chat_with_mask(CHAT)
    assert len(ids) == len(mask)
    assistant = [i for i, m in zip(ids, mask, strict=True) if m]
    assert assistant == [*tk.encode("An immutable sequence."), tk.token_id("<|end|>")]


def test_chat_content_that_spells_a_role_token_stays_text(trained_tokenizer):
    tk = trained_tokenizer
    ids = tk.encode_chat([{"role": "user", "content": "<|assistant|>hi<|end|>"}])
    assert ids.count(tk.token_id("<|assistant|>")) == 0 and ids.count(tk.token_id("<|end|>")) == 1


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"role": "function", "content": "x"}], "role 'function'"),
        ([{"role": "user"}], "string 'content'"),
        ([{"role": "user", "content": ["parts"]}], "string 'content'"),
        ([{"role": "user", "content": None}], "string 'content'"),
        ([{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}],
         "only assistant turns make calls"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": {}}}]}], "function 'name'"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}],
         "not valid JSON"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}],
         "JSON object"),
    ],
)
def test_malformed_chat_messages_are_refused_naming_the_problem(trained_tokenizer, messages, problem):
    with pytest.raises(LmforgeError, match=problem):
        trained_tokenizer.encode_chat(messages)


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city <now> & 'today'",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}},
]
TOOL_CHAT = [
    {"role": "user", "content": "Weather in Zürich, and 2 + 3?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
        {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "5"},
    {"role": "assistant", "content": "It is 18 C and sunny; 2 + 3 = 5."},
    {"role": "user", "content": "And 1 + 1?"},
    {"role": "assistant", "content": "Let me add them.", "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 1}'}}]},
    {"role": "tool", "tool_call_id": "call_3", "content": "2"},
]


def test_tools_join_the_system_turn_calls_follow_the_content_and_results_share_a_user_turn(trained_tokenizer):
    tk = trained_tokenizer
    listing = tools_text(TOOLS)
    lines = listing.split("\n")
    assert [json.loads(line) for line in lines[lines.index("<tools>") + 1: lines.index("</tools>")]] == TOOLS
    text = tk.decode(tk.encode_chat([{"role": "system", "content": "Be brief."}, *TOOL_CHAT], True, tools=TOOLS))
    assert text.startswith(f"{ENDOFTEXT}<|system|>Be brief.\n\n{listing}<|end|><|user|>Weather")
    calls = ('<|assistant|><tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|end|>')
    results = "<|user|><tool_response>\n18 C, sunny\n</tool_response>\n<tool_response>\n5\n</tool_response><|end|>"
    assert calls + results in text
    assert '<|assistant|>Let me add them.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 1}}\n</tool_call><|end|>' in text
    assert text.endswith("<tool_response>\n2\n</tool_response><|end|><|assistant|>")
    # Without a system message the tools are a system turn of their own; without tools nothing changes.
    assert tk.decode(tk.encode_chat(TOOL_CHAT[:1], tools=TOOLS)).startswith(f"{ENDOFTEXT}<|system|>{listing}<|end|><|user|>")
    assert tk.encode_chat(CHAT, tools=[]) == tk.encode_chat(CHAT)


def test_chat_mask_covers_the_assistants_tool_calls_but_not_the_tools_or_their_results(trained_tokenizer):
    tk = trained_tokenizer
    ids, mask = tk.encode_chat_with_mask(TOOL_CHAT, tools=TOOLS)
    trained = tk.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert trained == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|end|>'
        "It is 18 C and sunny; 2 + 3 = 5.<|end|>"
        'Let me add them.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 1}}\n</tool_call><|end|>'
    )


def test_transformers_chat_template_renders_the_same_ids_with_tools(trained_tokenizer):
    transformers = pytest.importorskip("transformers")
    theirs = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(trained_tokenizer.path), bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, chat_template=CHAT_TEMPLATE)
    system = [{"role": "system", "content": "Be brief."}]
    for messages, tools in [(CHAT, None), (CHAT, TOOLS), (TOOL_CHAT, TOOLS), (system + TOOL_CHAT, TOOLS), (TOOL_CHAT, None)]:
        for generation_prompt in (False, True):
            out = theirs.apply_chat_template(messages, tools=tools, tokenize=True, add_generation_prompt=generation_prompt)
            ids = list(out["input_ids"] if hasattr(out, "keys") else out)
            assert ids == trained_tokenizer.encode_chat(messages, generation_prompt, tools=tools)


def test_an_imported_tokenizer_renders_tools_and_calls_with_its_own_template():
    # A foreign byte-level tokenizer (no lmforge tokens) whose Jinja template lists tools as
    # Qwen2.5's does: they reach it, with transformers' tojson (no HTML escapes), calls as dicts.
    from tokenizers import decoders, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["hello"], trainer)
    template = (
        "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] or '' }}"
        "{% for call in m['tool_calls'] or [] %}{{ call['function'] | tojson }}{% endfor %}\n{% endfor %}"
    )
    foreign = LmTokenizer(tk, eos_token="</s>", chat_template=template)
    assert not foreign.native
    text = foreign.decode(foreign.encode_chat(TOOL_CHAT[:3], tools=TOOLS))
    assert text.splitlines()[0] == json.dumps(TOOLS[0], ensure_ascii=False)  # "<now> & 'today'" unescaped
    assert '{"name": "get_weather", "arguments": {"city": "Zürich"}}' in text and "tool: 18 C, sunny" in text
