"""The reward-model objective: a Bradley–Terry loss on chosen/rejected pairs, the data DPO reads.

Each pair is scored by the same model as two sequences (prompt + reply), and the loss is
-log sigmoid(r_chosen - r_rejected) (Bradley & Terry, 1952; Ouyang et al., 2022, eq. 1).
Rows are whole sequences (no next-token shift), right-padded: the reward is read at the
last non-pad token, so padding changes no number.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lmforge.align import data as align_data
from lmforge.align.objectives import RowLoader
from lmforge.device import autocast
from lmforge.errors import DataError
from lmforge.tokenizer import LmTokenizer
from lmforge.train.objective import LoaderState

log = logging.getLogger(__name__)


def encode_pairs(tokenizer: LmTokenizer, records: list, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) token rows [pairs, seq_len] of `read_preferences` records, padded with pad_id;
    pairs whose rows are identical (truncated alike) are left out."""
    pairs = [align_data.encode_preference(tokenizer, p, c, r, seq_len - 1) for _, p, c, r in records]

    def rows(sequences: list[align_data.Sequence]) -> torch.Tensor:
        out = torch.full((len(sequences), seq_len), tokenizer.pad_id, dtype=torch.long)
        for i, sequence in enumerate(sequences):
            out[i, : len(sequence.ids)] = torch.tensor(sequence.ids)
        return out

    chosen, rejected = rows([pair.chosen for pair in pairs]), rows([pair.rejected for pair in pairs])
    # Replies that differ only past seq_len become the same row: a pair with nothing to rank.
    distinct = (chosen != rejected).any(dim=1)
    if not distinct.any():
        raise DataError(f"no pair's replies differ within data.seq_len {seq_len} tokens")
    if not distinct.all():
        log.warning("rm: %d of %d pairs are identical within data.seq_len %d tokens; left out",
                    int((~distinct).sum()), len(pairs), seq_len)
    return chosen[distinct], rejected[distinct]


def used_length(rows: torch.Tensor, pad_id: int | None) -> torch.Tensor:
    """Per row: one past its last non-pad token (the whole width when pad_id is None)."""
    width = rows.shape[1]
    if pad_id is None:
        return torch.full((rows.shape[0],), width, dtype=torch.long)
    positions = torch.arange(1, width + 1).expand_as(rows)
    return torch.where(rows != pad_id, positions, 0).amax(dim=1).clamp(min=1)


def pair_stats(model, chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair: Bradley–Terry loss and reward margin r_chosen - r_rejected (fp32), one forward for both."""
    rewards = model(torch.cat([chosen, rejected])).float()
    margin = rewards[: chosen.shape[0]] - rewards[chosen.shape[0]:]
    return -F.logsigmoid(margin), margin


class RewardModelObjective(LoaderState):
    """Bradley–Terry on preference pairs; logs reward accuracy (chosen scored higher) and margin."""

    kind = "rm"
    sharded = True  # batches are this rank's block of each step's pairs

    def __init__(self, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None,
                 seq_len: int, micro_batch_size: int, accum: int, seed: int, rank: int = 0, world_size: int = 1,
                 pad_id: int | None = None):
        self.chosen, self.rejected = train
        self.val, self.seq_len = val, seq_len
        self.loader = RowLoader(len(self.chosen), micro_batch_size, accum, seed, rank, world_size)
        # Tokens in use per pair (the longer side): with pad_id known, micro-batches drop the
        # padding columns no row needs; the reward is read before them, so no number changes.
        width = self.chosen.shape[1]
        self.lengths = torch.maximum(used_length(self.chosen, pad_id), used_length(self.rejected, pad_id))
        self.tokens_per_step = round(2 * self.loader.samples_per_step * self.lengths.float().mean().item()) if pad_id is not None \
            else 2 * self.loader.samples_per_step * width

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        index = self.loader.rows(step, micro_step)
        width = align_data.rounded_width(int(self.lengths[index].max()), self.chosen.shape[1])
        return {"chosen": self.chosen[index, :width], "rejected": self.rejected[index, :width]}

    def loss(self, model, batch):
        losses, margin = pair_stats(model, batch["chosen"], batch["rejected"])
        return losses.mean(), {"reward_accuracy": (margin > 0).float().mean().item(),
                               "reward_margin": margin.mean().item()}

    @torch.no_grad()
    def validate(self, model, device, dtype) -> dict[str, float]:
        if self.val is None or len(self.val[0]) == 0:
            return {}
        chosen, rejected = self.val
        was_training = model.training
        model.eval()
        losses, margins = [], []
        for start in range(0, len(chosen), 8):
            with autocast(device, dtype):
                loss, margin = pair_stats(model, chosen[start: start + 8].to(device), rejected[start: start + 8].to(device))
            losses.append(loss.cpu())
            margins.append(margin.cpu())
        model.train(was_training)
        loss, margin = torch.cat(losses), torch.cat(margins)
        return {"val_loss": loss.mean().item(), "val_reward_accuracy": (margin > 0).float().mean().item(),
                "val_reward_margin": margin.mean().item()}


def reward_scorer(model, tokenizer: LmTokenizer, batch_size: int = 8) -> Callable[[list[str], list[str]], list[float]]:
    """`(prompts, completions) -> rewards`, the reward-model callable of align/rewards: each pair as a
    user turn and the assistant's reply in the chat format the model was trained on (the end of
    long one cut at the model's context)."""
    device = next(model.parameters()).device
    width = model.config.max_seq_len

    @torch.no_grad()
    def score(prompts: list[str], completions: list[str]) -> list[float]:
        rewards: list[float] = []
        for start in range(0, len(prompts), batch_size):
            ids = [tokenizer.encode_chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}])[:width]
                   for prompt, reply in zip(prompts[start: start + batch_size], completions[start: start + batch_size], strict=True)]
            tokens = torch.full((len(ids), max(map(len, ids))), tokenizer.pad_id, dtype=torch.long)
            for i, row in enumerate(ids):
                tokens[i, : len(row)] = torch.tensor(row)
            rewards += model(tokens.to(device)).float().tolist()
        return rewards

    return score
