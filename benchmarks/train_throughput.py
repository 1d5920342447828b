"""Training throughput: lmforge's Transformer against HF transformers' LlamaForCausalLM.

Both models get the same shape, the same weights (lmforge's random init copied into the HF
model), the same random token batch, the same dtype/autocast and an AdamW with the same
hyperparameters (fused). One training step is: zero_grad -> forward with loss -> backward
-> optimizer step. Implementations are measured in alternating rounds (A B, then B A, ...)
and the best round counts, so that a noisy neighbour does not decide the comparison.

    .venv/bin/python benchmarks/train_throughput.py                 # small preset, bf16
    .venv/bin/python benchmarks/train_throughput.py --compile       # + lmforge with torch.compile
    .venv/bin/python benchmarks/train_throughput.py --preset 50m --seq-len 256 --no-write

Results go to stdout and into BENCHMARKS.md between the train_throughput markers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.peers import PEERS  # noqa: E402
from benchmarks.sections import write_section  # noqa: E402
from lmforge import device as devices  # noqa: E402
from lmforge.device import autocast  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.presets import PRESETS  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.train.config import OptimConfig  # noqa: E402
from lmforge.train.mfu import MEASURED, measured_matmul_peak  # noqa: E402
from lmforge.train.optim import build_optimizers  # noqa: E402
from lmforge.train.parallel import apply_compile  # noqa: E402

DEVICE = torch.device("cpu")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", choices=list(PRESETS))
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before each round")
    p.add_argument(
        "--rounds", type=int, default=3, help="alternating measurement rounds; best one counts"
    )
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--compile", action="store_true", help="also measure lmforge with each block compiled"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="print only; leave --out untouched")
    p.add_argument("--section", default="train_throughput", help="the BENCHMARKS.md section to write")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- models


def build_config(args) -> ModelConfig:
    max_seq_len = max(PRESETS[args.preset].get("max_seq_len", 0), args.seq_len)
    return ModelConfig(preset=args.preset, vocab_size=args.vocab_size, max_seq_len=max_seq_len)


def build_lmforge(config: ModelConfig, seed: int) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config)


def build_hf(config: ModelConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        hidden_size=config.dim,
        intermediate_size=config.ffn_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_seq_len,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.norm_eps,
        tie_word_embeddings=config.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        initializer_range=config.init_std,
        attn_implementation="sdpa",
        # Training: a KV cache would only cost time.
        use_cache=False,
    )
    return LlamaForCausalLM(hf_config)


@torch.no_grad()
def copy_weights(src: Transformer, dst) -> None:
    """lmforge -> HF Llama: split the fused qkv and gate/up projections (same rotate-half RoPE)."""
    c = src.config
    q_size, kv_size = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    dst.model.embed_tokens.weight.copy_(src.tok_embeddings.weight)
    for a, b in zip(src.layers, dst.model.layers, strict=True):
        q, k, v = a.attn.wqkv.weight.split([q_size, kv_size, kv_size], dim=0)
        b.self_attn.q_proj.weight.copy_(q)
        b.self_attn.k_proj.weight.copy_(k)
        b.self_attn.v_proj.weight.copy_(v)
        b.self_attn.o_proj.weight.copy_(a.attn.wo.weight)
        gate, up = a.ffn.w13.weight.chunk(2, dim=0)
        b.mlp.gate_proj.weight.copy_(gate)
        b.mlp.up_proj.weight.copy_(up)
        b.mlp.down_proj.weight.copy_(a.ffn.w2.weight)
        b.input_layernorm.weight.copy_(a.attn_norm.weight)
        b.post_attention_layernorm.weight.copy_(a.ffn_norm.weight)
    dst.model.norm.weight.copy_(src.norm.weight)
    if not c.tie_embeddings:
        dst.lm_head.weight.copy_(src.output.weight)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------- measurement


@dataclass
class Impl:
    name: str
    model: torch.nn.Module
    optimizers: list
    loss_fn: object  # (model, inputs, targets) -> loss
    error: str | None = None
    rounds: list[float] = field(default_factory=list)  # tokens/s per round
    first_loss: float | None = None
    last_loss: float | None = None

    def step(self, inputs, targets, dtype) -> torch.Tensor:
        with autocast(DEVICE, dtype):
            loss = self.loss_fn(self.model, inputs, targets)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    @property
    def best(self) -> float:
        return max(self.rounds) if self.rounds else float("nan")


def describe(exc: BaseException) -> str:
    first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{type(exc).__name__}: {first_line}"


def lmforge_loss(model, inputs, targets):
    return model(inputs, targets)


def hf_loss(model, inputs, targets):
    # HF shifts labels internally: positions 0..T-2 predict inputs[1..T-1]. Same T positions
    # go through the network (and the output head) as in lmforge; the loss covers T-1 of them.
    return model(input_ids=inputs, labels=inputs).loss


def hf_optimizer(model, config: OptimConfig) -> list[torch.optim.Optimizer]:
    """The same grouping and hyperparameters as lmforge's build_optimizers: decay on matrices."""
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    vectors = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": matrices, "weight_decay": config.weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, fused=True
    )
    return [opt]


