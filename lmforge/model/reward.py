"""A reward model: the decoder with a scalar head in place of the vocabulary projection.

A sequence's reward is `score(h)`, a Linear(dim, 1) without bias applied to the final
hidden state `h` of its last non-pad token, the pooling of transformers'
`LlamaForSequenceClassification`, so an exported reward model gives the same numbers there.
"""

from __future__ import annotations

import torch
from torch import nn

from lmforge.model.config import ModelConfig
from lmforge.model.transformer import Transformer


def last_token_index(tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[batch] index of each row's last non-pad token (0 for an all-pad row), as transformers pools."""
    positions = torch.arange(tokens.shape[-1], device=tokens.device)
    return (positions * (tokens != pad_id).int()).argmax(-1)


class RewardModel(Transformer):
    """`forward(tokens)` -> rewards [batch]. The language-model head stays (tied to the embedding,
    or frozen) so checkpoints keep the decoder's layout; it takes no part in the reward."""

    def __init__(self, config: ModelConfig, pad_id: int):
        super().__init__(config)
        self.pad_id = pad_id
        self.score = nn.Linear(config.dim, 1, bias=False)
        self.init_score()

    @torch.no_grad()
    def init_score(self) -> None:
        # Zero: every pair starts at margin 0 (loss log 2), identically on every rank and seed.
        nn.init.zeros_(self.score.weight)
        if not self.config.tie_embeddings:
            self.output.weight.requires_grad_(False)  # unused: DDP must not wait for its gradient

    @classmethod
    def from_lm(cls, lm: Transformer, pad_id: int) -> RewardModel:
        """A reward model on `lm`'s weights (copied) with a zero score head."""
        with torch.device("meta"):
            model = cls(lm.config, pad_id)
        model.to_empty(device=lm.tok_embeddings.weight.device)
        model.init_rope()
        missing, unexpected = model.load_state_dict(lm.state_dict(), strict=False)
        if missing != ["score.weight"] or unexpected:
            raise ValueError(f"unexpected weights: missing {missing}, unexpected {unexpected}")
        model.init_score()
        return model.train(lm.training)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        hidden = self.hidden_states(tokens)
        last = last_token_index(tokens, self.pad_id)
        return self.score(hidden[torch.arange(tokens.shape[0], device=tokens.device), last]).squeeze(-1)
