"""Serving throughput: `lmforge serve` (continuous batching) against HF transformers `generate`.

One exported model dir (the `small` preset, random weights, a BPE trained on the bundled
corpus) and the same token-id prompts for every contender. At each concurrency C, C
clients send requests back to back (each waits for its reply before the next); every
request asks for exactly `--max-tokens` new tokens (greedy, EOS ignored). Measured: output
tokens per second over the whole run, and time to first token (from the moment a request
is sent) at p50 / p99.

- lmforge: `lmforge serve DIR` in a subprocess, streamed over HTTP (SSE) by asyncio clients.
- HF sequential: one `model.generate` at a time, requests served first come first served.
- HF static batch: the queued requests (up to C) left-padded into one `generate`; requests
  that arrive meanwhile wait for the next batch.

The headline and the ratio column compare against HF static batch: the strongest baseline
doing the same work. HF sequential is a row for reference, never the yardstick.

    .venv/bin/python benchmarks/serve_throughput.py
    .venv/bin/python benchmarks/serve_throughput.py --concurrency 1 4 --no-write
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gzip
import json
import math
import os
import platform
import queue
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from lmforge.model import ModelConfig, Transformer  # noqa: E402
from lmforge.store.model_dir import save_model_dir  # noqa: E402
from lmforge.tokenizer import train_tokenizer  # noqa: E402

CORPUS = ROOT / "lmforge" / "data" / "corpus" / "python_docs.jsonl.gz"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests-per-client", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds; the best throughput counts")
    p.add_argument("--no-moderation", action="store_true",
                   help="skip the contender with configs/moderation.yaml (rules + profanity, output checked in windows)")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--server-args", nargs="*", default=[], help="extra `lmforge serve` overrides (key=value)")
    p.add_argument("--workload", choices=["lockstep", "realistic"], default="lockstep",
                   help="lockstep: C clients back to back, fixed lengths; realistic: mixed prompt and output "
                   "lengths arriving as a Poisson process (open loop)")
    p.add_argument("--requests", type=int, default=96, help="realistic: requests in the run")
    p.add_argument("--rate", type=float, default=16.0, help="realistic: mean arrivals per second (Poisson)")
    p.add_argument("--prompt-range", type=int, nargs=2, default=[16, 192], help="realistic: prompt tokens, uniform")
    p.add_argument("--output-range", type=int, nargs=2, default=[16, 256], help="realistic: new tokens, log-uniform")
    p.add_argument("--max-batch", type=int, default=16, help="realistic: lmforge max_num_seqs and HF's largest batch")
    return p.parse_args(argv)


def build(directory: Path, preset: str, prompt_tokens: int, count: int) -> tuple[Path, list[list[int]], ModelConfig]:
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    tokenizer = train_tokenizer(iter(texts), vocab_size=8192)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset=preset, vocab_size=8192))
    save_model_dir(directory / "model", model, tokenizer)
    paragraphs = [p for t in texts for p in t.split("\n\n") if len(p) > 400]
    prompts = [tokenizer.encode_prompt(p)[:prompt_tokens] for p in paragraphs[:count]]
    return directory / "model", prompts, model.config


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# The yardstick: HF doing the same work as well as `generate` can (every queued request in one
# batch), not one request at a time.
BASELINE = "HF static batch"
ROW_ORDER = ["lmforge serve", BASELINE, "HF sequential", "lmforge + moderation"]


def tokens_per_second(measured: tuple[float, list[float], int]) -> float:
    wall, _, tokens = measured[:3]
    return tokens / wall


def keep_best(row: dict[str, tuple], name: str, result: tuple) -> None:
    """Alternating rounds keep each contender's best throughput (wall seconds, TTFTs, tokens, ...):
    a shared machine's noise hits every contender."""
    if name not in row or tokens_per_second(result) > tokens_per_second(row[name]):
        row[name] = result


def headline(results: dict[int, dict[str, tuple[float, list[float], int]]]) -> str:
    """One sentence at the highest concurrency: lmforge serve against the strongest baseline."""
    c = max(results)
    ours, theirs = results[c]["lmforge serve"], results[c][BASELINE]
    return (f"Headline, concurrency {c}: `lmforge serve` {tokens_per_second(ours):,.0f} output tokens/s, "
            f"**{tokens_per_second(ours) / tokens_per_second(theirs):.2f}x {BASELINE}** "
            f"({tokens_per_second(theirs):,.0f} tokens/s, the strongest baseline doing the same work); "
            f"TTFT p99 {percentile(ours[1], 0.99) * 1000:,.0f} ms against {percentile(theirs[1], 0.99) * 1000:,.0f} ms.")