def run_round(
    impl: Impl, inputs, targets, dtype, warmup: int, steps: int, tokens_per_step: int
) -> None:
    if impl.error:
        return
    try:
        for _ in range(warmup):
            loss = impl.step(inputs, targets, dtype)
            if impl.first_loss is None:
                impl.first_loss = loss.item()
        start = time.perf_counter()
        for _ in range(steps):
            loss = impl.step(inputs, targets, dtype)
        loss_value = loss.item()  # CPU: synchronous anyway; .item() keeps the loss honest
        elapsed = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - recorded in the report, the others still run
        impl.error = describe(exc)
        print(f"  {impl.name}: FAILED ({impl.error})", flush=True)
        return
    impl.last_loss = loss_value
    rate = steps * tokens_per_step / elapsed
    impl.rounds.append(rate)
    print(
        f"  {impl.name:<24} {rate:>10,.0f} tok/s  ({elapsed / steps * 1e3:7.1f} ms/step, loss {loss_value:.3f})",
        flush=True,
    )


class CpuMonitor:
    """How much CPU other processes used while we measured: a busy neighbour on a small machine
    (OpenMP threads descheduled at every barrier) can slow a step down tenfold."""

    def __init__(self):
        self.other = self.window = 0.0

    @staticmethod
    def _machine_busy() -> float:
        try:
            fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self._t, self._busy, self._own = (
            time.perf_counter(),
            self._machine_busy(),
            sum(os.times()[:2]),
        )
        return self

    def __exit__(self, *exc):
        own = sum(os.times()[:2]) - self._own
        self.other += max(0.0, self._machine_busy() - self._busy - own)
        self.window += time.perf_counter() - self._t

    @property
    def other_share(self) -> float:
        """Other processes' CPU time as a share of the whole machine's capacity."""
        return self.other / (self.window * (os.cpu_count() or 1)) if self.window else 0.0


# ----------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    wanted = [f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return " ".join(wanted)


