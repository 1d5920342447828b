"""The GRPO objective against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.align.grpo_loss import group_advantages, grpo_loss, k3_kl


def hand_example():
    # Two completions of two tokens; the second completion's last token is padding.
    logprobs = torch.tensor([[math.log(0.5), math.log(0.5)], [math.log(0.2), math.log(0.9)]], requires_grad=True)
    old = torch.tensor([[math.log(0.4), math.log(0.5)], [math.log(0.2), math.log(0.3)]])
    mask = torch.tensor([[1, 1], [1, 0]])
    return logprobs, old, torch.tensor([1.0, -1.0]), mask


def test_the_loss_equals_a_hand_computed_example_in_both_aggregations():
    logprobs, old, advantages, mask = hand_example()
    # ratios [[1.25, 1.0], [1.0, 3.0]]; A = +1: min(1.25, 1.2) -> -1.2 (clipped), -1.0; A = -1: +1.0; padding ignored.
    token = grpo_loss(logprobs, old, advantages, mask, aggregation="token")
    assert token.loss.item() == pytest.approx((-1.2 - 1.0 + 1.0) / 3, abs=1e-6)
    assert token.clip_fraction == pytest.approx(1 / 3, abs=1e-6) and token.kl == 0.0
    sequence = grpo_loss(logprobs, old, advantages, mask, aggregation="sequence")
    assert sequence.loss.item() == pytest.approx(((-1.2 - 1.0) / 2 + 1.0) / 2, abs=1e-6)
    token.loss.backward()
    # d/dlogp of -ratio * A / 3 is -ratio * A / 3 where unclipped; 0 where clipped or padded.
    expected = torch.tensor([[0.0, -1.0 / 3], [1.0 / 3, 0.0]])
    assert torch.allclose(logprobs.grad, expected, atol=1e-6)


def test_a_group_with_equal_rewards_has_zero_advantage():
    rewards = torch.tensor([[0.7, 0.7, 0.7, 0.7], [1.0, 0.0, 0.0, 1.0]])
    advantages = group_advantages(rewards)
    assert torch.equal(advantages[0], torch.zeros(4))
    assert torch.allclose(advantages[1], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-3)
    assert torch.allclose(group_advantages(rewards, scale=False)[1], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_kl_is_zero_when_the_policy_equals_the_reference_and_positive_otherwise():
    logprobs, old, advantages, mask = hand_example()
    assert torch.equal(k3_kl(old, old), torch.zeros_like(old))
    same = grpo_loss(logprobs, old, advantages, mask, ref_logprobs=logprobs.detach(), kl_coef=1.0)
    plain = grpo_loss(logprobs, old, advantages, mask)
    assert same.kl == pytest.approx(0.0, abs=1e-7) and same.loss.item() == pytest.approx(plain.loss.item(), abs=1e-7)
    apart = grpo_loss(logprobs, old, advantages, mask, ref_logprobs=old, kl_coef=0.5)
    assert apart.kl > 0 and apart.loss.item() > plain.loss.item()
