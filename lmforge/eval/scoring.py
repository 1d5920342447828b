"""Model-level scoring shared by lmforge's tasks and the lm-evaluation-harness adapter.

Requests follow lm-evaluation-harness's conventions so that numbers agree with its `hf`
backend: a (context, continuation) pair is encoded as whole-then-split with trailing
context spaces moved into the continuation, inputs are the last `max_length + 1` tokens
minus one, and long texts are scored in disjoint rolling windows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from lmforge.model import Transformer
from lmforge.monitor.progress import Progress
from lmforge.serve.config import EngineConfig
from lmforge.serve.engine import Engine
from lmforge.serve.sampling import SamplingParams
from lmforge.tokenizer import LmTokenizer


class Scorer:
    """Log-likelihoods and greedy generations of a model, batched."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: LmTokenizer,
        batch_size: int = 16,
        max_length: int | None = None,
        add_bos_token: bool = True,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_seq_len
        # Documents start with BOS in lmforge's training data, so contexts do too.
        self.add_bos_token = add_bos_token and tokenizer.bos_id is not None
        self.device = next(model.parameters()).device
        self._engine: Engine | None = None  # built on the first generation
        self.progress: Progress | None = None  # `lmforge eval` counts requests scored here

    def _advance(self, requests: int) -> None:
        if self.progress is not None:
            self.progress.update(requests)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS, else EOS (as the harness does)."""
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        add_bos = self.add_bos_token if add_bos is None else add_bos
        return self.tokenizer.encode_prompt(text) if add_bos else self.tokenizer.encode(text)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), split from the encoding of the whole string."""
        if not context:
            cont = self.encode(continuation, add_bos=False)
            return [self.prefix_token_id], cont
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self.encode(context + continuation), self.encode(context)
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def loglikelihood_tokens(self, requests: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """Sum of log p(continuation | context) and whether greedy decoding gives it, per request."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        rows = []
        for index, (context, continuation) in enumerate(requests):
            if not continuation:
                results[index] = (0.0, True)
                continue
            full = (context + continuation)[-(self.max_length + 1):]
            rows.append((index, full[:-1], len(continuation), continuation[-(self.max_length):]))
        # Longest first: batches pad little, and the first batch shows the peak memory.
        rows.sort(key=lambda row: -len(row[1]))
        for start in range(0, len(rows), self.batch_size):
            batch = rows[start : start + self.batch_size]
            width = len(batch[0][1])
            tokens = torch.zeros(len(batch), width, dtype=torch.long)
            for i, (_, inputs, _, _) in enumerate(batch):
                tokens[i, : len(inputs)] = torch.tensor(inputs)
            logits = self.model(tokens.to(self.device))
            for i, (index, inputs, cont_len, continuation) in enumerate(batch):
                cont_len = min(cont_len, len(inputs))
                scored = F.log_softmax(logits[i, len(inputs) - cont_len : len(inputs)].float(), dim=-1)
                target = torch.tensor(continuation[-cont_len:], device=scored.device)
                logprob = scored.gather(-1, target[:, None]).sum().item()
                greedy = bool((scored.argmax(-1) == target).all())
                results[index] = (logprob, greedy)
            self._advance(len(batch))
        return results  # type: ignore[return-value]

    def rolling_windows(self, ids: list[int]) -> Iterator[tuple[list[int], list[int]]]:
        """Disjoint windows covering every token of `ids`, each conditioned on what precedes it
        within the window; the first is conditioned on the prefix token."""
        tokens = [self.prefix_token_id, *ids]
        for start in range(1, len(tokens), self.max_length):
            end = min(start + self.max_length, len(tokens))
            context_start = max(0, end - self.max_length - 1)
            window = tokens[context_start:end]
            predicted = end - start
            yield window[: len(window) - predicted], window[len(window) - predicted:]

    def text_loglikelihood(self, texts: Sequence[str]) -> list[tuple[float, int]]:
        """(sum log-likelihood in nats, tokens scored) of each whole text."""
        windows, owners = [], []
        for index, text in enumerate(texts):
            for window in self.rolling_windows(self.encode(text, add_bos=False)):
                windows.append(window)
                owners.append(index)
        totals = [[0.0, 0] for _ in texts]
        for owner, (window, (logprob, _)) in zip(owners, zip(windows, self.loglikelihood_tokens(windows), strict=True), strict=True):
            totals[owner][0] += logprob
            totals[owner][1] += len(window[1])
        return [(total, count) for total, count in totals]

    def generate_until(self, context: str | list[int], until: Sequence[str], max_tokens: int) -> str:
        """Greedy continuation of `context` (text, or token ids as given), cut at the first stop string.

        Generation runs on lmforge's inference engine, the one decoder users get everywhere
        (`generate`, `chat`, `serve`), over this scorer's model.
        """
        ids = self.encode(context) if isinstance(context, str) else list(context)
        prompt = ids[-(self.max_length - max_tokens):] if max_tokens < self.max_length else []
        if not prompt:
            prompt = [self.prefix_token_id]
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, EngineConfig(max_num_seqs=1))
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=[s for s in until if s])
        text = self._engine.run_to_completion([prompt], params)[0].text
        self._advance(1)
        return text