async def closed_loop(clients: int, prompts: list[list[int]], send) -> tuple[float, list[float], int]:
    """`clients` workers take prompts in turn; -> (wall seconds, TTFTs, output tokens)."""
    work: asyncio.Queue = asyncio.Queue()
    for p in prompts:
        work.put_nowait(p)
    ttfts, tokens = [], 0

    async def client():
        nonlocal tokens
        while not work.empty():
            ttft, n = await send(work.get_nowait())
            ttfts.append(ttft)
            tokens += n

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - start, ttfts, tokens


async def open_loop(prompts: list[list[int]], lengths: list[int], arrivals: list[float], send):
    """Each request sent at its arrival time whatever is still running; -> (wall seconds from the first
    arrival to the last reply, TTFTs, output tokens, end-to-end latencies)."""
    ttfts, latencies, tokens = [], [], 0
    start = time.perf_counter()

    async def one(prompt, length, at):
        nonlocal tokens
        await asyncio.sleep(max(0.0, start + at - time.perf_counter()))
        sent = time.perf_counter()
        ttft, n = await send(prompt, length)
        latencies.append(time.perf_counter() - sent)
        ttfts.append(ttft)
        tokens += n

    await asyncio.gather(*(one(p, n, t) for p, n, t in zip(prompts, lengths, arrivals, strict=True)))
    return time.perf_counter() - start, ttfts, tokens, latencies


def realistic_workload(pool: list[list[int]], args, seed: int = 0):
    """Mixed lengths arriving as a Poisson process: prompts cut to a uniform length in
    --prompt-range, outputs log-uniform in --output-range, exponential gaps at --rate."""
    import random

    rng = random.Random(seed)
    low, high = args.output_range
    prompts, lengths, arrivals, now = [], [], [], 0.0
    for i in range(args.requests):
        source = pool[i % len(pool)]
        prompts.append(source[: rng.randint(*args.prompt_range)])
        lengths.append(round(math.exp(rng.uniform(math.log(low), math.log(high)))))
        arrivals.append(now)
        now += rng.expovariate(args.rate)
    return prompts, lengths, arrivals


