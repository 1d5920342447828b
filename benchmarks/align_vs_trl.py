"""SFT and DPO on CPU: `lmforge sft` / `lmforge dpo` against TRL's SFTTrainer / DPOTrainer, the same work.

Same starting model (an exported HF model dir), same data (the first --pairs preference pairs,
the first --conversations chats of the shipped Python-docs sets), same rows per step, steps,
sequence budget, learning rate (constant), AdamW settings, dtype (autocast) and seed. DPO: the
sigmoid loss at the same beta against reference log-probs computed once before training on
both sides (TRL: `precompute_ref_log_probs=True`). SFT: one conversation per row, no packing,
loss on every token (TRL trains on every token of a `messages` dataset; lmforge `loss_on: all`).

Each (task, side) trains in its own subprocess. Measured: wall time of that subprocess (Python
start-up and imports included), the in-process span (load the model, prepare the data,
reference pass, train, save the final model), the seconds of the optimizer steps alone, real
tokens/s (non-pad tokens the training forwards saw / step seconds), peak resident memory, and a
quality figure from one evaluator for both final models (lmforge's code, fp32): DPO preference
accuracy (the policy's implicit reward ranks chosen above rejected, against the starting model)
and SFT loss per token on the training conversations.

    .venv/bin/python benchmarks/align_vs_trl.py --model quickstart/model --write
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
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

from benchmarks.rl_vs_trl import WEIGHT_SUFFIXES, machine_cpu_seconds, peak_rss_mib  # noqa: E402
from benchmarks.sections import write_section  # noqa: E402
from lmforge.align import data as align_data  # noqa: E402
from lmforge.jsonl import load_jsonl  # noqa: E402

PAIRS = "lmforge://data/chat/python_docs_preferences.jsonl.gz"
CHATS = "lmforge://data/chat/python_docs_chat.jsonl.gz"
TASKS = ("dpo", "sft")
SIDES = ("lmforge", "trl")
LR = {"dpo": 5e-6, "sft": 1e-4}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model dir (lmforge export) both sides start from")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--batch", type=int, default=8, help="pairs (DPO) or conversations (SFT) per step")
    p.add_argument("--seq-len", type=int, default=256, help="token budget per sequence")
    p.add_argument("--pairs", type=int, default=160)
    p.add_argument("--conversations", type=int, default=144)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads, both sides (default: all cores)")
    p.add_argument("--work-dir", default=None, help="runs and final models (default: a temp dir)")
    p.add_argument("--write", action="store_true", help="put the section into BENCHMARKS.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # TASK:SIDE, in a subprocess
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_data(args, out: Path) -> dict[str, Path]:
    """The same records for both sides, as files: lmforge reads JSONL, TRL a `datasets.Dataset`."""
    out.mkdir(parents=True, exist_ok=True)
    pairs = [record for _, record in load_jsonl(PAIRS, "pairs")][: args.pairs]
    chats = [{"messages": record["messages"]} for _, record in load_jsonl(CHATS, "chats")][: args.conversations]
    paths = {"dpo": out / "pairs.jsonl", "sft": out / "chats.jsonl"}
    for task, records in (("dpo", pairs), ("sft", chats)):
        paths[task].write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


# ----------------------------------------------------------------------------- lmforge side


def run_lmforge(task: str, args, data: Path, out_dir: Path, meter: dict) -> str:
    """`lmforge sft` / `lmforge dpo` through the Python API; returns the run dir."""
    from lmforge.align import objectives
    from lmforge.align.config import AlignConfig
    from lmforge.align.run import run_dpo, run_sft
    from lmforge.train.trainer import Trainer

    pad_id = {}
    objective_class = objectives.DPOObjective if task == "dpo" else objectives.SFTObjective
    batch, train_step = objective_class.batch, Trainer.train_step

    def counting_batch(self, step, micro_step):
        out = batch(self, step, micro_step)
        meter["tokens"] += int((out["inputs"] != pad_id["id"]).sum())
        return out

    def timed_step(self, stop_requested):
        pad_id.setdefault("id", self.tokenizer.pad_id)
        started = time.perf_counter()
        try:
            return train_step(self, stop_requested)
        finally:
            meter["step_seconds"] += time.perf_counter() - started

    objective_class.batch, Trainer.train_step = counting_batch, timed_step
    config = AlignConfig.model_validate({
        "model": args.model,
        "run": {"name": task, "out_dir": str(out_dir), "seed": args.seed},
        "data": {"train": str(data), "val_fraction": 0.0, "seq_len": args.seq_len, "pack": False, "loss_on": "all"},
        "dpo": {"beta": args.beta, "loss": "sigmoid"},
        "optim": {"lr": LR[task], "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "train": {"max_steps": args.steps, "micro_batch_size": args.batch, "global_batch_tokens": args.batch * args.seq_len,
                  "dtype": args.dtype, "eval_every": 0, "checkpoint_every": 0, "log_every": 10},
    })
    result = (run_dpo if task == "dpo" else run_sft)(config)
    return str(result.run_dir)


# ----------------------------------------------------------------------------- TRL side


def run_trl(task: str, args, data: Path, out_dir: Path, meter: dict) -> str:
    """TRL's DPOTrainer / SFTTrainer on CPU; returns the final model dir (the starting dir, new weights)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    from lmforge.train.config import OptimConfig

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            meter["step_seconds"] += time.perf_counter() - self.started

    def counting(trainer_class):
        class Counting(trainer_class):
            def training_step(self, model, inputs, *rest, **kw):
                masks = [v for k, v in inputs.items() if k.endswith("attention_mask")]
                meter["tokens"] += int(sum(m.sum() for m in masks))
                return super().training_step(model, inputs, *rest, **kw)
        return Counting

    optim = OptimConfig()
    common = dict(
        output_dir=str(out_dir / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=LR[task], lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=optim.beta1, adam_beta2=optim.beta2, adam_epsilon=optim.eps,
        max_grad_norm=optim.grad_clip, gradient_checkpointing=False, use_cpu=True, bf16=args.dtype == "bf16",
        fp16=False, seed=args.seed, data_seed=args.seed, logging_steps=10, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, max_length=args.seq_len,
    )
    records = [json.loads(line) for line in data.read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if task == "dpo":
        rows = [{"prompt": prompt, "chosen": chosen, "rejected": rejected}
                for _, prompt, chosen, rejected in align_data.read_preferences(data)]
        config = DPOConfig(**common, beta=args.beta, loss_type=["sigmoid"], precompute_ref_log_probs=True)
        trainer = counting(DPOTrainer)(model=model, args=config, train_dataset=Dataset.from_list(rows),
                                       processing_class=tokenizer, callbacks=[StepTimer()])
    else:
        config = SFTConfig(**common, packing=False, padding_free=False)
        trainer = counting(SFTTrainer)(model=model, args=config, train_dataset=Dataset.from_list(records),
                                       processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    final = out_dir / "final"
    shutil.copytree(args.model, final, ignore=shutil.ignore_patterns(*(f"*{s}" for s in WEIGHT_SUFFIXES)), dirs_exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as saved:
        trainer.model.save_pretrained(saved, safe_serialization=True)
        for path in Path(saved).iterdir():
            if path.name.endswith(WEIGHT_SUFFIXES):
                shutil.move(str(path), final / path.name)
    return str(final)


RUNNERS = {"lmforge": run_lmforge, "trl": run_trl}


# ----------------------------------------------------------------------------- one evaluator


@torch.no_grad()
def quality(task: str, model_path: str, args, data: Path, reference: torch.Tensor | None = None):
    """DPO: [pairs, 2] reply log-probs (and, given the start's, preference accuracy); SFT: loss per token."""
    from lmforge.align.objectives import reference_logprobs
    from lmforge.store.loading import load_model

    model, tokenizer, _ = load_model(model_path, "cpu", torch.float32)
    if task == "dpo":
        pairs = [align_data.encode_preference(tokenizer, p, c, r, args.seq_len) for _, p, c, r in align_data.read_preferences(data)]
        chosen = align_data.build_rows_exact([pair.chosen for pair in pairs], args.seq_len, tokenizer.pad_id)
        rejected = align_data.build_rows_exact([pair.rejected for pair in pairs], args.seq_len, tokenizer.pad_id)
        logprobs = reference_logprobs(model, chosen, rejected, torch.device("cpu"), torch.float32)
        if reference is None:
            return logprobs
        margin = (logprobs[:, 0] - reference[:, 0]) - (logprobs[:, 1] - reference[:, 1])
        return (margin > 0).float().mean().item()
    sequences = [align_data.encode_conversation(tokenizer, messages, "all", args.seq_len, tools)
                 for _, messages, tools in align_data.read_conversations(data)]
    rows = align_data.build_rows(sequences, args.seq_len, tokenizer.pad_id, pack=False)
    model.eval()
    total = count = 0.0
    for start in range(0, len(rows), 8):
        batch = rows.select(list(range(start, min(start + 8, len(rows))))).trimmed()
        trained = int((batch.targets != -100).sum())
        total += model(batch.inputs, batch.targets).item() * trained
        count += trained
    return total / count


# ----------------------------------------------------------------------------- driver


def worker(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    task, side = args.worker.split(":")
    out_dir = Path(args.work_dir) / f"{task}-{side}"
    out_dir.mkdir(parents=True, exist_ok=True)
    meter = {"tokens": 0, "step_seconds": 0.0}
    started = time.perf_counter()
    final = RUNNERS[side](task, args, Path(args.work_dir) / "data" / ("pairs.jsonl" if task == "dpo" else "chats.jsonl"),
                          out_dir, meter)
    result = {"final_model": final, "seconds": time.perf_counter() - started, **meter, "peak_rss_mib": peak_rss_mib()}
    Path(args.result).write_text(json.dumps(result, indent=2))


def run_one(task: str, side: str, args, argv: list[str]) -> dict:
    result_path = Path(args.work_dir) / f"{task}-{side}.json"
    command = [sys.executable, __file__, *argv, "--work-dir", args.work_dir, "--worker", f"{task}:{side}",
               "--result", str(result_path)]
    print(f"--- {task} {side}: training in a subprocess", flush=True)
    started, busy, ours = time.perf_counter(), machine_cpu_seconds(), sum(os.times()[:4])
    completed = subprocess.run(command, cwd=ROOT)
    wall = time.perf_counter() - started
    other = machine_cpu_seconds() - busy - (sum(os.times()[:4]) - ours)
    if completed.returncode != 0:
        return {"error": f"exit status {completed.returncode} (its output is above)"}
    result = json.loads(result_path.read_text())
    result["wall_seconds"] = wall
    result["other_cpu_share"] = max(0.0, other) / (wall * (os.cpu_count() or 1))
    return result


def render(args, results: dict, start: dict, command: str) -> str:
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = "not installed"
    lines = [
        f"### SFT and DPO on CPU: lmforge vs TRL ({args.dtype})",
        "",
        f"The same exported model, {args.steps} optimizer steps of {args.batch} rows (DPO: the first {args.pairs} pairs of "
        f"`{PAIRS}`, beta {args.beta}, sigmoid loss, reference log-probs computed once up front on both sides; SFT: the "
        f"first {args.conversations} chats of `{CHATS}`, one per row, no packing, loss on every token), "
        f"at most {args.seq_len} tokens a sequence, constant lr (DPO {LR['dpo']}, SFT {LR['sft']}), the same AdamW, "
        f"{args.dtype} autocast. Each run is its own subprocess. Wall: that process, imports included. In-process: load, "
        "data, reference pass, train, save. Steps: the optimizer steps alone. Real tokens/s: non-pad tokens in the "
        "training forwards / step seconds. Quality by one evaluator (lmforge, fp32) for both final models: DPO "
        "preference accuracy on the training pairs (the share whose chosen reply gained more log-probability than the "
        "rejected one, against the starting model), SFT loss per token on the training chats (before training: "
        f"{start.get('sft', float('nan')):.3f}).",
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl_version}, python {platform.python_version()}, "
        f"torch threads {args.threads or torch.get_num_threads()}",
        "- other processes' share of the CPU while each trained: "
        + ", ".join(f"{task} {side} {r['other_cpu_share']:.0%}" for (task, side), r in results.items() if "other_cpu_share" in r),
        "",
        "| task | implementation | wall s | in-process s | steps s | real tokens | real tokens/s | peak RSS (MiB) | quality |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (task, side), r in results.items():
        if "error" in r:
            lines.append(f"| {task} | {side} | failed: {r['error']} | | | | | | |")
            continue
        label = "preference accuracy" if task == "dpo" else "loss/token"
        lines.append(f"| {task} | {side} | {r['wall_seconds']:.1f} | {r['seconds']:.1f} | {r['step_seconds']:.1f} | "
                     f"{r['tokens']:,} | {r['tokens'] / r['step_seconds']:,.0f} | {r['peak_rss_mib']:,.0f} | "
                     f"{label} {r['quality']:.3f} |")
    lines.append("")
    for task in args.tasks:
        lm, tr = results.get((task, "lmforge"), {}), results.get((task, "trl"), {})
        if "wall_seconds" in lm and "wall_seconds" in tr:
            lines.append(f"- {task}: lmforge / TRL wall {tr['wall_seconds'] / lm['wall_seconds']:.2f}x faster, "
                         f"steps {tr['step_seconds'] / lm['step_seconds']:.2f}x, real tokens/s "
                         f"{(lm['tokens'] / lm['step_seconds']) / (tr['tokens'] / tr['step_seconds']):.2f}x")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    if args.work_dir is None:
        args.work_dir = tempfile.mkdtemp(prefix="align_vs_trl-")
    args.work_dir = str(Path(args.work_dir).resolve())
    args.model = str(Path(args.model).resolve())
    print(f"work dir: {args.work_dir}", flush=True)
    data = write_data(args, Path(args.work_dir) / "data")
    side_argv = [a for a in argv if a != "--write"] + ["--model", args.model]  # the last --model wins
    results = {(task, side): run_one(task, side, args, side_argv) for task in args.tasks for side in args.sides}
    print("--- quality, one evaluator", flush=True)
    start = {}
    if "dpo" in args.tasks:
        reference = quality("dpo", args.model, args, data["dpo"])
    if "sft" in args.tasks:
        start["sft"] = quality("sft", args.model, args, data["sft"])
    for (task, _), r in results.items():
        if "error" not in r:
            r["quality"] = quality(task, r["final_model"], args, data[task], reference if task == "dpo" else None)
    for key, r in results.items():
        print(key, json.dumps(r, indent=2), flush=True)
    command = ".venv/bin/python benchmarks/align_vs_trl.py " + shlex.join(argv)
    block = render(args, results, start, command)
    print(block)
    if args.write:
        write_section("align_vs_trl", block)


if __name__ == "__main__":
    main()