def render(
    args, config, impls, peak, fpt, tokens_per_step, n_lm, n_hf, compile_note, elapsed, monitor
) -> str:
    import transformers

    hf = next(i for i in impls if i.name.startswith("HF"))
    lines = [
        f"### Training throughput: lmforge vs HF transformers and litgpt ({args.preset}, {args.dtype})",
        "",
        "Forward + backward + fused AdamW step, tokens/second, same process, same weights and batch.",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in [sys.executable.replace(str(ROOT) + '/', '')] + sys.argv)}`",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}",
        f"- CPU: {cpu_model()} ({cpu_flags() or 'no avx512/amx flags'}), "
        f"torch threads: {torch.get_num_threads()}, cpu capability: {torch.backends.cpu.get_cpu_capability()}",
        f"- shape: preset `{args.preset}` dim={config.dim} layers={config.n_layers} heads={config.n_heads} "
        f"kv_heads={config.n_kv_heads} ffn={config.ffn_dim} vocab={config.vocab_size} "
        f"tied={config.tie_embeddings}; batch {args.batch_size} x seq {args.seq_len} = {tokens_per_step} tokens/step",
        f"- parameters: lmforge {n_lm:,}, HF {n_hf:,}"
        + (" (equal)" if n_lm == n_hf else " (**DIFFERENT**)"),
        f"- training FLOPs/token (ModelConfig.flops_per_token): {fpt / 1e6:.1f} MFLOP",
        f"- measured {args.dtype} matmul peak (lmforge.train.mfu.measured_matmul_peak): {peak / 1e12:.3f} TFLOP/s; "
        "MFU below is against it, not a datasheet peak",
        f"- {args.rounds} alternating rounds x {args.steps} timed steps (after {args.warmup} warm-up steps each); "
        f"best round reported; total wall time {elapsed:.0f} s",
        f"- other processes used {monitor.other_share:.0%} of the machine's CPU time while this measured"
        + (
            " (**busy machine: figures are unreliable, rerun on a quiet machine**)"
            if monitor.other_share > 0.1
            else ""
        ),
    ]
    if compile_note:
        lines.append(f"- compile: {compile_note}")
    lines += [
        "",
        # A CPU has no datasheet peak lmforge knows: MFU here is against the measured matmul peak.
        f"| implementation | tokens/s | speedup vs HF | MFU (of {MEASURED}) | rounds (tok/s) |",
        "|---|---:|---:|---:|---|",
    ]
    for impl in impls:
        if impl.error and not impl.rounds:
            lines.append(f"| {impl.name} | failed: {impl.error} | | | |")
            continue
        speed = impl.best / hf.best if hf.rounds else float("nan")
        mfu = fpt * impl.best / peak
        rounds = ", ".join(f"{r:,.0f}" for r in impl.rounds)
        lines.append(f"| {impl.name} | {impl.best:,.0f} | {speed:.2f}x | {mfu:.1%} | {rounds} |")
    losses = ", ".join(f"{i.name} {i.first_loss:.4f}" for i in impls if i.first_loss is not None)
    lines += ["", f"First-step loss (same weights, sanity check): {losses}."]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = devices.dtype(args.dtype, "--dtype")
    config = build_config(args)
    tokens_per_step = args.batch_size * args.seq_len
    fpt = config.flops_per_token(args.seq_len)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}", flush=True
    )
    peak = measured_matmul_peak("cpu", dtype)
    print(f"measured {args.dtype} matmul peak: {peak / 1e12:.3f} TFLOP/s", flush=True)

    lm = build_lmforge(config, args.seed)
    hf = build_hf(config)
    copy_weights(lm, hf)
    n_lm, n_hf = n_params(lm), n_params(hf)
    print(
        f"parameters: lmforge {n_lm:,}  HF {n_hf:,}  ({'equal' if n_lm == n_hf else 'DIFFERENT'})",
        flush=True,
    )
    if n_lm != n_hf:
        print(
            "WARNING: parameter counts differ; the comparison is not like for like", file=sys.stderr
        )
    lm.train()
    hf.train()

    optim_config = OptimConfig()
    impls = [
        Impl("lmforge", lm, build_optimizers(lm, optim_config, DEVICE), lmforge_loss),
        Impl("HF transformers (sdpa)", hf, hf_optimizer(hf, optim_config), hf_loss),
    ]
    for name, build in PEERS.items():
        try:
            model, loss_fn = build(lm)
        except ImportError as exc:
            impls.append(Impl(name, None, [], None, error=f"not installed ({exc.name})"))
            continue
        print(f"parameters: {name} {n_params(model):,}", flush=True)
        impls.append(Impl(name, model.train(), hf_optimizer(model, optim_config), loss_fn))

    compile_note = None
    if args.compile:
        lmc = build_lmforge(config, args.seed)
        impl = Impl(
            "lmforge + compile", lmc, build_optimizers(lmc, optim_config, DEVICE), lmforge_loss
        )
        try:
            apply_compile(lmc)
        except Exception as exc:  # noqa: BLE001
            impl.error = describe(exc)
        impls.append(impl)

    g = torch.Generator().manual_seed(args.seed)
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
    inputs, targets = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    if args.compile and not impls[-1].error:
        # Compilation happens in the first steps; time it apart so the rounds see steady state.
        compiled = impls[-1]
        print("compiling lmforge blocks (first steps) ...", flush=True)
        c0 = time.perf_counter()
        try:
            for _ in range(2):
                loss = compiled.step(inputs, targets, dtype)
                if compiled.first_loss is None:
                    compiled.first_loss = loss.item()
            compile_note = (
                "each block via Module.compile(); compile + first 2 steps took "
                f"{time.perf_counter() - c0:.0f} s (less when the inductor cache is warm)"
            )
        except Exception as exc:  # noqa: BLE001
            compiled.error = describe(exc)
        if compiled.error:
            compile_note = f"unavailable ({compiled.error})"
            print(f"compile: {compile_note}", flush=True)
    elif args.compile:
        compile_note = f"unavailable ({impls[-1].error})"

    monitor = CpuMonitor()
    for r in range(args.rounds):
        order = impls if r % 2 == 0 else list(reversed(impls))
        print(f"round {r + 1}/{args.rounds}", flush=True)
        for impl in order:
            with monitor:
                run_round(impl, inputs, targets, dtype, args.warmup, args.steps, tokens_per_step)
    if monitor.other_share > 0.1:
        print(
            f"WARNING: other processes used {monitor.other_share:.0%} of the CPUs during the measurement; "
            "the figures are unreliable",
            file=sys.stderr,
        )

    section = render(
        args,
        config,
        impls,
        peak,
        fpt,
        tokens_per_step,
        n_lm,
        n_hf,
        compile_note,
        time.perf_counter() - t0,
        monitor,
    )
    print()
    print(section)
    if not args.no_write:
        out = Path(args.out)
        if not out.is_absolute():
            out = Path.cwd() / out
        write_section(args.section, section, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