# -- lmforge serve ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, port: int, max_num_seqs: int, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "lmforge", "serve", str(model_dir), "--port", str(port), "--allow-unreleased",
               f"engine.max_num_seqs={max_num_seqs}", "audit.path=null", "server.log_level=warning",
               "server.model_name=bench", f"limits.max_tokens={4096}", *extra]
    server = subprocess.Popen(command, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"lmforge serve exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("lmforge serve did not start")


async def stream_completion(http: httpx.AsyncClient, body: dict) -> tuple[float | None, int, str]:
    """One streamed /v1/completions request -> (time to first token, completion tokens, text)."""
    body = {"model": "bench", "stream": True, "stream_options": {"include_usage": True}, **body}
    sent, first, tokens, parts = time.perf_counter(), None, 0, []
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event["choices"]:
                if first is None:
                    first = time.perf_counter() - sent
                parts.append(event["choices"][0]["text"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return first, tokens, "".join(parts)


def lmforge_run(url: str, clients: int, prompts: list[list[int]], max_tokens: int, arrivals=None, lengths=None):
    """Closed loop of `clients` (every request `max_tokens` long), or with `arrivals` (seconds from
    the start) and per-request `lengths`, the open-loop realistic workload."""
    async def main():
        limits = httpx.Limits(max_connections=(clients if arrivals is None else len(prompts)) + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
            async def send(prompt, tokens=max_tokens):
                body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True}
                first, tokens, _ = await stream_completion(http, body)
                return first, tokens

            await send(prompts[0])  # warm-up
            if arrivals is not None:
                return await open_loop(prompts, lengths, arrivals, send)
            return await closed_loop(clients, prompts, send)

    return asyncio.run(main())


# -- HF transformers ---------------------------------------------------------------------------


class FirstTokenClock:
    """A `generate` streamer that notes when the first new token appears (its 2nd `put`)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def hf_run(model, clients: int, prompts: list[list[int]], max_tokens: int, batch: bool, pad_id: int,
           generate_kwargs=None, on_output=None, arrivals=None, lengths=None):
    """A worker thread runs `generate` (one request, or all queued up to `clients`); asyncio clients wait.

    `generate_kwargs(rows)`: the keywords of one `generate` over `rows` requests (default: exactly
    `max_tokens` new tokens); `on_output(new_ids)`: sees each request's new tokens. A request's
    output is its new tokens up to the first padding (rows that ended early are padded). With
    `arrivals` and `lengths` (the realistic workload): a batch generates as many tokens as its
    longest request asks for, and each request keeps its own first `length`."""
    jobs: queue.Queue = queue.Queue()

    def worker():
        while True:
            first_job = jobs.get()
            if first_job is None:
                return
            group = [first_job]
            while batch and len(group) < clients and not jobs.empty():
                group.append(jobs.get_nowait())
            width = max(len(p) for p, _, _, _ in group)
            longest = max(n for _, _, _, n in group)
            ids = torch.full((len(group), width), pad_id)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for i, (p, _, _, _) in enumerate(group):  # left padding, as decoder-only batching needs
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            clock = FirstTokenClock()
            kwargs = {"min_new_tokens": longest} if generate_kwargs is None else generate_kwargs(len(group))
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=mask, max_new_tokens=longest, do_sample=False,
                                     pad_token_id=pad_id, streamer=clock, **kwargs)
            for row, (_, sent, done, length) in enumerate(group):
                new = out[row, width:width + length].tolist()
                if generate_kwargs is not None and pad_id in new:  # rows that ended early, padded
                    new = new[: new.index(pad_id)]
                if on_output is not None:
                    on_output(new)
                done((clock.first - sent, len(new)))

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()

    async def main():
        loop = asyncio.get_running_loop()

        async def send(prompt, tokens=max_tokens):
            future = loop.create_future()
            jobs.put((prompt, time.perf_counter(), lambda r: loop.call_soon_threadsafe(future.set_result, r), tokens))
            return await future

        await send(prompts[0])  # warm-up
        if arrivals is not None:
            return await open_loop(prompts, lengths, arrivals, send)
        return await closed_loop(clients, prompts, send)

    try:
        return asyncio.run(main())
    finally:
        jobs.put(None)
        thread.join()


def main(argv=None) -> None:
    args = parse_args(argv)
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    if args.workload == "realistic":
        realistic(args, argv)
        return
    started = time.perf_counter()
    results: dict[int, dict[str, tuple[float, list[float], int]]] = {}
    biggest = max(args.concurrency)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, all_prompts, config = build(Path(tmp), args.preset, args.prompt_tokens,
                                               args.requests_per_client * biggest + 1)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        pad_id = json.loads((model_dir / "generation_config.json").read_text()).get("pad_token_id") or 0
        port = free_port()
        server = start_server(model_dir, port, biggest, *args.server_args)
        moderated_port, moderated = None, None
        if not args.no_moderation:
            moderated_port = free_port()
            moderated = start_server(model_dir, moderated_port, biggest, f"moderation.policy={ROOT / 'configs' / 'moderation.yaml'}",
                                     *args.server_args)
        try:
            for c in args.concurrency:
                prompts = all_prompts[: args.requests_per_client * c]
                row = results[c] = {}
                contenders = {
                    "lmforge serve": lambda: lmforge_run(f"http://127.0.0.1:{port}", c, prompts, args.max_tokens),  # noqa: B023
                    "HF sequential": lambda: hf_run(hf, c, prompts, args.max_tokens, batch=False, pad_id=pad_id),  # noqa: B023
                    "HF static batch": lambda: hf_run(hf, c, prompts, args.max_tokens, batch=True, pad_id=pad_id),  # noqa: B023
                }
                if moderated_port is not None:
                    contenders["lmforge + moderation"] = lambda c=c, prompts=prompts: lmforge_run(
                        f"http://127.0.0.1:{moderated_port}", c, prompts, args.max_tokens)
                for _ in range(args.rounds):
                    for name, measure in contenders.items():
                        keep_best(row, name, measure())
                for name, (wall, ttfts, tokens) in row.items():
                    print(f"concurrency {c:>2} {name:<16} {tokens / wall:8.1f} tok/s  TTFT p50 "
                          f"{percentile(ttfts, 0.5) * 1000:7.1f} ms  p99 {percentile(ttfts, 0.99) * 1000:7.1f} ms  "
                          f"({len(ttfts)} requests, {tokens} tokens, {wall:.1f} s)", flush=True)
        finally:
            for process in (server, moderated):
                if process is not None:
                    process.terminate()
                    process.wait(60)
    total = time.perf_counter() - started

    command = ".venv/bin/python benchmarks/serve_throughput.py" + (" " + shlex.join(argv or sys.argv[1:]) if (argv or sys.argv[1:]) else "")
    lines = [
        f"### Serving throughput: `lmforge serve` vs HF transformers `generate` ({args.preset}, fp32, CPU)",
        "",
        f"C clients send requests back to back ({args.requests_per_client} each); {args.prompt_tokens}-token prompts, "
        f"exactly {args.max_tokens} new tokens each (greedy, EOS ignored). lmforge is measured over HTTP (SSE",
        "streaming from a `lmforge serve` subprocess); HF runs `generate` in-process (no HTTP), one request at a",
        "time (sequential) or the queued requests left-padded into one batch (static batch). TTFT counts from",
        "the moment a request is sent, so it includes queueing.",
        *([] if args.no_moderation else [
            "`lmforge + moderation` is the same server with `moderation.policy=configs/moderation.yaml` (rules +",
            "profanity on every prompt; output checked, then released, every 64 characters with a 48-character",
            "tail held back), so its TTFT is the first released window."]),
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"- CPU threads: {torch.get_num_threads()}; model: {config.num_params():,} parameters, vocab 8192, context {config.max_seq_len}",
        f"- {args.rounds} alternating rounds per concurrency, the best round of each contender reported; "
        f"total wall time {total:.0f} s",
        "",
        headline(results),
        "",
        f"| concurrency | implementation | output tokens/s | vs {BASELINE} | TTFT p50 (ms) | TTFT p99 (ms) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for c, row in results.items():
        base = tokens_per_second(row[BASELINE])
        for name in sorted(row, key=ROW_ORDER.index):
            wall, ttfts, tokens = row[name]
            lines.append(f"| {c} | {name} | {tokens / wall:,.0f} | {tokens / wall / base:.2f}x | "
                         f"{percentile(ttfts, 0.5) * 1000:,.0f} | {percentile(ttfts, 0.99) * 1000:,.0f} |")
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        write_section("serve_throughput", block)



def realistic(args, argv) -> None:
    """The open-loop workload: lmforge serve (continuous batching) against HF static batches formed
    from the requests waiting, on the same arrivals; writes the serve_throughput_realistic section."""
    import transformers
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, pool, config = build(Path(tmp), args.preset, args.prompt_range[1], 200)
        prompts, lengths, arrivals = realistic_workload(pool, args)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        pad_id = json.loads((model_dir / "generation_config.json").read_text()).get("pad_token_id") or 0
        port = free_port()
        server = start_server(model_dir, port, args.max_batch, *args.server_args)
        contenders = {
            "lmforge serve": lambda: lmforge_run(f"http://127.0.0.1:{port}", args.max_batch, prompts, args.output_range[0], arrivals, lengths),
            BASELINE: lambda: hf_run(hf, args.max_batch, prompts, args.output_range[0], batch=True, pad_id=pad_id, arrivals=arrivals,
                                     lengths=lengths),
        }
        row: dict[str, tuple] = {}
        try:
            for _ in range(args.rounds):
                for name, measure in contenders.items():
                    result = measure()
                    keep_best(row, name, result)
                    wall, ttfts, tokens, latencies = result
                    print(f"{name:<16} {tokens / wall:8.1f} tok/s  TTFT p50 {percentile(ttfts, 0.5) * 1000:7.1f} ms  "
                          f"latency p99 {percentile(latencies, 0.99):6.2f} s ({wall:.1f} s)", flush=True)
        finally:
            server.terminate()
            server.wait(60)
    command = ".venv/bin/python benchmarks/serve_throughput.py " + shlex.join(argv or sys.argv[1:])
    offered = sum(lengths) / arrivals[-1] if arrivals[-1] else float("nan")
    lines = [
        f"### Serving throughput, realistic workload: `lmforge serve` vs HF static batches ({args.preset}, fp32, CPU)",
        "",
        f"{args.requests} requests arriving as a Poisson process at {args.rate:g}/s (open loop: a request is sent at "
        f"its time whatever is still running), prompts of {args.prompt_range[0]}-{args.prompt_range[1]} tokens "
        f"(uniform), outputs of {args.output_range[0]}-{args.output_range[1]} new tokens (log-uniform; greedy, EOS "
        f"ignored); {sum(lengths):,} output tokens in all, offered at {offered:,.0f} tokens/s. lmforge over HTTP (SSE) "
        f"with `engine.max_num_seqs={args.max_batch}`; HF in-process, each `generate` a batch of the requests waiting "
        f"(up to {args.max_batch}), as long as its longest request, each request keeping its own tokens. Throughput: "
        "output tokens / seconds from the first arrival to the last reply; TTFT and latency count from the moment "
        "a request is sent.",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}, CPU threads {torch.get_num_threads()}",
        f"- model: {config.num_params():,} parameters; {args.rounds} alternating rounds, the best of each reported; "
        f"total wall time {time.perf_counter() - started:.0f} s",
        "",
        f"| implementation | output tokens/s | vs {BASELINE} | TTFT p50 (ms) | TTFT p99 (ms) | latency p50 (s) | latency p99 (s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    base = row[BASELINE][2] / row[BASELINE][0]
    for name, (wall, ttfts, tokens, latencies) in row.items():
        lines.append(f"| {name} | {tokens / wall:,.0f} | {tokens / wall / base:.2f}x | {percentile(ttfts, 0.5) * 1000:,.0f} | "
                     f"{percentile(ttfts, 0.99) * 1000:,.0f} | {percentile(latencies, 0.5):.2f} | {percentile(latencies, 0.99):.2f} |")
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        write_section("serve_throughput_realistic", block)


if __name__ == "__main__":
    main()
