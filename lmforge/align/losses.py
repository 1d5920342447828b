"""Sequence log-probabilities and preference losses (DPO, IPO).

DPO (Rafailov et al., 2023, eq. 7):  -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
IPO (Azar et al., 2023, eq. 17):     ((pi_c - ref_c) - (pi_r - ref_r) - 1 / (2 * beta))^2
where pi_x / ref_x are summed log-probabilities of a reply under the policy / reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from lmforge.model.losses import IGNORE_INDEX

PreferenceLoss = Literal["sigmoid", "ipo"]


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over the scored (non-ignored) positions of each row: [batch]."""
    scored = targets != IGNORE_INDEX
    safe = targets.masked_fill(~scored, 0)
    logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, safe[..., None]).squeeze(-1)
    return (logprobs * scored).sum(-1)


def reply_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`sequence_logprobs` of `model` on `inputs`, the output head and log-softmax run only from the
    first scored position of any row on (`logits_to_keep`): a prompt's positions are never scored,
    so their vocabulary-wide logits would be computed and thrown away."""
    scored = targets != IGNORE_INDEX
    first = int(scored.int().argmax(dim=1).min()) if bool(scored.any()) else 0
    keep = targets.shape[1] - first
    return sequence_logprobs(model(inputs, logits_to_keep=keep), targets[:, first:])


@dataclass
class PreferenceStats:
    loss: torch.Tensor
    chosen_reward: torch.Tensor  # beta * (pi_c - ref_c), per pair
    rejected_reward: torch.Tensor

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_reward - self.rejected_reward

    @property
    def accuracy(self) -> torch.Tensor:
        return (self.chosen_reward > self.rejected_reward).float()


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    kind: PreferenceLoss = "sigmoid",
) -> PreferenceStats:
    """Mean loss over pairs and the implicit rewards beta * log(pi / ref)."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    logits = chosen_ratio - rejected_ratio
    losses = -F.logsigmoid(beta * logits) if kind == "sigmoid" else (logits - 1 / (2 * beta)) ** 2
    return PreferenceStats(losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
