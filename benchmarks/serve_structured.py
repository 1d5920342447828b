"""Structured outputs under load: `lmforge serve` with and without a JSON-schema `response_format`,
against HF transformers static batching doing the same work.

The model dir, prompts and clients are `serve_throughput.py`'s (the `small` preset, random
weights, C clients back to back). Without a format every request takes exactly `--max-tokens`
tokens; with one, the reply ends when its JSON is complete (or is closed by its budget, still
valid). HF's constrained rows run the same llguidance grammar as a `LogitsProcessor` (the way
transformers users add grammars), masks computed for the whole batch each step; a row that
reaches `--max-tokens` is simply cut, as `generate` does.

Also measured: the schema-validity rate of 200 sampled structured replies from the server
(budgets from the shortest valid reply up), and the grammar masks' share of the engine's time
(in-process `Engine`, same requests).

    .venv/bin/python benchmarks/serve_structured.py
    .venv/bin/python benchmarks/serve_structured.py --concurrency 1 4 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import jsonschema  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from benchmarks.serve_throughput import (  # noqa: E402
    build,
    closed_loop,
    free_port,
    hf_run,
    keep_best,
    percentile,
    start_server,
    stream_completion,
)
from lmforge.serve.engine import Engine  # noqa: E402
from lmforge.serve.sampling import SamplingParams  # noqa: E402
from lmforge.serve.structured import Grammars, StructuredSpec, unpack_bitmask  # noqa: E402
from lmforge.store.loading import load_model  # noqa: E402

# What an extraction call asks for: bounded and unbounded strings, an enum list, a nested object.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["python", "data", "web", "tools"]}, "maxItems": 3},
        "author": {"type": "object", "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                   "required": ["name", "email"], "additionalProperties": False},
        "summary": {"type": "string"},
    },
    "required": ["title", "year", "tags", "author", "summary"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}}
BASELINE = "HF static batch"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best throughput counts")
    p.add_argument("--validity-requests", type=int, default=200)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    return p.parse_args(argv)


def lmforge_send(http: httpx.AsyncClient, max_tokens: int, structured: bool):
    async def send(prompt, seed: int | None = None, budget: int | None = None, texts: list | None = None):
        body = {"prompt": prompt, "max_tokens": budget or max_tokens}
        if structured:
            body.update(response_format=FORMAT, temperature=1.0 if seed is not None else 0, seed=seed)
        else:
            body.update(temperature=0, ignore_eos=True)
        first, tokens, text = await stream_completion(http, body)
        if texts is not None:
            texts.append(text)
        return first, tokens
    return send


def lmforge_run(url: str, clients: int, prompts: list[list[int]], max_tokens: int, structured: bool):
    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as http:
            send = lmforge_send(http, max_tokens, structured)
            await send(prompts[0])  # warm-up
            return await closed_loop(clients, prompts, send)
    return asyncio.run(main())


def validity(url: str, prompts: list[list[int]], count: int, shortest: int, max_tokens: int) -> tuple[int, int, int]:
    """`count` sampled structured replies (seeded, budgets from `shortest` up) -> (valid, cut by budget, total)."""
    rng = random.Random(0)
    jobs = [(prompts[i % len(prompts)], i, rng.randint(shortest, max_tokens)) for i in range(count)]
    texts: list[str] = []

    async def main():
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=20)) as http:
            send = lmforge_send(http, max_tokens, structured=True)
            queue = list(jobs)

            async def worker():
                while queue:
                    prompt, seed, budget = queue.pop()
                    _, tokens = await send(prompt, seed=seed, budget=budget, texts=texts)
                    cut.append(tokens >= budget)
            cut: list[bool] = []
            await asyncio.gather(*(worker() for _ in range(16)))
            return cut
    cut = asyncio.run(main())
    return sum(_valid(t) for t in texts), sum(cut), len(texts)


def _valid(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


class GrammarProcessor:
    """An HF `LogitsProcessor`: each row's llguidance matcher masks its next token (batched)."""

    def __init__(self, grammars: Grammars, grammar: str, rows: int, outputs: list):
        from llguidance import LLMatcher

        self.grammars, self.outputs = grammars, outputs
        self.matchers = [LLMatcher(grammars.tokenizer, grammar, log_level=0) for _ in range(rows)]
        self.steps = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        import llguidance.torch as llt

        if self.steps:
            for matcher, token in zip(self.matchers, input_ids[:, -1].tolist(), strict=True):
                if not matcher.is_stopped() and not matcher.is_error():
                    matcher.consume_token(token)
        self.steps += 1
        live = [(m, i) for i, m in enumerate(self.matchers) if not m.is_stopped() and not m.is_error()]
        if live:
            bitmask = llt.allocate_token_bitmask(len(self.matchers), self.grammars.vocab_size)
            llt.fill_next_token_bitmask_par(self.grammars.executor, live, bitmask)
            scores = scores.masked_fill(~unpack_bitmask(bitmask, scores.shape[-1]), float("-inf"))
        return scores


