"""Alignment building blocks: chat data, loss masks, packing, DPO/IPO losses, LoRA, chat sessions."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lmforge.align import data as align_data
from lmforge.align.losses import preference_loss, reply_logprobs, sequence_logprobs
from lmforge.chat import ChatSession
from lmforge.errors import CheckpointError, DataError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.losses import IGNORE_INDEX
from lmforge.serve.config import EngineConfig
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams
from lmforge.store.adapter import LoraSettings, apply_lora, merge, save_adapter
from lmforge.store.loading import load_adapter

CONVERSATIONS = [
    [{"role": "user", "content": "What is the bisect module for?"},
     {"role": "assistant", "content": "It keeps a list sorted as items are inserted."}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "What does len() return?"},
     {"role": "assistant", "content": "The number of items."},
     {"role": "user", "content": "Of a string?"},
     {"role": "assistant", "content": "Its number of characters."}],
    [{"role": "user", "content": "Name a mutable sequence type."},
     {"role": "assistant", "content": "list"}],
]


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def model(trained_tokenizer) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset="tiny", vocab_size=1024, max_seq_len=128))
    model.init_weights(torch.Generator().manual_seed(0))
    return model


def sequences(tokenizer, loss_on="assistant"):
    return [align_data.encode_conversation(tokenizer, m, loss_on, 127) for m in CONVERSATIONS]


def test_loss_mask_trains_only_on_assistant_tokens_and_prompt_gradients_are_zero(trained_tokenizer, model):
    rows = align_data.build_rows(sequences(trained_tokenizer), 128, trained_tokenizer.pad_id, pack=False)
    trained_ids = rows.targets[rows.targets != IGNORE_INDEX].tolist()
    expected = []
    for messages in CONVERSATIONS:
        for m in messages:
            if m["role"] == "assistant":
                expected += [*trained_tokenizer.encode(m["content"]), trained_tokenizer.token_id("<|end|>")]
    assert trained_ids == expected
    # Prompt positions send exactly zero gradient into the model; assistant positions do not.
    inputs, targets = rows.inputs, rows.targets
    logits = model(inputs)
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    untrained = targets == IGNORE_INDEX
    assert logits.grad[untrained].abs().max().item() == 0.0
    assert logits.grad[~untrained].abs().sum().item() > 0


def test_loss_on_all_tokens_trains_on_the_prompt_too(trained_tokenizer):
    everything = align_data.build_rows(sequences(trained_tokenizer, "all"), 128, trained_tokenizer.pad_id, pack=False)
    assistant = align_data.build_rows(sequences(trained_tokenizer), 128, trained_tokenizer.pad_id, pack=False)
    assert (everything.targets != IGNORE_INDEX).sum() > (assistant.targets != IGNORE_INDEX).sum()


def test_packed_and_padded_batches_give_the_same_loss(trained_tokenizer, model):
    seqs = sequences(trained_tokenizer)
    packed = align_data.build_rows(seqs, 128, trained_tokenizer.pad_id, pack=True)
    padded = align_data.build_rows(seqs, 128, trained_tokenizer.pad_id, pack=False)
    assert len(packed) == 1 and len(padded) == 3
    assert packed.document_ids[0].max().item() == 2
    with torch.no_grad():
        loss_packed = model(packed.inputs, packed.targets, document_ids=packed.document_ids)
        loss_padded = model(padded.inputs, padded.targets)
    assert loss_packed.item() == pytest.approx(loss_padded.item(), abs=1e-5)
    # Training path (fused head + loss) too.
    assert model(packed.inputs, packed.targets, document_ids=packed.document_ids).item() == pytest.approx(
        loss_padded.item(), abs=1e-5
    )


def test_micro_batches_cut_to_their_longest_row_give_the_same_losses(trained_tokenizer, model):
    """SFT and DPO batches drop the padding columns no row needs: the width is the longest row
    rounded up to WIDTH_MULTIPLE, and the loss (and DPO log-probs) equal the full-width ones."""
    from lmforge.align.objectives import DPOObjective, SFTObjective, pair_batch

    seqs = sequences(trained_tokenizer)
    padded = align_data.build_rows(seqs, 128, trained_tokenizer.pad_id, pack=False)
    assert padded.lengths.tolist() == [len(s.ids) - 1 for s in seqs]
    longest = max(len(s.ids) - 1 for s in seqs)
    sft = SFTObjective(padded, None, 128, micro_batch_size=3, accum=1, seed=0)
    batch = sft.batch(0, 0)
    width = batch["inputs"].shape[1]
    assert longest <= width < longest + align_data.WIDTH_MULTIPLE and width % align_data.WIDTH_MULTIPLE == 0
    assert sft.tokens_per_step == round(3 * padded.lengths.float().mean().item())
    with torch.no_grad():
        order = sft.loader.rows(0, 0)
        full = padded.select(order)
        assert model(batch["inputs"], batch["targets"]).item() == pytest.approx(model(full.inputs, full.targets).item(), abs=1e-5)

    prompt = [{"role": "user", "content": "Which module sorts lists?"}]
    pairs = [align_data.encode_preference(trained_tokenizer, prompt, [{"role": "assistant", "content": good}],
                                          [{"role": "assistant", "content": bad}], 127)
             for good, bad in (("bisect keeps a list sorted as you insert", "os"), ("heapq", "the sys module, mostly"))]
    chosen = align_data.build_rows_exact([p.chosen for p in pairs], 127, trained_tokenizer.pad_id)
    rejected = align_data.build_rows_exact([p.rejected for p in pairs], 127, trained_tokenizer.pad_id)
    cut = pair_batch(chosen, rejected)
    assert cut["inputs"].shape[1] < 127
    with torch.no_grad():
        trimmed = sequence_logprobs(model(cut["inputs"]), cut["targets"])
        whole = sequence_logprobs(model(torch.cat([chosen.inputs, rejected.inputs])), torch.cat([chosen.targets, rejected.targets]))
    assert trimmed.tolist() == pytest.approx(whole.tolist(), abs=1e-4)
    with torch.no_grad():  # the head only from the first reply token on: the same log-probs
        assert reply_logprobs(model, cut["inputs"], cut["targets"]).tolist() == pytest.approx(trimmed.tolist(), abs=1e-4)
    dpo = DPOObjective(chosen, rejected, torch.zeros(2, 2), None, 127, 2, 1, 0, 0.1, "sigmoid")
    assert dpo.batch(0, 0)["inputs"].shape[1] == cut["inputs"].shape[1]
    assert dpo.tokens_per_step == int((chosen.lengths + rejected.lengths).sum())


def test_dpo_loss_equals_the_closed_form_on_hand_computed_logprobs():
    pc, pr = torch.tensor([-4.0, -7.5]), torch.tensor([-6.0, -7.0])
    rc, rr = torch.tensor([-5.0, -7.0]), torch.tensor([-5.5, -8.0])
    beta = 0.1
    stats = preference_loss(pc, pr, rc, rr, beta)
    by_hand = [-math.log(1 / (1 + math.exp(-beta * ((-4 + 5) - (-6 + 5.5))))),
               -math.log(1 / (1 + math.exp(-beta * ((-7.5 + 7) - (-7 + 8)))))]
    assert stats.loss.item() == pytest.approx(sum(by_hand) / 2, rel=1e-6)
    assert stats.chosen_reward.tolist() == pytest.approx([0.1, -0.05])
    assert stats.accuracy.tolist() == [1.0, 0.0]
    ipo = preference_loss(pc, pr, rc, rr, beta, "ipo")
    assert ipo.loss.item() == pytest.approx(((1.5 - 5) ** 2 + (-1.5 - 5) ** 2) / 2)


def test_sequence_logprobs_sum_only_the_reply_tokens(trained_tokenizer, model):
    prompt = [{"role": "user", "content": "Which module sorts lists?"}]
    pair = align_data.encode_preference(
        trained_tokenizer, prompt, [{"role": "assistant", "content": "bisect"}], [{"role": "assistant", "content": "os"}], 127
    )
    rows = align_data.build_rows_exact([pair.chosen, pair.rejected], 127, trained_tokenizer.pad_id)
    with torch.no_grad():
        got = sequence_logprobs(model(rows.inputs), rows.targets)
        ids = pair.chosen.ids
        logprobs = model(torch.tensor([ids[:-1]]))[0].log_softmax(-1)
        reply_start = len(trained_tokenizer.encode_chat(prompt, add_generation_prompt=True))
        direct = sum(logprobs[i - 1, ids[i]].item() for i in range(reply_start, len(ids)))
    assert got[0].item() == pytest.approx(direct, abs=1e-4)


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"text": "hi"}, r"c.jsonl:2: record has no 'messages'"),
        ({"messages": [{"role": "user", "content": "hi"}]}, r"c.jsonl:2: conversation has no assistant turn"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, r"c.jsonl:2: chat message 0 has role 'robot'"),
        ({"messages": "hello"}, r"c.jsonl:2: chat message 0 has role 'user'|c.jsonl:2: conversation has no assistant"),
        ("[1, 2]", r"c.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_conversation_records_name_the_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": CONVERSATIONS[0]}, record])
    with pytest.raises(DataError, match=message):
        align_data.read_conversations(path)


def test_bad_preference_records_name_the_line(tmp_path):
    ok = {"prompt": "Which?", "chosen": "this", "rejected": "that"}
    path = write_jsonl(tmp_path / "p.jsonl", [ok, {"prompt": "Which?", "chosen": "this"}])
    with pytest.raises(DataError, match=r"p.jsonl:2: preference record lacks 'rejected'"):
        align_data.read_preferences(path)
    path = write_jsonl(tmp_path / "p.jsonl", [ok, {**ok, "chosen": [{"role": "user", "content": "x"}]}])
    with pytest.raises(DataError, match=r"p.jsonl:2: 'chosen' must hold assistant turns only"):
        align_data.read_preferences(path)
    assert align_data.read_preferences(write_jsonl(tmp_path / "ok.jsonl", [ok]))[0][1] == [{"role": "user", "content": "Which?"}]


def test_lora_merged_and_unmerged_give_the_same_logits_and_the_base_is_untouched(model, tmp_path):
    base = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = torch.randint(0, 1024, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = model(tokens)
    wrapped = apply_lora(model, LoraSettings(enabled=True, r=4, alpha=8))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        wrapped(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
    base_now = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                for k, v in wrapped.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], base_now[k]) for k in base)
    with torch.no_grad():
        unmerged = wrapped(tokens)
    assert (unmerged - base_logits).abs().max().item() > 1e-3  # trained adapters: merging them is not a no-op
    checkpoint_dir = tmp_path / "base"
    save_adapter(tmp_path / "adapter", wrapped, str(checkpoint_dir))
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    merged = merge(wrapped)
    assert isinstance(merged, Transformer)
    with torch.no_grad():
        assert (merged(tokens) - unmerged).abs().max().item() < 1e-5
    with pytest.raises(CheckpointError, match="not a LoRA adapter dir"):
        load_adapter(tmp_path)


def test_chat_session_keeps_the_conversation_and_trims_the_oldest_turns(trained_tokenizer, model):
    engine = Engine(model, trained_tokenizer, EngineConfig(max_num_seqs=1))
    session = ChatSession(engine, SamplingParams(max_tokens=8, temperature=0), system="Be brief.")
    reply = "".join(session.send("What is a list?"))
    assert session.messages[-1] == {"role": "assistant", "content": reply}
    for _ in range(12):
        "".join(session.send("Tell me more about lists and tuples and sets and dicts, please."))
    assert session.messages[0]["role"] == "system"
    assert len(trained_tokenizer.encode_chat(session.messages[:-1], True)) <= 128 - 8
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]
    engine.shutdown()
