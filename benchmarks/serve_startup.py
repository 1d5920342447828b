"""Serving start-up: seconds from `lmforge serve` to its first healthy answer, and peak memory.

A released model dir is served three ways: with the release gate (a passing `lmforge
release` record for these weights, checked at start-up), and with `--allow-unreleased`
(no gate). Each start is a fresh process; the figures are the median of `--repeats`
starts. Peak memory is the server process's VmHWM (peak resident set) once it is healthy.

    .venv/bin/python benchmarks/serve_startup.py --preset 125m
    .venv/bin/python benchmarks/serve_startup.py --model-dir /tmp/startup/model --no-write

`--model-dir` reuses a model dir (built here when missing), so two checkouts can be
measured on the same weights: run the script from each with the same `--model-dir`.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CORPUS = ROOT / "lmforge" / "data" / "corpus" / "python_docs.jsonl.gz"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="125m", help="model shape of the dir built when --model-dir is missing")
    parser.add_argument("--model-dir", default=None, help="model dir to serve (built here when missing)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print, do not update BENCHMARKS.md")
    return parser.parse_args(argv)


def build_model_dir(directory: Path, preset: str) -> None:
    """Random weights of `preset` and a BPE trained on the bundled corpus, as a model dir."""
    import torch

    from lmforge.model import ModelConfig, Transformer
    from lmforge.store.model_dir import save_model_dir
    from lmforge.tokenizer import train_tokenizer

    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in itertools.islice(f, 300)]
    tokenizer = train_tokenizer(iter(texts), vocab_size=8192)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(preset=preset, vocab_size=tokenizer.vocab_size)).eval()
    save_model_dir(directory, model, tokenizer)


def release(model_dir: Path) -> None:
    """A passing release record for these weights, written by this checkout's `lmforge release`."""
    policy = model_dir.parent / "policy.yaml"
    policy.write_text("name: startup-bench\ntasks: [python_mc]\nlimit: 4\nthresholds:\n  python_mc/acc: {min: 0.0}\n")
    subprocess.run([sys.executable, "-m", "lmforge", "release", str(model_dir), "--policy", str(policy)],
                   check=True, capture_output=True, text=True, cwd=ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_once(model_dir: Path, gate: bool) -> tuple[float, float]:
    """(seconds to a healthy server, peak RSS MiB) of one `lmforge serve` start."""
    port = free_port()
    command = [sys.executable, "-m", "lmforge", "serve", str(model_dir), "--port", str(port), "--device", "cpu",
               "audit.path=null", "server.log_level=warning"] + ([] if gate else ["--allow-unreleased"])
    env = {**os.environ, "LMFORGE_LOG_LEVEL": "WARNING"}
    start = time.perf_counter()
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while True:
            if server.poll() is not None:
                raise SystemExit(f"lmforge serve exited: {server.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        seconds = time.perf_counter() - start
        return seconds, peak_rss_mib(server.pid)
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(argv=None) -> None:
    args = parse_args(argv)
    model_dir = Path(args.model_dir) if args.model_dir else Path(tempfile.mkdtemp(prefix="lmforge-startup-")) / "model"
    if not (model_dir / "config.json").is_file():
        build_model_dir(model_dir, args.preset)
    release(model_dir)
    weight_bytes = sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))
    rows = []
    for name, gate in (("release gate", True), ("--allow-unreleased", False)):
        runs = [start_once(model_dir, gate) for _ in range(args.repeats)]
        rows.append((name, statistics.median(s for s, _ in runs), statistics.median(m for _, m in runs),
                     [round(s, 2) for s, _ in runs]))
    flags = shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [
        f"### Serving start-up: `lmforge serve` to its first healthy answer ({weight_bytes / 2**20:,.0f} MiB of fp32 weights, CPU)",
        "",
        f"Command: `.venv/bin/python benchmarks/serve_startup.py {flags}`".replace(" `", "`", 0),
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; median of {args.repeats} starts.",
        "",
        "| start-up | seconds | peak RSS (MiB) | starts (s) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {name} | {seconds:.2f} | {rss:,.0f} | {', '.join(map(str, each))} |" for name, seconds, rss, each in rows]
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        from benchmarks.sections import write_section

        write_section("serve_startup", block)


if __name__ == "__main__":
    main()
