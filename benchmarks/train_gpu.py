"""Training throughput on one GPU the way `lmforge train` runs it (bf16 FSDP2 + compiled blocks), and
the inference engine's decode throughput.

For each preset the model goes through train/parallel.py exactly as in a run
(`parallel.strategy=fsdp` in a one-process group: bf16 gathered weights, fp32 gradient
reduction and fp32 master weights; `train.compile=true`; optional activation
checkpointing), with lmforge's fused AdamW and gradient clipping. One step: forward with
loss -> backward -> clip -> optimizer step, on a fixed random batch. Reported per preset and
variant: tokens/s, MFU (ModelConfig.flops_per_token against the GPU's dense bf16 datasheet peak
from lmforge.train.mfu; a device not in that table is measured, and the table says "of measured
matmul peak") and peak allocated memory.

    .venv/bin/python benchmarks/train_gpu.py                              # 125m, 350m, llama3-1b
    .venv/bin/python benchmarks/train_gpu.py --presets llama3-1b --batch-size 8 --ac selective
    .venv/bin/python benchmarks/train_gpu.py --device cpu --presets tiny --steps 2 --warmup 1 \\
        --variants eager --decode-batch 4 --decode-tokens 8 --no-write    # smoke test of the code path

Results go to stdout and into BENCHMARKS.md between the train_gpu markers.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.sections import write_section  # noqa: E402
from lmforge.model.config import ModelConfig  # noqa: E402
from lmforge.model.presets import PRESETS  # noqa: E402
from lmforge.model.transformer import Transformer  # noqa: E402
from lmforge.train import distributed  # noqa: E402
from lmforge.train.config import OptimConfig, ParallelConfig  # noqa: E402
from lmforge.train.mfu import peak_flops, peak_flops_basis  # noqa: E402
from lmforge.train.optim import build_optimizers  # noqa: E402
from lmforge.train.parallel import clip_gradients, grad_norm, parallelize  # noqa: E402

# Micro-batch sizes that fit an 80 GB H100 at seq 2048 with bf16 FSDP2 and no activation checkpointing.
DEFAULT_BATCH = {"125m": 16, "350m": 12, "llama3-1b": 6}
VARIANTS = {"fsdp+compile": ("fsdp", True), "fsdp": ("fsdp", False), "eager": ("single", False)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="125m,350m,llama3-1b", help="comma-separated preset names")
    p.add_argument("--variants", default="fsdp+compile,fsdp", help=f"comma-separated: {', '.join(VARIANTS)}")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=None, help="micro-batch; default per preset")
    p.add_argument("--vocab-size", type=int, default=32768, help="for presets without their own")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--ac", choices=["none", "full", "selective"], default="none", help="activation checkpointing")
    p.add_argument("--decode", action=argparse.BooleanOptionalAction, default=True,
                   help="also the inference engine's decode throughput per preset (eager and engine.compile)")
    p.add_argument("--decode-batch", type=int, default=64, help="sequences decoded together (engine.max_num_seqs)")
    p.add_argument("--decode-prompt", type=int, default=128, help="prompt tokens per sequence")
    p.add_argument("--decode-tokens", type=int, default=256, help="new tokens per sequence (EOS ignored)")
    p.add_argument("--out", default="BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


@dataclass
class Result:
    preset: str
    variant: str
    params: int
    batch: int
    tokens_per_second: float = 0.0
    mfu: float = 0.0
    peak_memory_gib: float = 0.0
    loss: float = float("nan")
    compile_seconds: float = 0.0
    error: str | None = None


def build_model(preset: str, args, device: torch.device, vocab_size: int | None = None) -> Transformer:
    overrides = {} if PRESETS[preset].get("vocab_size") else {"vocab_size": vocab_size or args.vocab_size}
    config = ModelConfig(preset=preset, max_seq_len=max(args.seq_len, 8), **overrides)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.init_weights(torch.Generator(device=device).manual_seed(0) if device.type == "cuda" else None)
    return model


def measure(preset: str, variant: str, args, env: distributed.DistEnv) -> Result:
    device, dtype = env.device, torch.bfloat16
    strategy, compile = VARIANTS[variant]
    batch = args.batch_size or DEFAULT_BATCH.get(preset, 8)
    model = build_model(preset, args, device)
    config = model.config
    result = Result(preset, variant, config.num_params(), batch)
    parallel = ParallelConfig(strategy=strategy, activation_checkpointing=args.ac)
    model = parallelize(model, parallel, env, dtype, compile=compile)
    optimizers = build_optimizers(model, OptimConfig(lr=3e-4), device)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (batch, args.seq_len + 1), generator=g).to(device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    # FSDP's mixed-precision policy casts the weights; the eager baseline uses autocast.
    autocast = torch.autocast(device.type, dtype=dtype, enabled=strategy == "single")

    def step() -> torch.Tensor:
        with autocast:
            loss = model(inputs, targets)
        loss.backward()
        clip_gradients(params, 1.0, grad_norm(params))
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    try:
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        sync()
        result.compile_seconds = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        elapsed = time.perf_counter() - start
        result.loss = loss.item()
        result.tokens_per_second = args.steps * batch * args.seq_len / elapsed
        result.mfu = config.flops_per_token(args.seq_len) * result.tokens_per_second / peak_flops(device, dtype)
        if device.type == "cuda":
            result.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    except torch.OutOfMemoryError:
        result.error = f"out of memory at micro-batch {batch}"
    except Exception as exc:  # noqa: BLE001 - recorded in the table, the other rows still run
        result.error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    return result


@dataclass
class DecodeResult:
    preset: str
    engine: str
    params: int
    tokens_per_second: float = 0.0
    seconds: float = 0.0
    error: str | None = None


def measure_decode(preset: str, compiled: bool, args, device: torch.device) -> DecodeResult:
    """lmforge's engine (what `lmforge serve` runs) in bf16 on `device`: --decode-batch sequences of
    --decode-prompt random prompt tokens, each decoding --decode-tokens new ones greedily, in one
    `run_to_completion` (prefill included); output tokens/s over the whole batch."""
    from lmforge.serve.config import EngineConfig
    from lmforge.serve.engine import Engine
    from lmforge.serve.sampling import SamplingParams

    tokenizer = decode_tokenizer()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the engine's defaults
    vocab = tokenizer.vocab_size if not PRESETS[preset].get("vocab_size") else None
    model = build_model(preset, args, device, vocab_size=vocab).to(dtype).eval()
    result = DecodeResult(preset, "eager" if not compiled else "engine.compile", model.config.num_params())
    try:
        engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=args.decode_batch, device=device.type,
                                                       compile=compiled))
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, min(tokenizer.vocab_size, model.config.vocab_size),
                                (args.decode_batch, args.decode_prompt), generator=g).tolist()
        warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        engine.run_to_completion(prompts[: min(4, len(prompts))], warm)  # compilation happens here
        params = SamplingParams(max_tokens=args.decode_tokens, temperature=0.0, ignore_eos=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        outputs = engine.run_to_completion(prompts, params)
        if device.type == "cuda":
            torch.cuda.synchronize()
        result.seconds = time.perf_counter() - start
        result.tokens_per_second = sum(len(o.token_ids) for o in outputs) / result.seconds
    except torch.OutOfMemoryError:
        result.error = f"out of memory at {args.decode_batch} sequences"
    except Exception as exc:  # noqa: BLE001 - recorded in the table, the other rows still run
        result.error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
    return result


_TOKENIZER = []


def decode_tokenizer():
    """A byte-level BPE trained on the bundled corpus (8,192 tokens), once per process."""
    if not _TOKENIZER:
        import gzip
        import json

        from lmforge.tokenizer import train_tokenizer

        corpus = ROOT / "lmforge" / "data" / "corpus" / "python_docs.jsonl.gz"
        with gzip.open(corpus, "rt", encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        _TOKENIZER.append(train_tokenizer(iter(texts), vocab_size=8192))
    return _TOKENIZER[0]


def render_decode(args, results: list[DecodeResult]) -> str:
    lines = [
        "",
        f"Inference engine decode (`lmforge serve`'s engine, in-process): {args.decode_batch} sequences of "
        f"{args.decode_prompt} random prompt tokens, {args.decode_tokens} new tokens each (greedy, EOS ignored), "
        "one batch, prefill included; bf16 on CUDA.",
        "",
        "| preset | params | engine | output tokens/s | seconds |",
        "|---|---:|---|---:|---:|",
    ]
    for r in results:
        value = f"failed: {r.error} | " if r.error else f"{r.tokens_per_second:,.0f} | {r.seconds:.1f}"
        lines.append(f"| {r.preset} | {r.params / 1e6:,.0f}M | {r.engine} | {value} |")
    return "\n".join(lines) + "\n"


def release_memory(device: torch.device) -> None:
    """Between measurements: the last model, optimizer and compiled graphs are garbage."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def render(args, results: list[Result], device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak, basis = peak_flops_basis(device, torch.bfloat16)
    lines = [
        "### Training on one GPU: bf16 FSDP2 + compiled blocks (lmforge train's code path)",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv)}`",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- device: {name}; MFU is against its {basis} (bf16, dense): {peak / 1e12:,.3g} TFLOP/s",
        f"- torch {torch.__version__}, python {platform.python_version()}",
        f"- seq {args.seq_len}; {args.steps} timed steps after {args.warmup} warm-up steps; "
        f"activation checkpointing: {args.ac}; AdamW (fused) + clipping; random tokens",
        "",
        f"| preset | params | variant | micro-batch | tokens/s | MFU (of {basis}) | peak memory | warm-up (s) |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.preset} | {r.params / 1e6:,.0f}M | {r.variant} | {r.batch} | failed: {r.error} | | | |")
            continue
        lines.append(
            f"| {r.preset} | {r.params / 1e6:,.0f}M | {r.variant} | {r.batch} | {r.tokens_per_second:,.0f} | "
            f"{r.mfu:.1%} | {r.peak_memory_gib:.1f} GiB | {r.compile_seconds:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    env = distributed.init(args.device, need_group=True)  # FSDP2 needs a (one-process) group
    if env.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    results = []
    try:
        for preset in args.presets.split(","):
            for variant in args.variants.split(","):
                print(f"{preset} / {variant} ...", flush=True)
                r = measure(preset, variant, args, env)
                release_memory(env.device)
                print(f"  {r.error or f'{r.tokens_per_second:,.0f} tok/s, MFU {r.mfu:.1%}, peak {r.peak_memory_gib:.1f} GiB'}",
                      flush=True)
                results.append(r)
        decode = []
        for preset in args.presets.split(",") if args.decode else []:
            for compiled in (False, True):
                print(f"{preset} / decode {'compiled' if compiled else 'eager'} ...", flush=True)
                d = measure_decode(preset, compiled, args, env.device)
                release_memory(env.device)
                print(f"  {d.error or f'{d.tokens_per_second:,.0f} output tok/s'}", flush=True)
                decode.append(d)
    finally:
        distributed.shutdown(env)
    section = render(args, results, env.device) + (render_decode(args, decode) if decode else "")
    print()
    print(section)
    if not args.no_write:
        out = Path(args.out) if Path(args.out).is_absolute() else Path.cwd() / args.out
        write_section("train_gpu", section, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
