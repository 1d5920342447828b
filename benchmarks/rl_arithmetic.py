"""RL works, on a CPU, in minutes: GRPO on held-out arithmetic after SFT, through the CLI.

The recipe a user runs: the quickstart's pretrained model -> `lmforge sft ... sft-arithmetic`
(worked solutions) -> `lmforge rl ... rl-arithmetic` (GRPO, reward: `numeric_match`, the
reply's last number is the answer). Measured: the reward of the rollouts over the steps,
and greedy accuracy on the 200 held-out test prompts (disjoint from the RL and SFT prompts)
of the SFT starting point and of the RL result, each with its standard error, and their
paired difference (same prompts) with its standard error; wall time of each stage.

    .venv/bin/python benchmarks/rl_arithmetic.py --base quickstart/runs/quickstart --write
    .venv/bin/python benchmarks/rl_arithmetic.py --sft runs/sft-arithmetic       # skip the SFT stage

Extra `section.key=value` arguments after `--` go to `lmforge rl` (e.g. `-- train.max_steps=100`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from lmforge.align.rewards.verifiable import NumericMatchOptions, numeric_match  # noqa: E402
from lmforge.jsonl import load_jsonl  # noqa: E402

TEST = "lmforge://data/rl/arithmetic_test.jsonl.gz"


def outcomes(model: str | os.PathLike, samples: int = 0, max_tokens: int = 48) -> list[float]:
    """Per held-out prompt, the share of replies whose last number is the answer (lmforge's engine,
    fp32): the greedy reply (`samples` 0), or `samples` replies at temperature 1 (seeded)."""
    from lmforge.serve.config import EngineConfig
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams
    from lmforge.store.loading import load_model

    records = [record for _, record in load_jsonl(TEST, "held-out prompts")]
    net, tokenizer, _ = load_model(model, "cpu", torch.float32)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True)
               for r in records]
    engine = Engine(net, tokenizer, EngineConfig(max_num_seqs=64))
    if not samples:
        replies = engine.run_to_completion(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        return [numeric_match(r, c.text, NumericMatchOptions()) for r, c in zip(records, replies, strict=True)]
    params = [SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=i * samples + k)
              for i in range(len(prompts)) for k in range(samples)]
    replies = engine.run_to_completion([p for p in prompts for _ in range(samples)], params)
    scores = [numeric_match(records[i // samples], c.text, NumericMatchOptions()) for i, c in enumerate(replies)]
    return [sum(scores[i * samples:(i + 1) * samples]) / samples for i in range(len(prompts))]


def mean_stderr(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    variance = sum((v - mean) ** 2 for v in values) / max(len(values) - 1, 1)
    return mean, math.sqrt(variance / len(values))


def lmforge(*args: str) -> float:
    """Run an lmforge verb as a user would; its wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lmforge", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"lmforge {' '.join(args[:3])} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def reward_curve(run_dir: Path, window: int) -> list[tuple[str, float, float]]:
    """(steps, mean rollout reward, mean held-out share of groups with no variance) per window of steps."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward/total/mean" in r]
    out = []
    for start in range(0, len(rows), window):
        chunk = rows[start: start + window]
        out.append((f"{chunk[0]['step']}-{chunk[-1]['step']}",
                    sum(r["reward/total/mean"] for r in chunk) / len(chunk),
                    sum(r["zero_variance_groups"] for r in chunk) / len(chunk)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="pretrained run to start the SFT stage from (the quickstart's)")
    parser.add_argument("--sft", help="an existing sft-arithmetic run: skip the SFT stage")
    parser.add_argument("--out", help="work dir (default: a temporary one)")
    parser.add_argument("--window", type=int, default=10, help="steps per row of the reward table")
    parser.add_argument("--write", action="store_true", help="write the section into BENCHMARKS.md")
    parser.add_argument("rl_args", nargs="*", help="section.key=value overrides for lmforge rl (after --)")
    args = parser.parse_args(argv)
    if not (args.base or args.sft):
        parser.error("give --base (a pretrained run) or --sft (an SFT'd one)")
    out = Path(args.out or tempfile.mkdtemp(prefix="lmforge-rl-bench-"))
    sft_seconds = None
    sft = Path(args.sft) if args.sft else out / "sft-arithmetic"
    if not args.sft:
        sft_seconds = lmforge("sft", str(args.base), "sft-arithmetic", f"run.out_dir={out}", "train.progress=false",
                              "--overwrite")
    before, before_sampled = outcomes(sft), outcomes(sft, samples=8)
    rl_args = ["rl", str(sft), "rl-arithmetic", f"run.out_dir={out}", "train.progress=false", *args.rl_args]
    rl_seconds = lmforge(*rl_args, "--overwrite")
    run_dir = out / "rl-arithmetic"
    after, after_sampled = outcomes(run_dir), outcomes(run_dir, samples=8)
    config = json.loads(json.dumps(__import__("yaml").safe_load((run_dir / "config.yaml").read_text())))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/total/mean" in r]
    rollout_rate = sum(r["rollout_tokens"] for r in steps) / sum(r["rollout_seconds"] for r in steps)
    acc_before, err_before = mean_stderr(before)
    acc_after, err_after = mean_stderr(after)
    gain, err_gain = mean_stderr([a - b for a, b in zip(after, before, strict=True)])
    sampled = [mean_stderr(before_sampled), mean_stderr(after_sampled),
               mean_stderr([a - b for a, b in zip(after_sampled, before_sampled, strict=True)])]
    rollout = config["rollout"]
    lines = [
        "## RL on a CPU: GRPO after SFT on held-out arithmetic",
        "",
        f"Measured {datetime.date.today()} on {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads. Command:",
        "",
        f"    python benchmarks/rl_arithmetic.py {shlex.join(argv if argv is not None else sys.argv[1:])}",
        "",
        f"Recipe: `lmforge sft QUICKSTART sft-arithmetic` then `lmforge rl SFT rl-arithmetic` "
        f"({config['train']['max_steps']} steps of {rollout['prompts_per_step']} prompts x {rollout['group_size']} "
        f"completions, up to {rollout['max_tokens']} tokens, temperature {rollout['temperature']}, lr "
        f"{config['optim']['lr']}, reward `numeric_match`). Held-out: the 200 `arithmetic_test` prompts "
        "(disjoint from the RL and SFT prompts), greedy, scored by the same evaluator before and after.",
        "",
        "| model | held-out accuracy, greedy | held-out accuracy, sampled (T=1, 8 per prompt) | wall time |",
        "| --- | ---: | ---: | ---: |",
        f"| SFT start (`sft-arithmetic`) | {acc_before:.1%} ± {err_before:.1%} | "
        f"{sampled[0][0]:.1%} ± {sampled[0][1]:.1%} | "
        + (f"{sft_seconds / 60:.1f} min |" if sft_seconds is not None else "(given) |"),
        f"| after GRPO (`rl-arithmetic`) | {acc_after:.1%} ± {err_after:.1%} | "
        f"{sampled[1][0]:.1%} ± {sampled[1][1]:.1%} | {rl_seconds / 60:.1f} min |",
        f"| paired difference (same prompts) | {gain:+.1%} ± {err_gain:.1%} | {sampled[2][0]:+.1%} ± {sampled[2][1]:.1%} | |",
        "",
        f"Rollouts: {rollout_rate:,.0f} generated tokens/s on lmforge's engine, in the training process.",
        "",
        "| steps | rollout reward (mean) | groups with no reward variance |",
        "| --- | ---: | ---: |",
        *(f"| {span} | {reward:.3f} | {zero:.0%} |" for span, reward, zero in reward_curve(run_dir, args.window)),
    ]
    block = "\n".join(lines)
    print(block)
    if args.write:
        write_section("rl_arithmetic", block)


if __name__ == "__main__":
    main()
