"""Mixture of experts on a CPU: dense vs MoE at equal active parameters, load balancing, and
training throughput against HF transformers' Mixtral.

Three parts, each its own section of BENCHMARKS.md:

1. `moe_dense_vs_moe`: `lmforge train pretrain-small` on the bundled corpus for model.preset=small
   (dense) and model.preset=small-moe (8 experts of 352, top-2: the same active parameters),
   each for the same wall-clock budget. The trainer has no time limit, so the steps are sized
   from a calibration: both models' training steps are timed in this process in alternating
   rounds (best round counts, so a busy neighbour does not decide it), and each run gets
   budget x its tokens/s / tokens per step, with the same lr schedule shape (warmup a fixed share
   of the steps, cosine to 10%). Each run is its own subprocess: its peak RSS is its own.
2. `moe_balance`: small-moe for the same steps with the auxiliary loss (aux_loss_coef 0.01), with
   the auxiliary-loss-free bias instead (aux_loss_coef 0, bias_update_rate > 0), and with
   neither: final val_bpb and the max/min expert load (share x experts, 1.0 is even).
3. `moe_throughput`: forward + backward + fused AdamW of small-moe's shape in lmforge and in
   HF transformers' MixtralForCausalLM built from lmforge's export (config_to_hf, state_to_hf:
   the same weights, logits checked equal first), with every HF experts implementation that
   runs (eager, grouped_mm, batched_mm), in alternating rounds, fp32 and bf16 autocast.

    .venv/bin/python benchmarks/moe.py                                   # all three, writes BENCHMARKS.md
    .venv/bin/python benchmarks/moe.py --budget 20 --balance-steps 20 --steps 2 --rounds 1 --no-write
    .venv/bin/python benchmarks/moe.py --parts 3 --dtypes fp32 --no-write
    .venv/bin/python benchmarks/moe.py --tokens work/tokens              # reuse a token dataset
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from benchmarks.train_throughput import CpuMonitor, Impl, cpu_flags, cpu_model, describe  # noqa: E402
from lmforge import device as devices  # noqa: E402
from lmforge.device import autocast  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.transformer import Transformer, pop_aux_losses  # noqa: E402
from lmforge.train.config import OptimConfig  # noqa: E402
from lmforge.train.optim import build_optimizers  # noqa: E402

CORPUS = "lmforge://data/corpus/python_docs.jsonl.gz"
CPU = torch.device("cpu")
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 1,3")
    p.add_argument("--work", help="work dir for tokenizer, tokens and runs (default: a temporary one)")
    p.add_argument("--tokens", help="an existing token dataset dir (skips the tokenizer and tokenize steps)")
    p.add_argument("--vocab", type=int, default=4096, help="tokenizer vocabulary when one is trained")
    # part 1
    p.add_argument("--budget", type=float, default=180.0, help="part 1: training seconds per model")
    p.add_argument("--calib-steps", type=int, default=3, help="part 1: timed steps per calibration round")
    p.add_argument("--warmup-share", type=float, default=0.1, help="lr warmup as a share of the steps")
    # part 2
    p.add_argument("--balance-steps", type=int, default=120, help="part 2: steps per run")
    p.add_argument("--bias-rates", default="0.001,0.01",
                   help="part 2: model.moe.bias_update_rate of the auxiliary-loss-free runs, comma-separated")
    # part 3
    p.add_argument("--vocab-size", type=int, default=8192, help="part 3: model vocabulary")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="part 3: timed steps per round")
    p.add_argument("--warmup", type=int, default=2, help="part 3: untimed steps before each round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (parts 1 and 3); best counts")
    p.add_argument("--dtypes", default="fp32,bf16", help="part 3: fp32 and/or bf16 (autocast)")
    p.add_argument("--impls", default=",".join(HF_IMPLS), help="part 3: HF experts implementations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="print only; leave --out untouched")
    return p.parse_args(argv)


def command_line() -> str:
    python = sys.executable.replace(str(ROOT) + "/", "")
    return " ".join(shlex.quote(a) for a in [python, *sys.argv])


def machine_line() -> str:
    return (f"{cpu_model()} ({cpu_flags() or 'no avx512/amx flags'}), {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), python {platform.python_version()}")


def header(title: str, args, t0: float, other: float, extra: list[str]) -> list[str]:
    lines = [
        f"### {title}",
        "",
        f"- command: `{command_line()}`",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- machine: {machine_line()}",
        *extra,
        f"- other processes used {other:.0%} of the machine's CPU time while this part ran"
        + (" (**busy machine: wall-clock figures are noisy**)" if other > 0.1 else ""),
        f"- this part took {(time.perf_counter() - t0) / 60:.1f} min",
    ]
    return lines


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


# ----------------------------------------------------------------------------- data and runs


def lmforge_cli(*args: str, log: Path) -> tuple[float, int, int]:
    """Run an lmforge verb in its own process: (wall seconds, exit status, peak RSS in bytes).
    os.wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the max over all of them)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lmforge", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"lmforge {' '.join(args[:3])} failed (exit {proc.returncode}); log {log}:\n"
                 + log.read_text()[-3000:])
    rss = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return seconds, proc.returncode, rss