def engine_mask_share(model_dir: Path, prompts: list[list[int]], max_tokens: int, shortest: int) -> tuple[float, float, int]:
    """In-process: (mask seconds, engine seconds, tokens) for structured requests batched 16 at a time."""
    model, tokenizer, _ = load_model(model_dir)
    engine = Engine(model, tokenizer)
    spec = StructuredSpec("json_schema", SCHEMA)
    params = [SamplingParams(max_tokens=max(shortest, max_tokens), temperature=1.0, seed=i, structured=spec)
              for i in range(len(prompts))]
    engine.run_to_completion(prompts[:2], params[:2])  # warm-up
    engine.grammars.mask_seconds = 0.0
    start = time.perf_counter()
    results = engine.run_to_completion(prompts, params)
    return engine.grammars.mask_seconds, time.perf_counter() - start, sum(len(r.token_ids) for r in results)


def measure(args, model_dir, all_prompts, hf, pad_id, grammars, grammar, url):
    results: dict[int, dict[str, tuple[float, list[float], int]]] = {}
    hf_texts: list[str] = []
    for c in args.concurrency:
        prompts = all_prompts[: args.requests_per_client * c]
        row = results[c] = {}

        def hf_structured(rows, outputs=hf_texts):
            from transformers import LogitsProcessorList
            return {"logits_processor": LogitsProcessorList([GrammarProcessor(grammars, grammar, rows, outputs)])}

        contenders = {
            "lmforge serve": lambda: lmforge_run(url, c, prompts, args.max_tokens, False),  # noqa: B023
            BASELINE: lambda: hf_run(hf, c, prompts, args.max_tokens, batch=True, pad_id=pad_id),  # noqa: B023
            "lmforge serve + json_schema": lambda: lmforge_run(url, c, prompts, args.max_tokens, True),  # noqa: B023
            f"{BASELINE} + json_schema": lambda c=c, prompts=prompts: hf_run(
                hf, c, prompts, args.max_tokens, batch=True, pad_id=pad_id, generate_kwargs=hf_structured,
                on_output=hf_texts.append),
        }
        for _ in range(args.rounds):
            for name, run in contenders.items():
                keep_best(row, name, run())
        for name, (wall, ttfts, tokens) in row.items():
            print(f"concurrency {c:>2} {name:<30} {tokens / wall:8.1f} tok/s  TTFT p50 {percentile(ttfts, 0.5) * 1000:7.1f} ms"
                  f"  p99 {percentile(ttfts, 0.99) * 1000:7.1f} ms ({len(ttfts)} requests, {tokens} tokens)", flush=True)
    return results, hf_texts


