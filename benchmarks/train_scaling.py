"""Training throughput across model sizes and sequence lengths: where the CPU path stops paying.

For each preset (`small`, `50m`, `125m`) and sequence length (256 ... 2048), lmforge's training
step (forward with loss, backward, fused AdamW, bf16 autocast) on the same token budget per
step, eager and with each block compiled (`train.compile`), each shape in its own subprocess
so that peak memory (`ru_maxrss`) is that shape's alone. Tokens/s is the best of --rounds
rounds of --steps timed steps; MFU is against the measured bf16 matmul peak of this machine.

    .venv/bin/python benchmarks/train_scaling.py --write
    .venv/bin/python benchmarks/train_scaling.py --presets small --seq-lens 256 512   # a quick look
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from benchmarks.train_throughput import cpu_flags, cpu_model  # noqa: E402
from lmforge.device import autocast  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.train.config import OptimConfig  # noqa: E402
from lmforge.train.mfu import measured_matmul_peak  # noqa: E402
from lmforge.train.optim import build_optimizers  # noqa: E402
from lmforge.train.parallel import apply_compile  # noqa: E402

DEVICE = torch.device("cpu")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=["small", "50m", "125m"])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[256, 512, 1024, 2048])
    p.add_argument("--tokens-per-step", type=int, default=4096, help="batch = this / seq len")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=3, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # PRESET:SEQ_LEN:MODE
    return p.parse_args(argv)


def measure(preset: str, seq_len: int, compiled: bool, args) -> dict:
    """One shape in this process: best tokens/s over the rounds, and the process's peak memory."""
    config = ModelConfig(preset=preset, vocab_size=args.vocab_size, max_seq_len=seq_len)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights(torch.Generator().manual_seed(0))
    optimizers = build_optimizers(model, OptimConfig(), DEVICE)
    batch = max(1, args.tokens_per_step // seq_len)
    inputs = torch.randint(0, config.vocab_size, (batch, seq_len))
    targets = torch.randint(0, config.vocab_size, (batch, seq_len))
    started = time.perf_counter()
    if compiled:
        apply_compile(model)

    def step():
        with autocast(DEVICE, torch.bfloat16):
            loss = model(inputs, targets)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()
    first = time.perf_counter() - started
    rates = []
    for _ in range(args.rounds):
        for _ in range(args.warmup):
            step()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        rates.append(batch * seq_len * args.steps / (time.perf_counter() - t))
    return {"preset": preset, "seq_len": seq_len, "batch": batch, "compiled": compiled, "tokens_per_second": max(rates),
            "params": sum(p.numel() for p in model.parameters()), "flops_per_token": config.flops_per_token(seq_len),
            "first_step_seconds": first, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_worker(preset: str, seq_len: int, compiled: bool, argv: list[str]) -> dict:
    mode = "compiled" if compiled else "eager"
    print(f"--- {preset} seq {seq_len} {mode}", flush=True)
    out = subprocess.run([sys.executable, __file__, *argv, "--worker", f"{preset}:{seq_len}:{mode}"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        tail = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"preset": preset, "seq_len": seq_len, "compiled": compiled, "error": tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(args, rows: list[dict], peak: float, command: str, elapsed: float) -> str:
    lines = [
        "### Training throughput across sizes and sequence lengths (CPU, bf16)",
        "",
        f"lmforge's training step (forward with loss, backward, fused AdamW, bf16 autocast) at {args.tokens_per_step:,} "
        f"tokens a step (batch = {args.tokens_per_step:,} / seq len), vocab {args.vocab_size:,}, eager and with each "
        f"block compiled (`train.compile`); best of {args.rounds} rounds of {args.steps} steps, each shape in its own "
        "process. MFU against the measured bf16 matmul peak of this machine; peak RSS of that process; first step: "
        "model build to the end of the first step (compile included).",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, python "
        f"{platform.python_version()}; CPU: {cpu_model()} ({cpu_flags() or 'no avx512/amx flags'}), "
        f"torch threads {torch.get_num_threads()}",
        f"- measured bf16 matmul peak: {peak / 1e12:.3f} TFLOP/s; total wall time {elapsed:.0f} s",
        "",
        "| preset | params | seq len | batch | eager tok/s | eager MFU | compiled tok/s | compiled MFU | compile gain "
        "| first step eager / compiled (s) | peak RSS eager / compiled (MiB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    shapes = sorted({(r["preset"], r["seq_len"]) for r in rows},
                    key=lambda s: (args.presets.index(s[0]), s[1]))
    for preset, seq_len in shapes:
        eager = next((r for r in rows if (r["preset"], r["seq_len"], r["compiled"]) == (preset, seq_len, False)), {})
        compiled = next((r for r in rows if (r["preset"], r["seq_len"], r["compiled"]) == (preset, seq_len, True)), {})
        if "error" in eager:
            lines.append(f"| {preset} | | {seq_len} | | failed: {eager['error']} | | | | | | |")
            continue

        def mfu(r):
            return r["tokens_per_second"] * r["flops_per_token"] / peak

        ok = "tokens_per_second" in compiled
        lines.append(
            f"| {preset} | {eager['params'] / 1e6:.1f}M | {seq_len} | {eager['batch']} | {eager['tokens_per_second']:,.0f} | "
            f"{mfu(eager):.1%} | " + (f"{compiled['tokens_per_second']:,.0f} | {mfu(compiled):.1%} | "
                                       f"{compiled['tokens_per_second'] / eager['tokens_per_second']:.2f}x | "
                                       if ok else f"{compiled.get('error', '-')} | | | ")
            + f"{eager['first_step_seconds']:.1f} / {compiled.get('first_step_seconds', float('nan')):.1f} | "
            f"{eager['peak_rss_mib']:,.0f} / {compiled.get('peak_rss_mib', float('nan')):,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        preset, seq_len, mode = args.worker.split(":")
        print(json.dumps(measure(preset, int(seq_len), mode == "compiled", args)))
        return
    started = time.perf_counter()
    side_argv = [a for a in argv if a != "--write"]
    rows = []
    for preset in args.presets:
        for seq_len in args.seq_lens:
            for compiled in (False,) if args.no_compile else (False, True):
                rows.append(run_worker(preset, seq_len, compiled, side_argv))
                print(json.dumps(rows[-1]), flush=True)
    peak = measured_matmul_peak("cpu", torch.bfloat16)
    command = ".venv/bin/python benchmarks/train_scaling.py " + shlex.join(argv)
    block = render(args, rows, peak, command, time.perf_counter() - started)
    print(block)
    if args.write:
        write_section("train_scaling", block)


if __name__ == "__main__":
    main()
