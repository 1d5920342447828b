"""The reference decoder and sample_next: greedy, seeded temperature / top-k / top-p, stop ids and limits."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import ConfigError
from lmforge.model import ModelConfig, Transformer
from lmforge.model.decode import generate_tokens, sample_next

CONTEXT = 48
PROMPT = [0, 17, 230, 5, 999, 42]


@pytest.fixture(scope="module")
def model() -> Transformer:
    # A larger init scale than training's makes next-token distributions far from uniform,
    # so greedy choices have clear margins and different seeds visibly differ.
    config = ModelConfig(preset="tiny", vocab_size=1024, max_seq_len=CONTEXT, init_std=0.1)
    model = Transformer(config).eval()
    model.init_weights(generator=torch.Generator().manual_seed(0))
    return model


def run(model, prompt=PROMPT, stop_ids=None, max_tokens=128, **sampling) -> list[int]:
    return list(generate_tokens(model, prompt, max_tokens, stop_ids=stop_ids, **sampling))


def test_greedy_is_deterministic_and_each_token_is_the_argmax_of_a_full_forward(model):
    first = run(model, temperature=0, max_tokens=20)
    assert first == run(model, temperature=0, max_tokens=20)
    assert len(first) == 20
    sequence = list(PROMPT)
    with torch.no_grad():
        for token in first:
            logits = model(torch.tensor([sequence]))[0, -1]
            assert token == int(logits.argmax())
            sequence.append(token)


def test_seeded_sampling_is_reproducible_and_different_seeds_differ(model):
    a = run(model, temperature=1.0, seed=1, max_tokens=24)
    assert a == run(model, temperature=1.0, seed=1, max_tokens=24)
    assert a != run(model, temperature=1.0, seed=2, max_tokens=24)
    assert a != run(model, temperature=0, max_tokens=24)


def test_top_k_one_equals_greedy(model):
    greedy = run(model, temperature=0, max_tokens=20)
    assert run(model, temperature=1.5, top_k=1, seed=3, max_tokens=20) == greedy


def test_tiny_top_p_equals_greedy(model):
    greedy = run(model, temperature=0, max_tokens=20)
    assert run(model, temperature=1.5, top_p=1e-6, seed=3, max_tokens=20) == greedy


def test_top_k_samples_only_the_k_most_likely_tokens():
    logits = torch.tensor([[2.0, 1.9, 1.8, 0.5, 0.4, 0.3]]).expand(4000, -1)
    generator = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, temperature=1.0, top_k=2, generator=generator)
    assert set(drawn.tolist()) == {0, 1}


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    logits = probs.log().expand(4000, -1)
    generator = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, temperature=1.0, top_p=0.6, generator=generator)
    assert set(drawn.tolist()) == {0, 1}
    # Within the nucleus, tokens keep their relative odds (0.4 : 0.3).
    share = (drawn == 0).float().mean().item()
    assert abs(share - 4 / 7) < 0.03


def test_generation_stops_before_the_first_stop_id(model):
    unstopped = run(model, temperature=0, max_tokens=20)
    stop = unstopped[5]
    first = unstopped.index(stop)
    assert first > 0
    assert run(model, temperature=0, max_tokens=20, stop_ids={stop}) == unstopped[:first]
    assert stop not in run(model, temperature=1.0, seed=4, max_tokens=20, stop_ids={stop})


def test_max_tokens_is_respected_and_the_context_caps_it(model):
    assert len(run(model, temperature=1.0, seed=0, max_tokens=7)) == 7
    assert len(run(model, temperature=0, max_tokens=1)) == 1
    long_prompt = list(range(CONTEXT - 3))
    assert len(run(model, prompt=long_prompt, temperature=0, max_tokens=50)) == 3
    assert len(run(model, prompt=list(range(CONTEXT - 1)), temperature=0, max_tokens=50)) == 1


@pytest.mark.parametrize("length", [CONTEXT, CONTEXT + 10])
def test_a_prompt_that_fills_the_context_is_a_config_error(model, length):
    with pytest.raises(
        ConfigError, match=f"prompt has {length} tokens; the model's context is {CONTEXT}"
    ):
        run(model, prompt=list(range(length)), temperature=0)


def test_an_empty_prompt_is_a_config_error(model):
    with pytest.raises(ConfigError, match="prompt is empty"):
        run(model, prompt=[], temperature=0)