def main(argv=None) -> None:
    args = parse_args(argv)
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    biggest = max(args.concurrency)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, all_prompts, config = build(Path(tmp), args.preset, args.prompt_tokens,
                                               args.requests_per_client * biggest + 1)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        pad_id = json.loads((model_dir / "generation_config.json").read_text()).get("pad_token_id") or 0
        _, tokenizer, _ = load_model(model_dir)
        grammars = Grammars(tokenizer, config.vocab_size)
        grammar, shortest = grammars.compile(StructuredSpec("json_schema", SCHEMA))
        port = free_port()
        server = start_server(model_dir, port, biggest)
        url = f"http://127.0.0.1:{port}"
        try:
            results, hf_outputs = measure(args, model_dir, all_prompts, hf, pad_id, grammars, grammar, url)
            valid, cut, total = validity(url, all_prompts, args.validity_requests, shortest, args.max_tokens)
        finally:
            server.terminate()
            server.wait(60)
        hf_valid = sum(_valid(tokenizer.decode(ids, skip_special_tokens=True)) for ids in hf_outputs)
        mask_s, engine_s, engine_tokens = engine_mask_share(model_dir, all_prompts[:64], args.max_tokens, shortest)
    total_s = time.perf_counter() - started
    print(f"validity: {valid}/{total} ({cut} closed by their budget); HF: {hf_valid}/{len(hf_outputs)}")
    print(f"masks: {mask_s:.2f} s of {engine_s:.2f} s engine time, {engine_tokens} tokens")

    argv_text = shlex.join(argv or sys.argv[1:])
    c = max(results)
    row = results[c]
    rate = {name: tokens / wall for name, (wall, _, tokens) in row.items()}
    lines = [
        f"### Structured outputs: `lmforge serve` with and without a JSON-schema `response_format` vs HF static batching ({args.preset}, fp32, CPU)",
        "",
        f"C clients send requests back to back ({args.requests_per_client} each); {args.prompt_tokens}-token prompts, at most "
        f"{args.max_tokens} new tokens. Without a format: exactly {args.max_tokens} tokens, greedy. With a format: a",
        f"five-field extraction schema (nested object, enum array, bounded and unbounded strings; its shortest reply is {shortest} tokens),",
        "greedy, ending when the JSON is complete. HF runs `generate` in-process with the queued requests left-padded into",
        "one batch; its constrained rows use the same llguidance grammar through a `LogitsProcessor` (masks batched per step).",
        "lmforge is measured over HTTP (SSE streaming from a `lmforge serve` subprocess). TTFT counts from the moment a request",
        "is sent, so it includes queueing.",
        "",
        f"- command: `.venv/bin/python benchmarks/serve_structured.py{(' ' + argv_text) if argv_text else ''}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"- CPU threads: {torch.get_num_threads()}; model: {config.num_params():,} parameters, vocab {config.vocab_size}",
        f"- {args.rounds} alternating rounds per concurrency, the best round of each contender reported; total wall time {total_s:.0f} s",
        "",
        f"Headline, concurrency {c} with the schema: `lmforge serve` {rate['lmforge serve + json_schema']:,.0f} output tokens/s, "
        f"**{rate['lmforge serve + json_schema'] / rate[BASELINE + ' + json_schema']:.2f}x {BASELINE} + json_schema** "
        f"({rate[BASELINE + ' + json_schema']:,.0f} tokens/s); the schema costs lmforge "
        f"{1 - rate['lmforge serve + json_schema'] / rate['lmforge serve']:.0%} of its unconstrained throughput.",
        "",
        f"Schema validity of {total} sampled replies (temperature 1, seeds 0..{total - 1}, budgets drawn from {shortest} to "
        f"{args.max_tokens} tokens): **{valid}/{total} ({valid / total:.0%})** valid, {cut} of them closed by their budget "
        f"(`finish_reason: length`). HF's constrained replies in the runs above: {hf_valid}/{len(hf_outputs)} valid "
        "(a row cut at `max_new_tokens` is left unfinished).",
        "",
        f"Grammar masks in lmforge's engine (in-process, 64 structured requests, 16 at a time): {mask_s:.2f} s of "
        f"{engine_s:.2f} s ({mask_s / engine_s:.0%}), {mask_s / max(engine_tokens, 1) * 1e6:,.0f} µs per generated token.",
        "",
        "| concurrency | implementation | output tokens/s | vs HF static batch (same format) | TTFT p50 (ms) | TTFT p99 (ms) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for c, row in results.items():
        for name, (wall, ttfts, tokens) in row.items():
            base_name = BASELINE + (" + json_schema" if "json_schema" in name else "")
            base = row[base_name][2] / row[base_name][0]
            lines.append(f"| {c} | {name} | {tokens / wall:,.0f} | {tokens / wall / base:.2f}x | "
                         f"{percentile(ttfts, 0.5) * 1000:,.0f} | {percentile(ttfts, 0.99) * 1000:,.0f} |")
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        write_section("serve_structured", block)


if __name__ == "__main__":
    main()
