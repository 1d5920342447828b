"""Log-probs in the two OpenAI layouts: legacy completions and chat."""

from __future__ import annotations

from lmforge.serve.sampling import TokenLogprob
from lmforge.tokenizer import LmTokenizer


def completion_logprobs(
    tokenizer: LmTokenizer,
    generated: list[TokenLogprob],
    prompt_ids: list[int] | None = None,
    prompt_logprobs: list[TokenLogprob | None] | None = None,
) -> dict:
    """{"tokens", "token_logprobs", "top_logprobs", "text_offset"}; with `prompt_ids` (echo) the
    prompt's tokens come first, the very first with null log-probs (nothing predicts it)."""
    entries: list[tuple[int, float | None, list | None]] = []
    for i, token in enumerate(prompt_ids or []):
        lp = prompt_logprobs[i] if prompt_logprobs and i < len(prompt_logprobs) else None
        entries.append((token, lp.logprob if lp else None, lp.top if lp else None))
    entries += [(lp.token_id, lp.logprob, lp.top) for lp in generated]
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = 0
    for token, logprob, top in entries:
        text = tokenizer.decode([token])
        tokens.append(text)
        token_logprobs.append(logprob)
        if top is None:
            top_logprobs.append(None)
        else:
            # The chosen token first, then the top ones (which win if two render alike).
            table = {text: logprob}
            table.update({tokenizer.decode([t]): v for t, v in top})
            top_logprobs.append(table)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(tokenizer: LmTokenizer, generated: list[TokenLogprob]) -> list[dict]:
    def entry(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in generated]