def prepare_tokens(args, work: Path) -> Path:
    if args.tokens:
        return Path(args.tokens)
    tokenizer, tokens = work / "tokenizer", work / "tokens"
    if not (tokens / "manifest.json").is_file():
        print("training the tokenizer and tokenizing the bundled corpus ...", flush=True)
        lmforge_cli("tokenizer", "train", "-i", CORPUS, "--out", str(tokenizer), "--vocab-size", str(args.vocab),
                    log=work / "tokenizer.log")
        lmforge_cli("tokenize", "-i", CORPUS, "--tokenizer", str(tokenizer), "--out", str(tokens),
                    "--val-fraction", "0.05", "--overwrite", log=work / "tokenize.log")
    return tokens


def dataset_vocab(tokens: Path) -> int:
    """model.vocab_size the trainer will pick: the tokenizer's, padded to 64."""
    vocab = json.loads((tokens / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    return -(-vocab // 64) * 64


@dataclass
class Run:
    label: str
    overrides: list[str]
    steps: int = 0
    wall: float = 0.0
    rss: int = 0
    other: float = 0.0
    records: list[dict] = field(default_factory=list)

    @property
    def train_records(self) -> list[dict]:
        return [r for r in self.records if "tokens_per_second" in r]

    @property
    def final(self) -> dict:
        return next((r for r in reversed(self.records) if "val_bpb" in r), {})

    def train_seconds(self) -> float:
        """Seconds of training steps (no validation, no checkpoint): each logged window's tokens / its rate."""
        seconds, seen = 0.0, 0
        for r in self.train_records:
            seconds += (r["tokens_seen"] - seen) / r["tokens_per_second"]
            seen = r["tokens_seen"]
        return seconds

    def tokens_per_second(self) -> float:
        seconds = self.train_seconds()
        recs = self.train_records
        return recs[-1]["tokens_seen"] / seconds if recs and seconds else float("nan")

    def starved(self, below: float = 0.1) -> str:
        """Experts under `below` of an even share in the last logged window, of all layers' experts."""
        recs = [r for r in self.records if "expert_load" in r]
        if not recs:
            return "—"
        loads = [x for row in recs[-1]["expert_load"] for x in row]
        return f"{sum(x < below for x in loads)} / {len(loads)}"

    def load(self, last: int = 3) -> tuple[float, float]:
        """expert_load_max/min, averaged over the last `last` logged windows."""
        recs = [r for r in self.records if "expert_load_max" in r][-last:]
        if not recs:
            return float("nan"), float("nan")
        return (sum(r["expert_load_max"] for r in recs) / len(recs),
                sum(r["expert_load_min"] for r in recs) / len(recs))


def train(run: Run, tokens: Path, work: Path, args) -> Run:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", run.label).strip("-")
    warmup = max(1, round(args.warmup_share * run.steps))
    cli = ["train", "pretrain-small", f"data.dataset={tokens}", f"run.out_dir={work / 'runs'}", f"run.name={name}",
           f"train.max_steps={run.steps}", f"schedule.warmup_steps={warmup}", "train.log_every=10",
           "train.eval_every=0", "train.checkpoint_every=0", "train.progress=false", *run.overrides, "--overwrite"]
    print(f"  {run.label}: lmforge {' '.join(cli)}", flush=True)
    monitor = ChildMonitor()
    with monitor:
        run.wall, _, run.rss = lmforge_cli(*cli, log=work / f"{name}.log")
    run.other = monitor.other_share
    run.records = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    final = run.final
    print(f"    {run.steps} steps in {run.wall:.0f} s ({run.train_seconds():.0f} s training), "
          f"{run.tokens_per_second():,.0f} tok/s, val_bpb {final.get('val_bpb', float('nan')):.4f}, "
          f"peak RSS {run.rss / 2**20:,.0f} MiB, other processes {run.other:.0%}", flush=True)
    return run


class ChildMonitor(CpuMonitor):
    """CpuMonitor counting this process's children (the training subprocess) as our own."""

    def __enter__(self):
        super().__enter__()
        self._own = sum(os.times()[:4])
        return self

    def __exit__(self, *exc):
        own = sum(os.times()[:4]) - self._own
        self.other += max(0.0, self._machine_busy() - self._busy - own)
        self.window += time.perf_counter() - self._t


# ----------------------------------------------------------------------------- part 1


def calibrate(configs: dict[str, ModelConfig], seq_len: int, micro: int, dtype, args) -> dict[str, float]:
    """Training tokens/s of each model here (forward + backward + AdamW on one micro-batch), alternating
    rounds, best round: the same step the trainer runs, without data loading and logging."""
    g = torch.Generator().manual_seed(args.seed)
    models = {}
    for label, config in configs.items():
        torch.manual_seed(args.seed)
        model = Transformer(config).train()
        models[label] = (model, build_optimizers(model, OptimConfig(), CPU))
    batch = torch.randint(0, next(iter(configs.values())).vocab_size, (micro, seq_len + 1), generator=g)
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def step(model, optimizers):
        with autocast(CPU, dtype):
            loss = model(inputs, targets)
            loss = loss + sum(pop_aux_losses(model).values())
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    rates: dict[str, list[float]] = {label: [] for label in configs}
    labels = list(configs)
    for r in range(args.rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            model, optimizers = models[label]
            step(model, optimizers)
            start = time.perf_counter()
            for _ in range(args.calib_steps):
                step(model, optimizers)
            rates[label].append(args.calib_steps * micro * seq_len / (time.perf_counter() - start))
            print(f"  calibration round {r + 1}: {label} {rates[label][-1]:,.0f} tok/s", flush=True)
    return {label: max(v) for label, v in rates.items()}


def recipe_config(overrides: list[str]):
    """pretrain-small's config with overrides, as `lmforge train` would build it."""
    import yaml

    from lmforge.train.config import TrainConfig

    data = yaml.safe_load((ROOT / "lmforge" / "configs" / "pretrain-small.yaml").read_text())
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        data.setdefault(section, {})[name] = yaml.safe_load(value)
    return TrainConfig.model_validate(data)


def part1(args, tokens: Path, work: Path) -> str:
    t0 = time.perf_counter()
    vocab = dataset_vocab(tokens)
    base = recipe_config([f"data.dataset={tokens}"])
    seq_len, micro = base.data.seq_len, base.train.micro_batch_size
    step_tokens = base.train.global_batch_tokens
    dtype = devices.compute_dtype(base.train.dtype, CPU)
    configs = {
        label: ModelConfig(preset=preset, vocab_size=vocab, max_seq_len=base.model.max_seq_len)
        for label, preset in (("dense (small)", "small"), ("MoE (small-moe)", "small-moe"))
    }
    print(f"part 1: dense vs MoE, {args.budget:.0f} s each; calibrating steps ...", flush=True)
    rates = calibrate(configs, seq_len, micro, dtype, args)
    runs = []
    for label, preset in zip(configs, ("small", "small-moe"), strict=True):
        steps = max(20, round(args.budget * rates[label] / step_tokens))
        runs.append(Run(label, [f"model.preset={preset}"], steps=steps))
    monitor = ChildMonitor()
    with monitor:
        for run in runs:
            train(run, tokens, work, args)
    lines = header(
        "Dense vs MoE at equal active parameters and equal wall time (bundled corpus, CPU)", args, t0,
        monitor.other_share,
        [f"- recipe: `lmforge train pretrain-small` (seq {seq_len}, {step_tokens:,} tokens/step, AdamW lr "
         f"{base.optim.lr}, cosine to {base.schedule.min_lr_ratio:.0%}, warmup {args.warmup_share:.0%} of the steps, "
         f"{devices.dtype_name(dtype)} compute) with `model.preset=small` / `model.preset=small-moe`, one subprocess each",
         f"- token dataset: `{tokens}` (bundled corpus `{CORPUS}`, vocab {vocab}); val_bpb on its held-out 5%",
         f"- budget {args.budget:.0f} s of training each: steps = budget x tokens/s measured in this process "
         f"(alternating rounds, best: " + ", ".join(f"{k} {v:,.0f}" for k, v in rates.items())
         + " tok/s) / tokens per step"],
    )
    lines += [
        "",
        "| model | params total | params active | steps | training time | wall time | tokens/s | val_bpb | val_loss | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run, config in zip(runs, configs.values(), strict=True):
        final = run.final
        lines.append(
            f"| {run.label} | {fmt_params(config.num_params())} | {fmt_params(config.num_params(active=True))} | "
            f"{run.steps} | {run.train_seconds():.0f} s | {run.wall:.0f} s | {run.tokens_per_second():,.0f} | "
            f"{final.get('val_bpb', float('nan')):.4f} | {final.get('val_loss', float('nan')):.4f} | "
            f"{run.rss / 2**20:,.0f} MiB |")
    lines += ["", "Training time: the logged windows' tokens over their tokens/s (steps only, no validation or "
              "checkpoint); wall time: the whole `lmforge train` process, start-up and final validation included."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- part 2


def part2(args, tokens: Path, work: Path) -> str:
    t0 = time.perf_counter()
    print(f"part 2: load balancing, small-moe, {args.balance_steps} steps each", flush=True)
    runs = [
        Run("aux loss 0.01", ["model.preset=small-moe"]),
        *(Run(f"aux-loss-free (bias rate {rate:g})",
              ["model.preset=small-moe", "model.moe.aux_loss_coef=0", f"model.moe.bias_update_rate={rate:g}"])
          for rate in (float(r) for r in args.bias_rates.split(",") if r)),
        Run("neither", ["model.preset=small-moe", "model.moe.aux_loss_coef=0", "model.moe.bias_update_rate=0"]),
        # The same steps (tokens) without experts: what the experts' extra parameters buy per token.
        Run("dense small, same steps (reference)", ["model.preset=small"]),
    ]
    monitor = ChildMonitor()
    with monitor:
        for run in runs:
            run.steps = args.balance_steps
            train(run, tokens, work, args)
    lines = header(
        "MoE load balancing: auxiliary loss vs auxiliary-loss-free bias vs neither (small-moe, CPU)", args, t0,
        monitor.other_share,
        [f"- recipe: `lmforge train pretrain-small model.preset=small-moe` + the overrides below, "
         f"{args.balance_steps} steps each, token dataset `{tokens}`; router z-loss 0.001 in all runs",
         "- expert load: each expert's share of its layer's tokens x 8 (1.0 is an even share), over the "
         "logged windows of 10 steps; max/min over all layers and experts, averaged over the last 3 windows"],
    )
    lines += [
        "",
        "| balancing | overrides | val_bpb | val_loss | expert load max | expert load min | experts under 0.1 "
        "(last window) | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        final, (high, low) = run.final, run.load()
        lines.append(f"| {run.label} | `{' '.join(o for o in run.overrides if o != 'model.preset=small-moe') or '(defaults)'}` | "
                     f"{final.get('val_bpb', float('nan')):.4f} | {final.get('val_loss', float('nan')):.4f} | "
                     f"{high:.2f} | {low:.2f} | {run.starved()} | {run.tokens_per_second():,.0f} |"
                     .replace("nan", "—"))
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- part 3


def export_hf(config: ModelConfig, model: Transformer, directory: Path) -> None:
    """lmforge's export, as `lmforge export` writes it: config.json and safetensors in HF names."""
    from safetensors.torch import save_file

    from lmforge.store.hf import config_to_hf, state_to_hf

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_hf(config, torch.float32, {}), indent=2))
    state = {k: v.detach().contiguous().clone() for k, v in state_to_hf(model.state_dict(), config).items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def hf_moe(directory: Path, impl: str, aux_coef: float):
    """transformers' own loading (its checkpoint conversion turns the per-expert tensors into its
    fused layout), with the experts implementation asked for and the aux loss on."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="sdpa", experts_implementation=impl,
        use_cache=False, output_router_logits=True, router_aux_loss_coef=aux_coef)


def batched_mm_bytes(config: ModelConfig, tokens: int) -> int:
    """HF's batched_mm indexes the expert weights per (token, k) pair: fp32 copies of one expert's
    three matrices for each, per layer, all saved for backward."""
    return tokens * config.moe.top_k * 3 * config.dim * config.expert_ffn_dim * 4 * config.n_layers


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def lmforge_loss(model, inputs, targets) -> torch.Tensor:
    """Cross-entropy plus the model's weighted auxiliary losses, as the trainer adds them."""
    return model(inputs, targets) + sum(pop_aux_losses(model).values())


def hf_loss(model, inputs, targets) -> torch.Tensor:
    """HF shifts the labels itself and adds router_aux_loss_coef x its aux loss."""
    return model(input_ids=inputs, labels=inputs).loss


def hf_optimizer(model, config: OptimConfig) -> list:
    """lmforge's grouping: weight decay on matrices (and stacked experts), none on vectors."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return [torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=True)]


def part3(args) -> str:
    t0 = time.perf_counter()
    config = ModelConfig(preset="small-moe", vocab_size=args.vocab_size, max_seq_len=max(512, args.seq_len),
                         moe={"router_z_loss_coef": 0.0})  # HF's Mixtral has no router z-loss
    aux_coef = config.moe.aux_loss_coef
    impl_names = [s for s in args.impls.split(",") if s]
    tokens_per_step = args.batch_size * args.seq_len
    g = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    check = torch.randint(0, config.vocab_size, (2, 64), generator=g)
    print(f"part 3: training throughput, small-moe shape, {tokens_per_step} tokens/step", flush=True)

    def build() -> list[Impl]:
        torch.manual_seed(args.seed)
        lm = Transformer(config)
        export = Path(tempfile.mkdtemp(prefix="lmforge-moe-hf-"))
        export_hf(config, lm, export)
        impls = [Impl("lmforge", lm, build_optimizers(lm, OptimConfig(), CPU), lmforge_loss)]
        lm.eval()
        with torch.no_grad():
            expected = lm(check)
        lm.train()
        for name in impl_names:
            impl = Impl(f"HF Mixtral ({name})", None, [], hf_loss)
            if name == "batched_mm" and batched_mm_bytes(config, tokens_per_step) > 0.5 * physical_memory():
                impl.error = (f"skipped: batched_mm gathers each token's top-{config.moe.top_k} experts' weights, "
                              f"{batched_mm_bytes(config, tokens_per_step) / 2**30:.0f} GiB kept for backward at "
                              f"{tokens_per_step:,} tokens/step, more than half this machine's "
                              f"{physical_memory() / 2**30:.0f} GiB")
                print(f"  {impl.name}: {impl.error}", flush=True)
                impls.append(impl)
                continue
            try:
                hf = hf_moe(export, name, aux_coef)
                if hf.config._experts_implementation != name:
                    raise RuntimeError(f"asked for {name}, got {hf.config._experts_implementation}")
                hf.eval()
                with torch.no_grad():
                    diff = (hf(check).logits - expected).abs().max().item()
                if diff > 1e-3:
                    raise RuntimeError(f"logits differ from lmforge's by {diff:.2e}")
                print(f"  {impl.name}: logits equal to lmforge's (max |diff| {diff:.1e})", flush=True)
                hf.train()
                impl.model, impl.optimizers = hf, hf_optimizer(hf, OptimConfig())
            except Exception as exc:  # noqa: BLE001 - reported, the others still run
                impl.error = describe(exc)
                print(f"  {impl.name}: unavailable ({impl.error})", flush=True)
            impls.append(impl)
        return impls

    n_total, n_active = config.num_params(), config.num_params(active=True)
    results: dict[str, list[Impl]] = {}
    monitor = CpuMonitor()
    for dtype_name in [s for s in args.dtypes.split(",") if s]:
        dtype = devices.dtype(dtype_name, "--dtypes")
        impls = build()  # fresh weights and optimizers per dtype: the same start for everyone
        live = [i for i in impls if not i.error]
        for r in range(args.rounds):
            print(f"  {dtype_name} round {r + 1}/{args.rounds}", flush=True)
            for impl in live if r % 2 == 0 else live[::-1]:
                if impl.error:
                    continue
                with monitor:
                    try:
                        for _ in range(args.warmup):
                            loss = impl.step(inputs, targets, dtype)
                            if impl.first_loss is None:
                                impl.first_loss = loss.item()
                        start = time.perf_counter()
                        for _ in range(args.steps):
                            loss = impl.step(inputs, targets, dtype)
                        loss.item()
                        elapsed = time.perf_counter() - start
                    except Exception as exc:  # noqa: BLE001
                        impl.error = describe(exc)
                        print(f"    {impl.name}: FAILED ({impl.error})", flush=True)
                        continue
                impl.rounds.append(args.steps * tokens_per_step / elapsed)
                print(f"    {impl.name:<26} {impl.rounds[-1]:>8,.0f} tok/s ({elapsed / args.steps * 1e3:6.0f} ms/step)",
                      flush=True)
        results[dtype_name] = impls

    import transformers

    lines = header(
        "MoE training throughput: lmforge vs HF transformers' Mixtral (small-moe shape, CPU)", args, t0,
        monitor.other_share,
        [f"- transformers {transformers.__version__}; HF model: `MixtralForCausalLM` from lmforge's export "
         "(`config_to_hf`, `state_to_hf` -> safetensors -> `from_pretrained(experts_implementation=...)`), logits checked equal to lmforge's "
         "(fp32, eval) before timing; attention sdpa on both",
         f"- shape: dim {config.dim}, {config.n_layers} layers, {config.moe.num_experts} experts of "
         f"{config.expert_ffn_dim}, top-{config.moe.top_k}, vocab {config.vocab_size}; {fmt_params(n_total)} "
         f"parameters, {fmt_params(n_active)} active; batch {args.batch_size} x seq {args.seq_len} = "
         f"{tokens_per_step:,} tokens/step",
         f"- step: forward + backward + fused AdamW (same hyperparameters and decay groups); loss = cross-entropy "
         f"+ {aux_coef} x load-balancing loss on both (lmforge's per layer, HF's over all layers; no router z-loss)",
         f"- {args.rounds} alternating rounds x {args.steps} timed steps after {args.warmup} warm-up steps; best "
         "round reported; fresh, identical weights per dtype"],
    )
    lines += [
        "",
        "| dtype | implementation | tokens/s | steps/s | lmforge / this | rounds (tok/s) | first loss |",
        "|---|---|---:|---:|---:|---|---:|",
    ]
    for dtype_name, impls in results.items():
        lm = impls[0]
        for impl in impls:
            if not impl.rounds:
                lines.append(f"| {dtype_name} | {impl.name} | {impl.error if impl.error.startswith('skipped') else 'failed: ' + str(impl.error)} | | | | |")
                continue
            rounds = ", ".join(f"{r:,.0f}" for r in impl.rounds)
            ratio = "—" if impl is lm else f"{lm.best / impl.best:.2f}x"
            lines.append(f"| {dtype_name} | {impl.name} | {impl.best:,.0f} | {impl.best / tokens_per_step:.2f} | "
                         f"{ratio} | {rounds} | {impl.first_loss:.4f} |")
    lines.append("")
    for dtype_name, impls in results.items():
        hf = [i for i in impls[1:] if i.rounds]
        if hf and impls[0].rounds:
            best = max(hf, key=lambda i: i.best)
            lines.append(f"- {dtype_name}: fastest HF implementation {best.name}; lmforge / it = "
                         f"**{impls[0].best / best.best:.2f}x**")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    parts = {int(p) for p in args.parts.split(",") if p}
    work = Path(args.work or tempfile.mkdtemp(prefix="lmforge-moe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{machine_line()}; work dir {work}", flush=True)
    out = Path(args.out)
    if not out.is_absolute():
        out = Path.cwd() / out
    tokens = prepare_tokens(args, work) if parts & {1, 2} else None
    for number, name, run in ((1, "moe_dense_vs_moe", lambda: part1(args, tokens, work)),
                              (2, "moe_balance", lambda: part2(args, tokens, work)),
                              (3, "moe_throughput", lambda: part3(args))):
        if number not in parts:
            continue
        section = run()
        print()
        print(section, flush=True)
        if not args.no_write:
            write_section(name, section, out)
            print(f"wrote section {name} to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
