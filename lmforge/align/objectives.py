"""SFT and DPO as trainer objectives: batches as a pure function of the step, their losses.

Rows (packed conversations for SFT, chosen/rejected pairs for DPO) are visited in a
seeded permutation per epoch, so resuming needs only the step, as in pretraining.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lmforge.align.data import Rows, pair_width
from lmforge.align.losses import preference_loss, reply_logprobs
from lmforge.device import autocast
from lmforge.errors import DataError
from lmforge.train.objective import LoaderState


class RowLoader:
    """Row indices for (step, micro_step): sample k is row perm(seed, epoch)[k % num_rows].

    A step's samples are split into one contiguous block per rank (micro batches in order),
    so the union over ranks is the same set of rows whatever the world size, as in pretraining.
    """

    def __init__(self, num_rows: int, micro_batch_size: int, grad_accum_steps: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if num_rows < 1:
            raise DataError("no training rows")
        self.num_rows, self.micro_batch_size, self.grad_accum_steps, self.seed = num_rows, micro_batch_size, grad_accum_steps, seed
        self.rank, self.world_size = rank, world_size
        self._epoch, self._perm = -1, np.arange(0)

    @property
    def samples_per_step(self) -> int:
        """Over all ranks."""
        return self.micro_batch_size * self.grad_accum_steps * self.world_size

    def rows(self, step: int, micro_step: int) -> list[int]:
        first = step * self.samples_per_step + (self.rank * self.grad_accum_steps + micro_step) * self.micro_batch_size
        out = []
        for sample in range(first, first + self.micro_batch_size):
            epoch, within = divmod(sample, self.num_rows)
            if epoch != self._epoch:
                self._perm, self._epoch = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows), epoch
            out.append(int(self._perm[within]))
        return out

    def state_dict(self, next_step: int) -> dict[str, Any]:
        return {"next_step": next_step, "samples_consumed": next_step * self.samples_per_step,
                "seed": self.seed, "num_rows": self.num_rows}

    def check_resume(self, state: dict[str, Any]) -> int:
        for key in ("seed", "num_rows"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"cannot resume: loader {key} was {state.get(key)}, is {getattr(self, key)} now (data or config changed)")
        if state["samples_consumed"] % self.samples_per_step:
            raise DataError("cannot resume: the global batch changed")
        return state["samples_consumed"] // self.samples_per_step


class SFTObjective(LoaderState):
    """Cross-entropy on the trained (assistant) tokens of packed or padded conversations."""

    kind = "sft"
    sharded = True  # batches are this rank's block of each step's rows

    def __init__(self, train: Rows, val: Rows | None, seq_len: int, micro_batch_size: int, accum: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.train_rows, self.val_rows, self.seq_len = train, val, seq_len
        self.loader = RowLoader(len(train), micro_batch_size, accum, seed, rank, world_size)
        # Real tokens (padding is cut from each micro-batch), on average over the data.
        self.tokens_per_step = round(self.loader.samples_per_step * train.lengths.float().mean().item())

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        rows = self.train_rows.select(self.loader.rows(step, micro_step)).trimmed()
        batch = {"inputs": rows.inputs, "targets": rows.targets}
        if rows.document_ids is not None:
            batch["document_ids"] = rows.document_ids
        return batch

    def loss(self, model, batch):
        return model(batch["inputs"], batch["targets"], document_ids=batch.get("document_ids")), {}

    @torch.no_grad()
    def validate(self, model, device, dtype) -> dict[str, float]:
        if self.val_rows is None or len(self.val_rows) == 0:
            return {}
        was_training = model.training
        model.eval()
        total = count = 0.0
        for start in range(0, len(self.val_rows), 8):
            rows = self.val_rows.select(list(range(start, min(start + 8, len(self.val_rows))))).trimmed()
            trained = int((rows.targets != -100).sum())
            docs = rows.document_ids.to(device) if rows.document_ids is not None else None
            with autocast(device, dtype):
                loss = model(rows.inputs.to(device), rows.targets.to(device), document_ids=docs)
            total += loss.item() * trained
            count += trained
        model.train(was_training)
        return {"val_loss": total / max(count, 1)}


class DPOObjective(LoaderState):
    """Direct preference optimisation against reference log-probs computed once, up front."""

    kind = "dpo"
    sharded = True

    def __init__(self, chosen: Rows, rejected: Rows, reference: torch.Tensor, val: tuple[Rows, Rows, torch.Tensor] | None,
                 seq_len: int, micro_batch_size: int, accum: int, seed: int, beta: float, loss_kind: str,
                 rank: int = 0, world_size: int = 1):
        self.chosen, self.rejected, self.reference, self.val = chosen, rejected, reference, val
        self.seq_len, self.beta, self.loss_kind = seq_len, beta, loss_kind
        self.loader = RowLoader(len(chosen), micro_batch_size, accum, seed, rank, world_size)
        # Real tokens of both replies (padding is cut from each micro-batch), on average over the pairs.
        self.tokens_per_step = round(self.loader.samples_per_step * (chosen.lengths + rejected.lengths).float().mean().item())

    def batch(self, step: int, micro_step: int) -> dict[str, torch.Tensor]:
        index = self.loader.rows(step, micro_step)
        return {**pair_batch(self.chosen.select(index), self.rejected.select(index)), "reference": self.reference[index]}

    def stats(self, model, batch):
        logprobs = reply_logprobs(model, batch["inputs"], batch["targets"])
        pairs = logprobs.shape[0] // 2
        reference = batch["reference"]
        return preference_loss(logprobs[:pairs], logprobs[pairs:], reference[:, 0], reference[:, 1], self.beta, self.loss_kind)

    def loss(self, model, batch):
        stats = self.stats(model, batch)
        return stats.loss, {"reward_margin": stats.margin.mean().item(), "preference_accuracy": stats.accuracy.mean().item(),
                            "chosen_reward": stats.chosen_reward.mean().item(), "rejected_reward": stats.rejected_reward.mean().item()}

    @torch.no_grad()
    def validate(self, model, device, dtype) -> dict[str, float]:
        if self.val is None:
            return {}
        chosen, rejected, reference = self.val
        was_training = model.training
        model.eval()
        losses, margins, accuracy = [], [], []
        for start in range(0, len(chosen), 8):
            index = list(range(start, min(start + 8, len(chosen))))
            batch = {k: v.to(device) for k, v in pair_batch(chosen.select(index), rejected.select(index)).items()}
            batch["reference"] = reference[index].to(device)
            with autocast(device, dtype):
                stats = self.stats(model, batch)
            losses.append(stats.loss.item() * len(index))
            margins += stats.margin.tolist()
            accuracy += stats.accuracy.tolist()
        model.train(was_training)
        n = len(chosen)
        return {"val_loss": sum(losses) / n, "val_reward_margin": sum(margins) / n, "val_preference_accuracy": sum(accuracy) / n}


def pair_batch(chosen: Rows, rejected: Rows) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows as one batch, cut to the width the longest of them needs."""
    width = pair_width(chosen, rejected)
    chosen, rejected = chosen.narrow(width), rejected.narrow(width)
    return {"inputs": torch.cat([chosen.inputs, rejected.inputs]), "targets": torch.cat([chosen.targets, rejected.targets])}


@torch.no_grad()
def reference_logprobs(model, chosen: Rows, rejected: Rows, device, dtype, batch_size: int = 8) -> torch.Tensor:
    """[pairs, 2] summed reply log-probs (chosen, rejected) under the frozen starting model."""
    model.eval()
    out = []
    for start in range(0, len(chosen), batch_size):
        index = list(range(start, min(start + batch_size, len(chosen))))
        batch = {k: v.to(device) for k, v in pair_batch(chosen.select(index), rejected.select(index)).items()}
        with autocast(device, dtype):
            logprobs = reply_logprobs(model, batch["inputs"], batch["targets"]).float().cpu()
        out.append(torch.stack([logprobs[: len(index)], logprobs[len(index):]], dim=1))
    return torch.cat(out)
