"""GRPO on CPU: `lmforge rl` against TRL's GRPOTrainer, the same work on both sides.

Same starting model (an exported HF model dir), same prompts (the bundled arithmetic set,
chat-formatted), same reward (lmforge's `numeric_match`: the reply's last number equals the
answer), same group size G, prompts per step P, completion budget, temperature, learning
rate, micro-batch and number of optimizer steps. One optimizer step = P prompts x G sampled
completions, generated together, then one on-policy update (no KL, no reuse of a rollout).

Each side trains in its own subprocess, so peak memory (`ru_maxrss`) is that side's alone.
Measured: rollout tokens/s (completion tokens generated / seconds spent generating),
optimizer steps per minute, peak resident memory, reward over training, and the held-out
accuracy each final model reaches, scored by one evaluator for both (greedy, lmforge's
engine, `numeric_match`) so that only the weights differ.

    .venv/bin/python benchmarks/rl_vs_trl.py --model DIR --steps 50 --group-size 8 \
        --prompts-per-step 8 --max-tokens 64 --write
    .venv/bin/python benchmarks/rl_vs_trl.py --model /tmp/qs/model --steps 5 --group-size 4 \
        --prompts-per-step 4 --max-tokens 32 --sides trl          # one side, no BENCHMARKS.md

`DIR`: `lmforge export RUN_DIR --out DIR` of an SFT'd arithmetic model. With `--write` the
table goes into BENCHMARKS.md between the rl_vs_trl markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from lmforge.align.rewards.verifiable import NumericMatchOptions, numeric_match  # noqa: E402
from lmforge.jsonl import load_jsonl  # noqa: E402

TRAIN = "lmforge://data/rl/arithmetic_train.jsonl.gz"
TEST = "lmforge://data/rl/arithmetic_test.jsonl.gz"
SIDES = ("lmforge", "trl")
# The GRPO and optimizer settings both sides are given (AdamW betas, eps and grad clip: OptimConfig's).
WEIGHT_DECAY = 0.0
CLIP = 0.2
# Weight files of a model dir. The TRL side's final model keeps every other file of the starting
# dir, so lmforge's loader sees the tokenizer (and its card hash) the model was exported with.
WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model", required=True, help="HF model dir (lmforge export) both sides start from"
    )
    p.add_argument("--steps", type=int, default=50, help="optimizer steps")
    p.add_argument("--group-size", type=int, default=8, help="completions per prompt (G)")
    p.add_argument("--prompts-per-step", type=int, default=8, help="prompts per optimizer step (P)")
    p.add_argument("--max-tokens", type=int, default=64, help="completion budget per sample")
    p.add_argument(
        "--micro-batch-size", type=int, default=8, help="sequences per forward/backward pass"
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="training matmul dtype, both sides",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads, both sides (default: all cores)"
    )
    p.add_argument(
        "--heldout", type=int, default=200, help="held-out prompts scored per final model"
    )
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument(
        "--work-dir", default=None, help="where runs and final models go (default: a temp dir)"
    )
    p.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    # Internal: train one side in this process and write its measurements to --result.
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (args.prompts_per_step * args.group_size) % args.micro_batch_size:
        p.error(
            f"--micro-batch-size {args.micro_batch_size} must divide P x G = "
            f"{args.prompts_per_step * args.group_size}"
        )
    return args


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def machine_cpu_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot (all processes), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def chat(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


# ----------------------------------------------------------------------------- held-out accuracy


def heldout_accuracy(
    model: str | os.PathLike, n: int = 200, max_tokens: int = 64
) -> tuple[float, float]:
    """(accuracy, standard error) of greedy replies to the first `n` held-out prompts.

    One evaluator for every model (lmforge's engine, fp32, `numeric_match`), so a difference
    between two models is in their weights, not in how they were sampled or scored.
    """
    from lmforge.serve.config import EngineConfig
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams
    from lmforge.store.loading import load_model

    records = [record for _, record in load_jsonl(TEST, "held-out prompts")][:n]
    net, tokenizer, _ = load_model(model, "cpu", torch.float32)
    engine = Engine(net, tokenizer, EngineConfig(max_num_seqs=64, device="cpu", dtype="float32"))
    prompts = [
        tokenizer.encode_chat(chat(r["prompt"]), add_generation_prompt=True) for r in records
    ]
    replies = engine.run_to_completion(
        prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0)
    )
    options = NumericMatchOptions()
    correct = sum(numeric_match(r, c.text, options) for r, c in zip(records, replies, strict=True))
    p = correct / len(records)
    return p, math.sqrt(p * (1 - p) / len(records))


# ----------------------------------------------------------------------------- lmforge side


def run_lmforge(
    model_dir,
    steps,
    group_size,
    prompts_per_step,
    max_tokens,
    micro_batch_size,
    lr,
    temperature,
    dtype,
    seed,
    out_dir,
) -> dict:
    """`lmforge rl` through its Python API: rollouts on lmforge's engine, GRPO through its trainer."""
    from lmforge.align.rl import RLConfig, run_rl

    config = RLConfig.model_validate(
        {
            "model": str(model_dir),
            "run": {"name": "rl", "out_dir": str(out_dir), "seed": seed},
            "data": {"train": TRAIN, "test": None},
            "rollout": {
                "prompts_per_step": prompts_per_step,
                "group_size": group_size,
                "max_tokens": max_tokens,
                "temperature": temperature,
            },
            "rewards": [{"name": "numeric_match"}],
            # Stated, not left to defaults, so that both sides stay the same if a default moves.
            "optim": {"lr": lr, "weight_decay": WEIGHT_DECAY},
            "schedule": {"name": "constant", "warmup_steps": 0},
            "grpo": {
                "kl_coef": 0.0,
                "clip_low": CLIP,
                "clip_high": CLIP,
                "aggregation": "token",
                "scale_rewards": True,
            },
            "train": {
                "max_steps": steps,
                "micro_batch_size": micro_batch_size,
                "dtype": dtype,
                "eval_every": 0,
                "log_every": 1,
            },
        }
    )
    started = time.perf_counter()
    result = run_rl(config)  # loads the model, trains, saves the final checkpoint
    seconds = time.perf_counter() - started
    rows = [
        json.loads(line)
        for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    rows = [r for r in rows if "reward/total/mean" in r]
    rewards = [r["reward/total/mean"] for r in rows]
    return {
        "side": "lmforge",
        "final_model": str(result.run_dir),  # heldout_accuracy loads a run dir's latest checkpoint
        "seconds": seconds,
        "steps": len(rows),
        "rollouts": [
            (r["rollout_seconds"], round(r["rollout_tokens_per_second"] * r["rollout_seconds"]))
            for r in rows
        ],
        "mean_completion_length": sum(r["completion_length"] for r in rows) / len(rows),
        "reward_first": rewards[0],
        "reward_last": rewards[-1],
        "reward_mean": sum(rewards) / len(rewards),
    }


# ----------------------------------------------------------------------------- TRL side


def numeric_match_reward(completions, answer, **_) -> list[float]:
    """lmforge's numeric_match as a TRL reward function: TRL passes the completions (chat
    messages, since the prompts are chat) and each dataset column as a keyword list."""
    options = NumericMatchOptions()
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [numeric_match({"answer": a}, t, options) for t, a in zip(texts, answer, strict=True)]


def run_trl(
    model_dir,
    steps,
    group_size,
    prompts_per_step,
    max_tokens,
    micro_batch_size,
    lr,
    temperature,
    dtype,
    seed,
    out_dir,
) -> dict:
    """TRL's GRPOTrainer with transformers `generate` rollouts (no vLLM) on CPU."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from lmforge.train.config import OptimConfig

    class TimedGRPOTrainer(GRPOTrainer):
        """Times the rollout itself: TRL's profiling timings go only to W&B/MLflow/Trackio."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # (seconds, completion tokens) per generate call
            self.rollouts: list[tuple[float, int]] = []

        def _generate_single_turn(self, *args, **kwargs):
            started = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(*args, **kwargs)
            # Tokens up to and including EOS: the padding `generate` adds after it is not output.
            self.rollouts.append(
                (time.perf_counter() - started, sum(len(ids) for ids in completion_ids))
            )
            return completion_ids, logprobs

    out_dir = Path(out_dir)
    records = [record for _, record in load_jsonl(TRAIN, "RL prompts")]
    dataset = Dataset.from_list(
        [{"prompt": chat(r["prompt"]), "answer": r["answer"]} for r in records]
    )
    completions_per_step = prompts_per_step * group_size
    optim = OptimConfig()  # lmforge's AdamW betas, eps, clip: the same optimizer step on both sides
    args = GRPOConfig(
        output_dir=str(out_dir / "trainer"),
        max_steps=steps,
        num_generations=group_size,
        # One optimizer step = P x G completions, generated in one batch, trained in micro-batches.
        per_device_train_batch_size=micro_batch_size,
        gradient_accumulation_steps=completions_per_step // micro_batch_size,
        generation_batch_size=completions_per_step,
        max_completion_length=max_tokens,
        num_iterations=1,
        beta=0.0,
        loss_type="dapo",  # token-level average, as lmforge's grpo_loss `token` aggregation
        scale_rewards="group",
        epsilon=CLIP,
        epsilon_high=CLIP,
        temperature=temperature,
        learning_rate=lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=WEIGHT_DECAY,
        adam_beta1=optim.beta1,
        adam_beta2=optim.beta2,
        adam_epsilon=optim.eps,
        max_grad_norm=optim.grad_clip,
        # TRL turns activation checkpointing on by default; lmforge rl does not checkpoint, and
        # recomputing the forward only costs time here (the memory is small on CPU), so off.
        gradient_checkpointing=False,
        use_vllm=False,
        use_cpu=True,
        bf16=dtype == "bf16",
        fp16=False,
        seed=seed,
        data_seed=seed,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        log_completions=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = TimedGRPOTrainer(
        model=model,
        reward_funcs=[numeric_match_reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    train_started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_started

    # The final model: the starting dir with its weights replaced (same config, tokenizer, card).
    final = out_dir / "final"
    shutil.copytree(
        model_dir,
        final,
        ignore=shutil.ignore_patterns(*(f"*{s}" for s in WEIGHT_SUFFIXES)),
        dirs_exist_ok=True,
    )
    with tempfile.TemporaryDirectory(dir=out_dir) as saved:
        trainer.model.save_pretrained(saved, safe_serialization=True)
        for path in Path(saved).iterdir():
            if path.name.endswith(WEIGHT_SUFFIXES):
                shutil.move(str(path), final / path.name)
    seconds = time.perf_counter() - started  # the same span as lmforge's run_rl: load, train, save

    logs = [row for row in trainer.state.log_history if "reward" in row]
    rewards = [row["reward"] for row in logs]
    return {
        "side": "trl",
        "final_model": str(final),
        "seconds": seconds,
        "trainer_train_seconds": train_seconds,
        "steps": trainer.state.global_step,
        "rollouts": trainer.rollouts,
        "step_seconds": [row["step_time"] for row in logs if "step_time" in row],
        "mean_completion_length": sum(r["completions/mean_length"] for r in logs) / len(logs),
        "reward_first": rewards[0],
        "reward_last": rewards[-1],
        "reward_mean": sum(rewards) / len(rewards),
    }


RUNNERS = {"lmforge": run_lmforge, "trl": run_trl}


# ----------------------------------------------------------------------------- driver


def rollout_rates(rollouts: list[tuple[float, int]]) -> dict:
    """Rollout speed from (seconds, completion tokens) per rollout: all tokens over all generating
    time, and the same without the first rollout, which can pay a one-off warm-up
    that a run of a few steps cannot amortise."""
    seconds, tokens = [s for s, _ in rollouts], [t for _, t in rollouts]
    steady = len(rollouts) > 1
    return {
        "rollout_tokens": sum(tokens),
        "rollout_seconds": sum(seconds),
        "rollout_tokens_per_second": sum(tokens) / sum(seconds),
        "first_rollout_seconds": seconds[0],
        "steady_rollout_tokens_per_second": (
            sum(tokens[1:]) / sum(seconds[1:]) if steady else float("nan")
        ),
    }


def worker(args) -> None:
    """Train one side in this process and write its measurements (and peak memory) as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out_dir = Path(args.work_dir) / args.worker
    out_dir.mkdir(parents=True, exist_ok=True)
    result = RUNNERS[args.worker](
        args.model,
        args.steps,
        args.group_size,
        args.prompts_per_step,
        args.max_tokens,
        args.micro_batch_size,
        args.lr,
        args.temperature,
        args.dtype,
        args.seed,
        out_dir,
    )
    result["peak_rss_mib"] = peak_rss_mib()
    result.update(rollout_rates(result["rollouts"]))
    result["steps_per_minute"] = result["steps"] / result["seconds"] * 60
    Path(args.result).write_text(json.dumps(result, indent=2))


def run_side(side: str, args, argv: list[str]) -> dict:
    result_path = Path(args.work_dir) / f"{side}.json"
    command = [
        sys.executable,
        __file__,
        *argv,
        "--work-dir",
        args.work_dir,
        "--worker",
        side,
        "--result",
        str(result_path),
    ]
    print(f"--- {side}: training in a subprocess", flush=True)
    # A busy neighbour on a small machine slows either side severalfold: measure how busy it was.
    started, busy, ours = time.perf_counter(), machine_cpu_seconds(), sum(os.times()[:4])
    completed = subprocess.run(command, cwd=ROOT)
    other = machine_cpu_seconds() - busy - (sum(os.times()[:4]) - ours)
    if completed.returncode != 0:
        return {"side": side, "error": f"exit status {completed.returncode} (its output is above)"}
    result = json.loads(result_path.read_text())
    result["other_cpu_share"] = max(0.0, other) / (
        (time.perf_counter() - started) * (os.cpu_count() or 1)
    )
    return result


def render(
    args, results: dict, start_acc: tuple[float, float], command: str, elapsed: float
) -> str:
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    lines = [
        f"### GRPO on CPU: `lmforge rl` vs TRL GRPOTrainer ({args.dtype})",
        "",
        f"Arithmetic prompts (`{TRAIN}`), reward `numeric_match`, {args.steps} optimizer steps of "
        f"{args.prompts_per_step} prompts x {args.group_size} completions (up to {args.max_tokens} tokens, "
        f"temperature {args.temperature}), micro-batch {args.micro_batch_size}, lr {args.lr} constant, no KL, "
        "one update per rollout. Each side trains in its own subprocess. Rollout tokens/s: completion tokens "
        "(through EOS) / seconds spent generating, over all rollouts and without the first (warm-up). "
        "Steps/min: over loading the model, training and saving the final model (`run_rl`; TRL: "
        "`from_pretrained`, `GRPOTrainer(...).train()`, `save_pretrained`). Held-out accuracy: the same "
        f"greedy evaluator for every model (lmforge engine, first {args.heldout} prompts of `{TEST}`, +- one standard error).",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, trl {trl_version}, "
        f"python {platform.python_version()}, torch threads {args.threads or torch.get_num_threads()}",
        f"- model: `{args.model}`; held-out accuracy before RL: {start_acc[0]:.3f} +- {start_acc[1]:.3f}",
        f"- total wall time {elapsed:.0f} s; other processes' share of the machine's CPU while each side "
        "trained: "
        + ", ".join(
            f"{side} {r['other_cpu_share']:.0%}"
            for side, r in results.items()
            if "other_cpu_share" in r
        )
        + (
            " (**busy machine: rerun on a quiet one, or with --threads set to the idle cores**)"
            if any(r.get("other_cpu_share", 0) > 0.1 for r in results.values())
            else ""
        ),
        "",
        "| implementation | rollout tokens/s | after the first rollout | first rollout (s) "
        "| optimizer steps/min | peak RSS (MiB) | mean completion tokens | reward first -> last step "
        "| held-out accuracy |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for side, r in results.items():
        if "error" in r:
            lines.append(f"| {side} | failed: {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {side} | {r['rollout_tokens_per_second']:,.0f} | "
            f"{r['steady_rollout_tokens_per_second']:,.0f} | {r['first_rollout_seconds']:.1f} | "
            f"{r['steps_per_minute']:.2f} | "
            f"{r['peak_rss_mib']:,.0f} | {r['mean_completion_length']:.1f} | "
            f"{r['reward_first']:.3f} -> {r['reward_last']:.3f} | "
            f"{r['heldout_accuracy']:.3f} +- {r['heldout_stderr']:.3f} |"
        )
    if (
        "lmforge" in results
        and "trl" in results
        and not any("error" in r for r in results.values())
    ):
        lm, tr = results["lmforge"], results["trl"]
        lines += [
            "",
            f"lmforge vs TRL: rollout {lm['rollout_tokens_per_second'] / tr['rollout_tokens_per_second']:.2f}x "
            f"({lm['steady_rollout_tokens_per_second'] / tr['steady_rollout_tokens_per_second']:.2f}x after "
            "the first rollout), "
            f"optimizer steps {lm['steps_per_minute'] / tr['steps_per_minute']:.2f}x, "
            f"held-out accuracy {lm['heldout_accuracy'] - tr['heldout_accuracy']:+.3f}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    started = time.perf_counter()
    if args.work_dir is None:
        args.work_dir = tempfile.mkdtemp(prefix="rl_vs_trl-")
    print(f"work dir: {args.work_dir}", flush=True)
    side_argv = [a for a in argv if a != "--write"]
    results = {side: run_side(side, args, side_argv) for side in args.sides}

    print(f"--- held-out accuracy ({args.heldout} prompts, greedy)", flush=True)
    start_acc = heldout_accuracy(args.model, args.heldout, args.max_tokens)
    for r in results.values():
        if "error" not in r:
            r["heldout_accuracy"], r["heldout_stderr"] = heldout_accuracy(
                r["final_model"], args.heldout, args.max_tokens
            )
    for side, r in results.items():
        print(side, json.dumps(r, indent=2), flush=True)

    command = ".venv/bin/python benchmarks/rl_vs_trl.py " + shlex.join(argv)
    block = render(args, results, start_acc, command, time.perf_counter() - started)
    print(block)
    if args.write:
        write_section("rl_vs_trl", block)


if __name__ == "__main__":
    main()
