"""The GRPO objective: group-normalised advantages, a clipped policy ratio, a k3 KL penalty.

GRPO (Shao et al., 2024, DeepSeekMath, eq. 3): for each prompt, G sampled completions with
rewards r_1..r_G; advantage A_i = (r_i - mean(r)) / (std(r) + eps) for every token of
completion i; per token, with ratio rho = exp(logp - logp_old),

    L = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * KL_k3

KL_k3 (Schulman, "Approximating KL divergence", 2020): exp(ref - logp) - (ref - logp) - 1,
unbiased for KL(policy || reference) and never negative. Aggregation: `token` averages over
every completion token of the batch (DAPO, Yu et al., 2025: long completions weigh by their
length); `sequence` averages each completion's tokens, then the completions (the paper's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Aggregation = Literal["token", "sequence"]


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """[prompts, G] rewards -> advantages: minus the group mean, over the group std when `scale`.

    A group whose rewards are all equal has zero advantage everywhere: it teaches nothing.
    """
    centred = rewards - rewards.mean(dim=-1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(dim=-1, keepdim=True, unbiased=False) + eps)


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference); 0 where the two agree."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


@dataclass
class GRPOStats:
    loss: torch.Tensor
    kl: float  # mean per-token k3 KL (0 without a reference)
    clip_fraction: float  # share of tokens whose ratio was clipped where it mattered
    ratio_mean: float


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    kl_coef: float = 0.0,
    aggregation: Aggregation = "token",
    denominator: float | None = None,
) -> GRPOStats:
    """GRPO loss over [completions, tokens] log-probs of the sampled tokens.

    `old_logprobs` are those the rollouts were sampled with (detached); `advantages` is one
    value per completion ([completions]); `mask` marks completion tokens (1) against prompt
    and padding (0). `denominator`: divide the summed token (or per-completion) losses by
    this instead of this batch's token (completion) count, when the batch is one micro-batch
    of a larger step normalised as a whole.
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs.detach())
    adv = advantages.detach()[:, None]
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(per_token)
    if ref_logprobs is not None:
        kl = k3_kl(logprobs, ref_logprobs.detach())
        per_token = per_token + kl_coef * kl
    tokens = mask.sum().clamp(min=1)
    if aggregation == "token":
        loss = (per_token * mask).sum() / (tokens if denominator is None else denominator)
    elif aggregation == "sequence":
        per_completion = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        loss = per_completion.mean() if denominator is None else per_completion.sum() / denominator
    else:
        raise ValueError(f"aggregation must be token or sequence, got {aggregation!r}")
    with torch.no_grad():
        was_clipped = (clipped < unclipped).to(mask.dtype)  # the min picked the clipped term
        stats = dict(
            kl=((kl * mask).sum() / tokens).item(),
            clip_fraction=((was_clipped * mask).sum() / tokens).item(),
            ratio_mean=((ratio * mask).sum() / tokens).item(),
        )
    return GRPOStats(loss=loss, **stats)
